"""The HF <-> Megatron bridge is exact: Megatron logits equal transformers' logits (fp32) at every
parallel layout, and HF -> Megatron -> HF gives back every tensor bit for bit.

Each layout is one multi-rank run that loads several tiny models in turn (spawning ranks costs
more than the models); the transformers reference runs in the test process."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_intuitor.models.tiny import make_tiny_model
from megatron_intuitor.testing import run_distributed

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


def _load_score_export(rank, world_size, tp, pp, vpp, model_dirs, bad_dirs):
    """Per model: logits shard and the full export of this rank; per bad checkpoint: the error."""
    from megatron.core import parallel_state

    from megatron_intuitor.models.bridge import export_hf_weights, load_hf_weights
    from megatron_intuitor.models.config import (
        build_model, load_hf_config, transformer_config_from_hf)
    from megatron_intuitor.parallel import ParallelSizes, init_model_parallel

    sizes = ParallelSizes(tp, pp, vpp)
    init_model_parallel(sizes, seed=1)
    results = {"tp_rank": parallel_state.get_tensor_model_parallel_rank(), "models": {},
               "errors": {}}
    for name, model_dir in model_dirs.items():
        hf_config = load_hf_config(model_dir)
        chunks = build_model(hf_config, transformer_config_from_hf(
            hf_config, sizes, params_dtype=hf_config.dtype))
        load_hf_weights(chunks, model_dir, hf_config)
        logits = (_pipeline_logits(chunks, _token_ids(hf_config.vocab_size))
                  if hf_config.dtype == torch.float32 else None)
        results["models"][name] = {"logits": logits,
                                   "export": list(export_hf_weights(chunks, hf_config))}
    for name, bad_dir in bad_dirs.items():
        try:
            load_hf_weights(chunks, bad_dir, hf_config)
            results["errors"][name] = None
        except ValueError as err:
            results["errors"][name] = str(err)
    return results


def _hf_logits(model_dir) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(_token_ids(model.config.vocab_size)).logits


def _check_layout(tp, pp, model_dirs, vpp=None, bad_dirs=None):
    ranks = run_distributed(_load_score_export, tp * pp, tp, pp, vpp,
                            {k: str(v) for k, v in model_dirs.items()},
                            {k: str(v) for k, v in (bad_dirs or {}).items()})
    for name, model_dir in model_dirs.items():
        checkpoint = load_file(str(model_dir / "model.safetensors"))
        for rank, result in enumerate(ranks):
            exported = result["models"][name]["export"]
            names = [hf_name for hf_name, _ in exported]
            assert sorted(names) == sorted(checkpoint), f"{name} rank {rank}: exported names"
            assert len(names) == len(set(names)), f"{name} rank {rank}: a tensor exported twice"
            for hf_name, tensor in exported:
                expected = checkpoint[hf_name]
                assert tensor.dtype == expected.dtype, f"{name} rank {rank}: {hf_name} dtype"
                assert torch.equal(tensor, expected), f"{name} rank {rank}: {hf_name} differs"
        if next(iter(checkpoint.values())).dtype != torch.float32:
            continue
        shards = {r["tp_rank"]: r["models"][name]["logits"] for r in ranks
                  if r["models"][name]["logits"] is not None}
        assert sorted(shards) == list(range(tp))
        reference = _hf_logits(model_dir)
        megatron = torch.cat([shards[t] for t in range(tp)], dim=-1)
        padded = megatron[..., reference.shape[-1]:]
        assert megatron.shape[-1] % (128 * tp) == 0 and torch.all(padded == 0)
        diff = (megatron[..., : reference.shape[-1]] - reference).abs().max().item()
        assert diff <= ATOL, f"{name} at TP={tp} PP={pp} VPP={vpp}: max |logit diff| {diff}"
    return ranks[0]["errors"]


@pytest.fixture(scope="module")
def tiny_qwen2_bf16(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("qwen2_bf16"), arch="qwen2", vocab_size=1003,
                           dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def tiny_qwen2_4layers(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("qwen2_4l"), arch="qwen2", vocab_size=1003,
                           num_layers=4)


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


@pytest.mark.slow
def test_single_rank_logits_round_trip_and_bad_checkpoints(
        tiny_qwen2, tiny_qwen2_untied, tiny_llama, tiny_qwen3, tiny_qwen2_bf16, tmp_path):
    errors = _check_layout(
        1, 1, {"qwen2": tiny_qwen2, "qwen2_untied": tiny_qwen2_untied, "llama": tiny_llama,
               "qwen3": tiny_qwen3, "qwen2_bf16": tiny_qwen2_bf16},
        bad_dirs=_corrupt_copies(tiny_qwen2, tmp_path))
    assert "missing tensors: model.layers.1.mlp.down_proj.weight" in errors["missing"]
    assert "unexpected tensors: model.layers.0.self_attn.o_proj.bias" in errors["extra"]
    assert ("'model.layers.0.mlp.up_proj.weight'" in errors["shape"]
            and "[255, 128], expected [256, 128]" in errors["shape"])
    assert "cannot read safetensors file" in errors["truncated"]
    assert "truncated" in errors["truncated"]  # the directory of the bad file is named


@pytest.mark.slow
def test_tensor_parallel_2(tiny_qwen2, tiny_llama, tiny_qwen3):
    _check_layout(2, 1, {"qwen2": tiny_qwen2, "llama": tiny_llama, "qwen3": tiny_qwen3})


@pytest.mark.slow
def test_pipeline_parallel_2(tiny_qwen2, tiny_qwen2_untied, tiny_llama):
    # Tied embeddings at PP=2: the last stage holds a copy of the embedding as its output layer.
    _check_layout(1, 2, {"qwen2": tiny_qwen2, "qwen2_untied": tiny_qwen2_untied,
                         "llama": tiny_llama})


@pytest.mark.slow
def test_tensor_2_x_pipeline_2(tiny_qwen2, tiny_llama, tiny_qwen3):
    _check_layout(2, 2, {"qwen2": tiny_qwen2, "llama": tiny_llama, "qwen3": tiny_qwen3})


@pytest.mark.slow
def test_virtual_pipeline(tiny_qwen2_4layers):
    _check_layout(1, 2, {"qwen2_4layers": tiny_qwen2_4layers}, vpp=2)


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
