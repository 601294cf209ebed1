"""Evaluate a checkpoint without training: greedy validation metrics and self-certainty
best-of-N, for a Megatron training checkpoint or a Hugging Face model directory.

    python -m megatron_intuitor.evaluate runs/math_gsm8k/checkpoints/step_100 -n 8
    python -m megatron_intuitor.evaluate runs/math_gsm8k/hf_final --data data/gsm8k/test.parquet
    python -m megatron_intuitor.evaluate MODEL_DIR --synthetic 32 -n 4    # arithmetic prompts

A Megatron checkpoint (`.../checkpoints/step_<N>`) is first exported to a temporary HF directory
(`tools/convert_ckpt.py megatron-to-hf` at the TP/PP it was written at). The run's own settings
(`<run>/hydra/<time>/.hydra/config.yaml`, written by every run) give the defaults: the validation
files, prompt and response lengths, system prompt, sampling temperature / top-p and the rollout
dtype; every option here overrides them. vLLM samples one greedy response (the validation
metrics) and, with -n N >= 2, N sampled ones per prompt, which a transformers forward scores with
the trainer's self-certainty at the sampling temperature: `acc_sc_best_of_<N>` (the most
self-certain response graded), `maj@<N>`, `pass@<N>`. The last printed line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

from megatron_intuitor.checkpoint import TRAINER_STATE_FILE

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
REPO = Path(__file__).resolve().parent.parent
DEFAULT_SYSTEM_PROMPT = "Let's think step by step and output the final answer within \\boxed{}."


@dataclass(frozen=True)
class EvalSettings:
    """What the evaluation takes from the run (or the command line)."""
    datasets: list[dict] = field(default_factory=list)  # {path, format, name} per validation set
    max_prompt_length: int = 512
    max_response_length: int = 512
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    temperature: float = 1.0
    top_p: float = 1.0
    dtype: str = "float32"


def is_megatron_checkpoint(path: Path) -> bool:
    return (path / TRAINER_STATE_FILE).is_file()


def checkpoint_layout(path: Path) -> tuple[int, int]:
    """(TP, PP) the checkpoint was written at."""
    layout = json.loads((path / TRAINER_STATE_FILE).read_text())["layout"]
    return int(layout["tensor"]), int(layout["pipeline"])


def run_config_of(checkpoint: Path) -> Optional[Path]:
    """The newest Hydra record of the run a training checkpoint (`<run>/checkpoints/step_<N>`)
    or an export (`<run>/hf_final`) belongs to."""
    for run_dir in (checkpoint.parent.parent, checkpoint.parent):
        found = sorted((run_dir / "hydra").glob("*/.hydra/config.yaml"))
        if found:
            return found[-1]
    return None


def settings_from_run(config_file: Optional[Path]) -> EvalSettings:
    if config_file is None:
        return EvalSettings()
    cfg = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
    data, rollout = cfg["data"], cfg["rollout"]
    datasets = [entry if isinstance(entry, dict) else {"path": entry, "format": "auto"}
                for entry in data.get("val_files") or []]
    return EvalSettings(datasets=datasets, max_prompt_length=data["max_prompt_length"],
                        max_response_length=data["max_response_length"],
                        system_prompt=data.get("system_prompt") or DEFAULT_SYSTEM_PROMPT,
                        temperature=rollout["temperature"], top_p=rollout["top_p"],
                        dtype=rollout["dtype"])


def export_to_hf(checkpoint: Path, out: Path) -> Path:
    tp, pp = checkpoint_layout(checkpoint)
    subprocess.run([sys.executable, str(REPO / "tools" / "convert_ckpt.py"), "megatron-to-hf",
                    str(checkpoint), str(out), "--tp", str(tp), "--pp", str(pp)], check=True,
                   stdout=sys.stderr)  # stdout is the metrics alone
    return out


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path,
                        help="a Megatron checkpoint (step_<N>) or an HF model directory")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", help="a dataset file (JSONL / parquet, any layout the trainer "
                                       "reads) instead of the run's validation files")
    source.add_argument("--synthetic", type=int, metavar="PROMPTS",
                        help="that many synthetic arithmetic prompts")
    parser.add_argument("--format", default="auto", help="the --data layout (default: detected)")
    parser.add_argument("--name", default=None, help="dataset name in the metric names")
    parser.add_argument("--max-prompts", type=int, default=None, help="per dataset")
    parser.add_argument("-n", type=int, default=1,
                        help="responses per prompt for best-of-N (>= 2; 1: greedy only)")
    for option, kind in (("--temperature", float), ("--top-p", float),
                         ("--max-prompt-length", int), ("--max-response-length", int),
                         ("--system-prompt", str)):
        parser.add_argument(option, type=kind, default=None, help="default: the run's")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="default: the run's rollout.dtype")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"-n must be 1 (greedy only) or >= 2, got {args.n}")
    path = args.checkpoint
    if not (is_megatron_checkpoint(path) or (path / "config.json").is_file()):
        parser.error(f"{path}: neither a Megatron checkpoint ({TRAINER_STATE_FILE}) nor an HF "
                     f"model directory (config.json)")
    if args.data and not os.path.isfile(args.data):
        parser.error(f"--data {args.data}: no such file")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    run = settings_from_run(run_config_of(args.checkpoint.resolve()))
    overrides = {key: getattr(args, key) for key in ("temperature", "top_p", "max_prompt_length",
                                                     "max_response_length", "system_prompt",
                                                     "dtype") if getattr(args, key) is not None}
    settings = EvalSettings(**{**run.__dict__, **overrides})
    if args.synthetic:
        datasets = [{"format": "synthetic", "size": args.synthetic, "name": args.name}]
    elif args.data:
        datasets = [{"path": args.data, "format": args.format, "name": args.name}]
    else:
        datasets = settings.datasets
    if not datasets:
        sys.exit(f"{args.checkpoint}: no run config with validation files next to it: give "
                 f"--data FILE or --synthetic N")
    with tempfile.TemporaryDirectory(prefix="megatron_intuitor_eval_") as scratch:
        model_dir = args.checkpoint
        if is_megatron_checkpoint(args.checkpoint):
            model_dir = export_to_hf(args.checkpoint, Path(scratch) / "hf")
        result = evaluate(model_dir, datasets, settings, args.n, args.max_prompts, args.seed)
    for name, value in sorted(result.items()):
        print(f"{name:45s} {value:.4f}")
    print(json.dumps({"checkpoint": str(args.checkpoint), "n": args.n,
                      "temperature": settings.temperature, "dtype": settings.dtype,
                      "max_response_length": settings.max_response_length,
                      **{k: round(v, 4) for k, v in result.items()}}))


def evaluate(model_dir: Path, datasets: list[dict], settings: EvalSettings, n: int,
             max_prompts: Optional[int], seed: int) -> dict[str, float]:
    """Greedy validation metrics per dataset, plus best-of-N ones when n >= 2."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_intuitor.data.datasets import DatasetSpec, load_records
    from megatron_intuitor.data.prompts import build_prompts
    from megatron_intuitor.evaluation.best_of_n import (best_of_n_metrics,
                                                        hf_sequence_self_certainty)
    from megatron_intuitor.evaluation.registry import validation_metrics
    from megatron_intuitor.evaluation.responses import EvalResponses

    torch.manual_seed(seed)
    dtype = getattr(torch, settings.dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_sets = []
    for entry in datasets:
        spec = (DatasetSpec(format="synthetic", name=entry.get("name"), size=entry["size"],
                            seed=seed) if entry["format"] == "synthetic" else
                DatasetSpec(path=entry["path"], format=entry.get("format", "auto"),
                            name=entry.get("name"), max_rows=max_prompts))
        prompts = build_prompts(load_records(spec), tokenizer, settings.system_prompt,
                                settings.max_prompt_length,
                                name=entry.get("path") or "synthetic").prompts
        prompt_sets.append(prompts[:max_prompts] if max_prompts else prompts)

    responses = EvalResponses(model_dir, tokenizer, dtype=dtype,
                              max_prompt_length=settings.max_prompt_length,
                              max_response_length=settings.max_response_length, seed=seed)
    result: dict[str, float] = {}
    sampled = []
    start = time.perf_counter()
    for prompts in prompt_sets:
        prompt_ids = [p.token_ids for p in prompts]
        greedy = responses.greedy(prompt_ids)
        result.update(validation_metrics([p.record for p in prompts], [s.text for s in greedy]))
        if n >= 2:
            sampled.append(responses.sampled_groups(prompt_ids, n, settings.temperature,
                                                    settings.top_p, seed))
    responses.shutdown()
    result["timing/generate_s"] = time.perf_counter() - start
    if n < 2:
        return result

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    for prompts, groups in zip(prompt_sets, sampled):
        certainty = [hf_sequence_self_certainty(model, prompt.token_ids,
                                                [s.response_token_ids for s in group],
                                                settings.temperature, model.config.vocab_size)
                     for prompt, group in zip(prompts, groups)]
        result.update(best_of_n_metrics([p.record for p in prompts],
                                        [[s.text for s in group] for group in groups], certainty))
    result["timing/score_s"] = time.perf_counter() - start
    return result


if __name__ == "__main__":
    main()
