"""The HF <-> Megatron bridge is exact: Megatron logits equal transformers' logits (fp32) at every
parallel layout, and HF -> Megatron -> HF gives back every tensor bit for bit. For the
mixtures of experts (Qwen3-MoE; Qwen2-MoE with its gated shared expert and the full softmax's
top-k probabilities, norm_topk_prob=False) also at expert parallelism, and sequence parallel at
TP > 1 (as they train there), with Qwen3-MoE's gradients at EP=2, TP=2 and TP=2 x EP=2 equal to
those of single ranks that hold the whole model.

All layouts run in one 4-rank spawn that re-initialises Megatron's parallel groups per layout and
loads several tiny models in each; the transformers reference runs in the test process."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_intuitor.local_ranks import run_distributed
from megatron_intuitor.models.tiny import make_tiny_model

SEQ = 16
ATOL = 1e-5


def _token_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))


def _pipeline_logits(chunks, ids):
    """This rank's vocab shard of the logits [batch, seq, vocab/TP] (None off the last stage),
    one sequence per micro-batch through Megatron's pipeline schedule."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    microbatches = [ids[i:i + 1] for i in range(ids.shape[0])]

    for chunk in chunks:  # forward only
        chunk.eval()

    def forward_step(data_iterator, chunk):
        logits = chunk(next(data_iterator), positions, None)
        return logits, lambda out: (out.sum() * 0.0, {"logits": out.detach().clone()})

    iterators = [iter(microbatches) for _ in chunks]
    store = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks, num_microbatches=len(microbatches), seq_length=ids.shape[1],
        micro_batch_size=1, forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return torch.cat([item["logits"] for item in store])


# name -> (tensor, pipeline, virtual pipeline[, expert, expert tensor]) sizes and the models
# checked at that layout
LAYOUTS = {
    "tp1": ((1, 1, None), ("qwen2", "qwen2_untied", "llama", "qwen3", "qwen3_moe", "qwen2_moe",
                           "qwen2_bf16")),
    "tp2": ((2, 1, None), ("qwen2", "llama", "qwen3", "qwen3_moe", "qwen2_moe")),
    "ep2": ((1, 1, None, 2), ("qwen3_moe", "qwen2_moe")),
    "tp2_ep2": ((2, 1, None, 2), ("qwen3_moe", "qwen2_moe")),
    "tp2_ep2_etp1": ((2, 1, None, 2, 1), ("qwen3_moe",)),
    "pp2_ep2": ((1, 2, None, 2), ("qwen3_moe",)),
    # tied embeddings at PP=2: the last stage holds a copy of the embedding as output layer
    "pp2": ((1, 2, None), ("qwen2", "qwen2_untied", "llama")),
    "tp2_pp2": ((2, 2, None), ("qwen2", "llama", "qwen3")),
    "pp2_vpp2": ((1, 2, 2), ("qwen2_4layers",)),
}
WORLD_SIZE = 4  # every layout runs on the same 4 ranks, the rest being data parallel
# Layouts whose gradients of the MoE model are taken (PP=1; at TP=2 sequence parallel): "tp1" is
# the reference, one batch per data-parallel rank.
GRADIENT_LAYOUTS = ("tp1", "ep2", "tp2", "tp2_ep2", "tp2_ep2_etp1")
# Two rows per batch, the second padded; the longest odd, so that TP=2 pads it once more.
GRADIENT_ROW_LENGTHS = (2 * SEQ - 1, 2 * SEQ - 8)


def _hf_named_gradients(chunks, hf_config, dp_rank: int) -> dict[str, torch.Tensor]:
    """The gradients of the summed log-probs of data-parallel rank `dp_rank`'s batch (real tokens
    only) + the router's auxiliary loss, through `run_pipeline` (the trainer's forward: padding,
    sequence parallelism) and Megatron's tensor-parallel gradient reduction, per HF tensor
    name: each parameter's data is swapped for its gradient and exported through the bridge."""
    from tensor_parallel_grads import reduce_over_tensor_parallel

    from megatron_intuitor.models.bridge import export_hf_weights
    from megatron_intuitor.models.forward import run_pipeline, shifted_token_scores

    ids = torch.randint(0, hf_config.vocab_size, (2, max(GRADIENT_ROW_LENGTHS)),
                        generator=torch.Generator().manual_seed(10 + dp_rank))
    batch = {"input_ids": ids, "lengths": torch.tensor(GRADIENT_ROW_LENGTHS)}

    def log_prob_head(logits_shard, micro_batch):
        scores = shifted_token_scores(logits_shard, micro_batch["input_ids"], temperature=1.0,
                                      vocab_size=hf_config.vocab_size)
        return torch.where(micro_batch.padding(), 0.0, scores.log_probs).sum(), {}

    for chunk in chunks:
        chunk.train()
    run_pipeline(chunks, [batch], log_prob_head, forward_only=False, packed=False)
    reduce_over_tensor_parallel(chunks)
    for chunk in chunks:
        for param in chunk.parameters():  # an expert no token reached has no gradient
            param.data = param.grad if param.grad is not None else torch.zeros_like(param)
    return {name: tensor.clone() for name, tensor in export_hf_weights(chunks, hf_config)}


def _every_layout(rank, world_size, model_dirs, bad_dirs):  # noqa: C901 (one spawn, many checks)
    """Per layout and model: this rank's logits shard and a bit-exact comparison of its export
    with the checkpoint; per bad checkpoint: the error. One spawn for all layouts: starting
    ranks costs far more than the tiny models."""
    from megatron.core import parallel_state
    from safetensors.torch import load_file

    from megatron_intuitor.models.bridge import export_hf_weights, load_hf_weights
    from megatron_intuitor.models.config import (
        build_model, load_hf_config, transformer_config_from_hf, uses_sequence_parallel)
    from megatron_intuitor.parallel import ParallelSizes, init_model_parallel

    results = {"errors": {}}
    for layout, (sizes, models) in LAYOUTS.items():
        sizes = ParallelSizes(*sizes)
        init_model_parallel(sizes, seed=1)
        results[layout] = {}
        for name in models:
            hf_config = load_hf_config(model_dirs[name])
            chunks = build_model(hf_config, transformer_config_from_hf(
                hf_config, sizes, params_dtype=hf_config.dtype,
                sequence_parallel=uses_sequence_parallel(hf_config, sizes.tensor)))
            load_hf_weights(chunks, model_dirs[name], hf_config)
            logits = (_pipeline_logits(chunks, _token_ids(hf_config.vocab_size))
                      if hf_config.dtype == torch.float32 else None)
            checkpoint = load_file(f"{model_dirs[name]}/model.safetensors")
            export = [(hf_name, str(tensor.dtype), str(checkpoint[hf_name].dtype)
                       if hf_name in checkpoint else None,
                       hf_name in checkpoint and torch.equal(tensor, checkpoint[hf_name]))
                      for hf_name, tensor in export_hf_weights(chunks, hf_config)]
            dp_rank = parallel_state.get_data_parallel_rank()
            results[layout][name] = {
                "tp_rank": parallel_state.get_tensor_model_parallel_rank(), "dp_rank": dp_rank,
                "sequence_parallel": chunks[0].config.sequence_parallel,
                "logits": logits, "export": export, "checkpoint": sorted(checkpoint)}
            if name == "qwen3_moe" and layout in GRADIENT_LAYOUTS:
                results[layout][name].update(
                    gradients=_hf_named_gradients(chunks, hf_config, dp_rank),
                    # the ranks whose tokens this rank's experts compute
                    expert_group=torch.distributed.get_process_group_ranks(
                        parallel_state.get_expert_tensor_and_model_parallel_group()))
        if layout == "tp1":
            for bad, bad_dir in bad_dirs.items():
                try:
                    load_hf_weights(chunks, bad_dir, hf_config)
                    results["errors"][bad] = None
                except ValueError as err:
                    results["errors"][bad] = str(err)
        parallel_state.destroy_model_parallel()
    return results


def _hf_logits(model_dir) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(_token_ids(model.config.vocab_size)).logits


def _corrupt_copies(model_dir, root):
    """Broken copies of a checkpoint, keyed by what is wrong with them."""
    tensors = load_file(str(model_dir / "model.safetensors"))
    variants = {
        "missing": {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.down_proj.weight"},
        "extra": {**tensors, "model.layers.0.self_attn.o_proj.bias": torch.zeros(128)},
        "shape": {**tensors, "model.layers.0.mlp.up_proj.weight": torch.zeros(255, 128)},
    }
    dirs = {}
    for name, content in variants.items():
        dirs[name] = root / name
        shutil.copytree(model_dir, dirs[name])
        save_file(content, str(dirs[name] / "model.safetensors"))
    dirs["truncated"] = root / "truncated"
    shutil.copytree(model_dir, dirs["truncated"])
    weights = dirs["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return dirs


@pytest.fixture(scope="module")
def model_dirs(tiny_qwen2, tiny_qwen2_untied, tiny_llama, tiny_qwen3, tiny_qwen3_moe,
               tmp_path_factory):
    root = tmp_path_factory.mktemp("bridge_models")
    return {
        "qwen2": tiny_qwen2, "qwen2_untied": tiny_qwen2_untied, "llama": tiny_llama,
        "qwen3": tiny_qwen3,
        "qwen2_bf16": make_tiny_model(root / "qwen2_bf16", arch="qwen2", vocab_size=1003,
                                      dtype=torch.bfloat16),
        "qwen2_4layers": make_tiny_model(root / "qwen2_4layers", arch="qwen2", vocab_size=1003,
                                         num_layers=4),
        "qwen3_moe": tiny_qwen3_moe,
        "qwen2_moe": make_tiny_model(root / "qwen2_moe", arch="qwen2_moe", vocab_size=1003),
    }


@pytest.fixture(scope="module")
def bad_dirs(tiny_qwen2, tmp_path_factory):
    return _corrupt_copies(tiny_qwen2, tmp_path_factory.mktemp("bad_checkpoints"))


@pytest.fixture(scope="module")
def every_layout(model_dirs, bad_dirs):
    return run_distributed(_every_layout, WORLD_SIZE,
                           {name: str(path) for name, path in model_dirs.items()},
                           {name: str(path) for name, path in bad_dirs.items()})


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_round_trip_is_bit_identical(every_layout, layout):
    for name in LAYOUTS[layout][1]:
        for rank, result in enumerate(every_layout):
            model = result[layout][name]
            names = [hf_name for hf_name, *_ in model["export"]]
            where = f"{name} at {layout}, rank {rank}"
            assert sorted(names) == model["checkpoint"], f"{where}: exported names"
            assert len(names) == len(set(names)), f"{where}: a tensor exported twice"
            for hf_name, dtype, checkpoint_dtype, equal in model["export"]:
                assert dtype == checkpoint_dtype, f"{where}: {hf_name} is {dtype}"
                assert equal, f"{where}: {hf_name} differs from the checkpoint"


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_equal_transformers(every_layout, model_dirs, layout):
    (tp, pp, *_), models = LAYOUTS[layout]
    for name in models:
        if name == "qwen2_bf16":
            continue
        reference = _hf_logits(model_dirs[name])
        replicas = {}
        for result in every_layout:
            model = result[layout][name]
            if model["logits"] is not None:
                replicas.setdefault(model["dp_rank"], {})[model["tp_rank"]] = model["logits"]
        assert len(replicas) == WORLD_SIZE // (tp * pp)
        for shards in replicas.values():
            assert sorted(shards) == list(range(tp))
            megatron = torch.cat([shards[t] for t in range(tp)], dim=-1)
            assert megatron.shape[-1] % (128 * tp) == 0
            assert torch.all(megatron[..., reference.shape[-1]:] == 0)  # padded vocab
            diff = (megatron[..., : reference.shape[-1]] - reference).abs().max().item()
            assert diff <= ATOL, f"{name} at {layout}: max |logit diff| {diff}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", GRADIENT_LAYOUTS[1:])
def test_moe_gradients_equal_those_of_single_ranks(every_layout, layout):
    """Every rank's attention, norm and router gradients equal those of the single rank (TP1,
    EP1: "tp1") that held its data-parallel rank's batch, and an expert's gradient is the sum
    over the batches of the ranks that send it tokens (its expert tensor-and-model-parallel
    group): at EP=2 tokens travel to the expert's rank and their gradients back; at TP=2 each
    rank holds half of the sequence (padded to even: padding is left out of the loss and of the
    router's auxiliary loss) and Megatron sums the norm and router gradients over TP."""
    reference = {result["tp1"]["qwen3_moe"]["dp_rank"]: result["tp1"]["qwen3_moe"]["gradients"]
                 for result in every_layout}
    dp_rank_of = [result[layout]["qwen3_moe"]["dp_rank"] for result in every_layout]
    tp = LAYOUTS[layout][0][0]
    # fp32 rounding: at TP=2 the sums run in another order (reduce-scatters, split matmuls), and
    # an expert few tokens reach has gradients ~1e-3 of the largest upstream ones
    tolerance = 1e-5 if tp == 1 else 1e-4
    for rank, result in enumerate(every_layout):
        model = result[layout]["qwen3_moe"]
        assert model["sequence_parallel"] == (tp > 1)
        gradients = model["gradients"]
        assert sorted(gradients) == sorted(reference[model["dp_rank"]])
        senders = {dp_rank_of[other] for other in model["expert_group"]}
        # whole data-parallel replicas send tokens (else no reference batch would match)
        assert {r for r, d in enumerate(dp_rank_of) if d in senders} == set(model["expert_group"])
        reached = 0
        for name, gradient in gradients.items():
            if ".mlp.experts." in name:
                expected = sum(reference[dp][name] for dp in sorted(senders))
            else:
                expected = reference[model["dp_rank"]][name]
            reached += bool(expected.abs().max() > 0)
            # An expert no token of the group chose has a zero gradient, and must here too.
            diff = (gradient - expected).abs().max().item()
            assert diff <= tolerance * expected.abs().max().item(), (
                f"rank {rank}, {name}: {diff} of {expected.abs().max().item()}")
        assert reached >= 0.9 * len(gradients), f"rank {rank}: {reached} of {len(gradients)}"


@pytest.mark.slow
def test_bad_checkpoints_are_refused_by_name(every_layout):
    errors = every_layout[0]["errors"]
    assert "missing tensors: model.layers.1.mlp.down_proj.weight" in errors["missing"]
    assert "unexpected tensors: model.layers.0.self_attn.o_proj.bias" in errors["extra"]
    assert ("'model.layers.0.mlp.up_proj.weight'" in errors["shape"]
            and "[255, 128], expected [256, 128]" in errors["shape"])
    assert "cannot read safetensors file" in errors["truncated"]
    assert "truncated/model.safetensors" in errors["truncated"]


# --- configuration errors (no ranks needed) ---------------------------------------------------

def test_unsupported_architecture_is_refused(tiny_qwen2, tmp_path):
    from megatron_intuitor.models.config import load_hf_config

    shutil.copytree(tiny_qwen2, tmp_path / "gpt2")
    config_file = tmp_path / "gpt2" / "config.json"
    config = json.loads(config_file.read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported: Qwen2ForCausalLM"):
        load_hf_config(tmp_path / "gpt2")


def test_unsupported_feature_is_refused(tiny_llama, tmp_path):
    from megatron_intuitor.models.config import load_hf_config

    shutil.copytree(tiny_llama, tmp_path / "llama")
    config_file = tmp_path / "llama" / "config.json"
    config = json.loads(config_file.read_text())
    config["mlp_bias"] = True
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mlp_bias"):
        load_hf_config(tmp_path / "llama")


@pytest.mark.parametrize("sizes, message", [
    ((4, 1, None), "tensor parallel size 4 does not divide num_key_value_heads=2"),
    ((8, 1, None), "tensor parallel size 8 does not divide num_attention_heads=4"),
    ((1, 3, None), "pipeline parallel size 3 is larger than num_hidden_layers=2"),
    ((1, 2, 2), "num_hidden_layers=2 is not divisible by pipeline parallel size 2 x virtual"),
])
def test_bad_parallel_sizes_are_refused(tiny_qwen2, sizes, message):
    from megatron_intuitor.models.config import load_hf_config, transformer_config_from_hf
    from megatron_intuitor.parallel import ParallelSizes

    with pytest.raises(ValueError, match=message):
        transformer_config_from_hf(load_hf_config(tiny_qwen2), ParallelSizes(*sizes))


def test_fp8_needs_a_gpu(tiny_qwen2):
    from megatron_intuitor.models.config import load_hf_config, transformer_config_from_hf
    from megatron_intuitor.parallel import ParallelSizes
    from megatron_intuitor.platform import on_gpu

    if on_gpu():
        pytest.skip("CPU-only check")
    with pytest.raises(ValueError, match="fp8='hybrid' needs Transformer Engine"):
        transformer_config_from_hf(load_hf_config(tiny_qwen2), ParallelSizes(), fp8="hybrid")


@pytest.mark.parametrize("vocab, tp, padded", [(1003, 1, 1024), (1003, 2, 1024), (1025, 2, 1280),
                                               (152064, 2, 152064), (151665, 4, 152064)])
def test_padded_vocab_size(vocab, tp, padded):
    from megatron_intuitor.models.config import padded_vocab_size

    assert padded_vocab_size(vocab, tp) == padded


@pytest.mark.parametrize("sizes, message", [
    ((1, 1, None, 3), "expert_model_parallel_size 3 does not divide num_experts=8"),
    ((1, 1, None, 2, 3), "expert_tensor_parallel_size 3 does not divide moe_intermediate_size=64"),
])
def test_bad_expert_parallel_sizes_are_refused(tiny_qwen3_moe, sizes, message):
    from megatron_intuitor.models.config import load_hf_config, transformer_config_from_hf
    from megatron_intuitor.parallel import ParallelSizes

    with pytest.raises(ValueError, match=message):
        transformer_config_from_hf(load_hf_config(tiny_qwen3_moe), ParallelSizes(*sizes))


def test_expert_parallelism_needs_a_mixture_of_experts(tiny_qwen2):
    from megatron_intuitor.models.config import load_hf_config, transformer_config_from_hf
    from megatron_intuitor.parallel import ParallelSizes

    with pytest.raises(ValueError, match="expert_model_parallel_size=2 .* need a mixture-of-experts"):
        transformer_config_from_hf(load_hf_config(tiny_qwen2), ParallelSizes(expert=2))


def test_moe_with_dense_layers_is_refused(tiny_qwen3_moe, tmp_path):
    from megatron_intuitor.models.config import load_hf_config

    shutil.copytree(tiny_qwen3_moe, tmp_path / "moe")
    config_file = tmp_path / "moe" / "config.json"
    config = json.loads(config_file.read_text())
    config["mlp_only_layers"] = [0]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mlp_only_layers=\\[0\\].*every layer is a mixture"):
        load_hf_config(tmp_path / "moe")


def test_moe_router_matches_hf_routing(tiny_qwen3_moe):
    """Megatron's router options reproduce HF's: softmax -> top-k -> renormalise
    (norm_topk_prob) is a softmax over the top-k logits, so pre-softmax is off; the auxiliary
    loss coefficient is HF's router_aux_loss_coef; no z-loss."""
    from megatron_intuitor.models.config import load_hf_config, transformer_config_from_hf
    from megatron_intuitor.parallel import ParallelSizes

    hf_config = load_hf_config(tiny_qwen3_moe)
    config = transformer_config_from_hf(hf_config, ParallelSizes(expert=2))
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (8, 2, 64)
    assert config.moe_router_score_function == "softmax" and not config.moe_router_pre_softmax
    assert config.moe_aux_loss_coeff == hf_config.router_aux_loss_coef == 0.001
    assert config.moe_z_loss_coeff is None
    assert config.expert_model_parallel_size == 2 and config.moe_token_dispatcher_type == "alltoall"


@pytest.mark.parametrize("tp, setting, dense, moe", [
    (1, None, False, False), (1, True, False, False),  # nothing to split at TP=1
    (2, None, False, True),  # the default: exactly the mixture of experts
    (2, True, True, True), (2, False, False, False)])
def test_sequence_parallel_follows_the_setting_and_the_model(tiny_qwen2, tiny_qwen3_moe, tp,
                                                             setting, dense, moe):
    from megatron_intuitor.models.config import load_hf_config, uses_sequence_parallel

    assert uses_sequence_parallel(load_hf_config(tiny_qwen2), tp, setting) == dense
    assert uses_sequence_parallel(load_hf_config(tiny_qwen3_moe), tp, setting) == moe


@pytest.fixture(scope="module")
def tiny_qwen2_moe(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("qwen2_moe"), arch="qwen2_moe", vocab_size=1003)


def test_qwen2_moe_maps_its_shared_expert_and_router(tiny_qwen2_moe):
    """Qwen2-MoE (as Qwen1.5-MoE): probabilities of the full softmax (norm_topk_prob=False:
    pre-softmax), a shared expert of shared_expert_intermediate_size behind a sigmoid gate,
    q/k/v biases."""
    from megatron_intuitor.models.config import load_hf_config, transformer_config_from_hf
    from megatron_intuitor.parallel import ParallelSizes

    hf_config = load_hf_config(tiny_qwen2_moe)
    assert not hf_config.norm_topk_prob
    config = transformer_config_from_hf(hf_config, ParallelSizes(expert=2))
    assert config.moe_router_score_function == "softmax" and config.moe_router_pre_softmax
    assert config.moe_shared_expert_intermediate_size == 96 and config.moe_shared_expert_gate
    assert config.add_qkv_bias and not config.qk_layernorm


@pytest.mark.parametrize("change, message", [
    ({"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
    ({"mlp_only_layers": [1]}, "mlp_only_layers=\\[1\\]"),
    ({"qkv_bias": False}, "qkv_bias=False"),
    ({"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size=0"),
    ({"shared_expert_intermediate_size": 97}, None),
])
def test_unsupported_qwen2_moe_configs_are_refused(tiny_qwen2_moe, tmp_path, change, message):
    """Dense layers between the sparse ones (decoder_sparse_step, mlp_only_layers) and configs
    without biases or shared expert are refused naming the HF key; a shared expert that TP=2
    cannot split is refused at that layout."""
    from megatron_intuitor.models.config import load_hf_config, transformer_config_from_hf
    from megatron_intuitor.parallel import ParallelSizes

    shutil.copytree(tiny_qwen2_moe, tmp_path / "moe")
    config_file = tmp_path / "moe" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    if message is not None:
        with pytest.raises(ValueError, match=message):
            load_hf_config(tmp_path / "moe")
        return
    with pytest.raises(ValueError, match="tensor parallel size 2 does not divide "
                                         "shared_expert_intermediate_size=97"):
        transformer_config_from_hf(load_hf_config(tmp_path / "moe"), ParallelSizes(2))
