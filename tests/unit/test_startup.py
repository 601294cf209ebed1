"""What a run decides at its start: a fresh start sets the previous run aside, a resumed run says
where it is, RAY_ADDRESS is joined."""
import pytest

from megatron_intuitor.startup import (RUN_RECORD, ray_address_to_join, resume_message,
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


def test_ray_address_from_config_then_environment():
    assert ray_address_to_join(None, {}) is None
    assert ray_address_to_join(None, {"RAY_ADDRESS": "10.0.0.1:6379"}) == "10.0.0.1:6379"
    assert ray_address_to_join("auto", {"RAY_ADDRESS": "10.0.0.1:6379"}) == "auto"
