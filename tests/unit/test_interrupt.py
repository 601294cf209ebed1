"""Ctrl-C of a run (`megatron_intuitor.interrupt`): the step in progress and the last complete
checkpoint in one sentence."""
import json

import pytest

from megatron_intuitor import interrupt


def _checkpoint(path):
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"format_version": 1, "step": 2}))


def test_interrupt_names_the_step_and_the_last_checkpoint(tmp_path):
    step = 3
    with pytest.raises(interrupt.RunInterrupted) as caught:
        with interrupt.at_step(lambda: step):
            raise KeyboardInterrupt
    assert caught.value.step == 3
    assert interrupt.message(caught.value, tmp_path) == (
        f"interrupted at step 3; no checkpoint yet in {tmp_path}: a rerun starts from the "
        f"beginning")
    _checkpoint(tmp_path / "checkpoints" / "step_2")
    (tmp_path / "checkpoints" / ".tmp_step_3").mkdir()  # the save Ctrl-C cut short
    assert interrupt.message(caught.value, tmp_path) == (
        f"interrupted at step 3; last checkpoint step_2 ({tmp_path / 'checkpoints' / 'step_2'}); "
        f"rerun the same command (with trainer.resume=auto, the default) to continue from it")
    assert interrupt.message(KeyboardInterrupt(), tmp_path).startswith(
        "interrupted outside the training steps (start-up or the final export); last "
        "checkpoint step_2")
    assert interrupt.message(interrupt.RunInterrupted(0), tmp_path).startswith(
        "interrupted before the first training step; last checkpoint step_2")
