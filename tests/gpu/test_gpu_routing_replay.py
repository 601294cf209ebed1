"""Routing replay on GPU (`actor.moe_routing_replay=rollout`), in a process of its own (its
engine returns routed experts, which needs vLLM's Model Runner V2). Written without a GPU: it
has never run. Skipped without CUDA; run by scripts/gpu_smoke.sh."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TEMPERATURE = 1.0
TIE_MARGIN = 1e-4  # router logits closer than this may rank differently in two kernels


def test_engine_routing_is_transformers_top_k_and_megatron_replays_it(routed_engine, world,
                                                                      moe_model_dir):
    """After a sync, the engine's routed experts of prompt and response tokens equal
    transformers' router top-k on the same tokens (tokens whose k-th and (k+1)-th router logits
    are within TIE_MARGIN excepted, counted); Megatron's policy replaying them routes every
    token exactly so, and its log-probs' gap to the engine's is printed with and without
    replay (rollout/logprob_diff's measure)."""
    from megatron.core.transformer.moe.router import TopKRouter
    from transformers import AutoModelForCausalLM

    from megatron_intuitor.batch import NO_ROUTING, MicroBatching, batch_from_rollouts
    from megatron_intuitor.models.bridge import export_hf_weights
    from megatron_intuitor.models.forward import score_batch
    from megatron_intuitor.models.policy import load_policy
    from megatron_intuitor.models.routing_replay import install_routing_replay
    from megatron_intuitor.rollout.engine import SamplingConfig
    from megatron_intuitor.rollout.weight_sync import sync_weights

    hf_config, chunks = load_policy(moe_model_dir, world)
    install_routing_replay(chunks)
    sync_weights(routed_engine, export_hf_weights(chunks, hf_config))
    samples = routed_engine.generate([[5, 6, 7, 8, 9, 10], [11, 12, 13]],
                                     SamplingConfig(n=2, temperature=TEMPERATURE, max_tokens=16,
                                                    seed=3, ignore_eos=True))
    batch = batch_from_rollouts(samples, pad_token_id=0)
    top_k = hf_config.num_experts_per_tok

    model = AutoModelForCausalLM.from_pretrained(moe_model_dir, dtype=torch.float32).cuda()
    ties = compared = 0
    with torch.no_grad():
        for row, length in enumerate(batch.lengths.tolist()):
            ids = batch.input_ids[row:row + 1, :length].cuda()
            for layer, logits in enumerate(model(ids, output_router_logits=True).router_logits):
                ranked = logits.reshape(length, -1).sort(dim=-1, descending=True)
                clear = (ranked.values[:, top_k - 1] - ranked.values[:, top_k]) > TIE_MARGIN
                expected = ranked.indices[:, :top_k].sort(dim=-1).values.cpu()
                engine = batch.routed_experts[row, :length - 1, layer].long().sort(dim=-1).values
                clear = clear[:length - 1].cpu()
                assert torch.equal(engine[clear], expected[:length - 1][clear]), (row, layer)
                ties += int((~clear).sum())
                compared += length - 1
    print(f"routing replay: engine routing = transformers' top-k on {compared - ties} of "
          f"{compared} (token, layer) pairs; {ties} near-ties not compared")

    recorded: dict[int, list] = {}
    for router in (m for m in chunks[0].modules() if isinstance(m, TopKRouter)):
        router.register_forward_hook(lambda module, _, output: recorded.setdefault(
            module.layer_number - 1, []).append(output[1].nonzero()[:, 1].view(-1, top_k)))
    attention = torch.arange(batch.input_ids.shape[1]) < batch.lengths[:, None]
    batching = MicroBatching(micro_batch_size=len(batch), packed=True)  # one pack, row order

    def log_probs(routed_experts):
        return score_batch(chunks, batch.input_ids, attention, batch.response_mask,
                           temperature=TEMPERATURE, vocab_size=hf_config.vocab_size,
                           batching=batching, routed_experts=routed_experts)["log_probs"]

    replayed = log_probs(batch.routed_experts)
    engine_order = torch.cat([batch.routed_experts[row, :length] for row, length in
                              enumerate(batch.lengths.tolist())])
    for layer, calls in recorded.items():
        given = engine_order[:, layer].long()
        routed = given[:, 0] != NO_ROUTING
        assert torch.equal(torch.cat(calls).cpu()[routed], given[routed].sort(dim=-1).values)
    natural = log_probs(None)
    mask = batch.response_mask
    for name, values in (("replayed", replayed), ("natural", natural)):
        gap = (values - batch.rollout_log_probs)[mask].abs()
        print(f"routing replay: |vLLM - Megatron| log-prob, {name} routing: mean "
              f"{gap.mean():.2e} max {gap.max():.2e}")
