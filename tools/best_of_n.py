"""Self-certainty best-of-N for any Hugging Face checkpoint and dataset, without training.

    python tools/best_of_n.py MODEL_DIR --data ../shared/data/gsm8k/test.jsonl --max-prompts 50 -n 8
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
    source.add_argument("--synthetic-space", nargs=2, metavar=("OPERATORS", "MAX_OPERAND"),
                        help="every synthetic arithmetic prompt of these operators and operands "
                             "0..MAX_OPERAND, once each")
    parser.add_argument("--exclude", help="a file of questions (one user message a line) to "
                                          "leave out")
    parser.add_argument("--dump", help="write one JSON row per response here and add the "
                                       "selection report")
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
    from megatron_intuitor.evaluation.registry import grade_record, validation_metrics
    from megatron_intuitor.rollout.engine import RolloutEngine, SamplingConfig

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
    records = [p.record for p in prompts]

    start = time.perf_counter()
    engine = RolloutEngine(args.model_dir, dtype=dtype,
                           max_model_len=args.max_prompt_length + args.max_response_length,
                           seed=args.seed, engine_kwargs={"load_format": "auto"},
                           score_at_sampling=bool(args.dump))
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
    groups = [samples[index * args.n:(index + 1) * args.n] for index in range(len(prompts))]
    if args.dump:  # scored by the engine while it sampled
        certainty = [[sum(s.self_certainty) / max(len(s.self_certainty), 1) for s in group]
                     for group in groups]
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).eval()
        certainty = [hf_sequence_self_certainty(
            model, prompt.token_ids, [s.response_token_ids for s in group], args.temperature,
            model.config.vocab_size) for prompt, group in zip(prompts, groups)]
    score_s = time.perf_counter() - start

    records = [p.record for p in prompts]
    result = validation_metrics(records, [s.text for s in greedy])
    result.update(best_of_n_metrics(records, [[s.text for s in group] for group in groups],
                                    certainty))
    summary = {k: round(v, 4) for k, v in result.items()}
    if args.dump:
        from megatron_intuitor.evaluation import selection

        responses = dump_responses(args.dump, tokenizer, records, greedy, groups, certainty)
        report = selection.report(responses, [grade_record(r, g.text)
                                              for r, g in zip(records, greedy)],
                                  ns=sorted({max(args.n // 2, 2), args.n}), seed=args.seed)
        for name, value in report.items():
            print(f"{name:45s} {value:.4f}")
        summary.update({"report": {k: None if math.isnan(v) else round(v, 4)  # strict JSON
                                   for k, v in report.items()},
                        "decision": selection.decision(report, args.n)})
    for name, value in sorted(result.items()):
        print(f"{name:45s} {value:.4f}")
    print(json.dumps({"model": args.model_dir,
                      "data": args.data or ("synthetic_space " + " ".join(args.synthetic_space)
                                            if args.synthetic_space else "synthetic"),
                      "prompts": len(prompts), "n": args.n, "temperature": args.temperature,
                      "max_response_length": args.max_response_length, "seed": args.seed,
                      "generate_s": round(generate_s, 2), "score_s": round(score_s, 2),
                      "load_avg_1m": os.getloadavg()[0], **summary}))


def token_ends(tokenizer, token_ids: list[int]) -> list[int]:
    """The end, in characters of the decoded response, of each token (decoding each prefix as
    vLLM decodes the whole: special tokens skipped)."""
    return [len(tokenizer.decode(token_ids[:k + 1], skip_special_tokens=True))
            for k in range(len(token_ids))]


def dump_responses(path: str, tokenizer, records, greedy, groups, certainty):
    """Write the per-response rows; return each prompt's responses as `selection.Response`s."""
    from megatron_intuitor.evaluation.best_of_n import answer_token_mask, extract_answer
    from megatron_intuitor.evaluation.registry import grade_record
    from megatron_intuitor.evaluation.selection import Response

    def part_mean(values: list[float], mask: list[bool], inside: bool):
        chosen = [v for v, m in zip(values, mask) if m == inside]
        return sum(chosen) / len(chosen) if chosen else None

    responses = []
    with open(path, "w") as handle:
        for index, (record, first, group, scores) in enumerate(zip(records, greedy, groups,
                                                                   certainty)):
            base = {"prompt": index, "question": record.messages[-1]["content"],
                    "ground_truth": record.ground_truth}
            handle.write(json.dumps({**base, "sample": "greedy", "text": first.text,
                                     "correct": grade_record(record, first.text)}) + "\n")
            group_responses = []
            for number, (sample, score) in enumerate(zip(group, scores)):
                answer = extract_answer(record, sample.text)
                mask = answer_token_mask(record, sample.text,
                                         token_ends(tokenizer, sample.response_token_ids))
                response = Response(
                    self_certainty=score, length=len(sample.response_token_ids), answer=answer,
                    correct=grade_record(record, sample.text),
                    answer_self_certainty=(None if mask is None else
                                           part_mean(sample.self_certainty, mask, True)),
                    rest_self_certainty=(None if mask is None else
                                         part_mean(sample.self_certainty, mask, False)))
                group_responses.append(response)
                handle.write(json.dumps({**base, "sample": number, "text": sample.text,
                                         "finish_reason": sample.finish_reason,
                                         "answer_present": answer is not None,
                                         **response.__dict__}) + "\n")
            responses.append(group_responses)
    return responses


if __name__ == "__main__":
    main()
