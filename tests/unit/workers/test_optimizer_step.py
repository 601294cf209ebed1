"""The update's optimizer bookkeeping (`workers/actor.py`): one gradient-norm computation per
step, skipped steps leave the weights alone, the LR schedule advances once per training step
(verl's unit) unless all its optimizer steps were skipped, and the logged LR is the one the step
used. A stand-in optimizer with Megatron's interface counts the norm computations (each
is an all-reduce in a real run); the schedule is Megatron's own."""
import math

import pytest
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_intuitor.workers.actor import (end_of_training_step, guarded_optimizer_step,
                                             optimizer_step_at_scheduled_lr)


class _Optimizer:
    """MegatronOptimizer's step interface over one gradient norm."""

    def __init__(self, grad_norm: float):
        self.grad_norm, self.norm_computations, self.steps, self.zeroed = grad_norm, 0, 0, 0
        self.clipped_to = None
        self.param_groups = [{"lr": 0.0, "weight_decay": 0.0}]

    def prepare_grads(self) -> bool:
        return False

    def get_grad_norm(self) -> float:
        self.norm_computations += 1
        return self.grad_norm

    def clip_grad_norm(self, clip_grad: float) -> float:  # as Megatron's: computes the norm
        self.clipped_to = clip_grad
        return self.get_grad_norm()

    def step_with_ready_grads(self) -> bool:
        self.steps += 1
        return True

    def zero_grad(self) -> None:
        self.zeroed += 1


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_the_gradient_norm_is_computed_once_per_step(grad_clip):
    optimizer = _Optimizer(grad_norm=2.5)
    assert guarded_optimizer_step(optimizer, grad_clip) == (True, 2.5)
    assert optimizer.norm_computations == 1 and optimizer.steps == 1
    assert optimizer.clipped_to == (grad_clip or None)


@pytest.mark.parametrize("grad_norm", [math.inf, math.nan])
def test_a_non_finite_norm_skips_the_step(grad_norm):
    optimizer = _Optimizer(grad_norm)
    stepped, norm = guarded_optimizer_step(optimizer, 1.0)
    assert not stepped and not math.isfinite(norm)
    assert optimizer.steps == 0 and optimizer.zeroed == 1


def test_the_schedule_advances_once_per_training_step_unless_all_its_steps_were_skipped():
    """Linear warm-up to 1.0 over 2 training steps: lr 0, 0.5, 1.0 at scheduler steps 0, 1, 2.
    Training steps of 2 optimizer steps each: both of the first at lr 0, both of the second at
    0.5 (one skipped), a third whose steps are all skipped does not advance it: 3 scheduler
    steps after 4 training steps."""
    optimizer = _Optimizer(grad_norm=1.0)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=1.0, min_lr=0.0, lr_warmup_steps=2, lr_decay_steps=10,
        lr_decay_style="constant", start_wd=0.0, end_wd=0.0, wd_incr_steps=10,
        wd_incr_style="constant")
    used = []
    for grad_norms in ((1.0, 1.0), (math.nan, 1.0), (math.nan, math.inf), (1.0, 1.0)):
        taken = []
        for grad_norm in grad_norms:
            optimizer.grad_norm = grad_norm
            stepped, _, lr = optimizer_step_at_scheduled_lr(optimizer, grad_clip=1.0)
            taken.append(stepped)
            used.append((stepped, lr))
        end_of_training_step(scheduler, taken)
    assert used == [(True, 0.0), (True, 0.0), (False, 0.5), (True, 0.5),
                    (False, 1.0), (False, 1.0), (True, 1.0), (True, 1.0)]
    assert scheduler.num_steps == 3
    stepped, norm, lr = optimizer_step_at_scheduled_lr(optimizer, 1.0, finite_loss=False)
    assert (stepped, math.isnan(norm), lr) == (False, True, 1.0)
