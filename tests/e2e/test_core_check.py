"""scripts/gpu_check_core.sh's parts (megatron_intuitor.core_check) on CPU at their small sizes,
in a process that can import only what a bare GPU machine has (torch, transformers, their
dependencies) plus what the check's install adds (megatron-core, psutil, omegaconf and their
dependencies): the package imports without vLLM, Ray or Transformer Engine, and every part
passes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from repo_paths import REPO

# The distributions the child may import from, with everything they require.
INSTALLED = ["torch", "transformers", "megatron-core", "psutil", "omegaconf"]
# The check's install on top of torch + transformers (docs/gpu.md lists these wheels).
CARRIED = ["megatron-core", "psutil", "omegaconf", "antlr4-python3-runtime"]

# Run in the child: the path finder stops finding every top-level module outside the standard
# library (by name or by place), this repository and those distributions (and what they
# vendor), as if not installed (`find_spec` returns None, which is how transformers and
# megatron-core probe for optional packages).
CHILD = """
import importlib.machinery, importlib.metadata as md, json, sys, sysconfig, tempfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

def closure(names):
    seen, todo = set(), [canonicalize_name(name) for name in names]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            for line in md.distribution(name).requires or []:
                requirement = Requirement(line)
                if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                    todo.append(canonicalize_name(requirement.name))
    return seen

INSTALLED = closure(%r)
ALLOWED = {top for top, dists in md.packages_distributions().items()
           if any(canonicalize_name(dist) in INSTALLED for dist in dists)}
ALLOWED |= set(sys.stdlib_module_names) | {"megatron_intuitor"}

STDLIB = sysconfig.get_path("stdlib")
SITE = sysconfig.get_path("purelib")
VENDORED = tuple(f"{SITE}/{top}/" for top in ALLOWED)  # e.g. setuptools/_vendor/jaraco

class BareGpuMachine(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in ALLOWED:
            return super().find_spec(name, path, target)
        if path is None:  # a top-level name: only from sys.path entries inside allowed packages
            vendored = super().find_spec(name, [entry for entry in sys.path
                                                if entry.startswith(VENDORED)], target)
            if vendored is not None:
                return vendored
        spec = super().find_spec(name, path, target)
        origin = (spec and spec.origin) or ""
        in_stdlib = origin.startswith(STDLIB) and not origin.startswith(SITE)
        return spec if in_stdlib or origin.startswith(VENDORED) else None

sys.meta_path[:] = [BareGpuMachine if finder is importlib.machinery.PathFinder else finder
                    for finder in sys.meta_path]
"""
CHILD += """
from megatron_intuitor import core_check, parallel

results = [core_check.check_scoring(small=True)]
for check in (core_check.check_logits, core_check.check_ppo):
    with tempfile.TemporaryDirectory() as scratch:
        results.append(check(Path(scratch), small=True))
    parallel.destroy()
blocked = []
for name in ("ray", "transformer_engine", "vllm"):
    try:
        __import__(name)
    except ModuleNotFoundError:
        blocked.append(name)
print(json.dumps({"results": results, "blocked": blocked,
                  "carried": sorted(closure(%r) - closure(["torch", "transformers"]))}))
"""


@pytest.mark.slow
def test_core_check_parts_pass_on_cpu_without_vllm_ray_or_transformer_engine():
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    child = CHILD % (INSTALLED, CARRIED)
    run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["blocked"] == ["ray", "transformer_engine", "vllm"]
    assert report["carried"] == sorted(CARRIED)
    scoring, logits, ppo = report["results"]
    assert scoring["ok"] and max(scoring["fused_vs_float64_max_abs"].values()) < 1e-4
    assert logits["ok"] and logits["packed_log_probs_diff"]["max"] < 1e-4  # fp32 vs fp32
    assert ppo["ok"] and ppo["optimizers"] == ["DistributedOptimizer"]
    assert ppo["weights_equal_after_reload"] and ppo["optimizer_state_equal_after_reload"]
