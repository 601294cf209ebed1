"""What a run decides at its start from what it finds: a previous run in its output directory
(resumed, or set aside for a fresh start) and the Ray cluster to join."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Mapping, Optional

log = logging.getLogger(__name__)

# A run's record in trainer.output_dir: what a fresh start must not append to or pick up.
RUN_RECORD = ("metrics.jsonl", "alerts.jsonl", "wandb_run_id", "checkpoints", "hf_final",
              "curves.png", "collapse.png")


def set_aside_previous_run(output_dir: Path, resume: str) -> Optional[Path]:
    """With `trainer.resume=disable`, moves a previous run's record (metrics, alerts, the W&B
    run id, checkpoints, export, plots) into `<output_dir>/previous_<time>/`, so that the fresh
    start writes a new metrics file and W&B run and keeps the old ones. Returns that directory
    (None when there was nothing to move or the run resumes)."""
    if resume != "disable":
        return None
    found = [output_dir / name for name in RUN_RECORD if (output_dir / name).exists()]
    if not found:
        return None
    kept = output_dir / f"previous_{time.strftime('%Y%m%d_%H%M%S')}"
    suffix = 1
    while kept.exists():
        kept = output_dir / f"previous_{time.strftime('%Y%m%d_%H%M%S')}_{suffix}"
        suffix += 1
    kept.mkdir(parents=True)
    for path in found:
        path.rename(kept / path.name)
    return kept


def resume_checkpoint(checkpoint_root: Path, resume: str) -> Optional[Path]:
    """The checkpoint `trainer.resume` continues from (`auto`: the latest complete one under
    `checkpoint_root`; a path: that one); None for `disable` or a first run."""
    from megatron_intuitor.checkpoint import latest_checkpoint

    if resume == "disable":
        return None
    return latest_checkpoint(checkpoint_root) if resume == "auto" else Path(resume)


def finished_step(checkpoint: Optional[Path], final_policy: Path,
                  total_steps: int) -> Optional[int]:
    """The step of a run with nothing left to do: its checkpoint is at the last step or past it,
    and its final policy was exported after that checkpoint was saved. None when it has training
    or the export left."""
    from megatron_intuitor.checkpoint import TRAINER_STATE_FILE, read_trainer_state

    exported = final_policy / "model.safetensors.index.json"  # written last, then published
    if checkpoint is None or not exported.is_file():
        return None
    step = int(read_trainer_state(checkpoint)["step"])
    saved = (checkpoint / TRAINER_STATE_FILE).stat().st_mtime
    return step if step >= total_steps and exported.stat().st_mtime >= saved else None


def resume_message(checkpoint: Path, step: int, total_steps: int) -> str:
    """The console line of a resumed run, saying when nothing is left to do."""
    if step >= total_steps:
        return (f"resumed from {checkpoint} at step {step} of {total_steps}: the run is complete, "
                f"nothing left to do (trainer.resume=disable starts over, the old run kept; "
                f"trainer.total_steps=N runs on)")
    return f"resumed from {checkpoint} at step {step} of {total_steps}"


def ray_address_to_join(configured: Optional[str], environ: Mapping[str, str]) -> Optional[str]:
    """The Ray cluster the run joins: `trainer.ray_address`, else `RAY_ADDRESS`; None starts a
    private local cluster."""
    return configured or environ.get("RAY_ADDRESS") or None
