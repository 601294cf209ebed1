"""Self-certainty best-of-N for any Hugging Face checkpoint and dataset, without training.

    python tools/best_of_n.py MODEL_DIR --data ../shared/data/gsm8k/test.jsonl --max-prompts 50 -n 8
    python tools/best_of_n.py MODEL_DIR --synthetic 32 -n 4         # the tiny arithmetic set

vLLM samples N responses per prompt (and one greedy response); a transformers forward scores each
sampled response's self-certainty with the trainer's scorer at the sampling temperature; the
grader of the dataset grades them. Prints greedy `acc`, `acc_sc_best_of_<N>`, `maj@<N>` and
`pass@<N>` per dataset; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a local HF checkpoint (config, tokenizer, weights)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a dataset file (JSONL / parquet, any layout the trainer "
                                       "reads)")
    source.add_argument("--synthetic", type=int, metavar="PROMPTS",
                        help="that many synthetic arithmetic prompts instead of a file")
    parser.add_argument("--format", default="auto", help="the --data layout (default: detected)")
    parser.add_argument("--name", default=None, help="dataset name in the metric names")
    parser.add_argument("--max-prompts", type=int, default=None)
    parser.add_argument("-n", type=int, default=8, help="responses per prompt (>= 2)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-prompt-length", type=int, default=512)
    parser.add_argument("--max-response-length", type=int, default=512)
    parser.add_argument("--system-prompt", default="Let's think step by step and output the "
                                                   "final answer within \\boxed{}.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    if args.n < 2:
        parser.error(f"-n must be >= 2, got {args.n}")
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        parser.error(f"{args.model_dir}: no config.json (a local HF checkpoint is needed)")
    from pathlib import Path

    from megatron_intuitor.input_files import check_model_weights

    problems = check_model_weights("model_dir", Path(args.model_dir))  # headers only, seconds
    if problems:  # else vLLM fails minutes later with a traceback
        parser.error("; ".join(problems))
    if args.data and not os.path.isfile(args.data):
        parser.error(f"--data {args.data}: no such file")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_intuitor.data.datasets import DatasetSpec, load_records
    from megatron_intuitor.data.prompts import build_prompts
    from megatron_intuitor.evaluation.best_of_n import best_of_n_metrics, \
        hf_sequence_self_certainty
    from megatron_intuitor.evaluation.registry import validation_metrics
    from megatron_intuitor.rollout.engine import RolloutEngine, SamplingConfig

    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    spec = (DatasetSpec(format="synthetic", name=args.name, size=args.synthetic, seed=args.seed)
            if args.synthetic else
            DatasetSpec(path=args.data, format=args.format, name=args.name,
                        max_rows=args.max_prompts))
    prompts = build_prompts(load_records(spec), tokenizer, args.system_prompt,
                            args.max_prompt_length, name=args.data or "synthetic").prompts
    prompts = prompts[:args.max_prompts] if args.max_prompts else prompts
    records = [p.record for p in prompts]

    start = time.perf_counter()
    engine = RolloutEngine(args.model_dir, dtype=dtype,
                           max_model_len=args.max_prompt_length + args.max_response_length,
                           seed=args.seed, engine_kwargs={"load_format": "auto"})
    stop_ids = tuple(sorted({tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}))
    prompt_ids = [p.token_ids for p in prompts]
    greedy = engine.generate(prompt_ids, SamplingConfig(
        n=1, temperature=0.0, max_tokens=args.max_response_length, stop_token_ids=stop_ids))
    samples = engine.generate(prompt_ids, SamplingConfig(
        n=args.n, temperature=args.temperature, top_p=args.top_p,
        max_tokens=args.max_response_length, stop_token_ids=stop_ids, seed=args.seed))
    engine.shutdown()
    generate_s = time.perf_counter() - start

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).eval()
    vocab_size = model.config.vocab_size
    texts, certainty = [], []
    for index, prompt in enumerate(prompts):
        group = samples[index * args.n:(index + 1) * args.n]
        texts.append([s.text for s in group])
        certainty.append(hf_sequence_self_certainty(
            model, prompt.token_ids, [s.response_token_ids for s in group], args.temperature,
            vocab_size))
    score_s = time.perf_counter() - start

    result = validation_metrics(records, [s.text for s in greedy])
    result.update(best_of_n_metrics(records, texts, certainty))
    for name, value in sorted(result.items()):
        print(f"{name:45s} {value:.4f}")
    print(json.dumps({"model": args.model_dir, "data": args.data or "synthetic",
                      "prompts": len(prompts), "n": args.n, "temperature": args.temperature,
                      "generate_s": round(generate_s, 2), "score_s": round(score_s, 2),
                      **{k: round(v, 4) for k, v in result.items()}}))


if __name__ == "__main__":
    main()
