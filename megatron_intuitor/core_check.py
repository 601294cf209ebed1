"""The GPU check for a bare GPU machine (scripts/gpu_check_core.sh): what can be checked with only
CUDA torch, transformers and megatron-core installed, no vLLM, Transformer Engine or Ray.

    python -m megatron_intuitor.core_check {logits,scoring,ppo} [--small]

Parts (each meant for a process of its own; scripts/gpu_parts.py runs them):
  logits   Megatron's local layer spec (bf16) against transformers (fp32) on a Qwen2 at
           Qwen2.5-0.5B widths with 2 layers, made locally: the log-probs and entropies of the
           same tokens, padded and packed;
  scoring  the fused vocab-parallel scoring (`scoring.vocab_parallel_token_scores`) against
           float64 on a slice of the rows, then its peak extra memory and time at 8192 tokens x
           152064 (Qwen2.5's padded vocabulary, bf16 logits) against one exp pass over the same
           logits and the naive log-softmax, and the floor of one read of the logits at the
           copy bandwidth measured in the same run;
  ppo      one PPO update (Megatron DDP + distributed optimizer) on that model, a checkpoint
           saved and loaded into a fresh model and optimizer: weights and Adam's state equal.
--small: tiny sizes in fp32, for CPU (the CPU test runs every part so, with vLLM, Ray and
Transformer Engine made unimportable). Last line of every part: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from megatron_intuitor.platform import on_gpu

TEMPERATURE = 0.9
SCORING_TOKENS, SCORING_VOCAB = 8192, 152064  # Qwen2.5's lm_head width (151936 padded to 128)
SMALL_SCORING_TOKENS, SMALL_SCORING_VOCAB = 256, 4096
FLOAT64_ROWS = 256  # rows compared with float64 (a float64 copy of all 8192 would be 10 GB)
REPEATS = 3
# bf16 Megatron vs fp32 transformers on random weights (the TE suite's bounds for the same model)
LOG_PROB_MEAN_TOL, LOG_PROB_MAX_TOL = 0.05, 0.5
# the fused pass accumulates in fp32: against float64 over 152k columns
FUSED_VS_FLOAT64_TOL = 1e-3


def random_batch(lengths: list[int], prompt_len: int, seed: int = 0,
                 vocab: int = 500) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded random rows: (input_ids, attention_mask, response_mask)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=gen)
    attention = torch.arange(width) < torch.tensor(lengths)[:, None]
    ids[~attention] = 0
    response = attention.clone()
    response[:, :prompt_len] = False
    return ids, attention, response


def transformers_scores(model_dir: Path, ids: torch.Tensor, attention: torch.Tensor,
                        temperature: float) -> dict[str, torch.Tensor]:
    """transformers' fp32 log-prob of token t and entropy of the distribution that predicted it,
    at column t (0 at column 0), from logits / temperature."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = model.to(_device()).eval()
    with torch.no_grad():
        logits = model(input_ids=ids.to(_device()),
                       attention_mask=attention.long().to(_device())).logits
        log_p = torch.log_softmax(logits[:, :-1].float() / temperature, -1)
        log_probs = log_p.gather(-1, ids[:, 1:, None].to(_device()))[..., 0]
        entropy = -(log_p.exp() * log_p).sum(-1)
    pad = torch.nn.functional.pad
    return {"log_probs": pad(log_probs.cpu(), (1, 0)), "entropy": pad(entropy.cpu(), (1, 0))}


def _device() -> torch.device:
    from megatron_intuitor.platform import device

    return device()


def _model(directory: Path, small: bool) -> Path:
    from megatron_intuitor.models.tiny import QWEN25_05B_WIDTHS, make_tiny_model

    if small:
        return make_tiny_model(directory, dtype=torch.float32)
    return make_tiny_model(directory, **QWEN25_05B_WIDTHS, dtype=torch.bfloat16)


def _world() -> None:
    """This process as rank 0 of 1 (NCCL on GPU, gloo on CPU), Megatron at TP = PP = 1."""
    from megatron_intuitor import parallel
    from megatron_intuitor.local_ranks import free_port

    port = free_port()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    parallel.init_torch_distributed(0, 1, master_port=port)
    parallel.init_model_parallel(parallel.ParallelSizes(1, 1), seed=1)


def _policy(model_dir: Path, small: bool):
    from megatron_intuitor.models.policy import load_policy
    from megatron_intuitor.parallel import ParallelSizes

    dtype = torch.float32 if small else torch.bfloat16
    return load_policy(model_dir, ParallelSizes(1, 1), params_dtype=dtype, local_layers=True)


def _score(chunks, hf_config, ids, attention, response, packed: bool) -> dict[str, torch.Tensor]:
    from megatron_intuitor.batch import MicroBatching
    from megatron_intuitor.models.forward import score_batch

    return score_batch(chunks, ids, attention, response, temperature=TEMPERATURE,
                       vocab_size=hf_config.vocab_size,
                       batching=MicroBatching(micro_batch_size=2, packed=packed))


# ----------------------------------------------------------------------------------- logits

def check_logits(work_dir: Path, small: bool) -> dict:
    """Megatron's local layer spec vs transformers, padded and packed."""
    _world()
    model_dir = _model(work_dir / "model", small)
    hf_config, chunks = _policy(model_dir, small)
    ids, attention, response = random_batch([40, 57, 23, 64], prompt_len=10)
    reference = transformers_scores(model_dir, ids, attention, TEMPERATURE)
    result: dict = {"part": "logits", "model": "qwen2 2 layers at Qwen2.5-0.5B widths"
                    if not small else "tiny qwen2", "dtype": str(chunks[0].config.params_dtype)}
    ok = True
    for layout in ("padded", "packed"):
        got = _score(chunks, hf_config, ids, attention, response, packed=layout == "packed")
        for name in ("log_probs", "entropy"):
            diff = (got[name] - reference[name])[response].abs()
            mean, largest = float(diff.mean()), float(diff.max())
            result[f"{layout}_{name}_diff"] = {"mean": mean, "max": largest}
            ok &= mean < LOG_PROB_MEAN_TOL and largest < LOG_PROB_MAX_TOL
    result["ok"] = ok
    return result


# ---------------------------------------------------------------------------------- scoring

def naive_scores(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """What a plain implementation does: full-vocabulary fp32 log_softmax and softmax."""
    z = logits.float() / temperature
    log_probs = torch.log_softmax(z, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    log_sum_exp = torch.logsumexp(z, dim=-1)
    entropy = log_sum_exp - (torch.softmax(z, dim=-1) * z).sum(-1)
    return log_probs, entropy, log_sum_exp - z.mean(dim=-1)


def float64_scores(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """The reference: INTUITOR's formulas (scoring.py's docstring) in float64."""
    z = logits.double() / temperature
    log_sum_exp = torch.logsumexp(z, dim=-1)
    log_p = z - log_sum_exp[:, None]
    log_probs = log_p.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return log_probs, entropy, log_sum_exp - z.mean(dim=-1)


def exp_pass(logits: torch.Tensor) -> torch.Tensor:
    """One exp over every logit, chunk by chunk into one buffer (the fused pass's chunk): reading
    the logits once and one exp per element, what every exact method must at least do."""
    from megatron_intuitor.scoring import _chunk_rows

    rows = _chunk_rows(None, logits.shape[1], logits.device)
    buffer = torch.empty(min(rows, logits.shape[0]), logits.shape[1], dtype=torch.float32,
                         device=logits.device)
    for start in range(0, logits.shape[0], rows):
        chunk = logits[start:start + rows]
        torch.exp(chunk, out=buffer[:chunk.shape[0]])
    return buffer


def _measure(run: Callable[[], object]) -> tuple[float, float]:
    """(best seconds of REPEATS after a warm-up, peak extra bytes over what was allocated)."""
    gpu = on_gpu()
    run()
    best = math.inf
    peak = 0.0
    for _ in range(REPEATS):
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        started = time.perf_counter()
        result = run()
        if gpu:
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated() - before)
        best = min(best, time.perf_counter() - started)
        del result
    return best, peak


def copy_bandwidth(nbytes: int) -> float:
    """Bytes per second of a device-to-device copy of `nbytes` (read + write counted)."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=_device())
    target = torch.empty_like(source)
    seconds, _ = _measure(lambda: target.copy_(source))
    return 2 * nbytes / seconds


def check_scoring(small: bool) -> dict:
    """The fused scoring's values vs float64, then its time and memory vs its baselines."""
    from megatron_intuitor.scoring import vocab_parallel_token_scores

    tokens, vocab = ((SMALL_SCORING_TOKENS, SMALL_SCORING_VOCAB) if small
                     else (SCORING_TOKENS, SCORING_VOCAB))
    dtype = torch.float32 if small else torch.bfloat16  # bf16: what the bf16 model emits
    gen = torch.Generator(device=_device()).manual_seed(0)
    logits = (3 * torch.randn(tokens, vocab, generator=gen, device=_device())).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=gen, device=_device())

    def fused():
        return vocab_parallel_token_scores(logits, targets, temperature=TEMPERATURE,
                                           vocab_size=vocab)

    got = fused()
    rows = slice(0, min(FLOAT64_ROWS, tokens))
    want = float64_scores(logits[rows], targets[rows], TEMPERATURE)
    result: dict = {"part": "scoring", "tokens": tokens, "vocab": vocab, "dtype": str(dtype),
                    "device": torch.cuda.get_device_name() if on_gpu() else "cpu"}
    errors = {name: float((mine[rows].double() - theirs).abs().max())
              for name, mine, theirs in zip(("log_probs", "entropy", "self_certainty"), got,
                                            want)}
    result["fused_vs_float64_max_abs"] = errors
    del got, want
    paths = {"fused": fused, "exp": lambda: exp_pass(logits),
             "naive": lambda: naive_scores(logits, targets, TEMPERATURE)}
    for name, run in paths.items():
        seconds, peak = _measure(run)
        result[f"{name}_s"] = seconds
        if on_gpu():
            result[f"{name}_peak_extra_gib"] = peak / 2**30
    bandwidth = copy_bandwidth(logits.numel() * logits.element_size())
    floor = logits.numel() * logits.element_size() / bandwidth  # one read of the logits
    result.update(copy_bandwidth_gb_s=bandwidth / 1e9, read_floor_s=floor,
                  fused_over_floor=result["fused_s"] / floor,
                  fused_over_exp=result["fused_s"] / result["exp_s"],
                  fused_over_naive=result["fused_s"] / result["naive_s"])
    result["ok"] = max(errors.values()) < FUSED_VS_FLOAT64_TOL
    return result


# -------------------------------------------------------------------------------------- ppo

def _optimizer_state(optimizer) -> list[torch.Tensor]:
    """Every tensor of Adam's state (fp32 main copies' moments) and the main parameters."""
    inner = [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])]
    tensors = []
    for opt in inner:
        for group in opt.param_groups:
            for param in group["params"]:
                tensors.append(param.detach())
                state = opt.state.get(param, {})  # by name: a reload may insert in another order
                tensors += [state[key] for key in sorted(state) if torch.is_tensor(state[key])]
    return tensors


def check_ppo(work_dir: Path, small: bool) -> dict:
    """One PPO update with the distributed optimizer; its checkpoint reloads exactly."""
    from megatron_intuitor import checkpoint
    from megatron_intuitor.batch import MicroBatching, RolloutBatch
    from megatron_intuitor.models.optimizer import build_optimizer
    from megatron_intuitor.ppo import PPOSettings, ppo_forward_backward

    _world()
    model_dir = _model(work_dir / "model", small)
    hf_config, chunks = _policy(model_dir, small)
    chunks, optimizer = build_optimizer(chunks, 1e-4, clip_grad=1.0,
                                        use_distributed_optimizer=True)
    ids, attention, response = random_batch([37, 50, 23, 41], prompt_len=10, seed=8)
    old = _score(chunks, hf_config, ids, attention, response, packed=True)["log_probs"]
    rollouts = RolloutBatch(input_ids=ids, response_mask=response, lengths=attention.sum(1),
                            group_index=torch.zeros(len(ids), dtype=torch.long),
                            rollout_log_probs=old)
    batch = rollouts.for_update(torch.tensor([1.0, -0.5, 0.2, -0.7]), old, old)
    settings = PPOSettings(temperature=TEMPERATURE, clip_ratio=0.2, kl_coef=0.01,
                           kl_type="low_var_kl", entropy_coef=0.0, tis_cap=None)
    before = [param.detach().clone() for param in chunks[0].parameters()]
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    started = time.perf_counter()
    losses = ppo_forward_backward(chunks, batch, MicroBatching(micro_batch_size=2, packed=True),
                                  settings, hf_config.vocab_size)
    stepped, grad_norm, _ = optimizer.step()
    if on_gpu():
        torch.cuda.synchronize()
    update_s = time.perf_counter() - started
    # bf16 weights near 1 (the norms) may not move by one bf16 step; the fp32 main copies do
    moved = sum(not torch.equal(a, b) for a, b in zip(before, chunks[0].parameters()))

    path = checkpoint.save_checkpoint(work_dir / "checkpoints", 1, chunks, optimizer, extra={},
                                      keep_last=1)
    _, fresh = _policy(model_dir, small)
    fresh, fresh_optimizer = build_optimizer(fresh, 1e-4, clip_grad=1.0,
                                             use_distributed_optimizer=True)
    checkpoint.load_checkpoint(path, fresh, fresh_optimizer)
    weights_equal = all(torch.equal(a, b) for a, b in zip(chunks[0].parameters(),
                                                          fresh[0].parameters()))
    mine, theirs = _optimizer_state(optimizer), _optimizer_state(fresh_optimizer)
    state_equal = len(mine) == len(theirs) and all(torch.equal(a, b)
                                                   for a, b in zip(mine, theirs))
    return {"part": "ppo", "stepped": bool(stepped), "grad_norm": float(grad_norm),
            "losses": losses, "update_s": update_s,
            "parameters_moved": f"{moved}/{len(before)}",
            "optimizers": [type(opt).__name__
                           for opt in getattr(optimizer, "chained_optimizers", [optimizer])],
            "weights_equal_after_reload": weights_equal,
            "optimizer_state_tensors": len(mine), "optimizer_state_equal_after_reload":
                state_equal,
            "ok": bool(stepped) and math.isfinite(grad_norm) and grad_norm > 0 and moved > 0
                  and weights_equal and state_equal}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("logits", "scoring", "ppo"))
    parser.add_argument("--small", action="store_true",
                        help="tiny sizes in fp32 (the CPU test); the default sizes need a GPU")
    options = parser.parse_args()
    if not options.small and not on_gpu():
        print("core_check: no CUDA device (torch.cuda.is_available() is False); on CPU only "
              "--small runs", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="core_check_") as scratch:
        if options.part == "logits":
            result = check_logits(Path(scratch), options.small)
        elif options.part == "scoring":
            result = check_scoring(options.small)
        else:
            result = check_ppo(Path(scratch), options.small)
        from megatron_intuitor import parallel

        parallel.destroy()
    result["seconds"] = time.perf_counter() - started
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
