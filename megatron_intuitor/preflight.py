"""The launch scripts' preflight: everything that can be checked in seconds, before Ray, Megatron
and vLLM spend minutes starting, each problem with what to fix.

    python -m megatron_intuitor.preflight [--dry-run] [--command CMD] [--log-path-out FILE] -- OVERRIDES

Composes, resolves and validates the config of `python -m megatron_intuitor.main OVERRIDES`
(`megatron_intuitor.config`: every key, data files, model path, parallel sizes, GPUs visible on
a single node), reads every row of the data files as the trainer does, then checks what the config cannot know: the python and package versions the
project pins, the Ray cluster of a multi-node run, whether a hub model is cached, the free disk
for checkpoints. The report goes to stderr; exit status 1 if anything must be fixed.

--te-build: only the headers Transformer Engine's torch extension compiles against (run it from
the clone before `pip install -e ".[gpu]"`; it needs only the standard library).
--dry-run: stdout gets the command (a comment) and the resolved config, valid YAML.
--log-path-out FILE: creates <logger.log_dir>/<experiment>_<timestamp>.log, starting with the
command, this report and the resolved config, and writes its path into FILE (the script appends
the run's output).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Mapping, Optional

DISTRIBUTION = "megatron-intuitor"
# Megatron checkpoint bytes per parameter: the model (<= 4) and the distributed optimizer's fp32
# main copy and two Adam moments (12).
CHECKPOINT_BYTES_PER_PARAM = 16
GIB = 1024 ** 3
# What tools/prepare_data.py writes, as <output-dir>/<dataset>/<split>.parquet.
PREPARED_DATASETS = ("gsm8k", "math", "math500", "arc_challenge", "humaneval")
PREPARE_DATA = Path(__file__).resolve().parent.parent / "tools" / "prepare_data.py"


class Report:
    """Check results, printed as they come (stderr) and counted."""

    def __init__(self) -> None:
        colour = os.environ.get("MI_COLOR")
        if colour is None:
            colour = "1" if sys.stderr.isatty() and not os.environ.get("NO_COLOR") else "0"
        self._colour = colour == "1"
        self.errors = 0
        self.lines: list[str] = []  # plain text, for the log file

    def _print(self, mark: str, ansi: str, message: str) -> None:
        self.lines.append(f"{mark} {message}")
        if self._colour:
            mark = f"\033[{ansi}m{mark}\033[0m"
        print(f"  {mark} {message}", file=sys.stderr, flush=True)

    def ok(self, message: str) -> None:
        self._print("ok  ", "32", message)

    def warn(self, message: str) -> None:
        self._print("warn", "33", message)

    def error(self, message: str) -> None:
        self.errors += 1
        self._print("FAIL", "31", message)


# ------------------------------------------------------------------------------ the machine


def _requirements(extra: str) -> list:
    """The project's requirements for `extra` (cpu | gpu), from its installed metadata."""
    from packaging.requirements import Requirement

    requirements = []
    for line in metadata.requires(DISTRIBUTION) or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
            requirements.append(requirement)
    return requirements


def check_python_and_packages(report: Report, device: str) -> None:
    """Python and every pinned package (the `cpu` or `gpu` extra by `device`) at its version."""
    from packaging.specifiers import SpecifierSet

    try:
        requires_python = metadata.metadata(DISTRIBUTION)["Requires-Python"] or ""
    except metadata.PackageNotFoundError:
        report.warn(f"{DISTRIBUTION} is not installed, so its pinned versions cannot be checked: "
                    f"pip install -e '.[{'gpu' if device == 'cuda' else 'cpu'}]' (see README)")
        return
    version = platform.python_version()
    if version in SpecifierSet(requires_python):
        report.ok(f"python {version} ({sys.executable})")
    else:
        report.error(f"python {version} ({sys.executable}) but {DISTRIBUTION} needs python "
                     f"{requires_python}: use another interpreter (PYTHON=/path/to/python)")
    extra = "gpu" if device == "cuda" else "cpu"
    problems, checked = [], 0
    for requirement in _requirements(extra):
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{requirement.name} is missing (wanted {requirement})")
            continue
        checked += 1
        if requirement.specifier and installed not in requirement.specifier:
            problems.append(f"{requirement.name} {installed} is installed, {requirement} wanted")
    for problem in problems:
        report.error(f"{problem}: pip install -e '.[{extra}]'")
    if not problems:
        report.ok(f"{checked} pinned packages at their versions ({DISTRIBUTION}[{extra}])")
    if device == "cpu" and importlib.util.find_spec("torchvision") is not None:
        report.warn("torchvision is installed: its PyPI build breaks `import vllm` next to the "
                    "CPU torch; pip uninstall -y torchvision torchaudio torchcodec")


# Transformer Engine's three distributions: the Python package, its CUDA 13 core library (CUDA
# 13 like the torch vLLM 0.32.0 pins) and the torch extension built against the installed torch.
TE_DISTRIBUTIONS = ("transformer_engine", "transformer_engine_cu13", "transformer_engine_torch")


def check_transformer_engine(report: Report) -> None:
    """On GPU the model is built from Transformer Engine's layer spec: its three parts at one
    version, no CUDA 12 core next to CUDA 13, and `transformer_engine.pytorch` importable (the
    import is where a CUDA or torch ABI mismatch shows)."""
    versions = {}
    for name in TE_DISTRIBUTIONS + ("transformer_engine_cu12",):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    missing = [name for name in TE_DISTRIBUTIONS if name not in versions]
    if missing:
        report.error(f"Transformer Engine: {', '.join(missing)} not installed: see docs/gpu.md "
                     f"(`python -m megatron_intuitor.preflight --te-build` checks the headers "
                     f"its build needs)")
        return
    if len({versions[name] for name in TE_DISTRIBUTIONS}) > 1:
        report.error(f"Transformer Engine parts at different versions "
                     f"{ {name: versions[name] for name in TE_DISTRIBUTIONS} }: reinstall them "
                     f"together (docs/gpu.md)")
    if "transformer_engine_cu12" in versions:
        report.error("transformer_engine_cu12 is installed next to transformer_engine_cu13: "
                     "pip uninstall -y transformer_engine_cu12")
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure is the finding
        report.error(f"import transformer_engine.pytorch failed ({type(error).__name__}: "
                     f"{error}): rebuild transformer_engine_torch against this torch "
                     f"(docs/gpu.md)")
        return
    report.ok(f"Transformer Engine {versions['transformer_engine']} (core cu13, torch "
              f"extension) imports")


# What the build of transformer_engine_torch 2.20.2 includes besides the CUDA toolkit's headers
# (csrc/common.h: <cudnn.h>, csrc/extensions.h: <nccl.h>), which the toolkit does not ship. Its
# build adds only the toolkit's include directory (build_tools/pytorch.py through
# build_tools/utils.py `get_cuda_include_dirs`), or with NVTE_BUILD_USE_NVIDIA_WHEELS=1 (or no
# toolkit) those of the NVIDIA wheels; gcc also searches CPATH and CPLUS_INCLUDE_PATH. The pip
# package that has each header for CUDA 13:
TE_BUILD_HEADERS = {"cudnn.h": "nvidia-cudnn-cu13", "nccl.h": "nvidia-nccl-cu13"}
# common/cudnn_min_version.h: static_assert(CUDNN_VERSION >= 91200), "built against cuDNN 9.12.0
# or later headers".
TE_MIN_CUDNN = (9, 12, 0)


def te_build_include_dirs(env: Mapping[str, str], wheel_dirs: list[Path]) -> list[Path]:
    """The directories the compiler searches for the TE torch extension's headers, in order
    (`wheel_dirs`: the NVIDIA wheels' include directories)."""
    toolkit = _cuda_toolkit_include(env)
    if toolkit is not None and env.get("NVTE_BUILD_USE_NVIDIA_WHEELS", "0") == "0":
        dirs = [toolkit]
    else:
        dirs = list(wheel_dirs)
    for variable in ("CPATH", "CPLUS_INCLUDE_PATH"):
        dirs += [Path(entry) for entry in env.get(variable, "").split(os.pathsep) if entry]
    return dirs


def _cuda_toolkit_include(env: Mapping[str, str]) -> Optional[Path]:
    """`<toolkit>/include` of the nvcc TE's build finds (build_tools/utils.py `nvcc_path`):
    $CUDA_HOME/bin, an NVIDIA wheel's (nvidia/cu<N>/bin), PATH, /usr/local/cuda/bin."""
    candidates = [Path(env["CUDA_HOME"]) / "bin" / "nvcc"] if env.get("CUDA_HOME") else []
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidates += sorted(Path(root).glob("cu[0-9]*/bin/nvcc"), reverse=True)
    on_path = shutil.which("nvcc", path=env.get("PATH", ""))
    candidates += [Path(on_path)] if on_path else []
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for nvcc in candidates:
        if nvcc.is_file():
            include = nvcc.resolve().parent.parent / "include"
            return include if include.is_dir() else None
    return None


def nvidia_wheel_include_dirs() -> list[Path]:
    """`include` directories of the installed NVIDIA wheels (`nvidia/<component>/include`; the
    CUDA 13 torch pulls nvidia-cudnn-cu13 and nvidia-nccl-cu13)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(path for root in spec.submodule_search_locations
                  for path in Path(root).glob("*/include") if path.is_dir())


def cudnn_header_version(include_dir: Path) -> Optional[tuple[int, int, int]]:
    """The cuDNN version the headers in `include_dir` declare (cudnn_version.h since cuDNN 8)."""
    for name in ("cudnn_version.h", "cudnn.h"):
        header = include_dir / name
        if header.is_file():
            text = header.read_text(errors="replace")
            parts = [re.search(rf"#define\s+CUDNN_{part}\s+(\d+)", text)
                     for part in ("MAJOR", "MINOR", "PATCHLEVEL")]
            if all(parts):
                major, minor, patch = (int(match.group(1)) for match in parts)
                return major, minor, patch
    return None


def check_te_build_headers(report: Report, env: Mapping[str, str] = os.environ,
                           wheel_dirs: Optional[list[Path]] = None) -> None:
    """Before `pip install` compiles transformer_engine_torch: each header it needs beyond the
    CUDA toolkit is on the compiler's search path, else where it is (an NVIDIA wheel: the
    CPATH to export) or which package has it; cuDNN's headers are >= 9.12."""
    wheels = nvidia_wheel_include_dirs() if wheel_dirs is None else wheel_dirs
    searched = te_build_include_dirs(env, wheels)
    cudnn_dir = None
    for header, package in TE_BUILD_HEADERS.items():
        found = next((path for path in searched if (path / header).is_file()), None)
        if found is not None:
            report.ok(f"{header} for Transformer Engine's build: {found}")
            cudnn_dir = found if header == "cudnn.h" else cudnn_dir
            continue
        in_wheel = next((path for path in wheels if (path / header).is_file()), None)
        fix = (f"export CPATH={in_wheel}${{CPATH:+:$CPATH}} (the {package} wheel's headers)"
               if in_wheel else f"pip install {package}, then export CPATH=<its include "
                                f"directory>")
        report.error(f"Transformer Engine's torch extension includes {header}, in none of the "
                     f"directories its build searches "
                     f"({', '.join(map(str, searched)) or 'none: no CUDA toolkit found'}): {fix}")
    if cudnn_dir is not None:
        version = cudnn_header_version(cudnn_dir)
        wanted = ".".join(map(str, TE_MIN_CUDNN))
        if version is None or version < TE_MIN_CUDNN:
            found = ".".join(map(str, version)) if version else "of unknown version"
            report.error(f"cuDNN headers in {cudnn_dir} are {found}; Transformer Engine 2.20.2 "
                         f"compiles only against cuDNN >= {wanted} (a static_assert): "
                         f"pip install 'nvidia-cudnn-cu13>={wanted}' and put its include "
                         f"directory first in CPATH")


def check_ray_cluster(report: Report, cfg) -> None:
    """A multi-node run joins a running Ray cluster with enough nodes and GPUs (or CPUs)."""
    trainer = cfg.trainer
    if trainer.nnodes == 1:
        return
    address = trainer.ray_address
    start_hint = ("start one: `ray start --head --port=6379` on the head node, then `ray start "
                  "--address=<head-ip>:6379` on each other node (see README, Multi-node)")
    if not address:
        report.error(f"trainer.nnodes={trainer.nnodes} needs a running Ray cluster but "
                     f"trainer.ray_address is null: set trainer.ray_address=auto (the launch "
                     f"scripts do with N_NODES>1) and {start_hint}")
        return
    from ray._private.services import canonicalize_bootstrap_address

    try:
        bootstrap = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as error:
        report.error(f"no Ray cluster found for trainer.ray_address={address} ({error}); "
                     f"{start_hint}")
        return
    host, _, port = bootstrap.rpartition(":")
    try:  # ray.init retries for minutes against an address nobody listens on
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        report.error(f"cannot reach the Ray cluster at {bootstrap} ({error}); {start_hint}")
        return
    # The address as configured, as the trainer connects: Ray's token authentication depends on
    # how the cluster was named (found by "auto" on this node, or given).
    probe = ("import json, ray\n"
             f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
             "print(json.dumps([sum(n['Alive'] for n in ray.nodes()), ray.cluster_resources()]))")
    try:
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                timeout=90)
    except subprocess.TimeoutExpired:
        report.error(f"the Ray cluster at {bootstrap} did not answer in 90 s; check `ray status`")
        return
    try:
        nodes, resources = json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        if "InvalidAuthToken" in result.stderr or "AuthenticationError" in result.stderr:
            report.error(f"the Ray cluster at {bootstrap} wants its auth token: set "
                         f"RAY_AUTH_MODE=token (Ray sends the token unasked only to a cluster it "
                         f"found itself, not to RAY_ADDRESS or an explicit address), with the "
                         f"cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN")
        else:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            report.error(f"cannot join the Ray cluster at {bootstrap}: {last}")
        return
    wanted_nodes = trainer.nnodes
    unit = "GPU" if trainer.device == "cuda" else "CPU"
    per_rank = 1 if unit == "GPU" else trainer.cpus_per_worker
    wanted = trainer.nnodes * trainer.n_gpus_per_node * per_rank
    have = resources.get(unit, 0)
    if nodes < wanted_nodes:
        report.error(f"the Ray cluster at {bootstrap} has {nodes} live node(s), trainer.nnodes="
                     f"{wanted_nodes}: run `ray start --address={bootstrap}` on the missing "
                     f"nodes, or lower N_NODES")
    elif have < wanted:
        report.error(f"the Ray cluster at {bootstrap} has {have:g} {unit}s, the run needs "
                     f"{wanted:g} (trainer.nnodes x trainer.n_gpus_per_node)")
    else:
        report.ok(f"Ray cluster at {bootstrap}: {nodes} nodes, {have:g} {unit}s")


def _hf_config(cfg) -> Optional[dict]:
    """The model's config.json, when readable without a download."""
    path = cfg.model.path
    if not path:
        return None
    local = Path(path) / "config.json"
    if local.is_file():
        try:
            return json.loads(local.read_text())
        except ValueError:  # not JSON (or not UTF-8): the config validation named it
            return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json")
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None


def check_model(report: Report, cfg) -> None:
    """Where the weights come from: made locally, a local checkpoint, or the hub (cached?)."""
    path = cfg.model.path
    if not path:
        report.ok("model: a tiny Qwen2 made locally (model.make_tiny)")
        return
    from megatron_intuitor import input_files

    if Path(path).is_dir():
        # config.json and the weights' headers and sizes: checked by the config validation.
        if not input_files.check_model_weights("model.path", Path(path)):
            report.ok(f"model: {path}")
        return
    if _hf_config(cfg) is not None:
        report.ok(f"model: {path} (in the Hugging Face cache)")
    elif input_files.offline_mode():
        pass  # the config validation named model.path
    else:
        report.warn(f"model: {path} is not in the Hugging Face cache; it is downloaded at start "
                    f"(needs internet). Pre-download: `hf download {path}`")
    if cfg.trainer.nnodes > 1:
        report.warn(f"model: every node reads model.path={path}: use a shared filesystem or the "
                    f"same path (or HF cache) on each node")


def _parameter_count(hf: dict) -> int:
    """Parameters of a Qwen2 / Llama / Qwen3 config (the architectures the bridge maps)."""
    hidden, layers = hf["hidden_size"], hf["num_hidden_layers"]
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden // heads
    kv = hf.get("num_key_value_heads") or heads
    attention = hidden * head_dim * (2 * heads + 2 * kv)
    mlp = 3 * hidden * hf["intermediate_size"]
    embeddings = hf["vocab_size"] * hidden * (1 if hf.get("tie_word_embeddings") else 2)
    return layers * (attention + mlp) + embeddings


def check_sandbox(report: Report, cfg) -> None:
    """HumanEval grading runs model-written code only inside the sandbox: a sandbox that cannot
    start on this machine is an error now, not at the first validation after the model started."""
    graded = cfg.algorithm.name != "intuitor"
    needs = [entry["name"] for entry in cfg.data.val_files if entry["format"] == "humaneval"]
    if graded and cfg.data.format == "humaneval":
        needs.append("data.train_files")
    if not needs:
        return
    from megatron_intuitor.evaluation.sandbox import SandboxUnavailable, check_sandbox as probe

    try:
        report.ok(f"code sandbox for {', '.join(needs)}: {probe()}")
    except SandboxUnavailable as error:
        report.error(f"code sandbox for {', '.join(needs)} cannot start: {error}")


def check_data_rows(report: Report, cfg) -> None:
    """Every row of the data files, read as the trainer reads them (UTF-8, JSON, the format's
    fields): a bad row is named now, not after the console script started. Files the config
    check already refused (missing, a directory, another suffix) are not read again."""
    from megatron_intuitor.config import DATA_SUFFIXES
    from megatron_intuitor.data.datasets import DataError, load_records, run_dataset_specs

    train, val = run_dataset_specs(cfg.data)
    keyed = [(f"data.train_files[{i}]", spec) for i, spec in enumerate(train)] + [
        (f"data.val_files[{i}]", spec) for i, (_, spec) in enumerate(val)]
    rows, files, failed = 0, 0, False
    for key, spec in keyed:
        if spec.format == "synthetic" or (spec.path is not None and not (
                Path(spec.path).is_file() and spec.path.endswith(DATA_SUFFIXES))):
            continue
        try:
            rows += len(load_records(spec))
            files += 1
        except DataError as error:
            report.error(f"{key}: {error}")
            failed = True
    if files and not failed:
        report.ok(f"data: {rows} rows in {files} file(s), every row readable")


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def check_disk(report: Report, cfg) -> None:
    """Free space under trainer.output_dir for keep_last checkpoints (+1 while saving) and the
    final HF export."""
    from megatron_intuitor.input_files import output_dir_problem

    output_dir = Path(cfg.trainer.output_dir)
    problem = output_dir_problem("trainer.output_dir", output_dir)
    if problem:
        report.error(problem)
        return
    free = shutil.disk_usage(_existing_parent(output_dir)).free
    hf = _hf_config(cfg)
    if hf is None:
        size = "tiny" if not cfg.model.path else "unknown until the model is downloaded"
        report.ok(f"disk: {free / GIB:.1f} GiB free for {output_dir} (checkpoint size {size})")
        return
    try:
        params = _parameter_count(hf)
    except KeyError as missing:
        report.warn(f"disk: cannot estimate the checkpoint size ({missing} not in config.json); "
                    f"{free / GIB:.1f} GiB free for {output_dir}")
        return
    checkpoint = params * CHECKPOINT_BYTES_PER_PARAM
    export = params * 4
    needed = checkpoint * (cfg.trainer.keep_last + 1) + export
    summary = (f"{free / GIB:.1f} GiB free for {output_dir}; {params / 1e9:.2f}B parameters: "
               f"~{checkpoint / GIB:.0f} GiB per checkpoint, ~{needed / GIB:.0f} GiB for "
               f"trainer.keep_last={cfg.trainer.keep_last} (+1 while saving) and the HF export")
    if free < checkpoint + export:
        report.error(f"disk: {summary}: free space, or set trainer.output_dir elsewhere")
    elif free < needed:
        report.warn(f"disk: {summary}: lower trainer.keep_last or free space")
    else:
        report.ok(f"disk: {summary}")


# ------------------------------------------------------------------------------- the config


def load_config(report: Report, overrides: list[str]):
    """The resolved config (None if it cannot be composed); its problems reported."""
    from megatron_intuitor import config

    try:
        cfg = config.resolve(config.compose(overrides))
    except config.ConfigError as error:
        for problem in error.problems:
            report.error(problem)
        return None
    except Exception as error:  # Hydra: unknown key, group or option, bad override syntax
        report.error(f"cannot compose the config from {' '.join(overrides) or '(no overrides)'}: "
                     f"{error}")
        return None
    try:
        config.validate(cfg)
    except config.ConfigError as error:
        for problem in error.problems:
            report.error(problem)
        if any(p.startswith("data.") and "does not exist" in p for p in error.problems):
            hint_missing_data(report, cfg)
    else:
        trainer = cfg.trainer
        report.ok(f"config: experiment {trainer.experiment_name}, {trainer.nnodes} node(s) x "
                  f"{trainer.n_gpus_per_node} rank(s) on {trainer.device}, "
                  f"output {trainer.output_dir}")
    return cfg


def hint_missing_data(report: Report, cfg) -> None:
    """How to make the missing files of the <data.root>/<dataset>/<split>.parquet layout."""
    root = Path(cfg.data.root).expanduser().absolute()
    paths = list(cfg.data.train_files) + [entry["path"] for entry in cfg.data.val_files]
    for path in map(Path, paths):
        if (path.is_file() or path.suffix != ".parquet" or path.parent.parent != root
                or path.parent.name not in PREPARED_DATASETS):
            continue
        dataset, split = path.parent.name, path.stem
        source = "" if dataset == "humaneval" else f" --input <{dataset} {split} JSONL>"
        tool = PREPARE_DATA.relative_to(Path.cwd()) if PREPARE_DATA.is_relative_to(
            Path.cwd()) else PREPARE_DATA
        report.warn(f"make {path} with: python {tool} {dataset}{source} "
                    f"--split {split} --output-dir {root}")
    report.warn(f"data: the tasks read <data.root>/<dataset>/<split>.parquet with data.root="
                f"{cfg.data.root}: set data.root=<dir> (TRAIN_DATA / VAL_DATA for "
                f"custom_config), or see README, Data")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse",
                               "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def create_log(cfg, command: str, report: Report) -> Path:
    """<logger.log_dir>/<experiment>_<timestamp>.log, headed by the command, the preflight
    report and the resolved config."""
    from omegaconf import OmegaConf

    log_dir = Path(cfg.logger.log_dir).expanduser().absolute()
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{cfg.trainer.experiment_name}_{time.strftime('%Y%m%d_%H%M%S')}.log"
    header = (f"# {time.strftime('%Y-%m-%d %H:%M:%S')} on {platform.node()}, "
              f"megatron-intuitor {_git_commit()}\n# command: {command}\n# preflight:\n"
              + "".join(f"#   {line}\n" for line in report.lines)
              + f"# resolved config:\n{OmegaConf.to_yaml(cfg)}\n")
    path.write_text(header)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--command", default="", help="the command being checked, for the record")
    parser.add_argument("--log-path-out", type=Path)
    parser.add_argument("--te-build", action="store_true",
                        help="only check the headers Transformer Engine's torch extension "
                             "compiles against (before installing the GPU face)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    report = Report()
    if args.te_build:
        check_te_build_headers(report)
        return 1 if report.errors else 0
    cfg = load_config(report, args.overrides)
    device = cfg.trainer.device if cfg is not None else "cpu"
    check_python_and_packages(report, device)
    if device == "cuda":
        check_transformer_engine(report)
    if cfg is not None:
        check_model(report, cfg)
        check_data_rows(report, cfg)
        check_ray_cluster(report, cfg)
        check_disk(report, cfg)
        check_sandbox(report, cfg)

    if args.dry_run:
        if cfg is not None:
            from omegaconf import OmegaConf

            print(f"# {args.command}\n{OmegaConf.to_yaml(cfg)}", end="")
    elif report.errors == 0 and args.log_path_out is not None:
        args.log_path_out.write_text(str(create_log(cfg, args.command, report)))
    if report.errors:
        print(f"  {report.errors} problem(s) to fix", file=sys.stderr)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
