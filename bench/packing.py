"""Sequence packing (THD) vs padded rows, on a batch of very unequal lengths, on CPU.

Times one scoring pass (`score_batch`) and one PPO forward+backward (`ppo_forward_backward`) of
the same rows for each micro-batching: fixed micro-batches of MICRO_BATCH rows and token-budget
micro-batches of BUDGET tokens, each padded and packed. PP=1 on one process; then PP=2 on two
processes, packed with a token budget, comparing the two ways stages can exchange activations of
unequal micro-batches: padding every micro-batch to the largest of the call (what
`run_pipeline` does) vs Megatron's `variable_seq_lengths` (shapes exchanged first).

Time: the best of REPEATS rounds after a warm-up round; the modes alternate within each round so
that load from other processes on this shared machine falls on all of them alike.

Usage: python bench/packing.py [--layers 4] [--hidden 256]
Last line: one JSON object of figures.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from megatron_intuitor.batch import MicroBatching
from megatron_intuitor.local_ranks import run_distributed

TEMPERATURE = 1.0
REPEATS = 3
MICRO_BATCH = 4
BUDGET = 2048
# A long-tailed response-length distribution: 4 long rows among 28 short ones, spread over the
# batch as sampling leaves them (rows are grouped by prompt, not by length).
LENGTHS = [40 + 9 * i for i in range(28)]
for position, long_row in zip((2, 10, 18, 26), (960, 700, 512, 384)):
    LENGTHS.insert(position, long_row)
PROMPT = 24
MODES = {
    "padded_fixed": MicroBatching(micro_batch_size=MICRO_BATCH, packed=False),
    "packed_fixed": MicroBatching(micro_batch_size=MICRO_BATCH),
    "padded_dynamic": MicroBatching(max_tokens=BUDGET, packed=False),
    "packed_dynamic": MicroBatching(max_tokens=BUDGET),
}


def _batch(vocab_size: int):
    from megatron_intuitor.batch import batch_from_rollouts
    from megatron_intuitor.rollout.engine import RolloutSample

    gen = torch.Generator().manual_seed(0)
    samples = []
    for row, length in enumerate(LENGTHS):
        ids = torch.randint(0, vocab_size, (length,), generator=gen).tolist()
        samples.append(RolloutSample(row // 4, ids[:PROMPT], ids[PROMPT:], "", "stop",
                                     [0.0] * (length - PROMPT)))
    rollouts = batch_from_rollouts(samples, pad_token_id=0)
    old_log_probs = torch.where(rollouts.response_mask, -2.0, 0.0)
    return rollouts.for_update(torch.randn(len(LENGTHS), generator=gen), old_log_probs,
                               old_log_probs.clone())


def _seconds_on_rank(rank: int, world_size: int, model_dir: str, pp: int,
                     modes: dict[str, tuple[MicroBatching, bool]]) -> dict:
    """{mode: {"score_s", "ppo_s"}}; each mode is (batching, variable_seq_lengths)."""
    from megatron_intuitor.models.forward import score_batch
    from megatron_intuitor.models.optimizer import build_optimizer
    from megatron_intuitor.models.policy import load_policy
    from megatron_intuitor.parallel import ParallelSizes, init_model_parallel
    from megatron_intuitor.ppo import PPOSettings, ppo_forward_backward

    sizes = ParallelSizes(1, pp)
    init_model_parallel(sizes, seed=1)
    hf_config, chunks = load_policy(model_dir, sizes)
    config = chunks[0].config  # shared by every chunk and layer
    chunks, _ = build_optimizer(chunks, 1e-5)
    batch = _batch(hf_config.vocab_size)
    attention = torch.arange(batch.input_ids.shape[1]) < batch.lengths[:, None]
    settings = PPOSettings(temperature=TEMPERATURE, clip_ratio=0.2, kl_coef=0.005,
                           kl_type="low_var_kl", entropy_coef=0.0, tis_cap=None)
    times = {name: {"score_s": [], "ppo_s": []} for name in modes}
    for _ in range(REPEATS + 1):
        for name, (batching, variable) in modes.items():
            config.variable_seq_lengths = variable
            torch.distributed.barrier()
            start = time.perf_counter()
            score_batch(chunks, batch.input_ids, attention, batch.response_mask,
                        temperature=TEMPERATURE, vocab_size=hf_config.vocab_size,
                        batching=batching)
            torch.distributed.barrier()
            middle = time.perf_counter()
            for chunk in chunks:
                chunk.zero_grad_buffer()
            ppo_forward_backward(chunks, batch, batching, settings, hf_config.vocab_size)
            torch.distributed.barrier()
            times[name]["score_s"].append(middle - start)
            times[name]["ppo_s"].append(time.perf_counter() - middle)
    # Drop the warm-up round.
    return {name: {k: min(v[1:]) for k, v in t.items()} for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    from megatron_intuitor.models.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(make_tiny_model(tmp, hidden_size=args.hidden, num_layers=args.layers,
                                        num_heads=4, num_kv_heads=2,
                                        intermediate_size=2 * args.hidden))
        real = sum(LENGTHS)
        print(f"rows {len(LENGTHS)}, real tokens {real}, padded tokens "
              f"{len(LENGTHS) * max(LENGTHS)}; hidden {args.hidden}, {args.layers} layers")
        pp1 = run_distributed(_seconds_on_rank, 1, model_dir, 1,
                              {name: (batching, False) for name, batching in MODES.items()})[0]
        for name, t in pp1.items():
            print(f"PP=1 {name:15s} score {t['score_s']:.3f} s  ppo fwd+bwd {t['ppo_s']:.3f} s")
        pp2_modes = {"pad_to_common": (MODES["packed_dynamic"], False),
                     "variable_seq_lengths": (MODES["packed_dynamic"], True)}
        ranks = run_distributed(_seconds_on_rank, 2, model_dir, 2, pp2_modes)
        pp2 = {name: {k: max(r[name][k] for r in ranks) for k in ranks[0][name]}
               for name in pp2_modes}
        for name, t in pp2.items():
            print(f"PP=2 packed_dynamic {name:21s} score {t['score_s']:.3f} s  "
                  f"ppo fwd+bwd {t['ppo_s']:.3f} s")
    figures = {"real_tokens": real, "rows": len(LENGTHS), "max_length": max(LENGTHS),
               **{f"pp1_{name}_{k}": round(v, 4) for name, t in pp1.items()
                  for k, v in t.items()},
               **{f"pp2_packed_dynamic_{name}_{k}": round(v, 4) for name, t in pp2.items()
                  for k, v in t.items()}}
    for kind in ("fixed", "dynamic"):
        figures[f"pp1_{kind}_ppo_speedup_packed"] = round(
            pp1[f"padded_{kind}"]["ppo_s"] / pp1[f"packed_{kind}"]["ppo_s"], 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
