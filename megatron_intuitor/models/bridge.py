"""The exact HF <-> Megatron-Core weight bridge.

One table (`weight_mappings`) says, for every HF tensor, which Megatron parameter holds it and how
it is laid out across tensor-parallel ranks; `load_hf_weights` reads it one way (each rank reads
only the rows/columns it owns, through safetensors' lazy slices) and `export_hf_weights` the
other (TP all-gather, PP broadcast, one Megatron parameter at a time).

Layouts (TP rank r of T):
- REPLICATED: norms; every rank holds the full tensor.
- ROW: `linear_proj` / `linear_fc2`, split on dim 1 (the input features).
- VOCAB: embedding / output layer, rows split over a vocabulary padded to a multiple of 128 * T;
  the padded rows are zero and never exported.
- QKV: `linear_qkv` (weight and bias) interleaves q, k, v per query group,
  `[q_1 .. q_{heads/groups}, k, v]` for each group, and each rank holds whole groups.
- GATE_UP: `linear_fc1` on rank r is `cat(gate_shard_r, up_shard_r)` (not a chunk of
  `cat(gate, up)`).

Mixture-of-experts layers (Qwen3-MoE, Qwen2-MoE): the router is REPLICATED; expert e's
`linear_fc1` / `linear_fc2` (GATE_UP / ROW over the expert-tensor-parallel ranks) live on
expert-parallel rank e // (experts / EP) as its local expert e % (experts / EP). HF checkpoints
store each expert as `mlp.experts.{e}.{gate,up,down}_proj.weight` (transformers fuses them in
memory only). Qwen2-MoE's shared expert is a dense MLP over the tensor-parallel ranks
(`mlp.shared_experts.linear_fc1` / `linear_fc2`) and its sigmoid gate [1, hidden] is
REPLICATED (`mlp.shared_experts.gate_weight` <-> `mlp.shared_expert_gate.weight`).
"""
from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
import transformers

from megatron_intuitor.models.config import architecture_features, padded_vocab_size
from megatron_intuitor.platform import device


class Layout(enum.Enum):
    REPLICATED = "replicated"
    ROW = "row"
    VOCAB = "vocab"
    QKV = "qkv"
    GATE_UP = "gate_up"


@dataclass(frozen=True)
class TensorMapping:
    """One Megatron parameter <-> one or more HF tensors.

    `megatron`: the parameter's names relative to its layer (per-layer rows) or to the model.
    Every name present in a model chunk holds the tensor: alternatives (local-spec norm vs
    Transformer Engine's fused `layer_norm_weight`) and copies (a tied output layer on the last
    pipeline stage). Export reads it from the lowest pipeline stage that holds it.
    `hf`: HF names, `{layer}` standing for the global layer index and `{expert}` for the global
    expert index; `hf_shapes`: their full shapes. `per_expert` rows hold one expert each, split
    over the expert-tensor-parallel ranks.
    """

    megatron: tuple[str, ...]
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    layout: Layout
    per_layer: bool
    per_expert: bool = False

    def hf_names(self, layer: int | None, expert: int | None = None) -> list[str]:
        return [name.format(layer=layer, expert=expert) for name in self.hf]


@dataclass(frozen=True)
class _Dims:
    hidden: int
    ffn: int
    shared_ffn: int  # a shared expert's (0: none)
    heads: int
    groups: int
    head_dim: int
    vocab: int
    layers: int
    experts: int  # 0 for a dense model

    @classmethod
    def of(cls, hf_config: transformers.PretrainedConfig) -> "_Dims":
        features = architecture_features(hf_config)
        moe = features.moe
        return cls(hidden=hf_config.hidden_size,
                   ffn=moe.ffn_hidden_size if moe else hf_config.intermediate_size,
                   shared_ffn=moe.shared_expert_ffn_hidden_size if moe else 0,
                   heads=hf_config.num_attention_heads, groups=hf_config.num_key_value_heads,
                   head_dim=features.head_dim, vocab=hf_config.vocab_size,
                   layers=hf_config.num_hidden_layers, experts=moe.num_experts if moe else 0)


def weight_mappings(hf_config: transformers.PretrainedConfig) -> list[TensorMapping]:
    """The mapping table of this model, in HF module order (embeddings, layer, final norm, head)."""
    features = architecture_features(hf_config)
    d = _Dims.of(hf_config)
    q_rows, kv_rows = d.heads * d.head_dim, d.groups * d.head_dim
    layer = "model.layers.{layer}."
    tied_output = ("output_layer.weight",) if features.tied_embeddings else ()

    def per_layer(megatron, hf, shapes, layout, per_expert=False):
        return TensorMapping(tuple(megatron), tuple(layer + name for name in hf), tuple(shapes),
                             layout, per_layer=True, per_expert=per_expert)

    def model_level(megatron, hf, shapes, layout):
        return TensorMapping(tuple(megatron), tuple(hf), tuple(shapes), layout, per_layer=False)

    attention = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    rows = [
        model_level(("embedding.word_embeddings.weight", *tied_output),
                    ["model.embed_tokens.weight"], [(d.vocab, d.hidden)], Layout.VOCAB),
        per_layer(["self_attention.linear_qkv.weight"], [p + ".weight" for p in attention],
                  [(q_rows, d.hidden), (kv_rows, d.hidden), (kv_rows, d.hidden)], Layout.QKV),
    ]
    if features.qkv_bias:
        rows.append(per_layer(["self_attention.linear_qkv.bias"], [p + ".bias" for p in attention],
                              [(q_rows,), (kv_rows,), (kv_rows,)], Layout.QKV))
    if features.qk_norm:
        rows += [per_layer(["self_attention.q_layernorm.weight"], ["self_attn.q_norm.weight"],
                           [(d.head_dim,)], Layout.REPLICATED),
                 per_layer(["self_attention.k_layernorm.weight"], ["self_attn.k_norm.weight"],
                           [(d.head_dim,)], Layout.REPLICATED)]
    rows.append(per_layer(["self_attention.linear_proj.weight"], ["self_attn.o_proj.weight"],
                          [(d.hidden, q_rows)], Layout.ROW))
    if features.moe is None:
        rows += [
            per_layer(["mlp.linear_fc1.weight"], ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
                      [(d.ffn, d.hidden), (d.ffn, d.hidden)], Layout.GATE_UP),
            per_layer(["mlp.linear_fc2.weight"], ["mlp.down_proj.weight"], [(d.hidden, d.ffn)],
                      Layout.ROW)]
    else:
        expert = "mlp.experts.{expert}."
        rows += [
            per_layer(["mlp.router.weight"], ["mlp.gate.weight"], [(d.experts, d.hidden)],
                      Layout.REPLICATED),
            per_layer([_LOCAL_EXPERT + "linear_fc1.weight"],
                      [expert + "gate_proj.weight", expert + "up_proj.weight"],
                      [(d.ffn, d.hidden), (d.ffn, d.hidden)], Layout.GATE_UP, per_expert=True),
            per_layer([_LOCAL_EXPERT + "linear_fc2.weight"], [expert + "down_proj.weight"],
                      [(d.hidden, d.ffn)], Layout.ROW, per_expert=True)]
        if d.shared_ffn:
            shared = "mlp.shared_expert."
            rows += [
                per_layer(["mlp.shared_experts.linear_fc1.weight"],
                          [shared + "gate_proj.weight", shared + "up_proj.weight"],
                          [(d.shared_ffn, d.hidden), (d.shared_ffn, d.hidden)], Layout.GATE_UP),
                per_layer(["mlp.shared_experts.linear_fc2.weight"], [shared + "down_proj.weight"],
                          [(d.hidden, d.shared_ffn)], Layout.ROW),
                per_layer(["mlp.shared_experts.gate_weight"], ["mlp.shared_expert_gate.weight"],
                          [(1, d.hidden)], Layout.REPLICATED)]
    rows += [
        per_layer(["input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"],
                  ["input_layernorm.weight"], [(d.hidden,)], Layout.REPLICATED),
        per_layer(["pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"],
                  ["post_attention_layernorm.weight"], [(d.hidden,)], Layout.REPLICATED),
        model_level(["decoder.final_layernorm.weight"], ["model.norm.weight"], [(d.hidden,)],
                    Layout.REPLICATED),
    ]
    if not features.tied_embeddings:
        rows.append(model_level(["output_layer.weight"], ["lm_head.weight"],
                                [(d.vocab, d.hidden)], Layout.VOCAB))
    return rows


# A local expert's parameters, relative to its layer; `{local}` is the index on this EP rank.
_LOCAL_EXPERT = "mlp.experts.local_experts.{local}."
_LOCAL_EXPERT_NAME = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(.*)")


def expected_hf_tensors(hf_config: transformers.PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of this model with its shape, in export order."""
    expected = {}
    dims = _Dims.of(hf_config)
    for mapping, layer, expert in _hf_order(weight_mappings(hf_config), dims):
        expected.update(zip(mapping.hf_names(layer, expert), mapping.hf_shapes))
    return expected


def _hf_order(mappings: Sequence[TensorMapping], dims: _Dims):
    """(mapping, layer, expert) in HF module order: model-level rows listed before the per-layer
    rows (embeddings), every layer (its per-expert rows expert by expert), then the model-level
    rows after them (final norm, lm_head)."""
    first_layer_row = next(i for i, m in enumerate(mappings) if m.per_layer)
    yield from ((m, None, None) for m in mappings[:first_layer_row])
    for layer in range(dims.layers):
        yield from ((m, layer, None) for m in mappings if m.per_layer and not m.per_expert)
        for expert in range(dims.experts):
            yield from ((m, layer, expert) for m in mappings if m.per_expert)
    yield from ((m, None, None) for m in mappings[first_layer_row:] if not m.per_layer)


# --- which Megatron parameter is which ------------------------------------------------------

def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    from megatron.core.utils import unwrap_model

    return unwrap_model(chunk)


def _mapped_parameters(chunk: torch.nn.Module, mappings: Sequence[TensorMapping]):
    """(mapping, global layer index or None, global expert index or None, parameter) for every
    parameter of a GPTModel chunk."""
    by_layer_name = {name: m for m in mappings if m.per_layer for name in m.megatron}
    by_model_name = {name: m for m in mappings if not m.per_layer for name in m.megatron}
    first_local_expert = None
    if any(m.per_expert for m in mappings):
        from megatron.core import parallel_state

        local_experts = chunk.config.num_moe_experts // (
            parallel_state.get_expert_model_parallel_world_size())
        first_local_expert = parallel_state.get_expert_model_parallel_rank() * local_experts
    for name, param in chunk.named_parameters():
        expert = None
        if name.startswith("decoder.layers."):
            local, suffix = name[len("decoder.layers."):].split(".", 1)
            local_expert = _LOCAL_EXPERT_NAME.fullmatch(suffix)
            if local_expert:
                expert = first_local_expert + int(local_expert[1])
                suffix = _LOCAL_EXPERT + local_expert[2]
            mapping = by_layer_name.get(suffix)
            # layer_number is global and 1-based, whatever the pipeline / virtual stage.
            layer = chunk.decoder.layers[int(local)].layer_number - 1
        else:
            mapping, layer = by_model_name.get(name), None
        if mapping is None:
            raise RuntimeError(f"Megatron parameter {name!r} has no HF mapping in the bridge table")
        yield mapping, layer, expert, param


def _tp_rank_world(mapping: TensorMapping | None = None) -> tuple[int, int]:
    """This rank's tensor-parallel rank and size for `mapping`'s parameter: the expert-tensor-
    parallel ones for a per-expert row."""
    from megatron.core import parallel_state

    if mapping is not None and mapping.per_expert:
        return (parallel_state.get_expert_tensor_parallel_rank(),
                parallel_state.get_expert_tensor_parallel_world_size())
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def _tp_group(mapping: TensorMapping):
    from megatron.core import parallel_state

    if mapping.per_expert:
        return parallel_state.get_expert_tensor_parallel_group()
    return parallel_state.get_tensor_model_parallel_group()


# --- HF -> Megatron ---------------------------------------------------------------------------

# Buffers some HF checkpoints carry that are not weights.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


# safetensors' header dtype names.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


_COLUMN_READ_BYTES = 64 * 2**20


@dataclass(frozen=True)
class _StoredTensor:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte in the file


class _SafetensorsCheckpoint:
    """The tensors of an HF model directory, located from the safetensors headers and read with
    plain positioned reads straight into the result: sequential disk I/O, no memory map holding
    pages, memory bounded by the slice read (plus one block for column slices)."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self._tensors: dict[str, _StoredTensor] = {}
        for file in self._files_of(model_dir):
            for name, stored in self._read_header(file).items():
                if name in self._tensors:
                    raise ValueError(f"tensor {name!r} is stored twice: in "
                                     f"{self._tensors[name].file} and {file}")
                self._tensors[name] = stored

    @staticmethod
    def _read_header(file: Path) -> dict[str, _StoredTensor]:
        try:
            with open(file, "rb") as handle:
                header_bytes = int.from_bytes(handle.read(8), "little")
                if not 0 < header_bytes <= file.stat().st_size - 8:
                    raise ValueError(f"header length {header_bytes} does not fit the file")
                header = json.loads(handle.read(header_bytes))
            header.pop("__metadata__", None)
            stored = {}
            for name, info in header.items():
                begin, end = info["data_offsets"]
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(info["shape"])
                if end - begin != _numel(shape) * dtype.itemsize:
                    raise ValueError(f"tensor {name!r}: data_offsets disagree with its shape")
                stored[name] = _StoredTensor(file, dtype, shape, 8 + header_bytes + begin)
            data_end = max((s.offset + _numel(s.shape) * s.dtype.itemsize
                            for s in stored.values()), default=0)
            if data_end > file.stat().st_size:
                raise ValueError(f"file is truncated: its tensors end at byte {data_end}, the "
                                 f"file has {file.stat().st_size}")
            return stored
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"cannot read safetensors file {file}: {err}") from err

    @staticmethod
    def _files_of(model_dir: Path) -> list[Path]:
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"cannot read safetensors index {index}: {err!r}") from err
            files = [model_dir / name for name in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists missing files: {', '.join(missing)}")
            return files
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
        return files

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def rows(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Rows [start, stop) of dim 0 into `out` (contiguous, the checkpoint's dtype): one
        positioned read of exactly those bytes."""
        stored = self._tensors[name]
        self._check_out(name, out, (stop - start, *stored.shape[1:]))
        with self._open(name) as handle:
            self._read_rows_into(handle, stored, start, out)

    def columns(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Columns [start, stop) of a matrix into `out`. They are strided on disk, so whole rows
        are read sequentially in blocks of about `_COLUMN_READ_BYTES` and the columns copied
        out: one block of extra memory, disk-speed reads."""
        stored = self._tensors[name]
        rows, width = stored.shape
        self._check_out(name, out, (rows, stop - start))
        block_rows = max(1, _COLUMN_READ_BYTES // (width * stored.dtype.itemsize))
        block = torch.empty((min(block_rows, rows), width), dtype=stored.dtype)
        with self._open(name) as handle:
            for first in range(0, rows, block_rows):
                count = min(block_rows, rows - first)
                self._read_rows_into(handle, stored, first, block[:count])
                out[first:first + count] = block[:count, start:stop]

    def _check_out(self, name: str, out: torch.Tensor, shape: tuple[int, ...]) -> None:
        stored = self._tensors[name]
        if tuple(out.shape) != shape or out.dtype != stored.dtype or not out.is_contiguous():
            raise ValueError(f"tensor {name!r} in {stored.file}: its slice is {list(shape)} "
                             f"{stored.dtype}, the destination is {list(out.shape)} {out.dtype}"
                             f"{'' if out.is_contiguous() else ' (not contiguous)'}")

    def _open(self, name: str):
        try:
            return open(self._tensors[name].file, "rb", buffering=0)
        except OSError as err:
            raise ValueError(f"cannot read tensor {name!r} from {self._tensors[name].file}: "
                             f"{err}") from err

    @staticmethod
    def _read_rows_into(handle, stored: _StoredTensor, first_row: int,
                        out: torch.Tensor) -> None:
        row_bytes = _numel(stored.shape[1:]) * stored.dtype.itemsize
        buffer = out.view(-1).view(torch.uint8).numpy()
        handle.seek(stored.offset + first_row * row_bytes)
        done = 0
        while done < len(buffer):
            read = handle.readinto(buffer[done:])
            if not read:
                raise ValueError(f"{stored.file} ends inside a tensor (truncated file)")
            done += read

    def check(self, expected: dict[str, tuple[int, ...]], tied_embeddings: bool) -> None:
        """Missing, unexpected or misshapen tensors: a ValueError naming them, before any read."""
        found = self.names()
        missing = [name for name in expected if name not in found]
        ignorable = {"lm_head.weight"} if tied_embeddings else set()  # a redundant tied copy
        extra = sorted(name for name in found - set(expected)
                       if name not in ignorable and not name.endswith(_IGNORED_HF_SUFFIXES))
        problems = []
        if missing:
            problems.append(f"missing tensors: {', '.join(missing)}")
        if extra:
            problems.append(f"unexpected tensors: {', '.join(extra)}")
        for name, shape in expected.items():
            if name in found and self.shape(name) != shape:
                problems.append(f"tensor {name!r} in {self._tensors[name].file} has shape "
                                f"{list(self.shape(name))}, expected {list(shape)}")
        if problems:
            raise ValueError(f"checkpoint {self.model_dir} does not match the model config: "
                             + "; ".join(problems))


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _qkv_parts(interleaved: torch.Tensor, dims: _Dims) -> tuple[torch.Tensor, ...]:
    """q, k and v of `linear_qkv` rows (weight or bias) holding whole query groups, each
    interleaved `[q_1 .. q_{heads/groups}, k, v]`, as views shaped
    [groups, rows of the part, ...]."""
    q_rows = dims.heads // dims.groups * dims.head_dim
    grouped = interleaved.view(-1, q_rows + 2 * dims.head_dim, *interleaved.shape[1:])
    return grouped.split([q_rows, dims.head_dim, dims.head_dim], dim=1)


def vocab_shard_rows(vocab: int, tp_rank: int, tp: int) -> tuple[int, int]:
    """The real (unpadded) vocabulary rows [start, stop) that TP rank `tp_rank` holds."""
    rows = padded_vocab_size(vocab, tp) // tp
    return min(tp_rank * rows, vocab), min((tp_rank + 1) * rows, vocab)


def _read_shard(checkpoint: _SafetensorsCheckpoint, mapping: TensorMapping, layer: int | None,
                expert: int | None, dims: _Dims, tp_rank: int, tp: int,
                out: torch.Tensor) -> None:
    """This TP rank's shard of one Megatron parameter, read from the HF checkpoint straight into
    `out` (the parameter's shape, the checkpoint's dtype, contiguous, on the CPU)."""
    names = mapping.hf_names(layer, expert)
    if mapping.layout is Layout.REPLICATED:
        checkpoint.rows(names[0], 0, checkpoint.shape(names[0])[0], out)
    elif mapping.layout is Layout.ROW:
        width = mapping.hf_shapes[0][1] // tp
        checkpoint.columns(names[0], tp_rank * width, (tp_rank + 1) * width, out)
    elif mapping.layout is Layout.VOCAB:
        start, stop = vocab_shard_rows(dims.vocab, tp_rank, tp)
        checkpoint.rows(names[0], start, stop, out[:stop - start])
        out[stop - start:].zero_()  # Megatron's padded vocabulary rows
    elif mapping.layout is Layout.GATE_UP:
        rows = mapping.hf_shapes[0][0] // tp
        for index, name in enumerate(names):
            checkpoint.rows(name, tp_rank * rows, (tp_rank + 1) * rows,
                            out[index * rows:(index + 1) * rows])
    elif mapping.layout is Layout.QKV:
        parts = _qkv_parts(out, dims)  # this rank's whole query groups
        groups = parts[0].shape[0]
        for group in range(groups):
            index = tp_rank * groups + group
            for name, part in zip(names, parts):
                rows = part.shape[1]
                checkpoint.rows(name, index * rows, (index + 1) * rows, part[group])
    else:
        raise AssertionError(mapping.layout)


def check_hf_weights(model_dir: str | Path,
                     hf_config: transformers.PretrainedConfig) -> _SafetensorsCheckpoint:
    """The safetensors tensors of `model_dir` located from their headers, after checking their
    names and shapes against `hf_config` (a ValueError naming each missing, unexpected or
    misshapen tensor; FileNotFoundError without weights). Reads headers only: seconds, before
    any rank starts."""
    checkpoint = _SafetensorsCheckpoint(Path(model_dir))
    checkpoint.check(expected_hf_tensors(hf_config),
                     architecture_features(hf_config).tied_embeddings)
    return checkpoint


def load_hf_weights(model_chunks: Sequence[torch.nn.Module], model_dir: str | Path,
                    hf_config: transformers.PretrainedConfig) -> None:
    """Copy an HF safetensors checkpoint into this rank's Megatron chunks.

    Each rank reads only the slices it owns. The checkpoint's names and shapes are checked
    against `hf_config` first: a missing, unexpected or misshapen tensor is a ValueError naming
    it, and so is an unreadable or truncated file.
    """
    model_dir = Path(model_dir)
    mappings = weight_mappings(hf_config)
    dims = _Dims.of(hf_config)
    checkpoint = check_hf_weights(model_dir, hf_config)
    for chunk in model_chunks:
        for mapping, layer, expert, param in _mapped_parameters(_unwrap(chunk), mappings):
            tp_rank, tp = _tp_rank_world(mapping)
            dtype = checkpoint.dtype(mapping.hf_names(layer, expert)[0])
            direct = (param.device.type == "cpu" and param.dtype == dtype
                      and param.is_contiguous())
            # Read straight into the parameter when it can take the bytes as they are stored;
            # otherwise through one host buffer (GPU parameters, a dtype cast).
            target = param.data if direct else torch.empty(param.shape, dtype=dtype)
            _read_shard(checkpoint, mapping, layer, expert, dims, tp_rank, tp, target)
            if not direct:
                with torch.no_grad():
                    param.copy_(target)


# --- Megatron -> HF ---------------------------------------------------------------------------

def _gather_tp(shard: torch.Tensor, mapping: TensorMapping) -> list[torch.Tensor]:
    _, tp = _tp_rank_world(mapping)
    if tp == 1:
        return [shard]
    shards = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(shards, shard.contiguous(), group=_tp_group(mapping))
    return shards


def _to_hf(param: torch.Tensor, mapping: TensorMapping, dims: _Dims) -> list[torch.Tensor]:
    """Full HF tensors (new storage) from this rank's shard of `param` and its TP peers'."""
    shard = param.detach()
    if mapping.layout is Layout.REPLICATED:
        return [shard.clone()]
    shards = _gather_tp(shard, mapping)
    if mapping.layout is Layout.ROW:
        return [torch.cat(shards, dim=1)]
    if mapping.layout is Layout.VOCAB:
        return [torch.cat(shards)[: dims.vocab].clone()]
    if mapping.layout is Layout.GATE_UP:
        gates, ups = zip(*(s.chunk(2) for s in shards))
        return [torch.cat(gates), torch.cat(ups)]
    if mapping.layout is Layout.QKV:
        return [part.reshape(-1, *shard.shape[1:]) for part in _qkv_parts(torch.cat(shards), dims)]
    raise AssertionError(mapping.layout)


@dataclass(frozen=True)
class LocalPiece:
    """This rank's piece of one HF tensor, as a view of the Megatron parameter holding it.

    The piece is the standard TP shard of TP rank r (the one vLLM's parallel layers hold too):
    the whole tensor (REPLICATED), column block r (ROW), row block r of each part (GATE_UP; QKV,
    whose q rows are viewed as [query groups, rows per group, ...] because Megatron interleaves
    them with k and v). The vocabulary is the exception: Megatron and other systems pad it
    differently, so a VOCAB piece holds this rank's real rows and says which (`vocab_rows`).
    """

    hf_name: str
    tensor: torch.Tensor
    vocab_rows: tuple[int, int] | None = None


def local_hf_pieces(model_chunks: Sequence[torch.nn.Module],
                    hf_config: transformers.PretrainedConfig) -> list[LocalPiece]:
    """Every piece of an HF tensor that this rank's chunks hold, as views (nothing is copied or
    communicated). A tensor held twice (a tied output layer on the last pipeline stage) is
    listed once; an expert's pieces are on the ranks of its expert-parallel rank only."""
    mappings = weight_mappings(hf_config)
    dims = _Dims.of(hf_config)
    pieces, seen = [], set()
    for chunk in model_chunks:
        for mapping, layer, expert, param in _mapped_parameters(_unwrap(chunk), mappings):
            if (id(mapping), layer, expert) in seen:
                continue
            seen.add((id(mapping), layer, expert))
            names, shard = mapping.hf_names(layer, expert), param.detach()
            if mapping.layout in (Layout.REPLICATED, Layout.ROW):
                pieces.append(LocalPiece(names[0], shard))
            elif mapping.layout is Layout.VOCAB:
                start, stop = vocab_shard_rows(dims.vocab, *_tp_rank_world(mapping))
                pieces.append(LocalPiece(names[0], shard[:stop - start], (start, stop)))
            elif mapping.layout is Layout.GATE_UP:
                pieces += [LocalPiece(n, part) for n, part in zip(names, shard.chunk(2))]
            elif mapping.layout is Layout.QKV:
                pieces += [LocalPiece(n, part) for n, part in zip(names, _qkv_parts(shard, dims))]
            else:
                raise AssertionError(mapping.layout)
    return pieces


def export_hf_weights(model_chunks: Sequence[torch.nn.Module],
                      hf_config: transformers.PretrainedConfig
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, full tensor)` for every HF tensor of the model, on every rank.

    Every rank yields the same sequence (embeddings, layers in order, final norm, lm_head if
    untied), one Megatron parameter's tensors at a time, in the model's `params_dtype`, with
    the padded vocabulary trimmed, on the model's device (`.cpu()` them to save). An expert's
    tensors are gathered over its expert-tensor-parallel ranks and broadcast from its
    expert-parallel rank. Collectives run inside: every rank must drain the generator.
    """
    from megatron.core import parallel_state

    mappings = weight_mappings(hf_config)
    dims = _Dims.of(hf_config)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    key_of = {id(m): i for i, m in enumerate(mappings)}
    local = {}
    for chunk in model_chunks:
        for mapping, layer, expert, param in _mapped_parameters(_unwrap(chunk), mappings):
            local.setdefault((key_of[id(mapping)], layer, expert), param)
    # The declared parameter dtype: Megatron's local-spec norms are torch norms that stay fp32
    # whatever `params_dtype` says, while HF (and the TE spec) keep them in the model dtype.
    dtype = _unwrap(model_chunks[0]).config.params_dtype
    # Which stage holds a (row, layer); every stage's EP ranks together hold all its experts.
    held = {(index, layer) for index, layer, _ in local}
    held_by_stage = [held]
    if pp > 1:
        held_by_stage = [None] * pp
        dist.all_gather_object(held_by_stage, held,
                               group=parallel_state.get_pipeline_model_parallel_group())
    ep = parallel_state.get_expert_model_parallel_world_size()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    for mapping, layer, expert in _hf_order(mappings, dims):
        index = key_of[id(mapping)]
        names = mapping.hf_names(layer, expert)
        owners = [stage for stage, on_stage in enumerate(held_by_stage)
                  if (index, layer) in on_stage]
        if not owners:
            raise RuntimeError(f"no pipeline stage holds {names}")
        ep_owner = expert // (dims.experts // ep) if expert is not None else ep_rank
        if owners[0] == pp_rank and ep_owner == ep_rank:
            tensors = [t.to(dtype) for t in _to_hf(local[index, layer, expert], mapping, dims)]
        else:
            tensors = [torch.empty(shape, dtype=dtype, device=device())
                       for shape in mapping.hf_shapes]
        for name, tensor in zip(names, tensors):
            if expert is not None and ep > 1 and owners[0] == pp_rank:
                dist.broadcast(tensor, group=parallel_state.get_expert_model_parallel_group(),
                               group_src=ep_owner)
            if pp > 1:
                dist.broadcast(tensor, group=parallel_state.get_pipeline_model_parallel_group(),
                               group_src=owners[0])
            yield name, tensor
