"""The separate-rollout pipeline's bookkeeping against a stand-in actor that records what its
engines hold: no generation straddles a weight sync (no batch mixes versions), staleness stays
within trainer.max_staleness, and a resume from a checkpoint's data position trains exactly the
prompts an uninterrupted run trains (none lost, none repeated)."""
import pytest

from megatron_intuitor import metrics
from megatron_intuitor.data.loader import PromptLoader
from megatron_intuitor.rollout.pipeline import RolloutPipeline


class EngineStandIn:
    """Generation is instantaneous but 'running' until collected; syncs check the engines are
    idle, as the rollout ranks' in-place reload needs."""

    def __init__(self) -> None:
        self.engine_version = None
        self.policy_version = 0  # set by the test as its updates happen
        self.running = 0
        self.syncs = []

    def sync_weights(self) -> None:
        assert self.running == 0, "a weight sync while a generation is in flight"
        self.engine_version = self.policy_version
        self.syncs.append(self.policy_version)

    def submit_rollout(self, prompts, version):
        self.running += 1
        return {"prompts": prompts, "version": version}

    def collect_rollout(self, pending, ngram=3):
        self.running -= 1
        return pending["prompts"], {"version": pending["version"], "started": 0.0,
                                    "finished": 0.0, "tokens": len(pending["prompts"])}


def _run(pipeline, actor, steps):
    """The trainer's order: take step k (step k + staleness starts), then update to version k."""
    trained, staleness = [], []
    for step in steps:
        actor.policy_version = step - 1
        _, report, facts = pipeline.next(step, step - 1, ngram=3)
        trained.append(report)
        staleness.append(facts[metrics.STALENESS])
    return trained, staleness


def _pipeline(actor, loader, max_staleness, last_step=6):
    return RolloutPipeline(actor, loader, max_staleness, last_step,
                           lambda step, prompts: actor.submit_rollout(prompts,
                                                                      actor.engine_version))


def _loader():
    return PromptLoader(list(range(20)), batch_size=4, seed=3)


@pytest.mark.parametrize("max_staleness, expected", [(0, [0] * 6), (1, [0, 1, 1, 1, 1, 1])])
def test_staleness_within_the_bound_and_prompts_in_loader_order(max_staleness, expected):
    actor, reference = EngineStandIn(), _loader()
    trained, staleness = _run(_pipeline(actor, _loader(), max_staleness), actor, range(1, 7))
    assert staleness == expected
    assert trained == [reference.next_batch() for _ in range(6)]
    # one sync per new version the engines needed (the first: the start weights)
    assert actor.syncs == list(range(0, 6 if max_staleness == 0 else 5))


def test_resume_from_a_checkpoint_trains_every_prompt_once():
    actor = EngineStandIn()
    uninterrupted, _ = _run(_pipeline(actor, _loader(), 1), actor, range(1, 7))
    actor = EngineStandIn()
    pipeline = _pipeline(actor, _loader(), 1)
    first, _ = _run(pipeline, actor, range(1, 4))  # step 4's prompts are in flight here
    saved = pipeline.loader_state()  # what the step-3 checkpoint stores
    resumed_loader = _loader()
    resumed_loader.load_state_dict(saved)
    actor = EngineStandIn()
    rest, staleness = _run(_pipeline(actor, resumed_loader, 1), actor, range(4, 7))
    assert first + rest == uninterrupted
    assert staleness == [0, 1, 1]  # the pipeline restarts on-policy


def test_a_batch_beyond_the_bound_is_refused():
    actor = EngineStandIn()
    pipeline = _pipeline(actor, _loader(), 1)
    _run(pipeline, actor, range(1, 3))
    with pytest.raises(RuntimeError, match="2 steps behind the policy"):
        pipeline.next(3, 3, ngram=3)  # the policy moved two versions past the batch's
