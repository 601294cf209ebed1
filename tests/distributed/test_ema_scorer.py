"""`algorithm.scorer=ema` through the actor's own methods on 2 gloo ranks at TP=2: the reward's
self-certainty comes from the EMA copy (policy weight 0: the start weights, equal to the float64
oracle over transformers' logits; weight 1: the moved policy's own score), the entropy stays the
policy's, and a checkpoint saves and restores the EMA shards exactly."""
import pytest
import torch

from megatron_intuitor.local_ranks import run_distributed

RESPONSES = ((4, 6), (9, 3), (2, 11))  # (prompt, response) lengths


def _samples():
    from megatron_intuitor.rollout.engine import RolloutSample

    gen = torch.Generator().manual_seed(0)
    return [RolloutSample(prompt_index=i // 2, text="", finish_reason="stop",
                          prompt_token_ids=torch.randint(3, 900, (p,), generator=gen).tolist(),
                          response_token_ids=torch.randint(3, 900, (r,), generator=gen).tolist(),
                          log_probs=[0.0] * r)
            for i, (p, r) in enumerate(RESPONSES)]


def _oracle_self_certainty(model_dir: str, temperature: float) -> list[float]:
    """Each response's mean self-certainty under the start weights: transformers' fp32 logits,
    the float64 formula, averaged over the response tokens by hand."""
    import transformers
    from scoring_reference import reference_shifted_scores

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir,
                                                              torch_dtype=torch.float32)
    rewards = []
    with torch.no_grad():
        for sample in _samples():
            ids = torch.tensor([sample.prompt_token_ids + sample.response_token_ids])
            scores = reference_shifted_scores(model(ids).logits, ids, temperature=temperature,
                                              vocab_size=model.config.vocab_size)
            rewards.append(float(scores.self_certainty[0, len(sample.prompt_token_ids):].mean()))
    return rewards


def _actor(model_dir: str, overrides: list[str]):
    """An ActorWorker's training side (policy + distributed Adam, EMA scorer, scheduler, step
    data) built by its own methods at TP=2, without the Ray actor and the rollout engine."""
    from megatron_intuitor import parallel
    from megatron_intuitor.batch import batch_from_rollouts
    from megatron_intuitor.config import ActorSettings, load, training_schedule
    from megatron_intuitor.models.optimizer import build_optimizer
    from megatron_intuitor.models.policy import load_policy
    from megatron_intuitor.workers.actor import ActorWorker, _lr_scheduler

    cfg = load(overrides + ["actor.tensor_model_parallel_size=2", "trainer.n_gpus_per_node=2",
                            "rollout.tensor_parallel_size=2", "algorithm.kl_coef=0"])
    worker = object.__new__(ActorWorker)
    worker.settings = ActorSettings.from_cfg(cfg, training_schedule(cfg, 1000), pad_token_id=0)
    sizes = worker.settings.layout.parallel_sizes()
    parallel.init_model_parallel(sizes, seed=1)
    worker.hf_config, policy = load_policy(model_dir, sizes)
    worker.policy, worker.optimizer = build_optimizer(policy, 1e-3)
    # Adam's state exists from the first step on (a checkpoint holds it): one with zero
    # gradients, which leaves the weights as they are
    assert worker.optimizer.step()[0]
    worker.lr_scheduler = _lr_scheduler(worker.optimizer, worker.settings.optimizer,
                                        worker.settings.schedule)
    worker.reference, worker.ref_offload, worker.engine = None, False, None
    worker.model_dir, worker.dp_rank, worker.dp_size = model_dir, 0, 1
    worker.reports_for_dp_group = True
    worker.scorer_model = worker._build_scorer(model_dir, sizes, {"recompute": False})
    worker.rollouts = batch_from_rollouts(_samples(), pad_token_id=0)
    return worker


def _move_policy(worker) -> None:
    """A stand-in for an optimizer step: an exact function of each weight's value, so both TP
    shards of a tensor and its replicas move alike."""
    with torch.no_grad():
        for chunk in worker.policy:
            for param in chunk.parameters():
                param.mul_(1.25).add_(0.01)


def _shards(chunks) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for index, chunk in enumerate(chunks)
            for name, param in chunk.named_parameters(prefix=str(index))}


def _ranks(rank, world, model_dir, root):
    from megatron.core import parallel_state

    from megatron_intuitor.checkpoint import save_checkpoint
    from megatron_intuitor.workers.actor import ActorWorker

    out = {}
    # policy weight 0 (decay 1): the EMA stays the start weights while the policy moves
    worker = _actor(model_dir, ["algorithm.scorer=ema", "algorithm.scorer_ema.alpha_start=0",
                                "algorithm.scorer_ema.alpha_end=0"])
    _move_policy(worker)
    out["update_metrics"] = worker._update_scorer(step=1)
    scored = worker.score()
    online = ActorWorker.score(_with_scorer(worker, None))
    out["ema_stays_start"] = scored.self_certainty
    out["online"] = online.self_certainty
    out["entropy_equal"] = torch.equal(scored.entropy_sum, online.entropy_sum)
    # policy weight 1 (decay 0): the EMA becomes the policy
    worker = _with_settings(worker, alpha=1.0)
    out["update_metrics_1"] = worker._update_scorer(step=2)
    out["ema_is_policy"] = worker.score().self_certainty
    # a checkpoint holds the EMA shards: a half-way EMA, saved, then loaded into fresh ones
    worker = _with_settings(worker, alpha=0.5)
    _move_policy(worker)
    worker._update_scorer(step=3)
    saved = _shards(worker.scorer_model)
    path = worker.save_checkpoint(f"{root}/with_ema", 3, {"data": 0}, keep_last=1)
    worker.scorer_model = worker._build_scorer(model_dir, worker.settings.layout.parallel_sizes(),
                                               {"recompute": False})
    out["differs_before_load"] = any(not torch.equal(saved[n], p)
                                     for n, p in _shards(worker.scorer_model).items())
    worker.load_checkpoint(path)
    loaded = _shards(worker.scorer_model)
    out["restored_exactly"] = saved.keys() == loaded.keys() and all(
        torch.equal(saved[n], loaded[n]) for n in saved)
    save_checkpoint(f"{root}/without_ema", 3, worker.policy, worker.optimizer,
                    extra={"lr_scheduler": worker.lr_scheduler.state_dict()})
    try:
        worker.load_checkpoint(f"{root}/without_ema/step_3")
        out["missing_error"] = None
    except ValueError as error:
        out["missing_error"] = str(error)
    parallel_state.destroy_model_parallel()
    return out


def _with_scorer(worker, scorer_model):
    from copy import copy

    other = copy(worker)
    other.scorer_model = scorer_model
    return other


def _with_settings(worker, alpha: float):
    """The same worker (same weights) with a constant EMA policy weight `alpha`."""
    from dataclasses import replace

    worker.settings = replace(worker.settings, scorer=replace(
        worker.settings.scorer, alpha_start=alpha, alpha_end=alpha))
    return worker


@pytest.mark.slow
def test_ema_scorer_rewards_checkpoint_and_metrics(tmp_path, tiny_qwen2):
    from megatron_intuitor.config import load
    from megatron_intuitor.metrics import REWARD_SCORER, SCORER_EMA_POLICY_WEIGHT

    ranks = run_distributed(_ranks, 2, str(tiny_qwen2), str(tmp_path))
    oracle = torch.tensor(_oracle_self_certainty(str(tiny_qwen2), load([]).rollout.temperature),
                          dtype=torch.float64)
    for rank, out in enumerate(ranks):
        assert out["update_metrics"] == {REWARD_SCORER: 1.0, SCORER_EMA_POLICY_WEIGHT: 0.0}
        assert out["update_metrics_1"][SCORER_EMA_POLICY_WEIGHT] == 1.0
        torch.testing.assert_close(out["ema_stays_start"].double(), oracle, rtol=0, atol=1e-4,
                                   msg=f"rank {rank}: decay 1 scores as the start weights")
        assert (out["online"] - out["ema_stays_start"]).abs().min() > 0.01  # the policy moved
        assert out["entropy_equal"], "the entropy must stay the policy's"
        torch.testing.assert_close(out["ema_is_policy"], out["online"], rtol=0, atol=1e-6,
                                   msg=f"rank {rank}: decay 0 scores as the online policy")
        assert out["differs_before_load"] and out["restored_exactly"]
        assert "holds no weights of ema_scorer" in out["missing_error"]
