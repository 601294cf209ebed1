"""scripts/gpu_check_core.sh's parts (megatron_intuitor.core_check) on CPU at their small sizes,
in a process where vLLM, Ray and Transformer Engine cannot be imported (as on a bare GPU machine
with only torch, transformers and megatron-core): the package imports without them and every
part passes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from repo_paths import REPO

# Run in the child: the path finder stops finding these packages, as if not installed (so
# `find_spec` returns None, which is how transformers and megatron-core probe for them).
CHILD = """
import importlib.machinery, json, sys, tempfile
from pathlib import Path

ABSENT = {"vllm", "ray", "transformer_engine", "transformer_engine_torch"}

class WithoutGpuStack(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            return None
        return super().find_spec(name, path, target)

sys.meta_path[:] = [WithoutGpuStack if finder is importlib.machinery.PathFinder else finder
                    for finder in sys.meta_path]
from megatron_intuitor import core_check, parallel

results = [core_check.check_scoring(small=True)]
for check in (core_check.check_logits, core_check.check_ppo):
    with tempfile.TemporaryDirectory() as scratch:
        results.append(check(Path(scratch), small=True))
    parallel.destroy()
blocked = []
for name in sorted(ABSENT):
    try:
        __import__(name)
    except ModuleNotFoundError:
        blocked.append(name)
print(json.dumps({"results": results, "blocked": blocked,
                  "imported": sorted(m for m in sys.modules if m.partition(".")[0] in ABSENT)}))
"""


@pytest.mark.slow
def test_core_check_parts_pass_on_cpu_without_vllm_ray_or_transformer_engine():
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["blocked"] == ["ray", "transformer_engine", "transformer_engine_torch", "vllm"]
    assert report["imported"] == []
    scoring, logits, ppo = report["results"]
    assert scoring["ok"] and max(scoring["fused_vs_float64_max_abs"].values()) < 1e-4
    assert logits["ok"] and logits["packed_log_probs_diff"]["max"] < 1e-4  # fp32 vs fp32
    assert ppo["ok"] and ppo["optimizers"] == ["DistributedOptimizer"]
    assert ppo["weights_equal_after_reload"] and ppo["optimizer_state_equal_after_reload"]
