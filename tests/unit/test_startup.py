"""What a run decides at its start: a fresh start sets the previous run aside, a resumed run says
where it is, a finished run is found finished, RAY_ADDRESS is joined."""
import json
import os

import pytest

from megatron_intuitor.checkpoint import FORMAT_VERSION, TRAINER_STATE_FILE
from megatron_intuitor.startup import (RUN_RECORD, finished_step, ray_address_to_join,
                                       resume_checkpoint, resume_message,
                                       set_aside_previous_run)


def test_fresh_start_moves_the_previous_record_aside(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "wandb_run_id").write_text("abc123")
    (tmp_path / "checkpoints" / "step_2").mkdir(parents=True)
    (tmp_path / "wandb").mkdir()  # W&B's own run directories stay: each run has its own
    kept = set_aside_previous_run(tmp_path, "disable")
    assert kept is not None and kept.parent == tmp_path and kept.name.startswith("previous_")
    assert (kept / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (kept / "wandb_run_id").read_text() == "abc123"
    assert (kept / "checkpoints" / "step_2").is_dir()
    assert not any((tmp_path / name).exists() for name in RUN_RECORD)
    assert (tmp_path / "wandb").is_dir()
    (tmp_path / "metrics.jsonl").write_text("")  # a second fresh start in the same second
    second = set_aside_previous_run(tmp_path, "disable")
    assert second not in (None, kept) and (second / "metrics.jsonl").exists()


@pytest.mark.parametrize("resume", ["auto", "/runs/x/checkpoints/step_4"])
def test_resuming_runs_keep_their_record(tmp_path, resume):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert set_aside_previous_run(tmp_path, resume) is None
    assert (tmp_path / "metrics.jsonl").exists()


def test_empty_output_dir_has_nothing_to_set_aside(tmp_path):
    assert set_aside_previous_run(tmp_path, "disable") is None
    assert list(tmp_path.iterdir()) == []


def test_resume_message_says_when_nothing_is_left(tmp_path):
    assert resume_message(tmp_path / "step_10", 10, 20) == \
        f"resumed from {tmp_path}/step_10 at step 10 of 20"
    assert "the run is complete, nothing left to do" in resume_message(tmp_path, 20, 20)


def _saved(root, step: int, at: float):
    path = root / "checkpoints" / f"step_{step}"
    path.mkdir(parents=True)
    (path / TRAINER_STATE_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION,
                                                       "step": step}))
    os.utime(path / TRAINER_STATE_FILE, (at, at))
    return path


def _exported(root, at: float):
    index = root / "hf_final" / "model.safetensors.index.json"
    index.parent.mkdir(exist_ok=True)
    index.write_text("{}")
    os.utime(index, (at, at))
    return root / "hf_final"


def test_a_run_is_finished_when_its_last_step_was_saved_then_exported(tmp_path):
    _saved(tmp_path, 2, at=1000)
    last = _saved(tmp_path, 3, at=2000)
    assert resume_checkpoint(tmp_path / "checkpoints", "auto") == last
    assert resume_checkpoint(tmp_path / "checkpoints", "disable") is None
    assert resume_checkpoint(tmp_path / "checkpoints", str(tmp_path / "x")) == tmp_path / "x"
    assert finished_step(last, tmp_path / "hf_final", 3) is None  # not exported yet
    final = _exported(tmp_path, at=1500)  # an export older than the last save: killed between
    assert finished_step(last, final, 3) is None
    _exported(tmp_path, at=2500)
    assert finished_step(last, final, 3) == 3
    assert finished_step(last, final, 4) is None  # trainer.total_steps=4 runs on
    assert finished_step(None, final, 3) is None  # no checkpoint: a fresh start


def test_ray_address_from_config_then_environment():
    assert ray_address_to_join(None, {}) is None
    assert ray_address_to_join(None, {"RAY_ADDRESS": "10.0.0.1:6379"}) == "10.0.0.1:6379"
    assert ray_address_to_join("auto", {"RAY_ADDRESS": "10.0.0.1:6379"}) == "auto"
