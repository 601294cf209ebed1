"""The PPO update on Megatron (loss head on vocab-parallel logits, token mean over micro-batches
and DP ranks) gives the loss and gradient norm of the naive formula applied to transformers'
logits; a non-finite loss skips the step and leaves the weights untouched."""
import math
from dataclasses import replace

import pytest
import torch

from megatron_intuitor.local_ranks import run_distributed

TEMPERATURE, CLIP, DUAL_CLIP, KL_COEF = 0.7, 0.2, 3.0, 0.1
PROMPT_LENGTHS, RESPONSE_LENGTHS = [3, 5, 2, 4], [6, 2, 7, 4]


def _batch(vocab_size: int):
    from megatron_intuitor.batch import batch_from_rollouts
    from megatron_intuitor.rollout.engine import RolloutSample

    gen = torch.Generator().manual_seed(11)
    samples = []
    for row, (p, r) in enumerate(zip(PROMPT_LENGTHS, RESPONSE_LENGTHS)):
        ids = torch.randint(0, 500, (p + r,), generator=gen).tolist()
        samples.append(RolloutSample(row // 2, ids[:p], ids[p:], "", "stop", [0.0] * r))
    rollouts = batch_from_rollouts(samples, pad_token_id=0)
    unset = torch.zeros(rollouts.input_ids.shape)  # old / reference log-probs: set by the caller
    batch = rollouts.for_update(torch.tensor([1.5, -0.7, -1.2, 0.4]), unset, unset)
    noise = torch.randn(batch.input_ids.shape, generator=gen)
    return batch, noise


def _hf_reference(model_dir):
    """Naive formulas on transformers' fp32 logits; the 'old' and reference log-probs are the
    current ones shifted by fixed noise so that clipping and the KL term are active."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch, noise = _batch(model.config.vocab_size)
    ids, mask = batch.input_ids, batch.response_mask
    logits = model(ids).logits[:, :-1] / TEMPERATURE
    log_probs = torch.nn.functional.pad(
        torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1), (1, 0))
    old = (log_probs + 0.3 * noise).detach()
    ref = (log_probs - 0.2 * noise).detach()
    adv = batch.advantages[:, None].expand_as(log_probs)
    ratio = torch.exp(log_probs - old)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
    per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * DUAL_CLIP), per_token)
    d = ref - log_probs
    k3 = torch.exp(d) - d - 1
    tokens = mask.sum()
    pg = (per_token * mask).sum() / tokens
    kl = (k3 * mask).sum() / tokens
    (pg + KL_COEF * kl).backward()
    grad_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    return {"pg_loss": float(pg.detach()), "kl_loss": float(kl.detach()), "grad_norm": grad_norm,
            "old": old, "ref": ref}


def _megatron_update(rank, world_size, tp, model_dir, old, ref, poison):
    from megatron.core import parallel_state

    from megatron_intuitor import metrics
    from megatron_intuitor.batch import MicroBatching, data_parallel_shard
    from megatron_intuitor.models.bridge import export_hf_weights
    from megatron_intuitor.models.optimizer import build_optimizer
    from megatron_intuitor.models.policy import load_policy
    from megatron_intuitor.parallel import ParallelSizes, init_model_parallel
    from megatron_intuitor.ppo import PPOSettings, ppo_forward_backward
    from megatron_intuitor.workers.actor import guarded_optimizer_step

    sizes = ParallelSizes(tp, 1)
    init_model_parallel(sizes, seed=1)
    hf_config, chunks = load_policy(model_dir, sizes)
    chunks, optimizer = build_optimizer(chunks, 1e-3, clip_grad=1.0)
    batch, _ = _batch(hf_config.vocab_size)
    batch = replace(batch, old_log_probs=old, ref_log_probs=ref)
    if poison:
        batch.advantages[0] = float("nan")
    shard = data_parallel_shard(batch, parallel_state.get_data_parallel_rank(),
                                parallel_state.get_data_parallel_world_size()).trimmed()
    settings = PPOSettings(temperature=TEMPERATURE, vocab_size=hf_config.vocab_size,
                           clip_ratio=CLIP, kl_coef=KL_COEF, kl_type="low_var_kl",
                           entropy_coef=0.0, tis_cap=None)
    before = dict(export_hf_weights(chunks, hf_config))
    # 1 row per micro-batch, packed (the trainer's default layout)
    losses = ppo_forward_backward(chunks, shard, MicroBatching(micro_batch_size=1), settings)
    stepped, grad_norm = guarded_optimizer_step(optimizer, 1.0)
    after = dict(export_hf_weights(chunks, hf_config))
    changed = max(float((after[k] - before[k]).abs().max()) for k in before)
    return {"pg_loss": losses[metrics.PG_LOSS], "kl_loss": losses[metrics.KL_LOSS],
            "grad_norm": grad_norm, "stepped": stepped, "changed": changed}


@pytest.fixture(scope="module")
def reference(tiny_qwen2):
    return _hf_reference(str(tiny_qwen2))


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2], ids=["dp2", "tp2"])
def test_ppo_update_matches_naive_loss_and_gradient(tiny_qwen2, reference, tp):
    ranks = run_distributed(_megatron_update, 2, tp, str(tiny_qwen2), reference["old"],
                            reference["ref"], False)
    for result in ranks:
        assert result["pg_loss"] == pytest.approx(reference["pg_loss"], rel=1e-5, abs=1e-7)
        assert result["kl_loss"] == pytest.approx(reference["kl_loss"], rel=1e-5, abs=1e-7)
        assert result["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)
        assert result["stepped"] and result["changed"] > 1e-4


@pytest.mark.slow
def test_non_finite_loss_skips_the_step_and_keeps_the_weights(tiny_qwen2, reference):
    ranks = run_distributed(_megatron_update, 2, 2, str(tiny_qwen2), reference["old"],
                            reference["ref"], True)
    for result in ranks:
        assert not result["stepped"]
        assert not math.isfinite(result["grad_norm"])
        assert result["changed"] == 0.0
