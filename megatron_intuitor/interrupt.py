"""Ctrl-C (SIGINT) of a run: one sentence saying where it stopped and how to continue, exit
status 130 (128 + SIGINT, what shells report for an interrupted command), no traceback.

`at_step` turns a KeyboardInterrupt inside the training loop into `RunInterrupted` carrying the
step in progress; the console script catches both (a Ctrl-C during start-up is a bare
KeyboardInterrupt) and prints `message`.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

EXIT_STATUS = 130


class RunInterrupted(Exception):
    """Ctrl-C during training step `step` (0: before the first)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"interrupted at step {step}")
        self.step = step


@contextmanager
def at_step(step: Callable[[], int]) -> Iterator[None]:
    """Inside: a KeyboardInterrupt becomes RunInterrupted(step()), the step then in progress."""
    try:
        yield
    except KeyboardInterrupt:
        raise RunInterrupted(step()) from None


def message(error: BaseException, output_dir: str | Path) -> str:
    """Where the run stopped, and `resume_hint`."""
    step = error.step if isinstance(error, RunInterrupted) else None
    where = (f"interrupted at step {step}" if step else "interrupted before the first training "
             "step" if step == 0 else "interrupted outside the training steps (start-up or the "
             "final export)")
    return f"{where}; {resume_hint(output_dir)}"


def resume_hint(output_dir: str | Path) -> str:
    """The last complete checkpoint under `output_dir` and how to go on from it (the same
    command: `trainer.resume=auto` is the default)."""
    from megatron_intuitor.checkpoint import latest_checkpoint

    last: Optional[Path] = latest_checkpoint(Path(output_dir) / "checkpoints")
    if last is None:
        return f"no checkpoint yet in {output_dir}: a rerun starts from the beginning"
    return (f"last checkpoint {last.name} ({last}); rerun the same command (with "
            f"trainer.resume=auto, the default) to continue from it")
