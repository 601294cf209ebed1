"""Self-certainty best-of-N for any Hugging Face checkpoint and dataset, without training.

    python tools/best_of_n.py MODEL_DIR --data data/gsm8k/test.parquet --max-prompts 50 -n 8
    python tools/best_of_n.py MODEL_DIR --synthetic 32 -n 4         # the tiny arithmetic set
    python tools/best_of_n.py MODEL_DIR --synthetic-space +- 20 --exclude trained.txt -n 8 \
        --max-response-length 128 --dump responses.jsonl     # docs/experiments.md, section 1

vLLM samples N responses per prompt (and one greedy response); a transformers forward scores each
sampled response's self-certainty with the trainer's scorer at the sampling temperature (with
`--dump`: the engine scores each token from the logits it samples from, `rollout.sampling_scores`,
the same quantity); the grader of the dataset grades them. Prints greedy `acc`,
`acc_sc_best_of_<N>`, `maj@<N>` and `pass@<N>` per dataset; the last line is one JSON object.

`--dump FILE` also writes one JSON row per response (prompt, question, sample index or "greedy",
self-certainty, length, answer present, extracted answer, correct, the self-certainty of the
answer's tokens and of the rest) and adds the selection report of
`megatron_intuitor.evaluation.selection` (AUROC, mixed groups, confounds, bootstrap intervals,
at N and N/2) and its decision rule to the JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from typing import Optional

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?",
                        help="a local HF checkpoint (config, tokenizer, weights)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", help="a dataset file (JSONL / parquet, any layout the trainer "
                                       "reads)")
    source.add_argument("--synthetic", type=int, metavar="PROMPTS",
                        help="that many synthetic arithmetic prompts instead of a file")
    source.add_argument("--synthetic-space", nargs=2, metavar=("OPERATORS", "MAX_OPERAND"),
                        help="every synthetic arithmetic prompt of these operators and operands "
                             "0..MAX_OPERAND, once each")
    parser.add_argument("--exclude", help="a file of questions (one user message a line) to "
                                          "leave out")
    parser.add_argument("--dump", help="write one JSON row per response here and add the "
                                       "selection report")
    parser.add_argument("--chunk-prompts", type=int, default=None,
                        help="generate this many prompts at a time, the dump written after "
                             "each (sampling seed: --seed + the chunk's number)")
    parser.add_argument("--resume", action="store_true",
                        help="with --dump and --chunk-prompts: keep the dump's complete chunks "
                             "and sample only the rest (chunk k keeps its seed, so the result "
                             "equals one uninterrupted run)")
    parser.add_argument("--report-from", metavar="DUMP",
                        help="only print the selection report of an existing dump (complete "
                             "prompts only: a cut-short run's too)")
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
    if args.report_from and not os.path.isfile(args.report_from):
        parser.error(f"--report-from {args.report_from}: no such file")
    if args.report_from:
        print(json.dumps({"dump": args.report_from, "n": args.n, "seed": args.seed,
                          **selection_summary(args.report_from, args.n, args.seed)}))
        return
    if args.resume and not (args.dump and args.chunk_prompts):
        parser.error("--resume needs --dump and --chunk-prompts")
    if args.n < 2:
        parser.error(f"-n must be >= 2, got {args.n}")
    if args.model_dir is None:
        parser.error("MODEL_DIR is required (except with --report-from)")
    if not (args.data or args.synthetic or args.synthetic_space):
        parser.error("one of --data, --synthetic, --synthetic-space is required")
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        parser.error(f"{args.model_dir}: no config.json (a local HF checkpoint is needed)")
    from pathlib import Path

    from megatron_intuitor.input_files import check_model_weights

    problems = check_model_weights("model_dir", Path(args.model_dir))  # headers only, seconds
    if problems:  # else vLLM fails minutes later with a traceback
        parser.error("; ".join(problems))
    for flag, path in (("--data", args.data), ("--exclude", args.exclude)):
        if path and not os.path.isfile(path):
            parser.error(f"{flag} {path}: no such file")
    if args.synthetic_space:
        operators, max_operand = args.synthetic_space
        if not max_operand.isdigit():
            parser.error(f"--synthetic-space MAX_OPERAND: expected an integer >= 0, got "
                         f"{max_operand!r}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_intuitor.data.datasets import DatasetSpec, load_records
    from megatron_intuitor.data.prompts import build_prompts
    from megatron_intuitor.data.synthetic import arithmetic_space
    from megatron_intuitor.evaluation.best_of_n import best_of_n_metrics, \
        hf_sequence_self_certainty
    from megatron_intuitor.evaluation.registry import validation_metrics
    from megatron_intuitor.evaluation.responses import EvalResponses

    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if args.synthetic_space:
        records = arithmetic_space(int(max_operand), operators, name=args.name)
    else:
        records = load_records(
            DatasetSpec(format="synthetic", name=args.name, size=args.synthetic, seed=args.seed)
            if args.synthetic else
            DatasetSpec(path=args.data, format=args.format, name=args.name,
                        max_rows=args.max_prompts))
    if args.exclude:
        with open(args.exclude) as handle:
            excluded = {line.strip() for line in handle if line.strip()}
        records = [r for r in records if r.messages[-1]["content"] not in excluded]
    prompts = build_prompts(records, tokenizer, args.system_prompt, args.max_prompt_length,
                            name=args.data or "synthetic").prompts
    prompts = prompts[:args.max_prompts] if args.max_prompts else prompts
    if args.synthetic_space:  # a seeded order: any first prompts of a cut-short run are a sample
        prompts = [prompts[i] for i in random.Random(args.seed).sample(range(len(prompts)),
                                                                        len(prompts))]
    records = [p.record for p in prompts]

    start = time.perf_counter()
    responses = EvalResponses(args.model_dir, tokenizer, dtype=dtype,
                              max_prompt_length=args.max_prompt_length,
                              max_response_length=args.max_response_length, seed=args.seed,
                              score_at_sampling=bool(args.dump))
    chunk_size = args.chunk_prompts or len(prompts)
    done_chunks = kept_chunks(args.dump, args.n, chunk_size) if args.resume else 0
    greedy, groups = [], []
    dump = open(args.dump, "a" if args.resume else "w") if args.dump else None
    for chunk, first in enumerate(range(0, len(prompts), chunk_size)):
        if chunk < done_chunks:
            continue
        prompt_ids = [p.token_ids for p in prompts[first:first + chunk_size]]
        chunk_greedy = responses.greedy(prompt_ids)
        chunk_groups = responses.sampled_groups(prompt_ids, args.n, args.temperature, args.top_p,
                                                seed=args.seed + chunk)
        greedy += chunk_greedy
        groups += chunk_groups
        if dump:
            write_rows(dump, tokenizer, first, records[first:first + chunk_size], chunk_greedy,
                       chunk_groups)
            dump.flush()
        print(f"prompts {first + len(prompt_ids)}/{len(prompts)} after "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    responses.shutdown()
    generate_s = time.perf_counter() - start
    if done_chunks:  # the figures below need every prompt's responses: report from the dump
        dump.close()
        print(json.dumps({"dump": args.dump, "n": args.n, "seed": args.seed,
                          "resumed_after_prompts": done_chunks * chunk_size,
                          "generate_s": round(generate_s, 2),
                          **selection_summary(args.dump, args.n, args.seed)}))
        return

    start = time.perf_counter()
    if args.dump:  # scored by the engine while it sampled
        dump.close()
        certainty = [[mean(s.self_certainty) for s in group] for group in groups]
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).eval()
        certainty = [hf_sequence_self_certainty(
            model, prompt.token_ids, [s.response_token_ids for s in group], args.temperature,
            model.config.vocab_size) for prompt, group in zip(prompts, groups)]
    score_s = time.perf_counter() - start

    result = validation_metrics(records, [s.text for s in greedy])
    result.update(best_of_n_metrics(records, [[s.text for s in group] for group in groups],
                                    certainty))
    for name, value in sorted(result.items()):
        print(f"{name:45s} {value:.4f}")
    summary = {k: round(v, 4) for k, v in result.items()}
    if args.dump:
        summary.update(selection_summary(args.dump, args.n, args.seed))
    print(json.dumps({"model": args.model_dir,
                      "data": args.data or ("synthetic_space " + " ".join(args.synthetic_space)
                                            if args.synthetic_space else "synthetic"),
                      "prompts": len(prompts), "n": args.n, "temperature": args.temperature,
                      "max_response_length": args.max_response_length, "seed": args.seed,
                      "generate_s": round(generate_s, 2), "score_s": round(score_s, 2),
                      "load_avg_1m": os.getloadavg()[0], **summary}))


def kept_chunks(dump_path: str, n: int, chunk_size: int) -> int:
    """How many whole chunks the dump holds (a greedy row and `n` samples for each of their
    prompts); rows of a cut-off chunk after them are dropped from the file."""
    if not os.path.isfile(dump_path):
        return 0
    with open(dump_path) as handle:
        rows = [json.loads(line) for line in handle if line.endswith("\n")]
    per_prompt: dict[int, int] = {}
    for row in rows:
        per_prompt[row["prompt"]] = per_prompt.get(row["prompt"], 0) + 1
    complete = 0
    while per_prompt.get(complete) == n + 1:
        complete += 1
    chunks = complete // chunk_size
    with open(dump_path, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows
                          if row["prompt"] < chunks * chunk_size)
    return chunks


def mean(values: list[float]) -> float:
    """The token mean; 0 for an empty response (as the forward scorer gives it)."""
    return sum(values) / len(values) if values else 0.0


def selection_summary(dump_path: str, n: int, seed: int) -> dict:
    """The selection report of a dump (at N and N/2) and its decision rule, printed one figure
    a line; returned for the JSON line (a figure without data is null)."""
    from megatron_intuitor.evaluation import selection

    with open(dump_path) as handle:
        groups, greedy_correct = selection.responses_from_rows(
            [json.loads(line) for line in handle], n)
    report = selection.report(groups, greedy_correct, ns=sorted({max(n // 2, 2), n}),
                              seed=seed)
    for name, value in report.items():
        print(f"{name:45s} {value:.4f}")
    return {"report": {k: None if math.isnan(v) else round(v, 4) for k, v in report.items()},
            "decision": selection.decision(report, n)}


def token_ends(tokenizer, token_ids: list[int]) -> list[int]:
    """The end, in characters of the decoded response, of each token (decoding each prefix as
    vLLM decodes the whole: special tokens skipped)."""
    return [len(tokenizer.decode(token_ids[:k + 1], skip_special_tokens=True))
            for k in range(len(token_ids))]


def write_rows(handle, tokenizer, first_index: int, records, greedy, groups) -> None:
    """One JSON row per greedy and per sampled response of these prompts (numbered from
    `first_index`), the sampled ones with their engine-scored self-certainty."""
    from megatron_intuitor.evaluation.best_of_n import answer_token_mask, extract_answer
    from megatron_intuitor.evaluation.registry import grade_record

    def part_mean(values: list[float], mask: list[bool], inside: bool) -> Optional[float]:
        chosen = [v for v, m in zip(values, mask) if m == inside]
        return sum(chosen) / len(chosen) if chosen else None

    for index, (record, first, group) in enumerate(zip(records, greedy, groups), first_index):
        base = {"prompt": index, "question": record.messages[-1]["content"],
                "ground_truth": record.ground_truth}
        handle.write(json.dumps({**base, "sample": "greedy", "text": first.text,
                                 "correct": grade_record(record, first.text)}) + "\n")
        for number, sample in enumerate(group):
            answer = extract_answer(record, sample.text)
            mask = answer_token_mask(record, sample.text,
                                     token_ends(tokenizer, sample.response_token_ids))
            handle.write(json.dumps({
                **base, "sample": number, "text": sample.text,
                "finish_reason": sample.finish_reason,
                "self_certainty": mean(sample.self_certainty),
                "length": len(sample.response_token_ids), "answer_present": answer is not None,
                "answer": answer, "correct": grade_record(record, sample.text),
                "answer_self_certainty": (None if mask is None else
                                          part_mean(sample.self_certainty, mask, True)),
                "rest_self_certainty": (None if mask is None else
                                        part_mean(sample.self_certainty, mask, False))}) + "\n")

if __name__ == "__main__":
    main()
