"""Batches of prompts per training step: a seeded shuffle per epoch and a position
(epoch, step in epoch) that a checkpoint saves and restores exactly.

Each epoch's order depends only on (seed, epoch), so restoring the position reproduces the rest
of the run's data order without replaying it. The last incomplete batch of an epoch is dropped
(as verl's train dataloader does): every step sees `batch_size` prompts."""
from __future__ import annotations

from typing import Any, Generic, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


class PromptLoader(Generic[T]):
    def __init__(self, items: Sequence[T], batch_size: int, seed: int, shuffle: bool = True):
        if batch_size <= 0:
            raise ValueError(f"prompts per step must be > 0, got {batch_size}")
        if len(items) < batch_size:
            raise ValueError(f"{len(items)} prompts cannot fill one step of {batch_size} "
                             f"prompts (data.train_batch_size)")
        self.items = items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.step_in_epoch = 0
        self._order = self._epoch_order(0)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.items) // self.batch_size

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.items))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

    def next_batch(self) -> list[T]:
        """The next `batch_size` items, moving to the next epoch (a new order) when one ends."""
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
            self._order = self._epoch_order(self.epoch)
        start = self.step_in_epoch * self.batch_size
        self.step_in_epoch += 1
        return [self.items[i] for i in self._order[start:start + self.batch_size]]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed,
                "num_items": len(self.items), "batch_size": self.batch_size,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the data and settings must be those it was saved with
        (otherwise the same position would mean different prompts)."""
        for key in ("seed", "num_items", "batch_size", "shuffle"):
            if state[key] != self.state_dict()[key]:
                raise ValueError(f"data position was saved with {key}={state[key]!r} but this "
                                 f"run has {key}={self.state_dict()[key]!r}: the same position "
                                 f"would select other prompts")
        if not 0 <= state["step_in_epoch"] <= self.steps_per_epoch:
            raise ValueError(f"saved step_in_epoch {state['step_in_epoch']} is outside "
                             f"0..{self.steps_per_epoch}")
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self._order = self._epoch_order(self.epoch)
