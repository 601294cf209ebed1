"""Hydra config: composition and overrides, every named task, validation messages that name the
key, derived sizes checked by hand, and the entry point's dry inspection."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from megatron_intuitor import config
from megatron_intuitor.config import (ActorSettings, ConfigError, RankLayout, compose, load,
                                      resolve, training_schedule, validate)
from megatron_intuitor.parallel import ParallelSizes

TASKS = ("tiny", "default", "math_gsm8k", "math_math500", "code_humaneval", "reasoning_arc",
         "custom_config")


def _problems(overrides):
    with pytest.raises(ConfigError) as caught:
        load(overrides)
    return str(caught.value)


def test_default_is_the_tiny_cpu_preset():
    cfg = load([])
    assert cfg.model.make_tiny and cfg.model.path == ""
    assert cfg.data.format == "synthetic"
    assert cfg.actor.tensor_model_parallel_size == 2 and cfg.trainer.n_gpus_per_node == 2
    assert cfg.trainer.total_steps == 20
    assert cfg.trainer.device == "cpu"  # auto, on this machine without CUDA
    assert cfg.actor.precision == "fp32"


def test_synthetic_task_settings_are_checked_and_reach_the_prompts():
    """Bad `data.synthetic.operators` / `max_operand` are refused naming the key; good ones reach
    the generated training prompts."""
    problems = _problems(["data.synthetic.operators=+/", "data.synthetic.max_operand=-1"])
    assert "data.synthetic.operators='+/'" in problems
    assert "data.synthetic.max_operand=-1" in problems
    from megatron_intuitor.data.datasets import run_dataset_specs

    cfg = load(["data.synthetic.operators=*", "data.synthetic.max_operand=7"])
    [spec], _ = run_dataset_specs(cfg.data)
    assert (spec.operators, spec.max_operand) == ("*", 7)


def test_groups_hold_the_official_intuitor_recipe():
    cfg = compose(["task=math_gsm8k"])
    assert cfg.actor.lr == 3e-6 and cfg.actor.lr_scheduler == "cosine"
    assert cfg.actor.lr_warmup_ratio == 0.1
    assert cfg.data.prompts_per_step == 128 and cfg.rollout.n == 8
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length) == (512, 3072)
    assert cfg.algorithm.kl_type == "low_var_kl" and cfg.algorithm.kl_coef == 0.005
    assert cfg.algorithm.entropy_coef == 0 and cfg.algorithm.clip_ratio == 0.2
    assert cfg.rollout.temperature == 1.0 and cfg.algorithm.name == "intuitor"
    assert cfg.data.system_prompt == ("Let's think step by step and output the final answer "
                                      "within \\boxed{}.")
    assert cfg.model.path == "Qwen/Qwen2.5-3B" and cfg.actor.precision == "bf16"


def test_command_line_overrides_reach_the_config():
    cfg = compose(["actor.tensor_model_parallel_size=4", "rollout.n=16", "algorithm=grpo",
                   "data.system_prompt=null", "logger.backends=[console]"])
    assert cfg.actor.tensor_model_parallel_size == 4
    assert cfg.rollout.n == 16
    assert cfg.algorithm.name == "grpo" and cfg.algorithm.kl_coef == 0.005
    assert cfg.data.system_prompt is None and list(cfg.logger.backends) == ["console"]
    assert compose(["algorithm=hybrid"]).algorithm.name == "hybrid"
    with pytest.raises(Exception, match="actor.no_such_key"):  # Hydra's struct mode
        compose(["actor.no_such_key=1"])


@pytest.mark.parametrize("task", TASKS)
def test_every_task_composes_and_validates(task, tmp_path):
    """With its files present (empty placeholders: validation only checks they exist) and fp32,
    each task is a valid config; its dataset paths follow data.root."""
    cfg = resolve(compose([f"task={task}", f"data.root={tmp_path}", "actor.precision=fp32"]))
    files = list(cfg.data.train_files) + [entry.path for entry in cfg.data.val_files]
    for path in filter(None, files):
        assert path.startswith(str(tmp_path))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()
    validate(cfg)
    if task not in ("tiny", "default"):
        assert cfg.data.train_files, task
        assert cfg.data.val_files, task
        assert cfg.trainer.experiment_name == task.replace("custom_config", "custom_intuitor")


def test_default_task_is_tiny():
    assert compose(["task=default"]) == compose(["task=tiny"])


def test_custom_config_reads_environment_variables(monkeypatch, tmp_path):
    for name in ("DATA_FORMAT", "ANSWER_KEY", "TRAIN_BATCH_SIZE", "ROLLOUT_N"):
        monkeypatch.delenv(name, raising=False)
    defaults = resolve(compose(["task=custom_config"]))  # prepare_data's parquet layout
    assert (defaults.data.format, defaults.data.answer_key) == ("auto", None)
    assert defaults.data.prompts_per_step == 128 and defaults.rollout.n == 8
    assert defaults.data.train_files[0].endswith("data/math/train.parquet")
    monkeypatch.setenv("MODEL_PATH", "org/some-model")
    monkeypatch.setenv("TRAIN_DATA", str(tmp_path / "train.parquet"))
    monkeypatch.setenv("TRAIN_BATCH_SIZE", "64")
    monkeypatch.setenv("LEARNING_RATE", "1e-6")
    monkeypatch.setenv("ROLLOUT_N", "14")
    monkeypatch.setenv("TP_SIZE", "4")
    monkeypatch.setenv("USE_REMOVE_PADDING", "false")
    monkeypatch.setenv("EXPERIMENT_NAME", "from_env")
    monkeypatch.setenv("DATA_FORMAT", "math")
    monkeypatch.setenv("ANSWER_KEY", "answer")
    cfg = resolve(compose(["task=custom_config"]))
    assert cfg.data.format == "math" and cfg.data.answer_key == "answer"
    assert cfg.model.path == "org/some-model"
    assert list(cfg.data.train_files) == [str(tmp_path / "train.parquet")]
    assert cfg.data.prompts_per_step == 64 and cfg.actor.ppo_mini_batch_size == 64
    assert cfg.actor.lr == 1e-6 and isinstance(cfg.actor.lr, float)
    assert cfg.rollout.n == 14 and cfg.actor.tensor_model_parallel_size == 4
    assert cfg.actor.use_remove_padding is False
    assert cfg.trainer.experiment_name == "from_env"
    assert cfg.trainer.output_dir == os.path.abspath("runs/from_env")
    # ... and the command line still wins over the environment.
    assert resolve(compose(["task=custom_config", "rollout.n=4"])).rollout.n == 4


def test_resolve_makes_paths_absolute_and_normalises_datasets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = resolve(compose(["data.format=auto", "data.train_files=d/train.parquet",
                           "data.val_files=[d/gsm8k/test.parquet,"
                           "{name: he, format: humaneval, path: ''}]",
                           "model.path=models/local", "trainer.output_dir=out"]))
    assert list(cfg.data.train_files) == [str(tmp_path / "d/train.parquet")]
    assert [dict(entry) for entry in cfg.data.val_files] == [
        {"name": None, "format": "auto", "path": str(tmp_path / "d/gsm8k/test.parquet")},
        {"name": "he", "format": "humaneval", "path": ""}]
    assert cfg.trainer.output_dir == str(tmp_path / "out")
    assert cfg.model.path == "models/local"  # org/name: a hub id unless it exists here
    (tmp_path / "models/local").mkdir(parents=True)
    assert resolve(compose(["model.path=models/local"])).model.path == str(
        tmp_path / "models/local")
    assert resolve(compose(["model.path=./m"])).model.path == str(tmp_path / "m")


@pytest.mark.parametrize("overrides, message", [
    (["rollout.n=1"], "rollout.n=1: GRPO z-scores rewards within each prompt's group"),
    (["actor.ppo_mini_batch_size=3"],
     "data.prompts_per_step=8 is not divisible by actor.ppo_mini_batch_size=3"),
    (["data.prompts_per_step=5"],  # 5 x 4 = 20 responses per mini-batch on the one DP rank
     "actor.ppo_micro_batch_size_per_gpu=8 does not divide the 20 responses"),
    (["actor.log_prob_micro_batch_size_per_gpu=12"],
     "actor.log_prob_micro_batch_size_per_gpu=12 does not divide the 32 responses"),
    (["trainer.n_gpus_per_node=4", "actor.ppo_mini_batch_size=1"],  # DP 2, 1 x 4 responses
     "actor.ppo_micro_batch_size_per_gpu=8 does not divide the 2 responses"),
    (["trainer.n_gpus_per_node=3"], "3 ranks is not divisible by "
                                    "actor.tensor_model_parallel_size x"),
    (["actor.precision=bf16"], "actor.precision=bf16 needs CUDA"),
    (["actor.fp8=hybrid"], "actor.fp8=hybrid needs CUDA and Transformer Engine"),
    (["actor.fp8=e5m2"], "actor.fp8='e5m2': expected null, hybrid or e4m3"),
    (["actor.moe_token_dispatcher=flex"], "actor.moe_token_dispatcher='flex'"),
    (["actor.moe_routing_replay=on"],
     "actor.moe_routing_replay='on': expected one of disabled, rollout"),
    (["actor.moe_routing_replay=rollout"],
     "actor.moe_routing_replay=rollout needs a mixture-of-experts model; model.tiny has no"),
    (["actor.moe_routing_replay=rollout", "model.tiny.arch=qwen3_moe"],
     "actor.moe_routing_replay=rollout needs the engine's routed experts, which vLLM 0.32 "
     "returns only from its Model Runner V2, which needs Triton with a GPU backend"),
    (["actor.moe_routing_replay=rollout", "model.tiny.arch=qwen3_moe",
      "rollout.score_at_sampling=true"],
     "actor.moe_routing_replay=rollout needs rollout.score_at_sampling=false"),
    (["actor.sequence_parallel=maybe"], "actor.sequence_parallel='maybe': expected null, true"),
    (["model.tiny.arch=qwen3_moe", "actor.sequence_parallel=false"],
     "actor.sequence_parallel=false: Megatron-Core trains the mixture of experts of model.tiny at "
     "actor.tensor_model_parallel_size=2 only sequence parallel"),
    (["trainer.device=cuda"], "trainer.device=cuda but no CUDA device is visible"),
    (["algorithm.name=ppo"], "algorithm.name='ppo': expected one of intuitor, grpo, hybrid"),
    (["algorithm.kl_type=full"], "algorithm.kl_type='full'"),
    (["model.make_tiny=false"], "model.path is empty"),
    (["model.path=/no/such/model"], "model.path=/no/such/model does not exist"),
    (["data.format=gsm8k", "data.train_files=[/no/such/train.jsonl]"],
     "data.train_files[0]=/no/such/train.jsonl does not exist"),
    (["data.format=gsm8k"], "data.train_files is empty"),
    (["data.format=csv"], "data.format='csv'"),
    (["data.val_files=[/no/such/gsm8k/test.parquet]"],
     "data.val_files[0]=/no/such/gsm8k/test.parquet does not exist"),
    (["actor.tensor_model_parallel_size=4", "trainer.n_gpus_per_node=4"],
     "actor.tensor_model_parallel_size=4 does not divide the 4 attention heads / 2 key-value "
     "heads of model.tiny"),
    (["actor.pipeline_model_parallel_size=2", "actor.tensor_model_parallel_size=1",
      "actor.virtual_pipeline_model_parallel_size=2"],
     "virtual_pipeline_model_parallel_size = 4 does not divide the 2 layers of model.tiny"),
    (["actor.expert_model_parallel_size=2"],
     "actor.expert_model_parallel_size=2 needs a mixture-of-experts model; model.tiny has no"),
    (["actor.expert_model_parallel_size=3"],
     "actor.expert_model_parallel_size x expert_tensor_parallel_size = 3 x 2 does not divide "
     "the 2 ranks of a pipeline stage"),
    (["actor.virtual_pipeline_model_parallel_size=2"],
     "actor.virtual_pipeline_model_parallel_size > 1 needs actor.pipeline_model_parallel_size > 1"),
    (["actor.use_dynamic_bsz=true", "actor.max_tokens_per_gpu=50"],
     "actor.max_tokens_per_gpu=50 is smaller than one full sequence"),
    (["rollout.tensor_parallel_size=3"], "rollout.tensor_parallel_size=3 does not divide the 2"),
    (["rollout.top_p=0"], "rollout.top_p=0: expected a number in (0, 1]"),
    (["rollout.temperature=0"], "rollout.temperature=0: expected a number > 0"),
    (["algorithm=hybrid", "algorithm.hybrid_weights.verifiable=-1"],
     "algorithm.hybrid_weights={'self_certainty': 0.5, 'verifiable': -1}"),
    (["logger.backends=[console,tensorboard]"], "logger.backends="),
    (["trainer.resume=/no/such/checkpoint"], "trainer.resume=/no/such/checkpoint does not exist"),
    (["trainer.experiment_name=a/b"], "trainer.experiment_name='a/b'"),
    (["trainer.placement=RANDOM"], "trainer.placement='RANDOM': expected one of PACK"),
    (["actor.lr=abc"], "actor.lr='abc': expected a number >= 0"),
    (["actor.lr=-1e-6"], "actor.lr=-1e-06: expected a number >= 0"),
    (["trainer.guard.action=panic"], "trainer.guard.action='panic': expected one of warn"),
    (["trainer.guard.max_kl_jump=high"], "trainer.guard.max_kl_jump='high'"),
    (["trainer.guard.max_repetitive_share=1.5"], "trainer.guard.max_repetitive_share=1.5: "
     "expected null (off) or a number in [0, 1]"),
    (["+trainer.guard.max_kl=1"], "trainer.guard.max_kl is not a configuration key (did you mean "
     "trainer.guard.max_kl_jump?)"),
    (["trainer.guard.action=rollback"], "trainer.guard.action=rollback restores the best "
                                        "checkpoint: set trainer.best_metric"),
    (["algorithm.policy_loss=clip", "algorithm.cov.select_ratio=2"],
     "algorithm.policy_loss='clip': expected one of ppo, clip_cov, kl_cov"),
    (["algorithm.policy_loss=kl_cov", "actor.ppo_micro_batch_size_per_gpu=1"],
     "algorithm.policy_loss=kl_cov with actor.ppo_micro_batch_size_per_gpu=1"),
    (["algorithm.cov.clip_lower=5"], "algorithm.cov.clip_lower=5 must be below"),
    (["trainer.val_best_of_n=1"], "trainer.val_best_of_n=1: expected 0 (off) or an integer >= 2"),
    (["algorithm.clip_ratio_high=0"],
     "algorithm.clip_ratio_high=0: expected null (algorithm.clip_ratio) or a number > 0"),
])
def test_validation_names_the_key(overrides, message):
    assert message in _problems(overrides)


def test_unknown_keys_are_refused_with_the_nearest_known_key():
    text = _problems(["+trainer.typo=4", "+model.tiny.hiden_size=3"])
    assert "trainer.typo is not a configuration key" in text
    assert "model.tiny.hiden_size is not a configuration key (did you mean " \
           "model.tiny.hidden_size?)" in text
    load(["++trainer.seed=4"])  # forcing a key that exists is fine


def test_all_problems_are_reported_together():
    text = _problems(["actor.precision=bf16", "model.path=/no/such/model",
                      "data.val_files=[/no/such/val.parquet]"])
    assert "actor.precision=bf16" in text and "model.path=/no/such/model" in text
    assert "data.val_files[0]=/no/such/val.parquet" in text


def test_model_shape_is_read_from_the_checkpoint(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"],
        "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "hidden_size": 64, "vocab_size": 100}))
    save_file({"weight": torch.zeros(2)}, str(model_dir / "model.safetensors"))
    base = [f"model.path={model_dir}", "model.make_tiny=false"]
    load(base)  # TP 2 divides 8 heads and 2 KV heads; 64 + 32 tokens fit in 128
    text = _problems(base + ["actor.tensor_model_parallel_size=4", "trainer.n_gpus_per_node=4",
                             "actor.pipeline_model_parallel_size=1",
                             "data.max_response_length=100"])
    assert "does not divide the 8 attention heads / 2 key-value heads of " \
           f"{model_dir / 'config.json'}" in text
    assert "= 164 exceeds max_position_embeddings=128" in text
    assert "4 does not divide the 6 layers" in _problems(
        base + ["actor.pipeline_model_parallel_size=4", "actor.tensor_model_parallel_size=1",
                "trainer.n_gpus_per_node=4"])
    (model_dir / "config.json").unlink()
    assert "has no config.json" in _problems(base)


def test_layout_of_a_multi_node_run():
    """2 nodes x 8 GPUs, TP 2 x PP 2 -> DP 4; 128 prompts in mini-batches of 64 over 2 PPO
    epochs -> 4 optimizer steps per step."""
    cfg = resolve(compose(["task=math_gsm8k", "trainer.nnodes=2", "trainer.n_gpus_per_node=8",
                           "actor.tensor_model_parallel_size=2",
                           "actor.pipeline_model_parallel_size=2",
                           "actor.ppo_mini_batch_size=64", "actor.ppo_epochs=2",
                           "trainer.device=cpu"]))
    layout = RankLayout.from_cfg(cfg)
    assert (layout.world_size, layout.data_parallel) == (16, 4)
    assert layout.optimizer_steps_per_step == 4
    assert layout.parallel_sizes() == ParallelSizes(2, 2, None)


def test_actor_settings_carry_what_the_ranks_read():
    cfg = load(["actor.use_dynamic_bsz=true", "actor.max_tokens_per_gpu=4096",
                "rollout.weight_sync_bucket_mb=1.5", "algorithm.kl_coef=0", "rollout.dtype=auto"])
    settings = ActorSettings.from_cfg(cfg, training_schedule(cfg, 1000), pad_token_id=7)
    assert settings.layout == RankLayout.from_cfg(cfg)
    assert settings.batches.max_tokens_per_micro_batch == 4096
    assert settings.rollout.weight_sync_bucket_bytes == 1_572_864
    assert settings.rollout.dtype == cfg.actor.precision  # rollout.dtype=auto
    assert (settings.rollout.max_model_len
            == cfg.data.max_prompt_length + cfg.data.max_response_length)
    assert not settings.model.keep_reference and settings.pad_token_id == 7
    assert settings.loss.clip_ratio_high is None and settings.loss.clip_upper == 0.2
    fixed = ActorSettings.from_cfg(load([]), training_schedule(load([]), 1000), pad_token_id=0)
    assert fixed.batches.max_tokens_per_micro_batch == 0 and fixed.model.keep_reference
    clip_higher = ActorSettings.from_cfg(load(["algorithm.clip_ratio_high=0.28"]),
                                         training_schedule(cfg, 1000), pad_token_id=0)
    assert (clip_higher.loss.clip_ratio, clip_higher.loss.clip_upper) == (0.2, 0.28)


def test_training_schedule():
    tiny = load([])  # total_steps 20, 10% warm-up: 2 training steps
    assert tuple(training_schedule(tiny, 1024)) == (20, 2)
    by_epochs = load(["trainer.total_steps=null", "trainer.total_epochs=2",
                      "actor.ppo_mini_batch_size=4", "actor.ppo_epochs=2",
                      "actor.ppo_micro_batch_size_per_gpu=4"])
    # 100 prompts // 8 = 12 steps per epoch (the partial batch dropped), x 2 epochs = 24 steps;
    # the LR schedule counts training steps (not the 4 optimizer steps in each), and its
    # warm-up rounds down as verl's int(): int(2.4) = 2 (ceil would give 3).
    assert tuple(training_schedule(by_epochs, 100)) == (24, 2)
    with pytest.raises(ConfigError, match=r"data.train_files: 5 prompts left after filtering, "
                                          r"fewer than data.prompts_per_step=8"):
        training_schedule(tiny, 5)


def _main(*args, cwd):
    return subprocess.run([sys.executable, "-m", "megatron_intuitor.main", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})


def test_entry_point_prints_the_config_and_rejects_bad_ones(tmp_path):
    shown = _main("--cfg", "job", "actor.tensor_model_parallel_size=4", "task=math_gsm8k",
                  cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "tensor_model_parallel_size: 4" in shown.stdout
    assert "experiment_name: math_gsm8k" in shown.stdout
    rejected = _main("rollout.n=1", "trainer.output_dir=out", cwd=tmp_path)
    assert rejected.returncode == 2
    assert "invalid configuration" in rejected.stderr and "rollout.n=1" in rejected.stderr
    assert "Traceback" not in rejected.stderr


def test_importing_the_config_loads_neither_ray_nor_the_graders():
    """Validating a config (the preflight) must stay cheap: no Ray, no math-verify."""
    heavy = ("ray", "math_verify", "megatron_intuitor.evaluation.registry",
             "megatron_intuitor.workers.group")
    code = ("import sys, megatron_intuitor.config; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "[]"


def test_every_kl_type_the_algorithm_computes_is_accepted():
    from megatron_intuitor import algorithm

    for kind in algorithm.KL_KINDS:
        assert load([f"algorithm.kl_type={kind}"]).algorithm.kl_type == kind
    assert load(["algorithm.kl_type=k3"]).algorithm.kl_type == "k3"
    with pytest.raises(ConfigError, match="algorithm.kl_type='k4'"):
        load(["algorithm.kl_type=k4"])


def test_tiny_default_stays_on_cpu_where_cuda_is_visible(monkeypatch):
    """On a workstation with a GPU (CUDA faked visible), the tiny default still resolves to the
    CPU face and validates (with trainer.device=auto it picked cuda and was refused for want of
    Transformer Engine)."""
    monkeypatch.setattr(config, "_cuda_available", lambda: True)
    monkeypatch.setattr(config, "_cuda_device_count", lambda: 8)
    cfg = load([])
    assert cfg.trainer.device == "cpu"
