"""The preflight (`megatron_intuitor.preflight`, what `run_intuitor.sh --dry-run` runs) names
the inputs the console script would refuse later: the rows of the data files."""
import json

from megatron_intuitor import config


def _gsm8k_rows(count: int) -> list[bytes]:
    return [json.dumps({"question": f"{i} + 1?", "answer": f"#### {i + 1}"}).encode()
            for i in range(count)]


def test_data_rows_are_read_as_the_trainer_reads_them(preflight, tmp_path, monkeypatch):
    """Invalid UTF-8 in line 2 of a training file: an error naming the key, file and line (the
    console script's words), and `--dry-run` exits 1; a clean validation file: its rows
    counted."""
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    lines = _gsm8k_rows(3)
    lines[1] = lines[1].replace(b"1 + 1", b"1 \xff 1")
    column = lines[1].index(b"\xff") + 1
    train.write_bytes(b"\n".join(lines) + b"\n")
    val.write_bytes(b"\n".join(_gsm8k_rows(5)) + b"\n")
    overrides = [f"data.train_files=[{train}]", f"data.val_files=[{val}]", "data.format=gsm8k",
                 f"trainer.output_dir={tmp_path / 'run'}"]
    monkeypatch.setattr("sys.argv", ["preflight", "--dry-run", "--", *overrides])
    assert preflight.main() == 1
    cfg = config.resolve(config.compose(overrides))
    report = preflight.Report()
    preflight.check_data_rows(report, cfg)
    assert report.errors == 1
    assert report.lines == [f"FAIL data.train_files[0]: 1 bad row(s) in {train}:\n  {train}:2: "
                            f"invalid UTF-8 (invalid start byte: byte 0xff at column "
                            f"{column})"]
    train.write_bytes(b"\n".join(_gsm8k_rows(3)) + b"\n")
    clean = preflight.Report()
    preflight.check_data_rows(clean, cfg)
    assert clean.lines == ["ok   data: 8 rows in 2 file(s), every row readable"]
