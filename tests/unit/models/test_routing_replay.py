"""Routing replay (`models/routing_replay.py`) on the tiny Qwen3-MoE: the trainer's routers take
the given experts, its log-probs equal transformers' model whose routers are forced to the same
experts, and the routers route by their own top-k again after the pass."""
import torch

from megatron_intuitor.batch import NO_ROUTING
from megatron_intuitor.local_ranks import run_distributed
from megatron_intuitor.models.routing_replay import router_token_layout

# three right-padded prompt+response rows: prompt PROMPT tokens, then the response
LENGTHS = torch.tensor([14, 9, 12])
PROMPT = 5
WIDTH = int(LENGTHS.max())
INPUT_IDS = torch.randint(3, 900, (3, WIDTH), generator=torch.Generator().manual_seed(0))
LAYERS, EXPERTS, TOP_K = 4, 8, 2


def _forced_experts() -> torch.Tensor:
    """[rows, width, layers, top_k] distinct random experts per token and layer, `NO_ROUTING`
    where an engine reports none: each row's last token and the padding."""
    draws = torch.rand(3, WIDTH, LAYERS, EXPERTS, generator=torch.Generator().manual_seed(1))
    forced = draws.argsort(dim=-1)[..., :TOP_K]
    routed = torch.arange(WIDTH)[None] < (LENGTHS - 1)[:, None]
    return torch.where(routed[..., None, None], forced, NO_ROUTING).to(torch.int16)


def test_router_token_layout_is_sequence_major_with_padding_marked():
    # padded [b=2, s=3]: token (row i, position p) holds 10 * i + p; row 1 has 2 real tokens
    values = (10 * torch.arange(2)[:, None] + torch.arange(3)[None])[..., None, None]
    laid = router_token_layout(values, torch.tensor([3, 2]), packed=False)
    assert laid.flatten().tolist() == [0, 10, 1, 11, 2, NO_ROUTING]
    # packed [1, t=5] with 4 real tokens: the pack's order, its padding sequence marked
    packed = torch.arange(5)[None, :, None, None]
    laid = router_token_layout(packed, torch.tensor([3, 1]), packed=True)
    assert laid.flatten().tolist() == [0, 1, 2, 3, NO_ROUTING]


def _score_on_rank(rank, world_size, model_dir, forced):
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_intuitor.batch import MicroBatching
    from megatron_intuitor.models.forward import score_batch
    from megatron_intuitor.models.policy import load_policy
    from megatron_intuitor.models.routing_replay import install_routing_replay
    from megatron_intuitor.parallel import ParallelSizes, init_model_parallel

    init_model_parallel(ParallelSizes(1, 1), seed=1)
    hf_config, chunks = load_policy(model_dir, ParallelSizes(1, 1))
    install_routing_replay(chunks)
    routed: dict[int, list] = {}
    for router in (m for m in chunks[0].modules() if isinstance(m, TopKRouter)):
        router.register_forward_hook(lambda module, _, output: routed.setdefault(
            module.layer_number - 1, []).append(output[1].nonzero()[:, 1].view(-1, TOP_K)))
    attention = torch.arange(WIDTH) < LENGTHS[:, None]
    response = attention & (torch.arange(WIDTH) >= PROMPT)
    # two micro-batches, packed: the routers see [pack of rows 0-1], then [row 2]
    batching = MicroBatching(micro_batch_size=2, packed=True)

    def score(routed_experts):
        return score_batch(chunks, INPUT_IDS, attention, response, temperature=1.0,
                           vocab_size=hf_config.vocab_size, batching=batching,
                           routed_experts=routed_experts)["log_probs"]

    replayed = score(forced)
    replayed_routing = {layer: torch.cat(calls) for layer, calls in routed.items()}
    routed.clear()
    natural = score(None)  # after the replaying pass: the routers' own top-k again
    natural_routing = {layer: torch.cat(calls) for layer, calls in routed.items()}
    return replayed, natural, replayed_routing, natural_routing


def _transformers_log_probs(model_dir, forced=None) -> torch.Tensor:
    """transformers' log-probs of each token [rows, width] (0 at position 0), each row alone;
    with `forced` every router takes those experts where given (its own top-k elsewhere), their
    weights a softmax over the forced experts' logits (norm_topk_prob)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    current = {}
    for layer, decoder_layer in enumerate(model.model.layers):
        gate = decoder_layer.mlp.gate
        natural_forward = gate.forward

        def forced_forward(hidden, layer=layer, gate=gate, natural_forward=natural_forward):
            logits, weights, indices = natural_forward(hidden)
            if current.get("experts") is None:
                return logits, weights, indices
            chosen = current["experts"][:, layer].long()
            chosen = torch.where(chosen == NO_ROUTING, indices, chosen)
            return logits, torch.softmax(logits.gather(1, chosen), dim=-1), chosen

        gate.forward = forced_forward
    rows = []
    with torch.no_grad():
        for row, length in enumerate(LENGTHS.tolist()):
            current["experts"] = None if forced is None else forced[row, :length]
            logits = model(INPUT_IDS[row:row + 1, :length]).logits[0]
            picked = torch.log_softmax(logits[:-1], -1).gather(
                1, INPUT_IDS[row, 1:length, None])[:, 0]
            rows.append(torch.nn.functional.pad(picked, (1, WIDTH - length)))
    return torch.stack(rows)


def test_replayed_routing_gives_the_forced_models_log_probs_and_leaves_no_trace(tiny_qwen3_moe):
    forced = _forced_experts()
    [(replayed, natural, replayed_routing, natural_routing)] = run_distributed(
        _score_on_rank, 1, tiny_qwen3_moe, forced)
    response = (torch.arange(WIDTH) < LENGTHS[:, None]) & (torch.arange(WIDTH) >= PROMPT)
    # the routers' experts, in their token order: the pack of rows 0 and 1, then row 2
    real = torch.arange(WIDTH) < (LENGTHS - 1)[:, None]
    order = [(row, position) for rows in ([0, 1], [2]) for row in rows
             for position in range(int(LENGTHS[row]))]
    for layer in range(LAYERS):
        for index, (row, position) in enumerate(order):
            if real[row, position]:
                assert sorted(replayed_routing[layer][index].tolist()) == sorted(
                    forced[row, position, layer].tolist()), (layer, row, position)
    expected_forced = _transformers_log_probs(tiny_qwen3_moe, forced)
    expected_natural = _transformers_log_probs(tiny_qwen3_moe)
    assert (replayed - expected_forced)[response].abs().max() < 1e-5
    assert (natural - expected_natural)[response].abs().max() < 1e-5
    # the forced routing changes what the model computes, so the comparisons above tell apart
    assert (expected_forced - expected_natural)[response].abs().max() > 1e-2
    assert not torch.equal(replayed_routing[0], natural_routing[0])
