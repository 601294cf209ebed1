"""The launch scripts, run as a user runs them (bash, a fresh environment, --dry-run): the
resolved config they print equals Hydra's own composition of the same overrides (paths made
absolute, dataset lists normalised), environment variables reach their config keys, and bad
input (an unknown config, a missing data file, an unreachable Ray cluster) fails with the
thing named. No training here:
`run_intuitor.sh default` running to completion is the end-to-end test's job."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from megatron_intuitor import config
from megatron_intuitor.data.datasets import DatasetSpec, load_records
from repo_paths import REPO, SHARED_DATA

# Every variable a script reads: removed from the test environment so that only what a test sets
# reaches the scripts.
SCRIPT_VARIABLES = (
    "MODEL_PATH", "TRAIN_DATA", "VAL_DATA", "DATA_FORMAT", "PROMPT_KEY", "ANSWER_KEY",
    "TRAIN_BATCH_SIZE", "LEARNING_RATE", "TOTAL_EPOCHS", "ROLLOUT_N", "MAX_PROMPT_LENGTH",
    "MAX_RESPONSE_LENGTH", "N_GPUS", "N_NODES", "PPO_MICRO_BATCH_SIZE_PER_GPU",
    "LOG_PROB_MICRO_BATCH_SIZE_PER_GPU", "USE_REMOVE_PADDING", "ENABLE_GRADIENT_CHECKPOINTING",
    "GPU_MEMORY_UTILIZATION", "EXPERIMENT_NAME", "WANDB_API_KEY", "TP_SIZE", "PP_SIZE",
    "RAY_ADDRESS", "FP8", "DATA_ROOT", "PYTHON", "NO_COLOR", "MI_COLOR")
# Host-independent checks: the GPU configs resolved as on a CPU machine.
ON_CPU = ("trainer.device=cpu", "actor.precision=fp32")
VALID_CONFIGS = ("math_gsm8k", "math_math500", "code_humaneval", "reasoning_arc", "default",
                 "custom_config")


class ScriptRun:
    def __init__(self, result: subprocess.CompletedProcess, dry_run: bool):
        self.returncode, self.stdout, self.stderr = (result.returncode, result.stdout,
                                                     result.stderr)
        # A dry run's stdout: "# <command>" then the resolved config, one YAML document.
        self.command = self.stdout.partition("\n")[0].removeprefix("# ")
        self.config = yaml.safe_load(self.stdout) if dry_run and self.stdout else None

    def __repr__(self) -> str:
        return f"exit {self.returncode}\nstderr:\n{self.stderr}"


def run_script(script: str, *args: str, env: dict | None = None, cwd: Path,
               dry_run: bool = True) -> ScriptRun:
    environment = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARIABLES}
    environment.update(env or {})
    result = subprocess.run(["bash", str(REPO / script), *args] + (["--dry-run"] if dry_run
                                                                    else []),
                            cwd=cwd, env=environment, capture_output=True, text=True, timeout=180)
    # Not a terminal: no colour codes, whatever NO_COLOR says.
    assert "\x1b[" not in result.stderr + result.stdout
    return ScriptRun(result, dry_run)


# Keys the project itself resolves after Hydra (`config.resolve`): checked against hand-made
# expectations in the tests, not against Hydra's composition.
RESOLVED_BY_THE_PROJECT = ("data.train_files", "data.val_files", "model.path",
                           "trainer.output_dir", "trainer.resume", "trainer.device")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def assert_hydra_composition(printed: dict, *overrides: str, cwd: Path) -> None:
    """`printed` is what Hydra itself composes from `conf/` with `overrides` (its compose API,
    not `megatron_intuitor.config`), every key the project does not resolve itself equal;
    the output directory is made absolute against `cwd`."""
    from hydra import compose, initialize_config_dir

    saved = {name: os.environ.pop(name) for name in SCRIPT_VARIABLES if name in os.environ}
    try:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
            raw = OmegaConf.to_container(compose("config", overrides=list(overrides)),
                                         resolve=True)
    finally:
        os.environ.update(saved)

    def ours(key: str) -> bool:
        return key.startswith(RESOLVED_BY_THE_PROJECT)

    expected = {k: v for k, v in _flatten(raw).items() if not ours(k)}
    assert {k: v for k, v in _flatten(printed).items() if not ours(k)} == expected
    assert printed["trainer"]["output_dir"] == str(cwd / raw["trainer"]["output_dir"])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """The shared GSM8K / MATH500 / ARC files and HumanEval, prepared as a user prepares them."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the shared data directory {SHARED_DATA.resolve()} is missing")
    root = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, str(REPO / "tools" / "prepare_data.py"), "all",
                    "--input-dir", str(SHARED_DATA), "--output-dir", str(root)],
                   check=True, capture_output=True, timeout=300)
    return root


# Per named config: overrides for the files the shared data lacks (MATH, code and ARC training
# sets) and the files the config must end up reading.
def _named_cases(root: Path) -> dict:
    return {
        "default": ([], [], None),
        "math_gsm8k": ([], [root / "gsm8k/train.parquet"], root / "gsm8k/test.parquet"),
        "math_math500": ([f"data.train_files=[{root}/math500/test.parquet]"],
                         [root / "math500/test.parquet"], root / "math500/test.parquet"),
        "code_humaneval": ([f"data.train_files=[{root}/humaneval/test.parquet]"],
                           [root / "humaneval/test.parquet"], None),
        "reasoning_arc": ([f"data.train_files=[{root}/arc_challenge/test.parquet]"],
                          [root / "arc_challenge/test.parquet"],
                          root / "arc_challenge/test.parquet"),
    }


@pytest.mark.parametrize("name", ["default", "math_gsm8k", "math_math500", "code_humaneval",
                                  "reasoning_arc"])
def test_run_intuitor_named_config(name, data_root, tmp_path):
    extra, train_files, val_file = _named_cases(data_root)[name]
    overrides = [f"data.root={data_root}", *ON_CPU, *extra]
    run = run_script("run_intuitor.sh", name, *overrides, cwd=tmp_path)
    assert run.returncode == 0, run
    assert run.command.endswith(f"-m megatron_intuitor.main task={name} "
                                + " ".join(overrides).replace("[", r"\[").replace("]", r"\]"))
    assert_hydra_composition(run.config, f"task={name}", *overrides, cwd=tmp_path)
    assert run.config["data"]["train_files"] == [str(path) for path in train_files]
    if val_file is not None:
        assert [entry["path"] for entry in run.config["data"]["val_files"]] == [str(val_file)]
    if name == "default":
        assert run.config["model"]["make_tiny"] and run.config["data"]["format"] == "synthetic"
    if name == "code_humaneval":
        assert run.config["data"]["val_files"][0]["format"] == "humaneval"


def test_run_intuitor_without_config_name_is_default(tmp_path):
    run = run_script("run_intuitor.sh", "rollout.n=6", "trainer.device=cpu", cwd=tmp_path)
    assert run.returncode == 0, run
    assert run.command.endswith("-m megatron_intuitor.main task=default rollout.n=6 "
                                "trainer.device=cpu")
    assert_hydra_composition(run.config, "task=default", "rollout.n=6", "trainer.device=cpu",
                             cwd=tmp_path)
    assert run.config["rollout"]["n"] == 6


def test_unknown_config_lists_the_valid_ones(tmp_path):
    run = run_script("run_intuitor.sh", "math_gsm8", cwd=tmp_path)
    assert run.returncode != 0 and run.stdout == ""
    assert "unknown config 'math_gsm8'" in run.stderr
    listed = re.search(r"valid configs: (.*?) \(", run.stderr).group(1).split()
    assert set(VALID_CONFIGS) <= set(listed)


def test_missing_data_file_is_named(data_root, tmp_path):
    """MATH's training set is not in the shared data: the error names the file and how to make
    it; nothing starts."""
    run = run_script("run_intuitor.sh", "math_math500", f"data.root={data_root}", *ON_CPU,
                     cwd=tmp_path)
    assert run.returncode == 1
    missing = data_root / "math" / "train.parquet"
    assert f"data.train_files[0]={missing} does not exist" in run.stderr
    assert f"prepare_data.py math --input <math train JSONL> --split train --output-dir " \
           f"{data_root}" in run.stderr
    assert "math500/test.parquet does not exist" not in run.stderr  # that one is there


def test_bad_override_is_reported(tmp_path):
    run = run_script("run_intuitor.sh", "default", "rollout.n=1", "actor.no_such_key=3",
                     cwd=tmp_path)
    assert run.returncode == 1 and run.config is None
    assert "no_such_key" in run.stderr


TRAINING_ENV = {  # every variable of run_intuitor_training.sh, none at its default
    "TRAIN_BATCH_SIZE": "16", "LEARNING_RATE": "2e-5", "TOTAL_EPOCHS": "3", "ROLLOUT_N": "4",
    "MAX_PROMPT_LENGTH": "256", "MAX_RESPONSE_LENGTH": "128", "N_GPUS": "4", "N_NODES": "1",
    "TP_SIZE": "2", "PP_SIZE": "2", "PPO_MICRO_BATCH_SIZE_PER_GPU": "2",
    "LOG_PROB_MICRO_BATCH_SIZE_PER_GPU": "8", "USE_REMOVE_PADDING": "false",
    "ENABLE_GRADIENT_CHECKPOINTING": "false", "GPU_MEMORY_UTILIZATION": "0.5",
    "EXPERIMENT_NAME": "env_test", "DATA_FORMAT": "prompt", "PROMPT_KEY": "prompt",
    "ANSWER_KEY": "ground_truth"}
TRAINING_KEYS = {  # variable -> (config key, expected value)
    "TRAIN_BATCH_SIZE": ("data.prompts_per_step", 16), "LEARNING_RATE": ("actor.lr", 2e-5),
    "TOTAL_EPOCHS": ("trainer.total_epochs", 3), "ROLLOUT_N": ("rollout.n", 4),
    "MAX_PROMPT_LENGTH": ("data.max_prompt_length", 256),
    "MAX_RESPONSE_LENGTH": ("data.max_response_length", 128),
    "N_GPUS": ("trainer.n_gpus_per_node", 4), "N_NODES": ("trainer.nnodes", 1),
    "TP_SIZE": ("actor.tensor_model_parallel_size", 2),
    "PP_SIZE": ("actor.pipeline_model_parallel_size", 2),
    "PPO_MICRO_BATCH_SIZE_PER_GPU": ("actor.ppo_micro_batch_size_per_gpu", 2),
    "LOG_PROB_MICRO_BATCH_SIZE_PER_GPU": ("actor.log_prob_micro_batch_size_per_gpu", 8),
    "USE_REMOVE_PADDING": ("actor.use_remove_padding", False),
    "ENABLE_GRADIENT_CHECKPOINTING": ("actor.recompute", False),
    "GPU_MEMORY_UTILIZATION": ("rollout.gpu_memory_utilization", 0.5),
    "EXPERIMENT_NAME": ("trainer.experiment_name", "env_test"),
    "DATA_FORMAT": ("data.format", "prompt"), "PROMPT_KEY": ("data.prompt_key", "prompt"),
    "ANSWER_KEY": ("data.answer_key", "ground_truth")}


def _select(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def test_training_script_environment_reaches_the_config(tiny_qwen2, data_root, tmp_path):
    env = {**TRAINING_ENV, "MODEL_PATH": str(tiny_qwen2),
           "TRAIN_DATA": str(data_root / "gsm8k/train.parquet"),
           "VAL_DATA": str(data_root / "gsm8k/test.parquet")}
    run = run_script("run_intuitor_training.sh", *ON_CPU, env=env, cwd=tmp_path)
    assert run.returncode == 0, run
    assert set(TRAINING_KEYS) | {"MODEL_PATH", "TRAIN_DATA", "VAL_DATA"} >= set(env)
    for variable, (key, expected) in TRAINING_KEYS.items():
        assert _select(run.config, key) == expected, variable
    assert run.config["model"]["path"] == str(tiny_qwen2)
    assert run.config["data"]["train_files"] == [env["TRAIN_DATA"]]
    assert [v["path"] for v in run.config["data"]["val_files"]] == [env["VAL_DATA"]]
    # The variables are on the command line, as overrides.
    assert "data.prompts_per_step=16" in run.command and "rollout.n=4" in run.command
    # run_intuitor.sh custom_config reads the same variables into the same config.
    custom = run_script("run_intuitor.sh", "custom_config", *ON_CPU, env=env, cwd=tmp_path)
    assert custom.returncode == 0, custom
    assert custom.config == run.config


def test_training_script_defaults(tmp_path):
    """Unset variables take the documented defaults, the same as custom_config's. The default
    data files are not in tmp_path: the run is refused, naming them."""
    run = run_script("run_intuitor_training.sh", *ON_CPU, cwd=tmp_path)
    defaults = {"model.path": "Qwen/Qwen2.5-3B", "data.prompts_per_step": 128, "actor.lr": 3e-6,
                "rollout.n": 8, "data.max_prompt_length": 512, "data.max_response_length": 2048,
                "trainer.n_gpus_per_node": 8, "trainer.nnodes": 1,
                "actor.use_remove_padding": True, "actor.recompute": True,
                "rollout.gpu_memory_utilization": 0.6, "trainer.total_epochs": 1}
    for key, expected in defaults.items():
        assert _select(run.config, key) == expected, key
    assert run.config["data"]["train_files"] == [str(tmp_path / "data/math/train.parquet")]
    assert run.returncode == 1
    assert f"data.train_files[0]={tmp_path}/data/math/train.parquet does not exist" in run.stderr
    custom = run_script("run_intuitor.sh", "custom_config", *ON_CPU, cwd=tmp_path)
    assert custom.config == run.config


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_multi_node_needs_a_reachable_ray_cluster(data_root, tmp_path):
    address = f"127.0.0.1:{_closed_port()}"
    env = {"N_NODES": "2", "RAY_ADDRESS": address,
           "TRAIN_DATA": str(data_root / "gsm8k/train.parquet"),
           "VAL_DATA": str(data_root / "gsm8k/test.parquet")}
    run = run_script("run_intuitor_training.sh", *ON_CPU, env=env, cwd=tmp_path)
    assert run.returncode == 1
    assert run.config["trainer"]["nnodes"] == 2
    assert run.config["trainer"]["ray_address"] == "auto"  # finds RAY_ADDRESS
    assert "cannot reach the Ray cluster at" in run.stderr and "ray start --head" in run.stderr


def test_archercoder_port_is_the_original_recipe(data_root, tmp_path):
    """verl's math_intuitor.sh settings, reading $HOME/data/math/{train,test}.parquet as made by
    tools/prepare_data.py (here from MATH500, the MATH problems the shared data has)."""
    home = tmp_path / "home"
    for split in ("train", "test"):
        subprocess.run([sys.executable, str(REPO / "tools" / "prepare_data.py"), "math",
                        "--input", str(SHARED_DATA / "math500" / "test.jsonl"), "--split", split,
                        "--output-dir", str(home / "data")],
                       check=True, capture_output=True, timeout=120)
    run = run_script("math_intuitor_archercoder.sh", *ON_CPU, env={"HOME": str(home)},
                     cwd=tmp_path)
    assert run.returncode == 0, run
    recipe = {"model.path": "Qwen/Qwen2.5-3B", "data.prompts_per_step": 128,
              "actor.ppo_mini_batch_size": 128, "rollout.n": 8, "actor.lr": 3e-6,
              "algorithm.name": "intuitor", "algorithm.kl_coef": 0.005,
              "algorithm.kl_type": "low_var_kl", "algorithm.entropy_coef": 0,
              "data.max_prompt_length": 512, "data.max_response_length": 3072,
              "trainer.total_epochs": 1, "trainer.n_gpus_per_node": 8, "trainer.nnodes": 1,
              "actor.ppo_micro_batch_size_per_gpu": 4,
              "actor.log_prob_micro_batch_size_per_gpu": 4, "trainer.save_every": 10,
              "trainer.val_every": 10, "trainer.experiment_name": "math_intuitor",
              "actor.lr_scheduler": "constant", "actor.lr_warmup_ratio": 0}
    for key, expected in recipe.items():
        assert _select(run.config, key) == expected, key
    data = run.config["data"]
    assert data["train_files"] == [str(home / "data/math/train.parquet")]
    records = load_records(DatasetSpec(path=data["train_files"][0], format=data["format"],
                                       prompt_key=data["prompt_key"],
                                       answer_key=data["answer_key"]))
    assert len(records) == 500 and all(r.ground_truth and r.task == "math" for r in records)


@pytest.mark.parametrize("fp8", [None, "hybrid"])
def test_qwen7b_example_is_the_paper_recipe(fp8, data_root, tmp_path):
    """On CPU the run is refused (bf16 / FP8 need CUDA), but the config is resolved and shown;
    its batch sizes divide on 2 and 4 nodes."""
    env = {"N_NODES": "1", "DATA_ROOT": str(data_root), **({"FP8": fp8} if fp8 else {})}
    run = run_script("examples/run_qwen7b_math.sh", "trainer.device=cpu",
                     f"data.train_files=[{data_root}/math500/test.parquet]", env=env, cwd=tmp_path)
    recipe = {"model.path": "Qwen/Qwen2.5-7B", "actor.lr": 1e-6, "data.prompts_per_step": 64,
              "rollout.n": 14, "algorithm.kl_coef": 0.01, "data.max_prompt_length": 512,
              "data.max_response_length": 3072, "actor.tensor_model_parallel_size": 4,
              "actor.pipeline_model_parallel_size": 2, "trainer.n_gpus_per_node": 8,
              "actor.precision": "bf16", "actor.fp8": fp8}
    for key, expected in recipe.items():
        assert _select(run.config, key) == expected, key
    assert [v["path"] for v in run.config["data"]["val_files"]] == [
        str(data_root / "math500/test.parquet")]
    assert run.returncode == 1
    assert "actor.precision=bf16 needs CUDA" in run.stderr
    assert ("actor.fp8=hybrid needs CUDA" in run.stderr) == (fp8 is not None)
    for nodes in (2, 4):
        cfg = OmegaConf.create(run.config)
        cfg.trainer.nnodes = nodes
        assert config.RankLayout.from_cfg(cfg).data_parallel == nodes


@pytest.mark.parametrize("arm", ["intuitor", "grpo"])
def test_replication_example_is_the_papers_1_5b_recipe(arm, data_root, tmp_path):
    """examples/replicate_intuitor_qwen2.5_1.5b.sh: the paper's settings per arm, greedy MATH500
    and GSM8K validation every 10 steps; refused on CPU (bf16 needs CUDA) after resolving."""
    run = run_script("examples/replicate_intuitor_qwen2.5_1.5b.sh", "trainer.device=cpu",
                     f"data.train_files=[{data_root}/math500/test.parquet]",
                     env={"ARM": arm, "DATA_ROOT": str(data_root)}, cwd=tmp_path)
    recipe = {"model.path": "Qwen/Qwen2.5-1.5B", "algorithm.name": arm, "actor.lr": 3e-6,
              "actor.lr_scheduler": "cosine", "actor.lr_warmup_ratio": 0.1,
              "data.prompts_per_step": 128, "rollout.n": 7, "rollout.temperature": 0.9,
              "algorithm.kl_coef": 0.005, "algorithm.kl_type": "low_var_kl",
              "data.max_prompt_length": 512, "data.max_response_length": 3072,
              "trainer.total_steps": 58, "trainer.val_every": 10,
              "trainer.val_before_train": True, "trainer.n_gpus_per_node": 8,
              "trainer.experiment_name": f"qwen2.5_1.5b_math_{arm}"}
    for key, expected in recipe.items():
        assert _select(run.config, key) == expected, key
    assert [v["path"] for v in run.config["data"]["val_files"]] == [
        str(data_root / "math500/test.parquet"), str(data_root / "gsm8k/test.parquet")]
    assert run.returncode == 1 and "actor.precision=bf16 needs CUDA" in run.stderr
    cfg = OmegaConf.create(run.config)
    assert config.derive_layout(cfg).data_parallel == 8


def test_replication_example_refuses_an_unknown_arm(tmp_path):
    run = run_script("examples/replicate_intuitor_qwen2.5_1.5b.sh", env={"ARM": "ppo"},
                     cwd=tmp_path)
    assert run.returncode == 1 and "ARM=ppo: expected intuitor, grpo or random" in run.stderr


def test_real_launch_logs_the_run(tmp_path):
    """Without --dry-run: the log file is created, starts with the command and the resolved
    config, receives the run's output, and the run's exit status is the script's. A stand-in
    interpreter replaces the trainer (training is the end-to-end test's)."""
    stand_in = tmp_path / "python"
    stand_in.write_text(f'#!/usr/bin/env bash\nif [[ $1 == -m && $2 == megatron_intuitor.main ]]; then '
                        f'echo "trainer ran: $*"; '
                        f'exit 3; fi\nexec {sys.executable} "$@"\n')
    stand_in.chmod(0o755)
    run = run_script("run_intuitor.sh", "default", "trainer.experiment_name=logged",
                     "trainer.device=cpu", env={"PYTHON": str(stand_in)}, cwd=tmp_path,
                     dry_run=False)
    assert run.returncode == 3, run
    logs = list((tmp_path / "logs").glob("logged_*.log"))
    assert len(logs) == 1 and re.fullmatch(r"logged_\d{8}_\d{6}\.log", logs[0].name)
    assert f"log:     {logs[0]}" in run.stderr
    text = logs[0].read_text()
    assert "# command: " in text and "task=default trainer.experiment_name=logged" in text
    assert "experiment_name: logged" in text
    assert "# preflight:\n#   ok   config: experiment logged" in text
    assert "trainer ran: -m megatron_intuitor.main task=default" in text
    assert "the run failed (exit status 3)" in run.stderr


@pytest.mark.parametrize("script", ["run_intuitor.sh", "run_intuitor_training.sh",
                                    "math_intuitor_archercoder.sh", "examples/run_qwen7b_math.sh",
                                    "examples/replicate_intuitor_qwen2.5_1.5b.sh"])
def test_help_and_unknown_options(script, tmp_path):
    shown = run_script(script, "--help", cwd=tmp_path, dry_run=False)
    assert shown.returncode == 0 and "--dry-run" in shown.stdout
    refused = run_script(script, "--dry_run", cwd=tmp_path, dry_run=False)
    assert refused.returncode == 1 and "unknown option --dry_run" in refused.stderr
