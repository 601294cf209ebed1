"""Shared fixtures: tiny Hugging Face checkpoints made once per test session."""
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _tiny(tmp_path_factory, name: str, **kwargs):
    from megatron_intuitor.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp(name), **kwargs)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """Qwen2, tied embeddings, vocab 1003 (not divisible by TP, padded by Megatron)."""
    return _tiny(tmp_path_factory, "qwen2_tied", arch="qwen2", vocab_size=1003)


@pytest.fixture(scope="session")
def tiny_qwen2_untied(tmp_path_factory):
    return _tiny(tmp_path_factory, "qwen2_untied", arch="qwen2", vocab_size=1003,
                 tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Llama 3 (rope scaling), untied, vocab 1003."""
    return _tiny(tmp_path_factory, "llama", arch="llama", vocab_size=1003,
                 tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    """Qwen3 (qk-norm), tied."""
    return _tiny(tmp_path_factory, "qwen3", arch="qwen3", vocab_size=1003)


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory):
    """Qwen3-MoE, 4 layers of 8 experts (top-2, norm_topk_prob), tied."""
    return _tiny(tmp_path_factory, "qwen3_moe", arch="qwen3_moe", vocab_size=1003, num_layers=4)


@pytest.fixture
def preflight():
    """`megatron_intuitor.preflight`, the launch scripts' checks."""
    from megatron_intuitor import preflight as module

    return module


@pytest.fixture
def small_megatron_checkpoint():
    """Writes a checkpoint directory holding the tensor metadata of a model of 3 layers, hidden
    64, MLP 96, 4 heads of 16 (q+k+v 3 x 64 rows), zeros, via torch.distributed.checkpoint (no
    ranks), and a trainer state with `has_optimizer`; returns its path."""
    def make(path, has_optimizer: bool):
        import json

        import torch
        import torch.distributed.checkpoint as dcp

        dcp.save({"embedding.word_embeddings.weight": torch.zeros(1024, 64),
                  "decoder.layers.mlp.linear_fc1.weight": torch.zeros(3, 192, 64),
                  "decoder.layers.mlp.linear_fc2.weight": torch.zeros(3, 64, 96),
                  "decoder.layers.self_attention.linear_qkv.weight": torch.zeros(3, 192, 64)},
                 checkpoint_id=str(path))
        (path / "trainer_state.json").write_text(json.dumps(
            {"format_version": 1, "step": 0, "has_optimizer": has_optimizer, "extra": {},
             "layout": {"tensor": 1, "pipeline": 1, "data": 1, "virtual_pipeline": 1,
                        "world": 1}}))
        return path
    return make
