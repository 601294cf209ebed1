"""Weight sync from a Megatron actor sharded over 2 gloo ranks into the rollout engine of each
rank (built after torch.distributed, as vLLM needs): the engine's greedy tokens equal
transformers' for the same weights, before and after an update of the Megatron weights, and the
engine's log-probs equal Megatron's vocab-parallel log-probs of the same sampled tokens."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_intuitor.local_ranks import run_distributed

NEW_TOKENS = 12
TEMPERATURE = 0.8
LOGPROB_ATOL = 1e-4  # fp32 engine vs fp32 Megatron at TP=2; measured ~1e-6


def _update(weight: torch.Tensor) -> torch.Tensor:
    """A stand-in for an optimizer step: pseudo-noise that is an exact (IEEE mul, trunc, sub)
    function of each weight's value, so every TP shard, pipeline copy and the transformers
    reference move bit-identically."""
    return weight + 0.05 * (torch.frac(weight * 9973.0) - 0.5 * torch.sign(weight))


def _prompts():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (4, 11, 25)]


def _megatron_log_probs(chunk, samples, vocab_size):
    """Megatron's log-probs of each sample's response tokens (TP-sharded logits, PP=1)."""
    from megatron.core import parallel_state

    from megatron_intuitor.platform import device
    from megatron_intuitor.scoring import vocab_parallel_token_scores

    result = []
    chunk.eval()  # Megatron's MoE layer refuses to train at TP > 1 without sequence parallelism
    with torch.no_grad():
        for sample in samples:
            ids = torch.tensor([sample.prompt_token_ids + sample.response_token_ids],
                               device=device())
            logits = chunk(ids, torch.arange(ids.shape[1], device=device()).unsqueeze(0), None)
            start = len(sample.prompt_token_ids) - 1
            scores = vocab_parallel_token_scores(
                logits[:, start:-1], ids[:, start + 1:],
                temperature=TEMPERATURE, vocab_size=vocab_size,
                tp_group=parallel_state.get_tensor_model_parallel_group())
            result.append(scores.log_probs[0].cpu())
    return result


def _sync_and_generate(rank, world_size, tp, pp, rollout_tp, model_dir, prompts, ep=1, etp=None,
                       engine_kwargs=None):
    """Sync, generate, update, sync, generate; the engine is sharded like the actor when
    `rollout_tp == tp` and PP is 1 and there is no expert parallelism (shard to shard, each
    expert split over the TP ranks at MoE), else it streams full tensors."""
    from megatron_intuitor.models.bridge import export_hf_weights, load_hf_weights
    from megatron_intuitor.models.config import (
        build_model, load_hf_config, transformer_config_from_hf)
    from megatron_intuitor.parallel import ParallelSizes, init_model_parallel
    from megatron_intuitor.rollout.engine import RolloutEngine, SamplingConfig
    from megatron_intuitor.rollout.shard_sync import ShardSync, ShardSyncUnavailable
    from megatron_intuitor.rollout.weight_sync import sync_weights

    sizes = ParallelSizes(tp, pp, expert=ep, expert_tensor=etp)
    init_model_parallel(sizes, seed=1)
    hf_config = load_hf_config(model_dir)
    chunks = build_model(hf_config, transformer_config_from_hf(hf_config, sizes))
    load_hf_weights(chunks, model_dir, hf_config)
    # after torch.distributed, on every rank: vLLM builds its groups on the training world
    engine = RolloutEngine(model_dir, dtype=torch.float32, max_model_len=256, seed=0,
                           tensor_parallel_size=rollout_tp, engine_kwargs=engine_kwargs)
    greedy = SamplingConfig(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)

    def tokens():
        return [s.response_token_ids for s in engine.generate(prompts, greedy)]

    result = {}
    try:  # sharded alike: each rank copies its shards; else (the plan says why) stream
        sync = ShardSync.plan(engine, chunks, hf_config)
    except ShardSyncUnavailable as why:
        result["refused"] = str(why)

        def sync():
            return sync_weights(engine, export_hf_weights(chunks, hf_config))
    sync()
    result["before"] = tokens()
    with torch.no_grad():
        for chunk in chunks:
            for param in chunk.parameters():
                param.copy_(_update(param))
    report = sync()
    result["after"] = tokens()
    result["bytes"], result["path"] = report.bytes, report.path
    if report.path == "shards" and getattr(hf_config, "num_experts", 0):
        # the same weights streamed: the engine's tensors (fused experts prepacked on CPU, norms)
        # must come out bit for bit as the direct writes left them
        shards = _engine_tensors(engine)
        sync_weights(engine, export_hf_weights(chunks, hf_config))
        streamed = _engine_tensors(engine)
        result["stream_equal"] = streamed.keys() == shards.keys() and all(
            torch.equal(tensor, shards[name]) for name, tensor in streamed.items())
    if pp == 1:
        samples = engine.generate(prompts, SamplingConfig(
            n=2, temperature=TEMPERATURE, max_tokens=NEW_TOKENS, ignore_eos=True, seed=5))
        megatron = _megatron_log_probs(chunks[0], samples, hf_config.vocab_size)
        result["logprob_diff"] = max(
            float((torch.tensor(s.log_probs) - m).abs().max()) for s, m in zip(samples, megatron))
    engine.shutdown()
    return result


def _engine_tensors(engine) -> dict[str, torch.Tensor]:
    """Copies of the engine's parameters that hold their values (vLLM-CPU moves its linear
    layers' weights into private packs and leaves them empty)."""
    return {name: param.detach().clone() for name, param in engine.local_model.named_parameters()
            if param.numel()}


def _hf_greedy(model_dir, prompts, update: bool, tmp_path):
    """transformers' greedy tokens, of the checkpoint or of its updated weights (written as a
    checkpoint: transformers maps per-expert tensor names to its fused experts on loading)."""
    from transformers import AutoModelForCausalLM

    if update:
        weights = load_file(model_dir / "model.safetensors")
        updated = tmp_path / "updated"
        shutil.copytree(model_dir, updated)
        save_file({name: _update(w) for name, w in weights.items()},
                  updated / "model.safetensors", metadata={"format": "pt"})
        model_dir = updated
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS)[0, len(p):].tolist() for p in prompts]


@pytest.fixture(scope="module")
def tiny_qwen2_vocab1100(tmp_path_factory):
    """Untied, vocab 1100: Megatron pads it to 1280 (640 rows a rank at TP=2), vLLM to 1152
    (576 a rank), so rows 576..639 cross from rank 0's actor to rank 1's engine."""
    from megatron_intuitor.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("vocab1100"), vocab_size=1100,
                           tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_qwen2_moe(tmp_path_factory):
    """Qwen2-MoE: 8 experts (top-2, norm_topk_prob off) and a gated shared expert, tied."""
    from megatron_intuitor.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("qwen2_moe"), arch="qwen2_moe",
                           vocab_size=1003)


@pytest.mark.slow
@pytest.mark.parametrize("world, tp, pp, rollout_tp, model, ep", [
    (2, 2, 1, 1, "tiny_qwen2", 1), (2, 1, 2, 1, "tiny_qwen2", 1),
    (2, 2, 1, 2, "tiny_qwen2_vocab1100", 1), (4, 2, 1, 2, "tiny_qwen2_vocab1100", 1),
    (2, 2, 1, 2, "tiny_qwen3", 1), (2, 2, 1, 2, "tiny_llama", 1),
    (2, 1, 1, 1, "tiny_qwen3_moe", 2), (2, 2, 1, 2, "tiny_qwen2_moe", 1)],
    ids=["tp2-stream", "pp2-stream", "tp2-shards", "tp2dp2-shards", "tp2-shards-qwen3",
         "tp2-shards-llama", "ep2-stream-qwen3-moe", "tp2-shards-qwen2-moe"])
def test_sync_from_megatron_matches_transformers(request, tmp_path, world, tp, pp, rollout_tp,
                                                 model, ep):
    """tp2dp2: two engines of TP 2 in a world of 4 (vLLM's TP groups [0, 1], [2, 3] must be
    Megatron's). ep2: Qwen3-MoE with its experts split over the 2 ranks, streamed into vLLM's
    fused expert weights (vLLM takes the per-expert HF names). tp2-shards-qwen2-moe: every
    expert split over the 2 TP ranks (ETP=2) copied into vLLM's fused experts split alike (and
    the shared expert, its gate, the q/k/v biases into their layers), then bit-identical to a
    streamed sync of the same weights."""
    results = check_sync(request.getfixturevalue(model), tmp_path, world, tp, pp, rollout_tp,
                         shards=rollout_tp == tp and pp == 1 and ep == 1, ep=ep)
    if ep > 1:  # vLLM's engine at TP=1 holds every expert; the actor splits them
        for result in results:
            assert "the actor over EP=2 with ETP=1 (needs EP=1, ETP=1)" in result["refused"]


def check_sync(model_dir, tmp_path, world, tp, pp, rollout_tp, *, shards: bool, ep=1, etp=None,
               engine_kwargs=None) -> list[dict]:
    """Sync and generate on `world` ranks (tests/gpu/test_gpu_moe_sync.py on GPUs too): greedy
    tokens before and after an update equal transformers', the path taken is `shards` or the
    stream, an MoE's shard-to-shard sync leaves the engine's tensors bit for bit as a streamed
    sync of the same weights; the ranks' results."""
    prompts = _prompts()
    results = run_distributed(_sync_and_generate, world, tp, pp, rollout_tp, model_dir, prompts,
                              ep, etp, engine_kwargs)
    before = _hf_greedy(model_dir, prompts, False, tmp_path)
    after = _hf_greedy(model_dir, prompts, True, tmp_path)
    assert before != after
    weights = load_file(model_dir / "model.safetensors")
    weight_bytes = sum(w.numel() * 4 for w in weights.values())
    for result in results:
        assert result["before"] == before
        assert result["after"] == after
        assert result["path"] == ("shards" if shards else "stream"), result.get("refused")
        if shards:  # each rank's engine shard: 1 / TP of the matrices, vocab padded by vLLM
            assert 0.8 < result["bytes"] * rollout_tp / weight_bytes < 1.4
            if any(".experts." in name for name in weights):
                assert result["stream_equal"]
        else:
            assert result["bytes"] == weight_bytes
        if pp == 1:
            assert result["logprob_diff"] <= LOGPROB_ATOL
    return results
