"""Sequence packing (THD) and token-budget dynamic batching: the same per-token scores, PPO loss
and gradients as fixed padded micro-batches and as the naive formulas on transformers' logits,
at TP=1, TP=2 and PP=2, on rows of very unequal lengths."""
import math
from dataclasses import replace

import pytest
import torch

from megatron_intuitor.batch import MicroBatching
from megatron_intuitor.local_ranks import run_distributed
from scoring_reference import reference_shifted_scores

TEMPERATURE, CLIP, KL_COEF = 0.8, 0.2, 0.1
# (prompt, response) lengths: one row far longer than the budget, one without a response.
ROWS = [(3, 27), (5, 2), (2, 9), (4, 0), (6, 4), (3, 13), (2, 1), (4, 7)]
BUDGET = 24
BATCHINGS = {
    "padded_fixed": MicroBatching(micro_batch_size=3, packed=False),
    "packed_fixed": MicroBatching(micro_batch_size=3),
    "padded_dynamic": MicroBatching(max_tokens=BUDGET, packed=False),
    "packed_dynamic": MicroBatching(max_tokens=BUDGET),
}


def _batch():
    from megatron_intuitor.batch import batch_from_rollouts
    from megatron_intuitor.rollout.engine import RolloutSample

    gen = torch.Generator().manual_seed(5)
    samples = []
    for row, (p, r) in enumerate(ROWS):
        ids = torch.randint(0, 1003, (p + r,), generator=gen).tolist()
        samples.append(RolloutSample(row // 2, ids[:p], ids[p:], "", "stop", [0.0] * r))
    rollouts = batch_from_rollouts(samples, pad_token_id=0)
    unset = torch.zeros(rollouts.input_ids.shape)  # old / reference log-probs: set by the caller
    batch = rollouts.for_update(torch.randn(len(ROWS), generator=gen), unset, unset)
    return batch, torch.randn(batch.input_ids.shape, generator=gen)


def _hf_reference(model_dir) -> dict:
    """Per-token scores and the PPO loss (clip + dual clip + k3 KL, token mean) with its gradient
    norm, on transformers' fp32 logits of the padded batch (the scores: the float64 oracle)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch, noise = _batch()
    ids, mask = batch.input_ids, batch.response_mask
    attention = torch.arange(ids.shape[1]) < batch.lengths[:, None]
    logits = model(ids, attention_mask=attention.long()).logits
    shifted = reference_shifted_scores(logits, ids, temperature=TEMPERATURE)
    scores = {k: torch.where(mask, v.float(), 0.0) for k, v in shifted._asdict().items()}
    log_probs = scores["log_probs"]
    old, ref = (log_probs + 0.3 * noise).detach(), (log_probs - 0.2 * noise).detach()
    adv = batch.advantages[:, None]
    ratio = torch.exp(log_probs - old)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
    per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * 3.0), per_token)
    d = ref - log_probs
    tokens = mask.sum()
    pg, kl = (per_token * mask).sum() / tokens, ((d.exp() - d - 1) * mask).sum() / tokens
    (pg + KL_COEF * kl).backward()
    grad_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    return {"scores": {k: v.detach() for k, v in scores.items()}, "pg_loss": float(pg.detach()),
            "kl_loss": float(kl.detach()), "grad_norm": grad_norm, "old": old, "ref": ref}


def _largest(values: torch.Tensor) -> float:
    return float(values.abs().max()) if values.numel() else 0.0


def _every_batching_on_rank(rank, world_size, tp, pp, model_dir, old, ref):
    """Scores, PPO losses, gradient norm and this rank's gradient shard for every batching."""
    from megatron.core import parallel_state

    from megatron_intuitor import metrics
    from megatron_intuitor.models.forward import (micro_batches, run_pipeline, score_batch,
                                                  token_scores)
    from megatron_intuitor.models.optimizer import build_optimizer
    from megatron_intuitor.models.policy import load_policy
    from megatron_intuitor.parallel import ParallelSizes, init_model_parallel
    from megatron_intuitor.ppo import PPOSettings, ppo_forward_backward

    sizes = ParallelSizes(tp, pp)
    init_model_parallel(sizes, seed=1)
    hf_config, chunks = load_policy(model_dir, sizes)
    chunks, optimizer = build_optimizer(chunks, 1e-3)
    batch, _ = _batch()
    batch = replace(batch, old_log_probs=old, ref_log_probs=ref)
    attention = torch.arange(batch.input_ids.shape[1]) < batch.lengths[:, None]
    settings = PPOSettings(temperature=TEMPERATURE, clip_ratio=CLIP, kl_coef=KL_COEF,
                           kl_type="low_var_kl", entropy_coef=0.0, tis_cap=None)

    # Record the model input of every micro-batch (on the last stage, where heads run).
    seen = {}

    def recording_head(name):
        def head(logits_shard, micro_batch):
            seen.setdefault(name, []).append(
                (tuple(micro_batch["input_ids"].shape), micro_batch.packed_seq_params,
                 tuple(logits_shard.shape[:2]), int(micro_batch["response_mask"].sum())))
            scores = token_scores(logits_shard, micro_batch, temperature=TEMPERATURE,
                                  vocab_size=hf_config.vocab_size)
            return logits_shard.sum() * 0.0, {"scores": torch.stack(scores, -1),
                                              "response": micro_batch["response_mask"].bool()}
        return head

    results = {}
    for name, batching in BATCHINGS.items():
        scores = score_batch(chunks, batch.input_ids, attention, batch.response_mask,
                             temperature=TEMPERATURE, vocab_size=hf_config.vocab_size,
                             batching=batching)
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        losses = ppo_forward_backward(chunks, batch, batching, settings,
                                      hf_config.vocab_size)
        grads = torch.cat([p.main_grad.flatten().clone() for chunk in chunks
                           for p in chunk.parameters()])
        optimizer.prepare_grads()
        grad_norm = float(optimizer.get_grad_norm())
        cut = micro_batches({"input_ids": batch.input_ids, "response_mask": batch.response_mask},
                            batch.lengths, batching.partition(batch.lengths))
        with torch.no_grad():
            every = run_pipeline(chunks, cut, recording_head(name), forward_only=True,
                                 packed=batching.packed)
            selected = run_pipeline(chunks, cut, recording_head(f"{name}/selected"),
                                    forward_only=True, packed=batching.packed,
                                    logits_at="response_mask")
        # the LM head at response positions only: the same scores there, 0 elsewhere
        selection_diff = max(
            max(_largest((a["scores"] - b["scores"])[a["response"]]),
                _largest(b["scores"][~a["response"]])) for a, b in zip(every, selected)
        ) if every else None
        results[name] = {"selection_diff": selection_diff, "scores": scores,
                         "pg_loss": losses[metrics.PG_LOSS],
                         "kl_loss": losses[metrics.KL_LOSS], "grad_norm": grad_norm,
                         "grads": grads, "partition": [p.tolist() for p in
                                                       batching.partition(batch.lengths)]}
    last = parallel_state.is_pipeline_last_stage()
    return {"results": results, "seen": seen if last else None}


@pytest.fixture(scope="module")
def reference(tiny_qwen2):
    return _hf_reference(str(tiny_qwen2))


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_packed_and_dynamic_batching_equal_padded_and_transformers(tiny_qwen2, reference, tp, pp):
    ranks = run_distributed(_every_batching_on_rank, tp * pp, tp, pp, str(tiny_qwen2),
                            reference["old"], reference["ref"])
    lengths = [p + r for p, r in ROWS]
    response = torch.tensor([[p <= t < p + r for t in range(max(lengths))] for p, r in ROWS])
    for rank, result in enumerate(ranks):
        by_name = result["results"]
        padded = by_name["padded_fixed"]
        for name, got in by_name.items():
            where = f"rank {rank} {name}"
            for score, want in reference["scores"].items():
                torch.testing.assert_close(got["scores"][score], want, rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{where} {score} vs HF: {m}")
                torch.testing.assert_close(got["scores"][score], padded["scores"][score],
                                           rtol=1e-6, atol=2e-6,
                                           msg=lambda m: f"{where} {score} vs padded: {m}")
                assert torch.all(got["scores"][score][~response] == 0)
            for loss in ("pg_loss", "kl_loss"):
                assert got[loss] == pytest.approx(reference[loss], rel=1e-5, abs=1e-7), where
            assert got["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4), where
            torch.testing.assert_close(got["grads"], padded["grads"], rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{where} gradient vs padded: {m}")
        # Token budget: every row once; each micro-batch within it unless a lone long row.
        for name in ("padded_dynamic", "packed_dynamic"):
            batching, parts = BATCHINGS[name], by_name[name]["partition"]
            assert sorted(r for part in parts for r in part) == list(range(len(ROWS)))
            for part in parts:
                cost = batching.tokens([lengths[r] for r in part])
                assert cost <= BUDGET or (len(part) == 1 and lengths[part[0]] > BUDGET)
            assert [lengths[r] for r in parts[0]] == [max(lengths)] and max(lengths) > BUDGET
    # What the model read: packed micro-batches are one row of real tokens (plus one padding
    # sequence at PP > 1, where all micro-batches share a shape); padded ones are row blocks.
    seen = [r["seen"] for r in ranks if r["seen"] is not None]
    assert len(seen) == tp
    for name, batching in BATCHINGS.items():
        parts = ranks[0]["results"][name]["partition"]
        shapes = [shape for shape, *_ in seen[0][name]]
        for shape, _, logits, _ in seen[0][name]:
            assert logits == shape  # every position: [1, t] packed, [b, s] padded
        for _, _, logits, response_tokens in seen[0][f"{name}/selected"]:
            assert logits == (1, response_tokens)  # one logits row per response token
        for result in ranks:
            diff = result["results"][name]["selection_diff"]
            assert diff is None or diff <= 1e-6, (name, diff)
        for part, (shape, params, _, _) in zip(parts, seen[0][name]):
            real = [lengths[r] for r in part]
            if batching.packed:
                bounds = params.cu_seqlens_q.tolist()
                assert bounds[:len(real) + 1] == [0, *torch.tensor(real).cumsum(0).tolist()]
                padding = shape[1] - sum(real)
                assert bounds[len(real) + 1:] == ([shape[1]] if padding else [])
                assert params.max_seqlen_q == max(real + [padding])
                assert shape[0] == 1 and (pp > 1 or padding == 0)
            else:
                assert params is None
                assert shape == ((max(len(p) for p in parts), max(lengths)) if pp > 1
                                 else (len(real), max(real)))
        if pp > 1:
            assert len(set(shapes)) == 1


def test_run_pipeline_refuses_malformed_micro_batches():
    from megatron_intuitor.models.forward import run_pipeline

    ids = torch.zeros(2, 5, dtype=torch.long)
    run = lambda *micro: run_pipeline([], list(micro), None, forward_only=True, packed=True)
    with pytest.raises(ValueError, match="at least one micro-batch"):
        run()
    with pytest.raises(ValueError, match="micro-batch 0 needs 'input_ids' and 'lengths'"):
        run({"input_ids": ids})
    with pytest.raises(ValueError, match=r"micro-batch 1: response_mask shape \(2, 4\)"):
        run({"input_ids": ids, "lengths": torch.tensor([5, 1])},
            {"input_ids": ids, "lengths": torch.tensor([5, 1]),
             "response_mask": torch.zeros(2, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"lengths \[6, 1\] must be one per row, each in"):
        run({"input_ids": ids, "lengths": torch.tensor([6, 1])})
    with pytest.raises(ValueError, match=r"lengths \[0, 1\]"):
        run({"input_ids": ids, "lengths": torch.tensor([0, 1])})
