"""Routing replay at expert parallelism 2 (2 ranks, tiny Qwen3-MoE), padded micro-batches of
two rows (the routers see [s, b] sequence-major). TP1 x DP2: in the scoring pass and in a
forward-backward pass with activation recompute (the recomputed router calls replay from the
backward queue) every router takes exactly the given experts, and the gradients under replay
with recompute equal those without recompute (a recompute that routed by its own top-k would
make them differ) and differ from the unreplayed model's. TP2 x EP2 (ETP1), sequence parallel (as
`load_policy` builds MoE at TP > 1): each tensor-parallel rank's routers take the given experts
of its part of the sequence in the scoring pass."""
import pytest
import torch

from megatron_intuitor.local_ranks import run_distributed

LENGTHS = torch.tensor([12, 7, 10])
PROMPT = 4
WIDTH = int(LENGTHS.max())
LAYERS, EXPERTS, TOP_K = 4, 8, 2


def _forced_experts() -> torch.Tensor:
    """Random distinct experts per token and layer; -1 (the router's own) on each row's last
    token and the padding, as the engine reports them."""
    draws = torch.rand(3, WIDTH, LAYERS, EXPERTS, generator=torch.Generator().manual_seed(2))
    routed = torch.arange(WIDTH)[None] < (LENGTHS - 1)[:, None]
    return torch.where(routed[..., None, None], draws.argsort(dim=-1)[..., :TOP_K],
                       -1).to(torch.int16)


def _replay_on_rank(rank, world_size, model_dir, forced, tensor, train):
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.utils import get_model_config

    from megatron_intuitor.batch import MicroBatching
    from megatron_intuitor.models.forward import (ROUTED_EXPERTS, micro_batches, run_pipeline,
                                                  score_batch, token_scores)
    from megatron_intuitor.models.policy import load_policy
    from megatron_intuitor.models.routing_replay import install_routing_replay
    from megatron_intuitor.parallel import ParallelSizes, init_model_parallel

    sizes = ParallelSizes(tensor=tensor, pipeline=1, expert=2, expert_tensor=1)
    init_model_parallel(sizes, seed=1)
    hf_config, chunks = load_policy(model_dir, sizes, recompute=True)
    install_routing_replay(chunks)
    config = get_model_config(chunks[0])
    input_ids = torch.randint(3, 900, (3, WIDTH), generator=torch.Generator().manual_seed(0))
    attention = torch.arange(WIDTH) < LENGTHS[:, None]
    response = attention & (torch.arange(WIDTH) >= PROMPT)
    batching = MicroBatching(micro_batch_size=2, packed=False)
    calls: list = []  # per router call: (layer, experts of each token [s * b, top_k])
    for router in (m for m in chunks[0].modules() if isinstance(m, TopKRouter)):
        router.register_forward_hook(lambda module, _, output: calls.append(
            (module.layer_number - 1, output[1].nonzero()[:, 1].view(-1, TOP_K))))

    def expected(rows) -> torch.Tensor:
        """The forced experts of a micro-batch's rows in router order [s * b, layers, top_k]."""
        width = int(LENGTHS[rows].max())
        return forced[rows, :width].transpose(0, 1).reshape(-1, LAYERS, TOP_K)

    def routed_as_forced(micro_rows: list) -> bool:
        """Each router call took the forced experts (where given) of its micro-batch, in the
        order the micro-batches ran (recomputed calls included)."""
        per_layer = {layer: [c for l, c in calls if l == layer] for layer in range(LAYERS)}
        for layer, layer_calls in per_layer.items():
            wanted = [expected(rows) for rows in micro_rows]
            if len(layer_calls) != len(wanted):
                return False
            for got, want in zip(layer_calls, wanted):
                given = want[:, layer].long()
                if config.sequence_parallel:  # each TP rank routes its part of the sequence
                    given = given.chunk(parallel_state.get_tensor_model_parallel_world_size())[
                        parallel_state.get_tensor_model_parallel_rank()]
                keep = given[:, 0] >= 0
                if not torch.equal(got[keep], given[keep].sort(dim=-1).values):
                    return False
        return True

    if not train:
        chunks[0].eval()  # Megatron refuses MoE in training mode at TP > 1 without SP
    score_batch(chunks, input_ids, attention, response, temperature=1.0,
                vocab_size=hf_config.vocab_size, batching=batching, routed_experts=forced)
    scored_as_forced = routed_as_forced([[0, 1], [2]])
    if not train:
        return scored_as_forced, None

    def sum_of_log_probs(logits, micro_batch):
        log_probs = token_scores(logits, micro_batch, temperature=1.0,
                                 vocab_size=hf_config.vocab_size).log_probs
        mask = micro_batch["response_mask"]
        return -(log_probs * mask).sum(), mask.sum().to(torch.int), {}

    def gradients(replay: bool, recompute: bool) -> torch.Tensor:
        config.recompute_granularity = "full" if recompute else None
        for param in chunks[0].parameters():
            param.grad = None
        columns = {"input_ids": input_ids, "response_mask": response}
        if replay:
            columns[ROUTED_EXPERTS] = forced
        calls.clear()
        run_pipeline(chunks, micro_batches(columns, LENGTHS, batching.partition(LENGTHS)),
                     sum_of_log_probs, forward_only=False, packed=False,
                     logits_at="response_mask")
        return torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten()
                          for p in chunks[0].parameters()])

    chunks[0].train()
    replayed_recomputed = gradients(replay=True, recompute=True)
    # forward then recomputed forward of each micro-batch
    trained_as_forced = routed_as_forced([[0, 1], [0, 1], [2], [2]])
    replayed = gradients(replay=True, recompute=False)
    natural = gradients(replay=False, recompute=False)
    return scored_as_forced, (trained_as_forced,
                              float((replayed_recomputed - replayed).abs().max()),
                              float((replayed - natural).abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize("tensor, train", [(1, True), (2, False)], ids=["tp1-ep2", "tp2-ep2"])
def test_replay_at_ep2_routes_as_given_in_scoring_and_recomputed_update(tiny_qwen3_moe, tensor,
                                                                        train):
    results = run_distributed(_replay_on_rank, 2, tiny_qwen3_moe, _forced_experts(), tensor,
                              train)
    for scored, trained in results:
        assert scored
        if train:
            trained_as_forced, recompute_gap, replay_effect = trained
            assert trained_as_forced
            assert recompute_gap < 1e-6
            assert replay_effect > 1e-3
