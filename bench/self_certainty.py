"""Benchmark: vocab-parallel self-certainty / log-prob / entropy on Qwen2.5's vocabulary (152064)
at TP=2 on gloo, one rank per core, against its baselines, measured in the same run:

  fused  megatron_intuitor.scoring.vocab_parallel_token_scores (forward: the scoring pass);
  naive  what the FSDP INTUITOR code does: all-gather the full vocabulary, fp32 log_softmax
         (gathered log-probs), entropy from softmax, logsumexp - mean;
  floor  torch.logsumexp over the same local shard: one exp pass, the least any exact method
         must do. One call per at most FLOOR_ROWS rows: a single call at 16384 tokens would add
         a 5 GB temporary per rank next to the 5 GB of logits.

Every (path, tokens) pair runs in fresh processes. Peak extra memory is the rise of the rank's
resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) over its resident set
with the input logits already allocated: torch's CPU allocations are invisible to tracemalloc.
Time is the slower rank's best of REPEATS calls after one warm-up.

The naive path keeps several full-vocabulary fp32 copies per token (~0.6 MB each): it runs only
at the sizes whose estimated need fits in the memory available now, and the output says which.

Usage: python bench/self_certainty.py [--tokens 4096 16384] [--naive-tokens 1024 2048]
Last line: one JSON object of figures.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

from megatron_intuitor.scoring import vocab_parallel_token_scores
from megatron_intuitor.testing import run_distributed

VOCAB = 152064  # Qwen2.5 lm_head width: divisible by 128 * 2, so no padding at TP=2
TP = 2
TEMPERATURE = 0.9
REPEATS = 2
FLOOR_ROWS = 4096
NAIVE_FULL_COPIES = 4  # full-vocabulary fp32 copies alive at once (measured 3.9 at 1024 tokens)


def _resident_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MB."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def _reset_high_water_mark() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _fused(shard, targets, group):
    return vocab_parallel_token_scores(shard, targets, temperature=TEMPERATURE,
                                       vocab_size=VOCAB, tp_group=group)


def _naive(shard, targets, group):
    gathered = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, shard, group=group)
    logits = torch.cat(gathered, dim=-1)[:, :VOCAB]
    del gathered
    z = logits.float() / TEMPERATURE
    log_probs = torch.log_softmax(z, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    log_sum_exp = torch.logsumexp(z, dim=-1)
    entropy = log_sum_exp - (torch.softmax(z, dim=-1) * z).sum(-1)
    self_certainty = log_sum_exp - z.mean(dim=-1)
    return log_probs, entropy, self_certainty


def _floor(shard, targets, group):
    return torch.cat([torch.logsumexp(shard[start:start + FLOOR_ROWS], dim=-1)
                      for start in range(0, shard.shape[0], FLOOR_ROWS)])


PATHS = {"fused": _fused, "naive": _naive, "floor": _floor}


def _measure_on_rank(rank: int, world_size: int, path: str, tokens: int) -> dict:
    group = dist.group.WORLD
    shard_width = VOCAB // world_size
    gen = torch.Generator().manual_seed(rank)
    shard = torch.empty(tokens, shard_width).normal_(0.0, 3.0, generator=gen)
    targets = torch.randint(0, VOCAB, (tokens,), generator=torch.Generator().manual_seed(0))
    run = PATHS[path]
    peak_extra_mb, times = 0.0, []
    with torch.no_grad():
        for repeat in range(REPEATS + 1):
            dist.barrier()
            _reset_high_water_mark()
            resident_before, _ = _resident_mb()
            start = time.perf_counter()
            result = run(shard, targets, group)
            elapsed = time.perf_counter() - start
            _, high_water = _resident_mb()
            del result
            peak_extra_mb = max(peak_extra_mb, high_water - resident_before)
            if repeat:  # the first call is the warm-up
                times.append(elapsed)
    return {"peak_extra_mb": peak_extra_mb, "seconds": min(times)}


def measure(path: str, tokens: int) -> dict:
    per_rank = run_distributed(_measure_on_rank, TP, path, tokens)
    return {"peak_extra_mb": round(max(r["peak_extra_mb"] for r in per_rank), 1),
            "seconds": round(max(r["seconds"] for r in per_rank), 4)}


def _available_mb() -> float:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("MemAvailable missing from /proc/meminfo")


def _naive_need_mb(tokens: int) -> float:
    shard_mb = tokens * VOCAB // TP * 4 / 2**20
    return TP * (shard_mb + NAIVE_FULL_COPIES * TP * shard_mb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--naive-tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    args = parser.parse_args()

    sizes: dict[int, dict] = {}
    for tokens in sorted(set(args.tokens) | set(args.naive_tokens)):
        entry = sizes.setdefault(tokens, {"tokens": tokens})
        for path in ("fused", "floor"):
            figures = measure(path, tokens)
            entry[f"{path}_peak_mb"], entry[f"{path}_s"] = figures["peak_extra_mb"], figures["seconds"]
        if tokens in args.naive_tokens:
            need_mb, available_mb = _naive_need_mb(tokens), _available_mb()
            if need_mb < 0.8 * available_mb:
                figures = measure("naive", tokens)
                entry["naive_peak_mb"], entry["naive_s"] = (figures["peak_extra_mb"],
                                                            figures["seconds"])
            else:
                entry["naive_skipped"] = (f"needs ~{need_mb:.0f} MB for {TP} ranks, "
                                          f"{available_mb:.0f} MB available")
        entry["fused_over_floor_time"] = round(entry["fused_s"] / entry["floor_s"], 3)
        if "naive_peak_mb" in entry:
            entry["fused_over_naive_peak"] = round(entry["fused_peak_mb"] / entry["naive_peak_mb"], 4)
        print(json.dumps(entry), flush=True)

    # Headline: the largest size with all three paths measured; every size under "sizes".
    headline = max((e for e in sizes.values() if "naive_peak_mb" in e),
                   key=lambda e: e["tokens"], default=max(sizes.values(), key=lambda e: e["tokens"]))
    fused_peaks = [e["fused_peak_mb"] for e in sizes.values()]
    summary = {key: headline.get(key) for key in
               ("fused_peak_mb", "naive_peak_mb", "fused_s", "naive_s", "floor_s", "tokens")}
    summary.update(tp=TP, vocab=VOCAB, threads_per_rank=1, dtype="float32",
                   fused_peak_mb_range=[min(fused_peaks), max(fused_peaks)],
                   sizes={str(t): e for t, e in sorted(sizes.items())})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
