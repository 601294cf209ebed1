"""Checkpoints: Megatron distributed checkpoints written atomically, exact resume, HF export.

A training checkpoint is the directory `<root>/step_<N>`:

    *.distcp, .metadata, common.pt,   Megatron `dist_checkpointing` (torch_dist): the model chunks
    metadata.json                     (global, TP/PP-independent keys: loads at any TP/PP/VPP) and
                                      the distributed optimizer state (`dp_reshardable`: same
                                      TP/PP only, any DP)
    trainer_state.json                step, the parallel layout it was written at, caller's `extra`
    rank_states/rank_<r>.pt           what is per rank and outside the sharded dict: python,
                                      numpy, torch and Megatron-tracker RNG states, Adam's step
    hf/                               optional: the HF config and tokenizer, so that
                                      tools/convert_ckpt.py can rebuild the model and export it

Every rank writes into `<root>/.tmp_step_<N>`; after a barrier rank 0 renames it to `step_<N>`
(one atomic rename), so a save killed at any point leaves only a `.tmp_*` directory, which
`latest_checkpoint` ignores and the next save removes.

`save_hf_checkpoint` streams the bridge's `(hf_name, tensor)` pairs into safetensors shards of
bounded size (same temporary-name-then-rename rule), for the final policy and the converter.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import queue
import random
import re
import shutil
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"
RANK_STATES_DIR = "rank_states"
HF_ASSETS_DIR = "hf"
FORMAT_VERSION = 1
# The one distributed-optimizer format that both saves and loads on this Megatron-Core (0.16.1):
# `fully_sharded_model_space` and `fully_reshardable` failed to load here.
OPTIMIZER_SHARDING_TYPE = "dp_reshardable"

_NONE: Mapping = MappingProxyType({})  # no companion models
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp_"
_OLD_PREFIX = ".old_"
# Files of an HF model directory that are weights (re-created by the exporter, never copied).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_WEIGHT_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")


# --------------------------------------------------------------------------------------------
# Public API: training checkpoints
# --------------------------------------------------------------------------------------------

def save_checkpoint(root: str | Path, step: int, model_chunks: Sequence[torch.nn.Module],
                    optimizer: Any = None, extra: Optional[dict] = None, *,
                    keep_last: Optional[int] = None, keep_steps: Sequence[int] = (),
                    hf_assets_dir: Optional[str | Path] = None,
                    companions: Mapping[str, Sequence[torch.nn.Module]] = _NONE) -> Path:
    """Write `<root>/step_<step>` atomically on every rank (collective); return its path.

    `extra` (same on every rank, JSON-serialisable: data position, scheduler state, ...) comes
    back from `load_checkpoint` together with `step`. `keep_last` keeps that many newest
    checkpoints, and those of `keep_steps` besides (the best one). `hf_assets_dir` (an HF model
    directory) has its config and tokenizer copied into the checkpoint so it can later be
    exported to HF without the original directory. `companions`: other models sharded like
    the policy (name -> chunks: the EMA scorer), saved under their name's prefix.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (or None to keep all), got {keep_last}")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"checkpoint root {root} exists and is not a directory")
    state = {**_trainer_state(step, model_chunks, optimizer, extra),
             "companions": sorted(companions)}
    final = root / f"step_{step}"
    _save_atomically(final, model_chunks, optimizer, state, hf_assets_dir, companions)
    if keep_last is not None and _rank() == 0:
        _prune(root, keep_last, keep_steps)
    _barrier()
    return final


def save_model_checkpoint(path: str | Path, model_chunks: Sequence[torch.nn.Module], *,
                          hf_assets_dir: Optional[str | Path] = None,
                          overwrite: bool = False) -> Path:
    """Write a model-only checkpoint (step 0) at `path` itself (the HF -> Megatron converter's
    output); `load_checkpoint` reads it like a training checkpoint. Collective."""
    path = Path(path)
    if not overwrite and path.exists() and any(path.iterdir()):
        raise FileExistsError(f"output directory {path} is not empty (pass overwrite=True)")
    state = _trainer_state(0, model_chunks, None, None)
    _save_atomically(path, model_chunks, None, state, hf_assets_dir)
    return path


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The complete `step_<N>` directory with the largest N under `root`, or None.

    Temporary (`.tmp_*`) and displaced (`.old_*`) directories never match; a `step_<N>` without
    its trainer state is not a checkpoint this module wrote and is skipped with a warning."""
    candidates = []
    for step, path in _step_dirs(Path(root)):
        if (path / TRAINER_STATE_FILE).is_file():
            candidates.append((step, path))
        else:
            logger.warning("ignoring %s: no %s in it", path, TRAINER_STATE_FILE)
    return max(candidates)[1] if candidates else None


def read_trainer_state(path: str | Path) -> dict:
    """The trainer state of checkpoint `path` (step, layout, extra), with a clear error if
    `path` is not a complete checkpoint."""
    path = Path(path)
    state_file = path / TRAINER_STATE_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not state_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint: {TRAINER_STATE_FILE} is missing")
    state = json.loads(state_file.read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{state_file}: format_version {state.get('format_version')} is not "
                         f"the supported {FORMAT_VERSION}")
    return state


def load_checkpoint(path: str | Path, model_chunks: Sequence[torch.nn.Module],
                    optimizer: Any = None, *, load_rng: bool = True,
                    companions: Mapping[str, Sequence[torch.nn.Module]] = _NONE) -> dict:
    """Load checkpoint `path` into this rank's model chunks (any TP/PP/VPP) and, if given, the
    optimizer (same TP/PP as saved; DP may differ), and the `companions` saved with it (name ->
    chunks, as `save_checkpoint`'s). Collective. Returns the saved `extra` with `step` added.

    RNG states are restored only when the parallel layout equals the saved one (then every rank
    continues its own streams exactly); otherwise they are left alone with a warning."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from megatron.core.utils import unwrap_model

    path = Path(path)
    state = read_trainer_state(path)
    missing = sorted(set(companions) - set(state.get("companions", ())))
    if missing:
        raise ValueError(f"checkpoint {path} holds no weights of {', '.join(missing)} (it was "
                         f"saved without them: see algorithm.scorer)")
    layout = _layout(len(model_chunks))
    saved = state["layout"]
    same_model_parallel = (saved["tensor"], saved["pipeline"]) == (layout["tensor"],
                                                                   layout["pipeline"])
    if optimizer is not None:
        if not state["has_optimizer"]:
            raise ValueError(f"checkpoint {path} holds no optimizer state (model-only); "
                             "load it with optimizer=None")
        if not same_model_parallel:
            raise ValueError(
                f"optimizer state in {path} was saved at TP={saved['tensor']} "
                f"PP={saved['pipeline']} and the '{OPTIMIZER_SHARDING_TYPE}' format only "
                f"reshards over DP; this run has TP={layout['tensor']} PP={layout['pipeline']}. "
                "Load the model alone (optimizer=None) to change TP/PP.")

    if optimizer is not None:
        _init_empty_adam_states(optimizer)
    sharded = _sharded_state_dict(model_chunks, optimizer, is_loading=True,
                                  companions=companions)
    # Optimizer state loading must not be recorded by autograd (FACTS: dp_reshardable needs it).
    with torch.no_grad():
        loaded = dist_checkpointing.load(sharded, str(path),
                                         strict=StrictHandling.RAISE_UNEXPECTED)
        for key, chunk in zip(_model_keys(len(model_chunks)), model_chunks):
            unwrap_model(chunk).load_state_dict(loaded[key], strict=True)
        for name, chunks in companions.items():
            for key, chunk in zip(_model_keys(len(chunks), name), chunks):
                unwrap_model(chunk).load_state_dict(
                    {k[len(name) + 1:]: v for k, v in loaded[key].items()}, strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(loaded["optimizer"])

    rank_state = _read_rank_state(path) if (load_rng or optimizer is not None) else None
    if optimizer is not None:
        _set_adam_steps(optimizer, rank_state["adam_steps"], path)
    if load_rng:
        if layout == {k: saved[k] for k in layout}:
            _set_rng_states(rank_state["rng"])
        else:
            logger.warning("not restoring RNG states of %s: saved at layout %s, loading at %s",
                           path, saved, layout)
    _barrier()
    return {**state["extra"], "step": state["step"]}


# Model dimensions a checkpoint's tensor metadata holds: (config.json key, tensor, axis of the
# tensor's global shape; the layers are stacked on axis 0, then a mixture of experts' experts).
_ROUTER = "decoder.layers.mlp.router.weight"
_CHECKPOINT_DIMS = (("num_hidden_layers", "decoder.layers.mlp.linear_fc1.weight", 0),
                    ("num_hidden_layers", _ROUTER, 0),
                    ("hidden_size", "embedding.word_embeddings.weight", 1),
                    ("intermediate_size", "decoder.layers.mlp.linear_fc2.weight", 2),
                    ("num_experts", _ROUTER, 1),
                    ("moe_intermediate_size",
                     "decoder.layers.mlp.experts.experts.linear_fc2.weight", 3))
_QKV = "decoder.layers.self_attention.linear_qkv.weight"


def model_size_mismatch(path: str | Path, hf: dict, what: str) -> Optional[str]:
    """When checkpoint `path` holds a model of other dimensions (layers, hidden size, MLP size,
    attention width; experts and their MLP size) than the config.json dict `hf` (named `what`): both sizes in one sentence;
    None when they agree. Reads `.metadata` only."""
    from torch.distributed.checkpoint import FileSystemReader

    tensors = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved, wanted = {}, {}
    for key, tensor, axis in _CHECKPOINT_DIMS:
        if tensor in tensors:
            # transformers 5 writes a Qwen3-MoE's expert count as num_local_experts
            value = hf.get(key) or (hf.get("num_local_experts") if key == "num_experts" else None)
            saved[key], wanted[key] = tensors[tensor].size[axis], value
    if _QKV in tensors:
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        width = "q+k+v rows per layer"
        saved[width] = tensors[_QKV].size[1]
        wanted[width] = (heads + 2 * (hf.get("num_key_value_heads") or heads)) * head_dim
    if saved == wanted:
        return None

    def sizes(dims: dict) -> str:
        return ", ".join(f"{key} {value}" for key, value in dims.items())

    return f"{path} holds a model of {sizes(saved)}; {what} describes {sizes(wanted)}"


def disk_full_explanation(error: BaseException, root: str | Path, step: int) -> Optional[str]:
    """When `error` (or anything in its chain: a rank's error reaches the controller as the
    text of its traceback) is a full disk or quota, what saving step `step` under `root` needs:
    the free space there, and the size of the last complete checkpoint (or, without one, what
    the failed save had written). None for any other error."""
    reasons = [os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT)]
    reason = next((r for e in _exception_chain(error) for r in reasons if r in str(e)), None)
    if reason is None:
        return None
    root = Path(root)
    free = shutil.disk_usage(_existing_ancestor(root)).free
    last = latest_checkpoint(root)
    if last is not None:
        needs = f"a checkpoint needs ~{_format_bytes(_tree_bytes(last))} (as {last.name})"
    else:
        partial = root / f"{_TMP_PREFIX}step_{step}"
        needs = (f"a checkpoint needs more than the {_format_bytes(_tree_bytes(partial))} "
                 f"written before the disk filled")
    return (f"{reason} while saving checkpoint step_{step} in {root}: "
            f"{_format_bytes(free)} free there, {needs}")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _format_bytes(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _exception_chain(error: BaseException) -> list[BaseException]:
    """`error`, its causes and contexts, and a Ray task error's original exception (`cause`)."""
    chain: list[BaseException] = []
    todo = [error]
    while todo:
        current = todo.pop()
        if any(current is seen for seen in chain):
            continue
        chain.append(current)
        todo += [e for e in (current.__cause__, current.__context__,
                             getattr(current, "cause", None)) if isinstance(e, BaseException)]
    return chain


# --------------------------------------------------------------------------------------------
# Public API: HF export
# --------------------------------------------------------------------------------------------

def save_hf_checkpoint(named_tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path,
                       *, assets_dir: Optional[str | Path] = None,
                       max_shard_bytes: int = 5 * 2**30, overwrite: bool = False,
                       write: bool = True, progress: bool = False) -> Optional[Path]:
    """Write `(hf_name, tensor)` pairs as HF safetensors shards plus
    `model.safetensors.index.json`, and copy config/tokenizer files from `assets_dir`.

    `named_tensors` is typically `export_hf_weights(model_chunks, hf_config)`, which every rank
    must consume (it is collective): ranks with `write=False` only drain it. Memory held: one
    shard (<= `max_shard_bytes`, or one tensor if larger). Output appears under its final name
    only when complete.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if write:
        _check_output_dir(out_dir, overwrite)
    tensors = tqdm(named_tensors, desc="export", unit="tensor", disable=not (write and progress))
    if not write:
        for _ in tensors:
            pass
        return None

    tmp = _fresh_tmp_dir(out_dir)
    shard_files: list[str] = []
    weight_map: dict[str, str] = {}
    total_bytes = 0
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        name = f"model-{len(shard_files) + 1:05d}.safetensors"
        save_file(pending, str(tmp / name), metadata={"format": "pt"})
        (tmp / name).chmod(0o644)  # safetensors creates its files owner-only
        shard_files.append(name)
        weight_map.update({key: name for key in pending})
        pending, pending_bytes = {}, 0

    for name, tensor in tensors:
        if name in weight_map or name in pending:
            raise ValueError(f"exporter yielded tensor {name!r} twice")
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        # Own contiguous copy: the exporter may reuse or free its buffer after yielding.
        pending[name] = tensor.detach().to("cpu").contiguous().clone()
        pending_bytes += size
        total_bytes += size
    if pending:
        flush()
    if not shard_files:
        raise ValueError("the exporter yielded no tensors")

    # HF shard names carry the shard count, known only now.
    final_names = {old: f"model-{i:05d}-of-{len(shard_files):05d}.safetensors"
                   for i, old in enumerate(shard_files, start=1)}
    for old, new in final_names.items():
        (tmp / old).rename(tmp / new)
    index = {"metadata": {"total_size": total_bytes},
             "weight_map": {key: final_names[file] for key, file in sorted(weight_map.items())}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if assets_dir is not None:
        copy_hf_assets(assets_dir, tmp)
    _publish(tmp, out_dir)
    return out_dir


def copy_hf_assets(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy the non-weight files of an HF model directory (config, generation config,
    tokenizer, chat template) into `dst_dir`; return the copied names."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if not (src_dir / "config.json").is_file():
        raise FileNotFoundError(f"{src_dir} has no config.json: not an HF model directory")
    dst_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for item in sorted(src_dir.iterdir()):
        if not item.is_file() or item.name.endswith(_WEIGHT_SUFFIXES + _WEIGHT_INDEX_SUFFIXES):
            continue
        shutil.copy2(item, dst_dir / item.name)
        copied.append(item.name)
    return copied


def hf_assets_of(checkpoint: str | Path) -> Path:
    """The HF config/tokenizer directory stored inside a checkpoint (clear error if absent)."""
    assets = Path(checkpoint) / HF_ASSETS_DIR
    if not (assets / "config.json").is_file():
        raise FileNotFoundError(
            f"checkpoint {checkpoint} carries no HF config ({assets}/config.json); it was saved "
            "without hf_assets_dir: pass the original HF model directory explicitly")
    return assets


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def _save_atomically(final: Path, model_chunks: Sequence[torch.nn.Module], optimizer: Any,
                     state: dict, hf_assets_dir: Optional[str | Path],
                     companions: Mapping[str, Sequence[torch.nn.Module]] = _NONE) -> None:
    """Write into `.tmp_<name>` next to `final`, then rename it to `final` (replacing it)."""
    from megatron.core import dist_checkpointing

    if hf_assets_dir is not None and not (Path(hf_assets_dir) / "config.json").is_file():
        raise FileNotFoundError(f"hf_assets_dir {hf_assets_dir} has no config.json")
    tmp = final.parent / f"{_TMP_PREFIX}{final.name}"
    if _rank() == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a save that was killed
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)  # dist_checkpointing.save needs it to exist (and be empty)
    _barrier()

    sharded = _sharded_state_dict(model_chunks, optimizer, is_loading=False,
                                  companions=companions)
    _in_process_write_results()
    dist_checkpointing.save(sharded, str(tmp),
                            content_metadata={"distrib_optim_sharding_type":
                                              OPTIMIZER_SHARDING_TYPE})
    (tmp / RANK_STATES_DIR).mkdir(exist_ok=True)
    torch.save({"rng": _rng_states(), "adam_steps": _adam_steps(optimizer)},
               tmp / RANK_STATES_DIR / f"rank_{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        if hf_assets_dir is not None:
            copy_hf_assets(hf_assets_dir, tmp / HF_ASSETS_DIR)
        # Written last: its presence is what marks a directory as a complete checkpoint.
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        _publish(tmp, final)
    _barrier()


def _in_process_write_results() -> None:
    """Megatron's torch_dist writer hands its write results back through a queue that it makes,
    once per process, with a spawned `multiprocessing.Manager`: a server process (~300 MB) and a
    resource tracker that outlive a rank killed with SIGKILL. This module saves synchronously
    (`dist_checkpointing.save` without `async_sharded_save`), where the results are put and read
    in this same process, so a plain in-process queue does the job and no process is spawned."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def _publish(tmp: Path, final: Path) -> None:
    """Give the finished `tmp` directory its final name. An existing `final` is first moved to
    `.old_<name>` (so the name never points at a half-written directory), then deleted."""
    old = final.parent / f"{_OLD_PREFIX}{final.name}"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _fresh_tmp_dir(final: Path) -> Path:
    tmp = final.parent / f"{_TMP_PREFIX}{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _check_output_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output {out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out_dir} is not empty (pass --overwrite)")


def _prune(root: Path, keep_last: int, keep_steps: Sequence[int] = ()) -> None:
    """Delete all but the newest `keep_last` checkpoints and those of `keep_steps`, and any
    leftover temporary dirs."""
    for step, path in sorted(_step_dirs(root))[:-keep_last]:
        if step not in keep_steps:
            shutil.rmtree(path)
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith((_TMP_PREFIX + "step_", _OLD_PREFIX + "step_")):
            shutil.rmtree(path)


def _step_dirs(root: Path) -> Iterator[tuple[int, Path]]:
    if not root.is_dir():
        return
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            yield int(match.group(1)), path


# --------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------

def _model_keys(num_chunks: int, name: str = "model") -> list[str]:
    # Megatron's convention; the ShardedTensor keys inside are global, so a checkpoint saved
    # with one chunk loads into several (VPP) and back.
    return [name] if num_chunks == 1 else [f"{name}{i}" for i in range(num_chunks)]


def _sharded_state_dict(model_chunks: Sequence[torch.nn.Module], optimizer: Any,
                        is_loading: bool,
                        companions: Mapping[str, Sequence[torch.nn.Module]] = _NONE) -> dict:
    # DDP / Float16Module wrappers would prefix every key with "module."; unwrapped keys are the
    # same for the trainer's wrapped chunks and the converter's bare ones.
    from megatron.core.utils import unwrap_model

    if not model_chunks:
        raise ValueError("model_chunks is empty")
    sharded = {key: unwrap_model(chunk).sharded_state_dict()
               for key, chunk in zip(_model_keys(len(model_chunks)), model_chunks)}
    if optimizer is not None:
        model_sharded: dict = {}
        for key in _model_keys(len(model_chunks)):
            model_sharded.update(sharded[key])
        sharded["optimizer"] = optimizer.sharded_state_dict(
            model_sharded, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": OPTIMIZER_SHARDING_TYPE})
    for name, chunks in companions.items():  # global keys "<name>.decoder...": no clash
        sharded.update({key: unwrap_model(chunk).sharded_state_dict(prefix=f"{name}.")
                        for key, chunk in zip(_model_keys(len(chunks), name), chunks)})
    return sharded


def _trainer_state(step: int, model_chunks: Sequence[torch.nn.Module], optimizer: Any,
                   extra: Optional[dict]) -> dict:
    extra = dict(extra or {})
    if "step" in extra:
        raise ValueError("extra must not contain 'step': it is the checkpoint's own field")
    try:
        json.dumps(extra)
    except TypeError as err:
        bad = [key for key, value in extra.items() if not _json_ok(value)]
        raise TypeError(f"checkpoint extra values must be JSON-serialisable; bad keys: {bad}") \
            from err
    return {"format_version": FORMAT_VERSION, "step": step, "layout": _layout(len(model_chunks)),
            "has_optimizer": optimizer is not None, "extra": extra}


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def _layout(num_chunks: int) -> dict:
    from megatron.core import parallel_state as ps

    return {"tensor": ps.get_tensor_model_parallel_world_size(),
            "pipeline": ps.get_pipeline_model_parallel_world_size(),
            "data": ps.get_data_parallel_world_size(),
            "virtual_pipeline": num_chunks,
            "world": dist.get_world_size()}


# --------------------------------------------------------------------------------------------
# Per-rank state: RNG and Adam step
# --------------------------------------------------------------------------------------------

def _rng_states() -> dict:
    from megatron.core import tensor_parallel

    states = {"python": random.getstate(), "numpy": np.random.get_state(),
              "torch": torch.get_rng_state(),
              "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(states["tracker"])


def _read_rank_state(path: Path) -> dict:
    rank_file = path / RANK_STATES_DIR / f"rank_{_rank():05d}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no per-rank state {rank_file.name} "
                                f"for rank {_rank()}")
    # Our own file with python/numpy RNG tuples in it: not loadable with weights_only.
    return torch.load(rank_file, weights_only=False)


def _torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a Megatron optimizer (chained or not)."""
    return [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])]


def _steps_per_group(opt: torch.optim.Optimizer) -> bool:
    """Whether `opt` keeps Adam's step in its param groups, as Transformer Engine's FusedAdam
    (what Megatron uses on GPU) does (TE 2.20.2 `optimizers/fused_adam.py:571-587`); its
    per-parameter state may then hold only its moments: its `state_dict` and `load_state_dict`
    look every key up in `name_to_dtype_map` (`fused_adam.py:203-207, 283, 390`). torch's Adam
    keeps a step per parameter."""
    return not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW))


def _adam_steps(optimizer: Any) -> Optional[list[Optional[float]]]:
    """Adam's step per inner torch optimizer (None: no step taken yet). Megatron's
    `dp_reshardable` format does not restore it (FACTS), so it travels in the rank state."""
    if optimizer is None:
        return None
    steps = []
    for opt in _torch_optimizers(optimizer):
        if _steps_per_group(opt):
            values = {float(g["step"]) for g in opt.param_groups if g["params"] and "step" in g}
        else:
            values = {float(s["step"]) for s in opt.state.values() if "step" in s}
        if len(values) > 1:
            raise RuntimeError(f"inner optimizer has parameters at different Adam steps {values}")
        steps.append(values.pop() if values else None)
    return steps


def _init_empty_adam_states(optimizer: Any) -> None:
    """Give a fresh optimizer (no step taken: torch creates Adam state lazily) zero moments and
    step 0 so that its sharded state dict has the shapes to load into; the loaded values and
    the saved Adam step then replace them. Megatron's distributed optimizer cannot describe its
    state before that (its `state_dict` asserts one common step)."""
    for opt in _torch_optimizers(optimizer):
        step = {} if _steps_per_group(opt) else {"step": torch.tensor(0.0)}
        for group in opt.param_groups:
            for param in group["params"]:
                if not opt.state[param]:
                    opt.state[param].update(exp_avg=torch.zeros_like(param),
                                            exp_avg_sq=torch.zeros_like(param), **step)


def _set_adam_steps(optimizer: Any, steps: Optional[list[Optional[float]]], path: Path) -> None:
    inner = _torch_optimizers(optimizer)
    if steps is None or len(steps) != len(inner):
        saved = None if steps is None else len(steps)
        raise ValueError(f"checkpoint {path} has Adam steps for {saved} optimizers, this run "
                         f"has {len(inner)}")
    for opt, step in zip(inner, steps):
        if step is None:
            continue
        if _steps_per_group(opt):
            for group in opt.param_groups:  # empty groups too: FusedAdam advances them alike
                old = group.get("step")
                group["step"] = (torch.tensor([step], dtype=old.dtype, device=old.device)
                                 if isinstance(old, torch.Tensor) else int(step))
            continue
        for param_state in opt.state.values():
            # One tensor per parameter: torch's Adam increments each state's step in place, so a
            # tensor shared between parameters would advance once per parameter per step.
            old = param_state.get("step")
            param_state["step"] = torch.tensor(
                step, dtype=old.dtype if isinstance(old, torch.Tensor) else torch.float32,
                device=old.device if isinstance(old, torch.Tensor) else "cpu")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
