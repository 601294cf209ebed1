"""Checks of the run's input files (the model's config.json and safetensors weights, checkpoints)
that need no model, no Ray and no GPU: read headers and sizes only, so that a bad input fails in
a second with its key and file named, before minutes of start-up. `config.validate` calls them;
so do the preflight and `tools/convert_ckpt.py`.

Each check returns a list of problems (strings, empty when all is well) that name the config key
or file, in the style of `config.ConfigError`.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Optional

# Where the bridge reads weights from: safetensors only (README, model.path).
SAFETENSORS_INDEX = "model.safetensors.index.json"
# The keys of config.json that the bridge and the config checks read.
REQUIRED_MODEL_KEYS = ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size")
_TRUE_STRINGS = ("1", "ON", "YES", "TRUE")


# ------------------------------------------------------------------------------ the model


def offline_mode() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE_STRINGS


def check_hub_model(key: str, hub_id: str) -> list[str]:
    """A hub id with HF_HUB_OFFLINE set must already be in the local Hugging Face cache."""
    if not offline_mode() or cached_hub_file(hub_id, "config.json") is not None:
        return []
    return [f"{key}={hub_id} is a Hugging Face hub id that is not in the local cache, and "
            f"HF_HUB_OFFLINE=1 forbids downloading it: download it where there is internet "
            f"(`hf download {hub_id}`) or set {key} to a local checkpoint directory"]


def cached_hub_file(hub_id: str, filename: str) -> Optional[Path]:
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(hub_id, filename)
    except ValueError:  # not a valid repo id
        return None
    return Path(cached) if isinstance(cached, str) else None


def read_model_config(key: str, config_file: Path) -> tuple[Optional[dict], list[str]]:
    """config.json as a dict, or the problems that make it unusable (not JSON, not an object,
    a key the bridge needs missing, an architecture it does not map)."""
    try:
        hf = json.loads(config_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        return None, [f"{key}: {config_file} is not UTF-8 text ({error.reason} at byte "
                      f"{error.start})"]
    except json.JSONDecodeError as error:
        return None, [f"{key}: {config_file} is not valid JSON: {error.msg} at line "
                      f"{error.lineno} column {error.colno}"]
    if not isinstance(hf, dict):
        return None, [f"{key}: {config_file} holds a {type(hf).__name__}, not a JSON object"]
    missing = [name for name in REQUIRED_MODEL_KEYS if not isinstance(hf.get(name), int)]
    if missing:
        return None, [f"{key}: {config_file} has no integer {', '.join(missing)}: not a "
                      f"decoder-only transformer config the bridge can map"]
    from megatron_intuitor.models.config import SUPPORTED_ARCHITECTURES

    architectures = hf.get("architectures")
    if not (isinstance(architectures, list) and len(architectures) == 1
            and architectures[0] in SUPPORTED_ARCHITECTURES):
        return None, [f"{key}: {config_file} has architectures {architectures!r}, which the "
                      f"bridge cannot map: supported are {', '.join(SUPPORTED_ARCHITECTURES)}"]
    return hf, []


def check_model_weights(key: str, model_dir: Path) -> list[str]:
    """The safetensors weights of an HF model directory: present, every shard the index names
    present, and every file's header and size consistent (a truncated download or copy)."""
    index_file = model_dir / SAFETENSORS_INDEX
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            return [f"{key}: {index_file} is not a safetensors index ({error})"]
        missing = [name for name in shards if not (model_dir / name).is_file()]
        if missing:
            return [f"{key}: {index_file} names weight file(s) that are missing: "
                    f"{', '.join(missing)}"]
        files = [model_dir / name for name in shards]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(
            p.name for p in model_dir.glob("*.pt"))
        found = f" (found {', '.join(others[:3])}: re-save with save_pretrained(" \
                f"safe_serialization=True))" if others else ""
        return [f"{key}={model_dir} has no *.safetensors weights{found}"]
    return [f"{key}: {problem}" for path in files for problem in check_safetensors(path)]


def check_safetensors(path: Path) -> list[str]:
    """A safetensors file's 8-byte header length, JSON header and data length against the file
    size; reads the header only."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            return [f"{path} is truncated: {size} bytes, not even the 8-byte header length"]
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > size - 8:
            return [f"{path} is truncated or not safetensors: its header claims {header_length} "
                    f"bytes, the file has {size}"]
        try:
            header = json.loads(file.read(header_length))
            ends = [entry["data_offsets"][1] for name, entry in header.items()
                    if name != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return [f"{path} has a corrupt safetensors header"]
    expected = 8 + header_length + max(ends, default=0)
    if size < expected:
        return [f"{path} is truncated: {size} bytes, its header describes {expected}"]
    return []


# ------------------------------------------------------------------------------ checkpoints


def check_checkpoint(path: Path) -> list[str]:
    """A training (or converter) checkpoint as `checkpoint.py` writes it: the trainer state,
    Megatron's metadata, and every `.distcp` file at least as long as `.metadata` says."""
    from megatron_intuitor.checkpoint import TRAINER_STATE_FILE

    if not path.is_dir():
        return [f"{path} is not a directory"]
    state_file = path / TRAINER_STATE_FILE
    if not state_file.is_file():
        return [f"{path} is not a checkpoint: it has no {TRAINER_STATE_FILE} (a complete "
                f"checkpoint is a checkpoints/step_<N> directory)"]
    try:
        json.loads(state_file.read_text(encoding="utf-8"))["step"]
    except (ValueError, KeyError, TypeError):
        return [f"{state_file} is corrupt (no JSON object with a step)"]
    return check_distcp_sizes(path)


def check_distcp_sizes(path: Path) -> list[str]:
    """Every storage item of torch.distributed.checkpoint's `.metadata` lies inside its file."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (path / ".metadata").is_file():
        return [f"{path} has no .metadata: not a Megatron distributed checkpoint"]
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as error:  # a pickle of torch classes: anything may fail on corruption
        return [f"{path / '.metadata'} cannot be read ({type(error).__name__}: {error})"]
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0),
                                         info.offset + info.length)
    problems = []
    for name, length in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"{file} is missing (named in {path / '.metadata'})")
        elif file.stat().st_size < length:
            problems.append(f"{file} is truncated: {file.stat().st_size} bytes, the "
                            f"checkpoint's .metadata needs {length}")
    return problems


# ------------------------------------------------------------------------------ output


def output_dir_problem(key: str, output_dir: Path) -> Optional[str]:
    """Why directory `output_dir` (config key `key`) cannot be made or written: a file on its
    path, or a read-only or foreign directory where it would be made; None when it can."""
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{key}={output_dir}: {existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return (f"{key}={output_dir}: {existing} is not writable (read-only filesystem or "
                f"permissions): set {key} elsewhere")
    return None
