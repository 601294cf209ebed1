"""The real entry point on one GPU: 2 INTUITOR steps through Ray (NCCL, rollout TP 1 with
external_launcher, sleep/wake around training, bf16), then a checkpoint and the HF export.
Skipped without CUDA; run by scripts/gpu_smoke.sh in a process of its own."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_two_step_run_through_ray_writes_checkpoint_and_hf_export(model_dir, tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "megatron_intuitor.main", "task=tiny", f"model.path={model_dir}",
        "model.make_tiny=false", "trainer.device=cuda", "trainer.n_gpus_per_node=1",
        "actor.tensor_model_parallel_size=1", "rollout.tensor_parallel_size=1",
        "actor.precision=bf16", "rollout.dtype=bfloat16", "rollout.gpu_memory_utilization=0.3",
        "actor.ref_offload=true", "trainer.total_steps=2", "trainer.val_every=0",
        "trainer.save_every=2", "trainer.resume=disable", "logger.backends=[console,jsonl]",
        f"trainer.output_dir={out}", f"logger.log_dir={out / 'logs'}",
        "trainer.experiment_name=gpu_smoke"]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row.get("step") for row in steps if "actor/grad_norm" in row] == [1, 2], steps
    assert (out / "checkpoints" / "step_2").is_dir()
    assert list((out / "hf_final").glob("*.safetensors"))
