"""The pytest for the distributed self-certainty: vocab-parallel log-prob, entropy and
self-certainty (megatron_intuitor.scoring) against naive single-process formulas in float64.

Each TP world size runs every case once (one spawn per world size); the tests below then check
one property each on the collected results.
"""
import math

import pytest
import torch
import torch.distributed as dist

from megatron_intuitor.local_ranks import run_distributed
from megatron_intuitor.scoring import (masked_mean_per_packed_sequence, masked_mean_per_sequence,
                                       vocab_parallel_token_scores)
from scoring_reference import reference_shifted_scores, reference_token_scores


def _padded(vocab_size: int, tp: int) -> int:
    """Megatron's padded vocabulary: a multiple of 128 * TP (computed here independently)."""
    multiple = 128 * tp
    return math.ceil(vocab_size / multiple) * multiple


def _case(name, *, vocab, tp, shape, dtype=torch.float32, temperature=1.0, chunk=None,
          backward="both", scale=3.0, extreme=False, seed=0):
    """Full padded logits (padding filled with large garbage that must be ignored), targets and
    upstream gradients for log_probs / entropy."""
    gen = torch.Generator().manual_seed(seed)
    width = _padded(vocab, tp)
    logits = torch.randn(*shape, width, generator=gen, dtype=torch.float64) * scale
    if extreme:  # peaked and flat rows at +-1e4: exp under- and overflow without the max shift
        signs = torch.randint(0, 2, (*shape, width), generator=gen) * 2 - 1
        logits = signs * 1e4 + logits
        logits[..., 0, :vocab] = -1e4
        logits[..., 0, 7] = 1e4
    logits[..., vocab:] = 50.0  # padded columns: far above every real logit
    targets = torch.randint(0, vocab, shape, generator=gen)
    targets.view(-1)[0] = vocab - 1  # the last real column, next to the padding
    return dict(name=name, vocab=vocab, logits=logits.to(dtype), targets=targets,
                temperature=temperature, chunk=chunk, backward=backward,
                grad_log_probs=torch.randn(shape, generator=gen),
                grad_entropy=torch.randn(shape, generator=gen))


def _cases(tp: int) -> list[dict]:
    return [
        _case("v1003_batch", vocab=1003, tp=tp, shape=(3, 5), chunk=4),
        _case("v1003_packed_temperature", vocab=1003, tp=tp, shape=(13,), temperature=0.7,
              chunk=5, seed=1),
        _case("v32000_temperature", vocab=32000, tp=tp, shape=(2, 6), temperature=1.3, seed=2),
        _case("v32000_chunk7", vocab=32000, tp=tp, shape=(2, 6), chunk=7, seed=2),
        _case("v1003_entropy_only", vocab=1003, tp=tp, shape=(4, 3), chunk=3,
              backward="entropy", seed=3),
        _case("v1003_log_probs_only", vocab=1003, tp=tp, shape=(4, 3), chunk=3,
              backward="log_probs", seed=3),
        _case("v1003_extreme", vocab=1003, tp=tp, shape=(3, 4), chunk=5, extreme=True, seed=4),
        _case("v1003_bf16", vocab=1003, tp=tp, shape=(4, 5), dtype=torch.bfloat16,
              temperature=0.9, chunk=6, seed=5),
        _case("v32000_bf16_no_grad", vocab=32000, tp=tp, shape=(2, 3), dtype=torch.bfloat16,
              backward=None, seed=6),
    ]


def _score_shard(case: dict, rank: int, tp: int, tp_group) -> dict:
    full = case["logits"]
    width = full.shape[-1] // tp
    shard = full[..., rank * width:(rank + 1) * width].clone()
    before = shard.clone()
    shard.requires_grad_(case["backward"] is not None)
    with torch.set_grad_enabled(case["backward"] is not None):
        scores = vocab_parallel_token_scores(
            shard, case["targets"], temperature=case["temperature"], vocab_size=case["vocab"],
            tp_group=tp_group, chunk_size=case["chunk"])
    if case["backward"] is not None:
        loss = 0.0
        if case["backward"] in ("both", "log_probs"):
            loss = loss + (scores.log_probs * case["grad_log_probs"]).sum()
        if case["backward"] in ("both", "entropy"):
            loss = loss + (scores.entropy * case["grad_entropy"]).sum()
        loss.backward()
    return dict(values=[v.detach() for v in scores],
                grad=None if shard.grad is None else shard.grad.float(),
                unchanged=torch.equal(shard.detach(), before),
                self_certainty_requires_grad=scores.self_certainty.requires_grad)


def _score_cases_on_rank(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    return [_score_shard(case, rank, world_size, dist.group.WORLD) for case in cases]


def _naive(case: dict) -> dict:
    """The float64 oracle over the real vocabulary, with autograd."""
    logits = case["logits"].double().requires_grad_()
    log_probs, entropy, self_certainty = reference_token_scores(
        logits, case["targets"], temperature=case["temperature"], vocab_size=case["vocab"])
    loss = (log_probs * case["grad_log_probs"] * (case["backward"] in ("both", "log_probs"))
            + entropy * case["grad_entropy"] * (case["backward"] in ("both", "entropy"))).sum()
    loss.backward()
    return dict(values=[log_probs.detach(), entropy.detach(), self_certainty.detach()],
                grad=logits.grad)


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda tp: f"tp{tp}")
def scored(request):
    """(tp, cases, per-rank results) for one tensor-parallel size."""
    tp = request.param
    cases = _cases(tp)
    return tp, cases, run_distributed(_score_cases_on_rank, tp, cases)


def _tolerance(case: dict) -> dict:
    if case["name"].endswith("extreme"):  # values ~1e4: fp32 relative precision
        return dict(rtol=2e-6, atol=1e-3)
    return dict(rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_values_equal_naive_reference(scored):
    tp, cases, results = scored
    for index, case in enumerate(cases):
        reference = _naive(case)["values"]
        for rank_results in results:
            for name, got, want in zip(("log_probs", "entropy", "self_certainty"),
                                       rank_results[index]["values"], reference):
                assert got.dtype == torch.float32 and got.shape == case["targets"].shape
                torch.testing.assert_close(got.double(), want, **_tolerance(case),
                                           msg=lambda m: f"{case['name']} {name} tp={tp}: {m}")


@pytest.mark.slow
def test_gradients_equal_naive_autograd(scored):
    tp, cases, results = scored
    for index, case in enumerate(cases):
        if case["backward"] is None:
            assert all(r[index]["grad"] is None for r in results)
            continue
        got = torch.cat([r[index]["grad"] for r in results], dim=-1).double()
        want = _naive(case)["grad"]
        assert torch.all(got[..., case["vocab"]:] == 0), "padded columns must get no gradient"
        low_precision = case["logits"].dtype == torch.bfloat16
        tolerance = dict(rtol=1.6e-2, atol=1e-3) if low_precision else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, want, **tolerance,
                                   msg=lambda m: f"{case['name']} tp={tp}: {m}")


@pytest.mark.slow
def test_inputs_unchanged_and_self_certainty_has_no_gradient(scored):
    _, cases, results = scored
    for index, case in enumerate(cases):
        for rank_results in results:
            assert rank_results[index]["unchanged"], case["name"]
            assert not rank_results[index]["self_certainty_requires_grad"], case["name"]


@pytest.mark.slow
def test_extreme_logits_are_finite(scored):
    _, cases, results = scored
    [index] = [i for i, case in enumerate(cases) if case["name"].endswith("extreme")]
    for rank_results in results:
        assert all(torch.isfinite(v).all() for v in rank_results[index]["values"])
        assert torch.isfinite(rank_results[index]["grad"]).all()


def test_without_group_equals_reference_and_chunking_does_not_matter():
    case = _case("local", vocab=1003, tp=1, shape=(5, 7), temperature=0.8)
    reference = _naive(case)["values"]
    for chunk in (None, 1, 3, 35, 100):
        scores = vocab_parallel_token_scores(case["logits"], case["targets"], temperature=0.8,
                                             vocab_size=1003, chunk_size=chunk)
        for got, want in zip(scores, reference):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_bad_inputs_fail_clearly():
    logits, targets = torch.zeros(2, 3, 128), torch.zeros(2, 3, dtype=torch.long)
    score = lambda lg, tg, **kw: vocab_parallel_token_scores(
        lg, tg, **{"temperature": 1.0, "vocab_size": 100, **kw})
    with pytest.raises(ValueError, match="target_ids shape"):
        score(logits, targets[:, :2])
    with pytest.raises(ValueError, match=r"target_ids must lie in \[0, vocab_size=100\)"):
        score(logits, targets + 100)
    with pytest.raises(ValueError, match="vocab_size 129"):
        score(logits, targets, vocab_size=129)
    with pytest.raises(ValueError, match="temperature"):
        score(logits, targets, temperature=0.0)
    with pytest.raises(TypeError, match="target_ids must be an integer"):
        score(logits, targets.float())


def test_masked_mean_per_sequence():
    values = torch.tensor([[1.0, 2.0, 3.0, float("nan")], [5.0, 6.0, 7.0, 8.0],
                           [float("inf"), 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]])
    means = masked_mean_per_sequence(values, mask)
    assert means.tolist() == [2.0, 0.0, 1.0]  # fully masked row: 0, masked NaN/inf never leak


def test_masked_mean_per_packed_sequence_equals_padded():
    gen = torch.Generator().manual_seed(0)
    lengths = [4, 0, 1, 6]
    values = [torch.randn(n, generator=gen) for n in lengths]
    masks = [torch.rand(n, generator=gen) > 0.4 for n in lengths]
    masks[3][:] = False  # a fully masked response
    padded_values = torch.nn.utils.rnn.pad_sequence(values, batch_first=True)
    padded_masks = torch.nn.utils.rnn.pad_sequence(masks, batch_first=True)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    packed = masked_mean_per_packed_sequence(torch.cat(values), torch.cat(masks), cu_seqlens)
    torch.testing.assert_close(packed, masked_mean_per_sequence(padded_values, padded_masks))
    assert packed[3] == 0 and packed[1] == 0
    with pytest.raises(ValueError, match="cu_seqlens"):
        masked_mean_per_packed_sequence(torch.cat(values), torch.cat(masks), cu_seqlens[:-1])


# --- End to end: a tiny HF Qwen2 converted to Megatron, scored through the pipeline ----------

E2E_TEMPERATURE = 0.7
E2E_MICRO_BATCH = 2
E2E_ENTROPY_WEIGHT = 0.3


def _e2e_batch(vocab_size: int) -> dict:
    """Right-padded [prompt, response, padding] rows; the second response is empty."""
    gen = torch.Generator().manual_seed(0)
    prompt_lengths, response_lengths = [3, 5, 2, 4], [6, 0, 9, 4]
    seq = max(p + r for p, r in zip(prompt_lengths, response_lengths)) + 2
    input_ids = torch.randint(0, vocab_size, (len(prompt_lengths), seq), generator=gen)
    positions = torch.arange(seq)
    attention_mask = torch.stack([positions < p + r
                                  for p, r in zip(prompt_lengths, response_lengths)]).long()
    response_mask = torch.stack([(positions >= p) & (positions < p + r)
                                 for p, r in zip(prompt_lengths, response_lengths)]).long()
    return dict(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask)


def _score_and_grad_on_rank(rank, world_size, tp, pp, model_dir, batch, ep=1, packed=False):
    """score_batch on every rank, then one forward+backward of a log-prob/entropy loss through
    run_pipeline: the final norm's gradient on the last stage, summed over the tensor-parallel
    ranks as Megatron does under sequence parallelism (on for a mixture of experts at TP > 1)."""
    from megatron.core import parallel_state
    from tensor_parallel_grads import reduce_over_tensor_parallel

    from megatron_intuitor.batch import MicroBatching
    from megatron_intuitor.models.bridge import load_hf_weights
    from megatron_intuitor.models.config import (build_model, load_hf_config,
                                                 transformer_config_from_hf,
                                                 uses_sequence_parallel)
    from megatron_intuitor.models.forward import (micro_batches, run_pipeline, score_batch,
                                                  shifted_token_scores)
    from megatron_intuitor.parallel import ParallelSizes, init_model_parallel

    sizes = ParallelSizes(tp, pp, expert=ep)
    init_model_parallel(sizes, seed=1)
    hf_config = load_hf_config(model_dir)
    chunks = build_model(hf_config, transformer_config_from_hf(
        hf_config, sizes, sequence_parallel=uses_sequence_parallel(hf_config, tp)))
    load_hf_weights(chunks, model_dir, hf_config)
    batching = MicroBatching(micro_batch_size=E2E_MICRO_BATCH, packed=packed)
    scores = score_batch(chunks, **batch, temperature=E2E_TEMPERATURE,
                         vocab_size=hf_config.vocab_size, batching=batching)

    def loss_head(logits_shard, micro_batch):
        token = shifted_token_scores(logits_shard, micro_batch["input_ids"],
                                     temperature=E2E_TEMPERATURE, vocab_size=hf_config.vocab_size)
        mask = micro_batch["response_mask"]
        loss = ((token.log_probs + E2E_ENTROPY_WEIGHT * token.entropy) * mask).sum()
        return loss, {"loss": loss.detach()}

    lengths = batch["attention_mask"].sum(dim=1)
    tokens = {"input_ids": batch["input_ids"], "response_mask": batch["response_mask"]}
    run_pipeline(chunks, micro_batches(tokens, lengths, batching.partition(lengths)), loss_head,
                 forward_only=False, packed=packed)
    reduce_over_tensor_parallel(chunks)
    norm_grad = (chunks[-1].decoder.final_layernorm.weight.grad.clone()
                 if parallel_state.is_pipeline_last_stage() else None)
    return {"scores": scores, "norm_grad": norm_grad,
            "sequence_parallel": chunks[0].config.sequence_parallel}


def _hf_reference(model_dir, batch: dict) -> dict:
    """The float64 oracle on transformers' logits: entry t scores token t from logits at t-1."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids, response = batch["input_ids"], batch["response_mask"].bool()
    logits = model(ids, attention_mask=batch["attention_mask"]).logits
    shifted = reference_shifted_scores(logits, ids, temperature=E2E_TEMPERATURE)
    per_token = {k: torch.where(response, v.float(), 0.0) for k, v in shifted._asdict().items()}
    # run_pipeline's schedule divides each micro-batch's loss by the number of micro-batches.
    num_micro_batches = ids.shape[0] // E2E_MICRO_BATCH
    loss = ((per_token["log_probs"] + E2E_ENTROPY_WEIGHT * per_token["entropy"])
            * response).sum() / num_micro_batches
    loss.backward()
    return {"scores": {k: v.detach() for k, v in per_token.items()},
            "norm_grad": model.model.norm.weight.grad}


def _check_end_to_end(model_dir, tp, pp, ep=1, packed=False):
    from megatron_intuitor.models.config import load_hf_config, uses_sequence_parallel

    hf_config = load_hf_config(model_dir)
    batch = _e2e_batch(hf_config.vocab_size)
    world = pp * math.lcm(tp, ep * tp)  # expert-parallel ranks are data-parallel ranks
    ranks = run_distributed(_score_and_grad_on_rank, world, tp, pp, str(model_dir), batch, ep,
                            packed)
    assert all(r["sequence_parallel"] == uses_sequence_parallel(hf_config, tp) for r in ranks)
    reference = _hf_reference(model_dir, batch)
    response = batch["response_mask"]
    want_sentence = masked_mean_per_sequence(reference["scores"]["self_certainty"], response)
    assert want_sentence[1] == 0 and torch.all(want_sentence[[0, 2, 3]] > 0)
    for rank, result in enumerate(ranks):
        for name, want in reference["scores"].items():
            torch.testing.assert_close(result["scores"][name], want, rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"rank {rank} {name}: {m}")
        got_sentence = masked_mean_per_sequence(result["scores"]["self_certainty"], response)
        assert torch.isfinite(got_sentence).all()
        torch.testing.assert_close(got_sentence, want_sentence, rtol=1e-5, atol=2e-5)
    norm_grads = [r["norm_grad"] for r in ranks if r["norm_grad"] is not None]
    assert len(norm_grads) == world // pp
    for grad in norm_grads:
        torch.testing.assert_close(grad, reference["norm_grad"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_end_to_end_tensor_parallel_2(tiny_qwen2):
    _check_end_to_end(tiny_qwen2, tp=2, pp=1)


@pytest.mark.slow
def test_end_to_end_tensor_2_pipeline_2(tiny_qwen2):
    _check_end_to_end(tiny_qwen2, tp=2, pp=2)


@pytest.fixture(scope="module")
def tiny_qwen2_moe(tmp_path_factory):
    from megatron_intuitor.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("qwen2_moe"), arch="qwen2_moe",
                           vocab_size=1003)


@pytest.mark.slow
def test_end_to_end_moe_tensor_2_expert_2_sequence_parallel_packed(tiny_qwen2_moe):
    """Qwen2-MoE (gated shared expert, full-softmax top-k probabilities) at TP=2 x EP=2 (4
    ranks), sequence parallel, the rows packed (each pack padded to an even length): the
    vocab-parallel scores and the final norm's gradient (summed over TP) equal transformers'.
    Qwen3-MoE's logits and gradients at TP=2 x EP=2: tests/unit/models/test_bridge.py."""
    _check_end_to_end(tiny_qwen2_moe, tp=2, pp=1, ep=2, packed=True)


@pytest.mark.slow
def test_end_to_end_moe_expert_2_gradients(tiny_qwen3_moe):
    """Qwen3-MoE at EP=2: scores and the final norm's gradient equal transformers'."""
    _check_end_to_end(tiny_qwen3_moe, tp=1, pp=1, ep=2)


def test_score_batch_refuses_layouts_it_cannot_score():
    from megatron_intuitor.models.forward import check_batch

    batch = _e2e_batch(1003)
    ids, attention, response = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    with pytest.raises(ValueError, match="row 0 is not right-padded"):
        check_batch(ids, attention.flip(1), torch.zeros_like(response))
    empty = attention.clone()
    empty[2] = 0
    with pytest.raises(ValueError, match="attention_mask row 2 is empty"):
        check_batch(ids, empty, torch.zeros_like(response))
    with pytest.raises(ValueError, match="response_mask row 0 marks padding"):
        check_batch(ids, attention, torch.ones_like(response))
    response_at_0 = response.clone()
    response_at_0[:, 0] = 1
    with pytest.raises(ValueError, match="position 0"):
        check_batch(ids, attention, response_at_0)
    with pytest.raises(ValueError, match="attention_mask shape"):
        check_batch(ids, attention[:, 1:], response)
