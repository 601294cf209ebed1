"""The PPO update on Megatron (loss head on vocab-parallel logits, token mean over micro-batches
and DP ranks, or verl's mean of micro-batch token means) gives the loss and gradient norm of the
naive formula applied to transformers' logits; a non-finite loss skips the step and leaves the
weights untouched."""
import math
from dataclasses import replace

import pytest
import torch

from megatron_intuitor.local_ranks import run_distributed
from scoring_reference import reference_shifted_scores

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


def _hf_reference(model_dir, row_groups=None):
    """Naive formulas on transformers' fp32 logits; the 'old' and reference log-probs are the
    current ones shifted by fixed noise so that clipping and the KL term are active. Losses are
    the token mean over all rows, or with `row_groups` (the micro-batches) the mean over groups
    of each group's token mean (verl's aggregation)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch, noise = _batch(model.config.vocab_size)
    ids, mask = batch.input_ids, batch.response_mask
    log_probs = reference_shifted_scores(model(ids).logits, ids,
                                         temperature=TEMPERATURE).log_probs.float()
    old = (log_probs + 0.3 * noise).detach()
    ref = (log_probs - 0.2 * noise).detach()
    adv = batch.advantages[:, None].expand_as(log_probs)
    ratio = torch.exp(log_probs - old)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
    per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * DUAL_CLIP), per_token)
    d = ref - log_probs
    k3 = torch.exp(d) - d - 1
    groups = row_groups or [list(range(len(ids)))]
    pg = sum((per_token[g] * mask[g]).sum() / mask[g].sum() for g in groups) / len(groups)
    kl = sum((k3[g] * mask[g]).sum() / mask[g].sum() for g in groups) / len(groups)
    (pg + KL_COEF * kl).backward()
    grad_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    return {"pg_loss": float(pg.detach()), "kl_loss": float(kl.detach()), "grad_norm": grad_norm,
            "old": old, "ref": ref}


def _megatron_update(rank, world_size, tp, model_dir, old, ref, poison,
                     loss_agg_mode="token-mean", micro_batch_size=1):
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
    settings = PPOSettings(temperature=TEMPERATURE, clip_ratio=CLIP, kl_coef=KL_COEF,
                           kl_type="low_var_kl", entropy_coef=0.0, tis_cap=None,
                           loss_agg_mode=loss_agg_mode)
    before = dict(export_hf_weights(chunks, hf_config))
    # packed (the trainer's default layout)
    losses = ppo_forward_backward(chunks, shard, MicroBatching(micro_batch_size=micro_batch_size),
                                  settings, hf_config.vocab_size)
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
@pytest.mark.parametrize("tp", [1, 2], ids=["dp2", "tp2"])
def test_micro_batch_token_mean_is_the_mean_of_micro_batch_token_means(tiny_qwen2, tp):
    """loss_agg_mode=micro-batch-token-mean, 2 rows per micro-batch: rows {0, 1} and {2, 3}
    (one micro-batch on each DP rank, or two on the one rank at TP=2) with 8 and 11 response
    tokens; the loss is the plain mean of their two token means, not the 19-token mean."""
    official = _hf_reference(str(tiny_qwen2), row_groups=[[0, 1], [2, 3]])
    token_mean = _hf_reference(str(tiny_qwen2))
    assert official["pg_loss"] != pytest.approx(token_mean["pg_loss"], rel=1e-3)
    ranks = run_distributed(_megatron_update, 2, tp, str(tiny_qwen2), official["old"],
                            official["ref"], False, "micro-batch-token-mean", 2)
    for result in ranks:
        assert result["pg_loss"] == pytest.approx(official["pg_loss"], rel=1e-5, abs=1e-7)
        assert result["kl_loss"] == pytest.approx(official["kl_loss"], rel=1e-5, abs=1e-7)
        assert result["grad_norm"] == pytest.approx(official["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_non_finite_loss_skips_the_step_and_keeps_the_weights(tiny_qwen2, reference):
    ranks = run_distributed(_megatron_update, 2, 2, str(tiny_qwen2), reference["old"],
                            reference["ref"], True)
    for result in ranks:
        assert not result["stepped"]
        assert not math.isfinite(result["grad_norm"])
        assert result["changed"] == 0.0


def _head_inputs():
    from megatron_intuitor.models.forward import ModelInput

    gen = torch.Generator().manual_seed(5)
    vocab = 11
    logits = torch.randn(2, 5, vocab, generator=gen, dtype=torch.float64).float()
    input_ids = torch.randint(0, vocab, (2, 5), generator=gen)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, 2:] = True
    # float64 oracle scores: entry t from the logits at t - 1
    log_probs, entropy, _ = reference_shifted_scores(logits, input_ids, temperature=TEMPERATURE)
    old = log_probs + 0.05 * torch.randn(2, 5, generator=gen, dtype=torch.float64)
    advantages = torch.tensor([[1.0] * 5, [-1.0] * 5], dtype=torch.float64)
    micro_batch = ModelInput({"input_ids": input_ids, "response_mask": mask,
                              "advantages": advantages.float(), "old_log_probs": old.float()},
                             position_ids=torch.arange(5).expand(2, -1),
                             lengths=torch.tensor([5, 5]))
    return logits, micro_batch, log_probs, entropy, old, advantages, mask


def _settings(**overrides):
    from megatron_intuitor.ppo import PPOSettings

    options = dict(temperature=TEMPERATURE, clip_ratio=CLIP, kl_coef=0.0,
                   kl_type="low_var_kl", entropy_coef=0.0, tis_cap=None)
    options.update(overrides)
    return PPOSettings(**options)


@pytest.fixture
def single_rank_head(monkeypatch):
    from megatron_intuitor import ppo
    from megatron_intuitor.models import forward

    monkeypatch.setattr(forward, "_tp_group", lambda: None)  # one rank holds the vocabulary
    return lambda settings: ppo._ppo_head(settings, vocab_size=11)


def test_head_entropy_bonus_and_kl_cov_against_naive_formulas(single_rank_head):
    logits, micro_batch, log_probs, entropy, old, adv, mask = _head_inputs()
    ratio = torch.exp(log_probs - old)
    ppo_tokens = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
    ppo_tokens = torch.where(adv < 0, torch.minimum(ppo_tokens, -adv * DUAL_CLIP), ppo_tokens)
    loss, tokens, _ = single_rank_head(_settings(entropy_coef=0.1))(logits, micro_batch)
    expected = (ppo_tokens[mask].sum() - 0.1 * entropy[mask].sum()).item()
    assert int(tokens) == 6 and loss.item() == pytest.approx(expected, abs=1e-5)

    # KL-Cov: int(0.2 x 6) -> 1 token, the largest (A - mean A)(log p - mean log p)
    cov = (adv[mask] - adv[mask].mean()) * (log_probs[mask] - log_probs[mask].mean())
    kl_tokens = -adv[mask] * ratio[mask]
    top = int(cov.argmax())
    kl_tokens[top] += 2.0 * (log_probs - old)[mask][top].abs()
    loss, _, _ = single_rank_head(_settings(policy_loss="kl_cov", cov_select_ratio=0.2,
                                            cov_kl_coef=2.0))(logits, micro_batch)
    assert loss.item() == pytest.approx(kl_tokens.sum().item(), abs=1e-5)  # fp32 sum of ~1s


def test_head_micro_batch_token_mean_returns_rows_times_the_token_mean(single_rank_head):
    """verl's aggregation: weight = the micro-batch's 2 rows, loss = 2 x its 6-token mean (so
    that Megatron's division by the summed rows averages micro-batch means)."""
    logits, micro_batch, log_probs, _, old, adv, mask = _head_inputs()
    ratio = torch.exp(log_probs - old)
    ppo_tokens = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
    ppo_tokens = torch.where(adv < 0, torch.minimum(ppo_tokens, -adv * DUAL_CLIP), ppo_tokens)
    head = single_rank_head(_settings(loss_agg_mode="micro-batch-token-mean"))
    loss, weight, _ = head(logits, micro_batch)
    assert int(weight) == 2
    assert loss.item() == pytest.approx(2 * ppo_tokens[mask].mean().item(), abs=1e-5)


def test_head_clip_ratio_high_raises_only_the_upper_clip(single_rank_head):
    """algorithm.clip_ratio_high (DAPO's clip-higher): every ratio is e^0.22 = 1.246, which the
    symmetric clip caps at 1.2 and a clip_ratio_high of 0.28 leaves alone; against the float64
    PPO formula with the upper clip 1 + clip_ratio_high."""
    logits, micro_batch, log_probs, _, _, adv, mask = _head_inputs()
    old = log_probs - 0.22
    micro_batch.tokens["old_log_probs"] = old.float()
    ratio = torch.exp(log_probs - old)
    losses = {}
    for high in (None, 0.28):
        upper = 1 + (CLIP if high is None else high)
        tokens = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, upper))
        tokens = torch.where(adv < 0, torch.minimum(tokens, -adv * DUAL_CLIP), tokens)
        loss, _, _ = single_rank_head(_settings(clip_ratio_high=high))(logits, micro_batch)
        assert loss.item() == pytest.approx(tokens[mask].sum().item(), abs=1e-5)
        losses[high] = loss.item()
    # the 3 positive-advantage tokens: -1.2 each clipped, -1.246 each with clip-higher
    assert losses[None] - losses[0.28] == pytest.approx(3 * (math.exp(0.22) - 1.2), abs=1e-5)


def test_head_clip_cov_can_drop_every_unclipped_token(single_rank_head):
    from megatron_intuitor.models.forward import shifted_token_scores

    logits, micro_batch, *_ = _head_inputs()
    current = shifted_token_scores(logits, micro_batch["input_ids"], temperature=TEMPERATURE,
                                   vocab_size=11).log_probs
    micro_batch.tokens["old_log_probs"] = current.detach()  # ratio 1: PPO clips nothing
    wide = _settings(policy_loss="clip_cov", cov_select_ratio=1.0, cov_clip_lower=-1e9,
                     cov_clip_upper=1e9)
    logits.requires_grad_()
    loss, _, _ = single_rank_head(wide)(logits, micro_batch)
    loss.backward()
    assert loss.item() == 0.0 and float(logits.grad.abs().max()) == 0.0
    plain, _, _ = single_rank_head(_settings())(logits, micro_batch)
    plain.backward()
    assert float(logits.grad.abs().max()) > 1e-3  # without Clip-Cov the tokens carry gradient


def test_head_on_policy_takes_the_old_log_probs_from_its_own_forward(single_rank_head):
    """Without old log-probs (rollout.score_at_sampling, on-policy) the head uses its forward's
    own, detached: loss and logits gradient equal those of the head given exactly those
    log-probs as old ones (ratio 1: loss = -sum A over tokens), and it reports the engine's
    |log-prob difference| as the float64 token mean."""
    logits, micro_batch, log_probs, _, _, adv, mask = _head_inputs()
    rollout = log_probs + 0.01 * torch.randn(2, 5, generator=torch.Generator().manual_seed(3),
                                             dtype=torch.float64)
    micro_batch.tokens["rollout_log_probs"] = rollout.float()
    given = dict(micro_batch.tokens, old_log_probs=log_probs.float())
    del micro_batch.tokens["old_log_probs"]
    head = single_rank_head(_settings())
    gradients, losses = [], []
    for tokens in (micro_batch.tokens, given):
        leaf = logits.clone().requires_grad_()
        loss, _, extra = head(leaf, replace(micro_batch, tokens=tokens))
        loss.backward()
        gradients.append(leaf.grad)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(-adv[mask].sum().item(), abs=1e-5)
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    assert torch.allclose(gradients[0], gradients[1], atol=1e-6)
    assert float(gradients[0].abs().max()) > 1e-3
    sums = head(logits, micro_batch)[2]["sums"]
    from megatron_intuitor import metrics
    from megatron_intuitor.ppo import LOSS_METRICS

    diff = sums[LOSS_METRICS.index(metrics.ROLLOUT_LOGPROB_DIFF)] / sums[-1]
    assert float(diff) == pytest.approx((rollout - log_probs).abs()[mask].mean().item(),
                                        abs=1e-6)
