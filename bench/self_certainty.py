"""Benchmark: vocab-parallel self-certainty / log-prob / entropy on Qwen2.5's vocabulary (152064)
at TP=2 on gloo, one rank per core, against its baselines, measured in the same run:

  fused  megatron_intuitor.scoring.vocab_parallel_token_scores (forward: the scoring pass);
  naive  what the FSDP INTUITOR code does: all-gather the full vocabulary, fp32 log_softmax
         (gathered log-probs), entropy from softmax, logsumexp - mean;
  floor  torch.logsumexp over the same local shard, as a library call. One call per at most
         FLOOR_ROWS rows: a single call at 16384 tokens would add a 5 GB temporary per rank
         next to the 5 GB of logits.
  exp    the physical floor: ONE torch.exp pass over the same shard, written chunk by chunk into
         one cache-sized buffer (the chunk the fused pass uses), so that nothing but reading the
         logits and one exp per element is timed. Every exact method must do at least this.
  fused_fwd_bwd  the fused forward then the backward of log-prob + entropy (the training pass).
  fused_t1  the fused forward at temperature 1 (the default rollout temperature), where the
         scaling pass by 1 / T is skipped; every other path runs at T = 0.9.

fused_over_exp is the forward over one exp pass (goal <= 2), fused_t1_over_exp the same at T = 1,
fused_fwd_bwd_over_exp the training pass over one exp pass.

Peak extra memory: the first call of fresh processes per (path, tokens), as the rise of each
rank's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) over its
resident set with the input logits already allocated (torch's CPU allocations are invisible to
tracemalloc). Time: the slower rank's best of REPEATS rounds after a warm-up round, the paths
alternating within each round, so that load from other processes on this shared machine falls
on all of them alike.

The naive path keeps several full-vocabulary fp32 copies per token (~0.6 MB each). A path runs
only at the sizes whose estimated need fits in the memory available at that moment (the machine
is shared); the output names what was skipped and why.

Usage: python bench/self_certainty.py [--tokens 4096 16384] [--naive-tokens 1024 2048] [--skip-logsumexp]
Last line: one JSON object of figures.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

from megatron_intuitor.local_ranks import run_distributed
from megatron_intuitor.scoring import vocab_parallel_token_scores

VOCAB = 152064  # Qwen2.5 lm_head width: divisible by 128 * 2, so no padding at TP=2
TP = 2
TEMPERATURE = 0.9
REPEATS = 3
FLOOR_ROWS = 4096
EXP_CHUNK_ELEMENTS = 1 << 20  # scoring's CPU chunk: 4 MB of fp32, stays in cache
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


def _fused(shard, targets, group, temperature=TEMPERATURE):
    return vocab_parallel_token_scores(shard, targets, temperature=temperature,
                                       vocab_size=VOCAB, tp_group=group)


def _fused_t1(shard, targets, group):
    return _fused(shard, targets, group, temperature=1.0)


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


def _exp(shard, targets, group):
    rows = max(1, EXP_CHUNK_ELEMENTS // shard.shape[1])
    buffer = torch.empty(min(rows, shard.shape[0]), shard.shape[1])
    for start in range(0, shard.shape[0], rows):
        chunk = shard[start:start + rows]
        torch.exp(chunk, out=buffer[:chunk.shape[0]])
    return buffer


def _fused_fwd_bwd(shard, targets, group):
    with torch.enable_grad():
        logits = shard.detach().requires_grad_()
        scores = _fused(logits, targets, group)
        (scores.log_probs.sum() + scores.entropy.sum()).backward()
    return logits.grad


PATHS = {"fused": _fused, "naive": _naive, "floor": _floor, "exp": _exp,
         "fused_fwd_bwd": _fused_fwd_bwd, "fused_t1": _fused_t1}


def _inputs(rank: int, world_size: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    shard = torch.empty(tokens, VOCAB // world_size).normal_(
        0.0, 3.0, generator=torch.Generator().manual_seed(rank))
    targets = torch.randint(0, VOCAB, (tokens,), generator=torch.Generator().manual_seed(0))
    return shard, targets


def _peak_on_rank(rank: int, world_size: int, path: str, tokens: int) -> float:
    """Peak extra MB of one call, the first of this fresh process (no allocator reuse)."""
    shard, targets = _inputs(rank, world_size, tokens)
    dist.barrier()
    _reset_high_water_mark()
    resident_before, _ = _resident_mb()
    with torch.no_grad():
        result = PATHS[path](shard, targets, dist.group.WORLD)
    _, high_water = _resident_mb()
    del result
    return high_water - resident_before


def _seconds_on_rank(rank: int, world_size: int, paths: list[str], tokens: int) -> dict:
    """Best time per path over REPEATS rounds after a warm-up round; the paths alternate within
    each round so that load from other processes on the machine hits them alike."""
    shard, targets = _inputs(rank, world_size, tokens)
    times = {path: [] for path in paths}
    with torch.no_grad():
        for round_index in range(REPEATS + 1):
            for path in paths:
                dist.barrier()
                start = time.perf_counter()
                PATHS[path](shard, targets, dist.group.WORLD)
                if round_index:
                    times[path].append(time.perf_counter() - start)
    return {path: min(seconds) for path, seconds in times.items()}


def measure(paths: list[str], tokens: int) -> dict:
    """{path: {"peak_extra_mb", "seconds"}}, each figure the worse of the TP ranks."""
    figures = {}
    for path in paths:
        peaks = run_distributed(_peak_on_rank, TP, path, tokens)
        figures[path] = {"peak_extra_mb": round(max(peaks), 1)}
    for rank_seconds in run_distributed(_seconds_on_rank, TP, paths, tokens):
        for path, seconds in rank_seconds.items():
            figures[path]["seconds"] = round(max(seconds, figures[path].get("seconds", 0.0)), 4)
    return figures


def _available_mb() -> float:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("MemAvailable missing from /proc/meminfo")


def _shard_mb(tokens: int) -> float:
    return tokens * (VOCAB // TP) * 4 / 2**20


def _need_mb(path: str, tokens: int) -> float:
    """Estimated memory of the TP ranks together: their input shards plus the path's extra."""
    extra_per_rank = {"fused": 64.0, "fused_t1": 64.0, "floor": _shard_mb(min(tokens, FLOOR_ROWS)), "exp": 8.0,
                      "fused_fwd_bwd": _shard_mb(tokens) + 64.0,  # the logits' gradient
                      "naive": NAIVE_FULL_COPIES * TP * _shard_mb(tokens)}[path]
    return TP * (_shard_mb(tokens) + extra_per_rank)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--naive-tokens", type=int, nargs="*", default=[1024, 2048, 4096])
    parser.add_argument("--skip-logsumexp", action="store_true",
                        help="leave out the torch.logsumexp reference (the exp floor stays)")
    args = parser.parse_args()

    sizes: dict[int, dict] = {}
    for tokens in sorted(set(args.tokens) | set(args.naive_tokens)):
        entry = sizes.setdefault(tokens, {"tokens": tokens})
        wanted = (["fused", "fused_t1", "exp", "fused_fwd_bwd"] + (["floor"] if not args.skip_logsumexp else [])
                  + (["naive"] if tokens in args.naive_tokens else []))
        paths = []
        for path in wanted:
            need_mb, available_mb = _need_mb(path, tokens), _available_mb()
            if need_mb < 0.8 * available_mb:
                paths.append(path)
            else:
                entry[f"{path}_skipped"] = (f"needs ~{need_mb:.0f} MB for {TP} ranks, "
                                            f"{available_mb:.0f} MB available")
        for path, figures in (measure(paths, tokens) if paths else {}).items():
            entry[f"{path}_peak_mb"], entry[f"{path}_s"] = (figures["peak_extra_mb"],
                                                            figures["seconds"])
        if "fused_s" in entry and "floor_s" in entry:
            entry["fused_over_floor_time"] = round(entry["fused_s"] / entry["floor_s"], 3)
        if "exp_s" in entry:
            for path in ("fused", "fused_t1", "fused_fwd_bwd"):
                if f"{path}_s" in entry:
                    entry[f"{path}_over_exp"] = round(entry[f"{path}_s"] / entry["exp_s"], 3)
        if "naive_peak_mb" in entry:
            entry["fused_over_naive_peak"] = round(entry["fused_peak_mb"]
                                                   / entry["naive_peak_mb"], 4)
        print(json.dumps(entry), flush=True)

    # Headline: the largest size with all three paths measured; every size under "sizes".
    largest = max(sizes.values(), key=lambda e: e["tokens"])
    headline = max((e for e in sizes.values() if "naive_peak_mb" in e),
                   key=lambda e: e["tokens"], default=largest)
    fused_peaks = [e["fused_peak_mb"] for e in sizes.values() if "fused_peak_mb" in e]
    time_ratios = [e["fused_over_floor_time"] for e in sizes.values()
                   if "fused_over_floor_time" in e]
    exp_ratios = [e["fused_over_exp"] for e in sizes.values() if "fused_over_exp" in e]
    train_exp_ratios = [e["fused_fwd_bwd_over_exp"] for e in sizes.values()
                        if "fused_fwd_bwd_over_exp" in e]
    summary = {key: headline.get(key) for key in
               ("fused_peak_mb", "naive_peak_mb", "fused_s", "naive_s", "floor_s", "exp_s",
                "fused_fwd_bwd_s", "tokens")}
    summary.update(
        tp=TP, vocab=VOCAB, threads_per_rank=1, dtype="float32",
        fused_peak_mb_range=[min(fused_peaks), max(fused_peaks)] if fused_peaks else None,
        max_fused_over_floor_time=max(time_ratios) if time_ratios else None,
        max_fused_over_exp=max(exp_ratios) if exp_ratios else None,
        max_fused_t1_over_exp=max((e["fused_t1_over_exp"] for e in sizes.values()
                                   if "fused_t1_over_exp" in e), default=None),
        max_fused_fwd_bwd_over_exp=max(train_exp_ratios) if train_exp_ratios else None,
        targets_met={
            "fused_peak_le_naive_peak_over_tp": (headline.get("naive_peak_mb") is not None
                                                 and headline["fused_peak_mb"]
                                                 <= headline["naive_peak_mb"] / TP),
            "fused_time_le_1.5x_floor": bool(time_ratios) and max(time_ratios) <= 1.5,
            "fused_time_le_2x_exp": bool(exp_ratios) and max(exp_ratios) <= 2.0,
        },
        sizes={str(t): e for t, e in sorted(sizes.items())})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
