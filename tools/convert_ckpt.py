"""Convert between Hugging Face checkpoints and Megatron distributed checkpoints.

    python tools/convert_ckpt.py hf-to-megatron HF_DIR OUT --tp 2 --pp 1 [--verify]
    python tools/convert_ckpt.py megatron-to-hf CKPT OUT [--tp 1 --pp 1] [--verify]

Mixture-of-experts models (Qwen3-MoE, Qwen2-MoE) also take --ep (expert-parallel size) and --etp
(expert-tensor-parallel size, default --tp); the ranks are then pp x lcm(tp, ep x etp).

hf-to-megatron: starts tp*pp local ranks; each reads only its slices of the safetensors files
and the ranks write one Megatron distributed checkpoint, with the HF config and tokenizer copied
into OUT/hf/. The result loads at any TP/PP (`megatron_intuitor.checkpoint.load_checkpoint`),
and is what `megatron-to-hf` reads back.

megatron-to-hf: CKPT is such a checkpoint or a training checkpoint (`<root>/step_<N>`); the
model is loaded at the TP/PP given here (any), streamed through the bridge and written as
safetensors shards of at most --max-shard-size with `model.safetensors.index.json`, plus the
config and tokenizer (from CKPT/hf/ or --hf-dir).

Both write to a temporary directory next to OUT and rename it when complete: a conversion killed
half way leaves nothing named OUT. A non-empty OUT is refused without --overwrite.

--verify runs the model of both sides on a few prompts, both in float32 (a bf16 checkpoint is
loaded into a float32 model exactly), prints the max |logit difference| over the real vocabulary
and exits with status 1 if it is above --tolerance.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_intuitor.local_ranks import run_distributed

VERIFY_PROMPTS = (
    "What is 12 + 30? Let's think step by step.",
    "The quick brown fox jumps over the lazy dog because",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30}


class UsageError(Exception):
    """Bad input found before any conversion work: printed without a traceback, exit 2."""


# --------------------------------------------------------------------------------------------
# Argument checks (parent process, before any rank starts)
# --------------------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 5GB, 500MB, 2GiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"output directory {out} is not empty (pass --overwrite to replace it)")


def _check_model(hf_dir: Path, sizes, what: str):
    """The HF config of `hf_dir`, after checking it is supported at `sizes`."""
    from megatron_intuitor.models.config import load_hf_config, transformer_config_from_hf

    if not hf_dir.is_dir():
        raise UsageError(f"{what} {hf_dir} is not a directory")
    try:
        hf_config = load_hf_config(hf_dir)
        # Refuses TP not dividing heads / kv heads / ffn and PP larger than the layer count.
        transformer_config_from_hf(hf_config, sizes)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from err
    return hf_config


def _sizes(args):
    from megatron_intuitor.parallel import ParallelSizes

    if min(args.tp, args.pp, args.ep, args.etp or 1) < 1:
        raise UsageError(f"--tp, --pp, --ep and --etp must be >= 1 (got --tp {args.tp} "
                         f"--pp {args.pp} --ep {args.ep} --etp {args.etp})")
    return ParallelSizes(args.tp, args.pp, args.vpp, args.ep, args.etp)


def _world(sizes) -> int:
    """The fewest ranks that hold the layout: experts spread over data-parallel ranks."""
    return sizes.pipeline * math.lcm(sizes.tensor, sizes.expert * sizes.expert_tensor_size)


def _dtype_of_hf(hf_config, requested: str) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    dtype = getattr(hf_config, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _dtype_of_checkpoint(ckpt: Path, requested: str) -> torch.dtype:
    """The dtype the checkpoint's weights were saved in (so the export is bit-exact)."""
    from megatron.core import dist_checkpointing

    if requested != "auto":
        return DTYPES[requested]
    return dist_checkpointing.load_tensors_metadata(str(ckpt))[
        "embedding.word_embeddings.weight"].dtype


# --------------------------------------------------------------------------------------------
# Rank side
# --------------------------------------------------------------------------------------------

def _build(hf_dir: str, sizes, dtype: torch.dtype, seed: int = 0):
    from megatron_intuitor.models.config import (build_model, load_hf_config,
                                                 transformer_config_from_hf)
    from megatron_intuitor.parallel import init_model_parallel

    init_model_parallel(sizes, seed=seed)
    hf_config = load_hf_config(hf_dir)
    transformer_config = transformer_config_from_hf(hf_config, sizes, params_dtype=dtype)
    # Every weight is about to be overwritten: skip the random init (on CPU it materialises each
    # full weight in float32 before splitting it, several times the memory of a shard).
    transformer_config.perform_initialization = False
    return hf_config, build_model(hf_config, transformer_config)


def pipeline_logits(chunks: Sequence[torch.nn.Module], token_ids: torch.Tensor,
                    vocab_size: int) -> Optional[torch.Tensor]:
    """Full-vocabulary logits [batch, seq, vocab_size] on the last pipeline stage (None on the
    others), one sequence per micro-batch through Megatron's schedule, gathered over TP."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    positions = torch.arange(token_ids.shape[1]).unsqueeze(0)
    microbatches = [token_ids[i:i + 1] for i in range(token_ids.shape[0])]

    def forward_step(data_iterator, chunk):
        logits = chunk(next(data_iterator), positions, None)

        def keep(out):
            full = gather_from_tensor_model_parallel_region(out)[..., :vocab_size]
            return out.sum() * 0.0, {"logits": full.detach().clone()}
        return logits, keep

    iterators = [iter(microbatches) for _ in chunks]
    for chunk in chunks:  # Megatron's MoE layer refuses to train at TP > 1 without sequence parallelism
        chunk.eval()
    with torch.no_grad():
        store = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=list(chunks), num_microbatches=len(microbatches),
            seq_length=token_ids.shape[1], micro_batch_size=1, forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return torch.cat([item["logits"] for item in store]).float()


def _checkpoint_logits(hf_dir: str, sizes, ckpt: str, token_ids: torch.Tensor):
    """Logits of the Megatron checkpoint `ckpt` loaded into a float32 model (rank side)."""
    from megatron_intuitor.checkpoint import load_checkpoint

    hf_config, chunks = _build(hf_dir, sizes, torch.float32)
    load_checkpoint(ckpt, chunks, load_rng=False)
    return pipeline_logits(chunks, token_ids, hf_config.vocab_size)


def _hf_to_megatron_rank(rank: int, world: int, hf_dir: str, out: str, sizes, dtype,
                         overwrite: bool, token_ids: Optional[torch.Tensor]):
    from tqdm import tqdm

    from megatron_intuitor.checkpoint import save_model_checkpoint
    from megatron_intuitor.models.bridge import load_hf_weights

    phases = tqdm(total=3, desc="hf-to-megatron", unit="phase", disable=rank != 0)
    phases.set_postfix_str("build model")
    hf_config, chunks = _build(hf_dir, sizes, dtype)
    phases.update()
    phases.set_postfix_str("read HF slices")
    load_hf_weights(chunks, hf_dir, hf_config)
    phases.update()
    phases.set_postfix_str("write checkpoint")
    save_model_checkpoint(out, chunks, hf_assets_dir=hf_dir, overwrite=overwrite)
    phases.update()
    phases.close()
    if token_ids is None:
        return None
    del chunks
    gc.collect()
    return _checkpoint_logits(hf_dir, sizes, out, token_ids)


def _megatron_to_hf_rank(rank: int, world: int, ckpt: str, assets: str, out: str, sizes, dtype,
                         max_shard_bytes: int, overwrite: bool,
                         token_ids: Optional[torch.Tensor]):
    from megatron_intuitor.checkpoint import load_checkpoint, save_hf_checkpoint
    from megatron_intuitor.models.bridge import export_hf_weights

    hf_config, chunks = _build(assets, sizes, dtype)
    load_checkpoint(ckpt, chunks, load_rng=False)
    save_hf_checkpoint(export_hf_weights(chunks, hf_config), out, assets_dir=assets,
                       max_shard_bytes=max_shard_bytes, overwrite=overwrite, write=rank == 0,
                       progress=True)
    if token_ids is None:
        return None
    del chunks
    gc.collect()
    return _checkpoint_logits(assets, sizes, ckpt, token_ids)


# --------------------------------------------------------------------------------------------
# Verification (parent side)
# --------------------------------------------------------------------------------------------

def verify_token_ids(hf_dir: Path, vocab_size: int) -> tuple[torch.Tensor, list[int]]:
    """The verification prompts tokenised with the model's tokenizer (random ids if it has
    none), right-padded to one length: padding after a causal prefix leaves its logits alone."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        sequences = [tokenizer(prompt)["input_ids"] for prompt in VERIFY_PROMPTS]
    except (OSError, ValueError):
        gen = torch.Generator().manual_seed(0)
        sequences = [torch.randint(0, vocab_size, (16,), generator=gen).tolist()
                     for _ in VERIFY_PROMPTS]
    length = max(len(seq) for seq in sequences)
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq)
    return ids, [len(seq) for seq in sequences]


def hf_logits(hf_dir: Path, token_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=token_ids).logits.float()


def _report_verify(rank_results: list, hf_dir: Path, token_ids: torch.Tensor,
                   lengths: list[int], tolerance: float) -> bool:
    megatron = next(result for result in rank_results if result is not None)
    reference = hf_logits(hf_dir, token_ids)
    diff = max(float((megatron[row, :n] - reference[row, :n]).abs().max())
               for row, n in enumerate(lengths))
    ok = diff <= tolerance
    print(f"verify: max |logit diff| Megatron vs transformers over {len(lengths)} prompts = "
          f"{diff:.3e} (tolerance {tolerance:.1e}): {'OK' if ok else 'FAILED'}")
    return ok


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------

def _run_ranks(fn, world: int, *args) -> list:
    try:
        return run_distributed(fn, world, *args)
    except RuntimeError as err:
        # The ranks' tracebacks are in the message; the last line of each is what went wrong.
        raise SystemExit(f"convert_ckpt: conversion failed\n{err}") from None


def hf_to_megatron(args) -> bool:
    from megatron_intuitor.input_files import check_model_weights
    from megatron_intuitor.models.bridge import check_hf_weights

    hf_dir, out = Path(args.hf_dir), Path(args.out)
    sizes = _sizes(args)
    hf_config = _check_model(hf_dir, sizes, "HF model directory")
    bad_weights = check_model_weights("HF model directory", hf_dir)
    if bad_weights:
        raise UsageError("; ".join(bad_weights))
    try:  # names against the model's tensors now, not in a rank after it built the model
        check_hf_weights(hf_dir, hf_config)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from err
    _check_output(out, args.overwrite)
    dtype = _dtype_of_hf(hf_config, args.dtype)
    token_ids, lengths = (verify_token_ids(hf_dir, hf_config.vocab_size) if args.verify
                          else (None, None))
    results = _run_ranks(_hf_to_megatron_rank, _world(sizes), str(hf_dir),
                         str(out), sizes, dtype, args.overwrite, token_ids)
    print(f"wrote Megatron checkpoint {out} (TP={sizes.tensor} PP={sizes.pipeline} "
          f"EP={sizes.expert}, {dtype})")
    return not args.verify or _report_verify(results, hf_dir, token_ids, lengths,
                                             args.tolerance)


def megatron_to_hf(args) -> bool:
    from megatron_intuitor.checkpoint import hf_assets_of, model_size_mismatch, read_trainer_state
    from megatron_intuitor.input_files import check_distcp_sizes

    ckpt, out = Path(args.ckpt), Path(args.out)
    sizes = _sizes(args)
    try:
        read_trainer_state(ckpt)
        assets = Path(args.hf_dir) if args.hf_dir else hf_assets_of(ckpt)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from err
    truncated = check_distcp_sizes(ckpt)  # else a rank fails deep in torch, naming no file
    if truncated:
        raise UsageError("; ".join(truncated))
    hf_config = _check_model(assets, sizes, "HF config directory")
    what = f"--hf-dir {assets}" if args.hf_dir else f"its own {assets / 'config.json'}"
    mismatch = model_size_mismatch(ckpt, json.loads((assets / "config.json").read_text()), what)
    if mismatch:  # else a rank fails in Megatron's load with a shape traceback
        raise UsageError(f"{mismatch}: pass the --hf-dir of the model this checkpoint was "
                         f"trained from")
    _check_output(out, args.overwrite)
    dtype = _dtype_of_checkpoint(ckpt, args.dtype)
    token_ids, lengths = (verify_token_ids(assets, hf_config.vocab_size) if args.verify
                          else (None, None))
    results = _run_ranks(_megatron_to_hf_rank, _world(sizes), str(ckpt),
                         str(assets), str(out), sizes, dtype, args.max_shard_size,
                         args.overwrite, token_ids)
    print(f"wrote HF checkpoint {out} ({dtype})")
    return not args.verify or _report_verify(results, out, token_ids, lengths, args.tolerance)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_ckpt.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser, tp_help: str) -> None:
        sub.add_argument("--tp", type=int, default=1, help=tp_help)
        sub.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
        sub.add_argument("--vpp", type=int, default=None,
                         help="virtual pipeline stages per rank (needs --pp > 1)")
        sub.add_argument("--ep", type=int, default=1,
                         help="expert-parallel size (mixture-of-experts models)")
        sub.add_argument("--etp", type=int, default=None,
                         help="expert-tensor-parallel size (default: --tp)")
        sub.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                         help="weight dtype (auto: keep the source's, which makes the round "
                              "trip bit-exact)")
        sub.add_argument("--overwrite", action="store_true",
                         help="replace a non-empty OUT (refused otherwise)")
        sub.add_argument("--verify", action="store_true",
                         help="compare Megatron and transformers logits on a few prompts")
        sub.add_argument("--tolerance", type=float, default=1e-4,
                         help="max |logit diff| accepted by --verify (float32 on both sides)")

    to_megatron = commands.add_parser(
        "hf-to-megatron", help="HF safetensors dir -> Megatron distributed checkpoint",
        description="HF safetensors dir -> Megatron distributed checkpoint (loads at any TP/PP)")
    to_megatron.add_argument("hf_dir", help="HF model directory (config.json, *.safetensors)")
    to_megatron.add_argument("out", help="output checkpoint directory")
    common(to_megatron, "tensor-parallel size = number of ranks writing (x --pp)")
    to_megatron.set_defaults(run=hf_to_megatron)

    to_hf = commands.add_parser(
        "megatron-to-hf", help="Megatron distributed checkpoint -> HF safetensors dir",
        description="Megatron distributed checkpoint -> HF safetensors shards + index, config, "
                    "tokenizer")
    to_hf.add_argument("ckpt", help="checkpoint directory (converter output or step_<N>)")
    to_hf.add_argument("out", help="output HF model directory")
    to_hf.add_argument("--hf-dir", default=None,
                       help="HF directory with config/tokenizer (default: CKPT/hf)")
    to_hf.add_argument("--max-shard-size", type=parse_size, default="5GB",
                       help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    common(to_hf, "tensor-parallel size to load the checkpoint at (any)")
    to_hf.set_defaults(run=megatron_to_hf)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ok = args.run(args)
    except UsageError as err:
        print(f"convert_ckpt.py: error: {err}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":  # spawned ranks re-import this file: nothing may run on import
    sys.exit(main())
