"""Datasets (the shared GSM8K / MATH500 / ARC files and HumanEval from its package), prompts with
the chat template, the synthetic task and the resumable loader."""
import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_intuitor.data.datasets import (DataError, DatasetSpec, humaneval_path, last_boxed,
                                             load_records, read_records)
from megatron_intuitor.data.loader import PromptLoader
from megatron_intuitor.data.prompts import DEFAULT_SYSTEM_PROMPT, build_prompts, chat_messages
from megatron_intuitor.data.synthetic import arithmetic_records, arithmetic_space
from repo_paths import SHARED_DATA



def _first_json_row(path: Path) -> dict:
    with open(path) as lines:
        return json.loads(lines.readline())


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", ["gsm8k", "auto"])
def test_gsm8k(fmt):
    path = SHARED_DATA / "gsm8k" / "test.jsonl"
    records = load_records(DatasetSpec(str(path), format=fmt))
    assert len(records) == sum(1 for line in open(path) if line.strip())
    raw = _first_json_row(path)
    first = records[0]
    assert first.messages == [{"role": "user", "content": raw["question"]}]
    assert raw["answer"].endswith("#### " + first.ground_truth) and first.ground_truth == "18"
    assert (first.data_source, first.task, first.location) == ("gsm8k", "math", f"{path}:1")


def test_gsm8k_thousands_separator(tmp_path):
    path = _jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "so\n#### 1,234"}])
    assert load_records(DatasetSpec(str(path), format="gsm8k"))[0].ground_truth == "1234"


@pytest.mark.parametrize("fmt", ["math500", "math", "auto"])
def test_math500(fmt):
    path = SHARED_DATA / "math500" / "test.jsonl"
    records = load_records(DatasetSpec(str(path), format=fmt))
    assert len(records) == 500
    raw = _first_json_row(path)
    assert records[0].messages[0]["content"] == raw["problem"]
    assert records[0].ground_truth == raw["answer"]
    assert records[0].data_source == "math500"


def test_math_answer_from_boxed_solution(tmp_path):
    assert last_boxed(r"x \boxed{1} then \boxed{\frac{1}{2}} end") == r"\frac{1}{2}"
    assert last_boxed("no box") is None
    path = _jsonl(tmp_path / "m.jsonl", [{"problem": "p", "solution": r"so \boxed{\sqrt{2}}."}])
    assert load_records(DatasetSpec(str(path), format="math"))[0].ground_truth == r"\sqrt{2}"


@pytest.mark.parametrize("fmt", ["arc", "auto"])
def test_arc_renders_choices(fmt):
    path = SHARED_DATA / "arc_challenge" / "test.jsonl"
    records = load_records(DatasetSpec(str(path), format=fmt))
    assert len(records) == 1172
    raw = _first_json_row(path)
    text = records[0].messages[0]["content"]
    assert text.startswith(raw["question"])
    for label, choice in zip(raw["choices"]["label"], raw["choices"]["text"]):
        assert f"\n{label}. {choice}" in text
    assert records[0].ground_truth == raw["answerKey"] == "C"
    assert records[0].task == "multiple_choice"
    assert records[0].extra["choices"] == raw["choices"]
    assert records[0].data_source == "arc_challenge"


def test_humaneval_from_package():
    records = load_records(DatasetSpec(format="humaneval"))
    with gzip.open(humaneval_path(), "rt") as lines:
        raw = [json.loads(line) for line in lines if line.strip()]
    assert len(records) == len(raw) == 164
    for record, problem in zip(records, raw):
        assert {k: record.extra[k] for k in ("task_id", "prompt", "test", "entry_point")} == \
            {k: problem[k] for k in ("task_id", "prompt", "test", "entry_point")}
        assert problem["prompt"] in record.messages[0]["content"]
    assert (records[0].data_source, records[0].task, records[0].ground_truth) == \
        ("humaneval", "code", "HumanEval/0")


def test_prompt_format_columns_and_verl_parquet(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [{"q": "Hi?", "a": 3},
                                         {"q": [{"role": "user", "content": "Yo"}], "a": "x"}])
    records = load_records(DatasetSpec(str(path), format="prompt", prompt_key="q", answer_key="a",
                                       name="mine"))
    assert [r.messages for r in records] == [[{"role": "user", "content": "Hi?"}],
                                             [{"role": "user", "content": "Yo"}]]
    assert [r.ground_truth for r in records] == ["3", "x"]
    assert {r.data_source for r in records} == {"mine"}
    verl = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{
        "data_source": "openai/gsm8k", "ability": "math",
        "prompt": [{"role": "user", "content": "What?"}],
        "reward_model": {"style": "rule", "ground_truth": "7"},
        "extra_info": {"split": "train", "index": 0}}]), verl)
    (record,) = load_records(DatasetSpec(str(verl)))  # auto: the prompt column
    assert (record.ground_truth, record.task, record.data_source) == ("7", "math", "openai/gsm8k")
    assert record.extra == {"split": "train", "index": 0}
    assert record.location == f"{verl} row 1"


def test_json_array_and_json_lines(tmp_path):
    rows = [{"question": "a", "answer": "#### 1"}, {"question": "b", "answer": "#### 2"}]
    array = tmp_path / "array.json"
    array.write_text(json.dumps(rows, indent=1))
    lines = _jsonl(tmp_path / "lines.json", rows)
    for path in (array, lines):
        assert [r.ground_truth for r in load_records(DatasetSpec(str(path)))] == ["1", "2"]
    assert load_records(DatasetSpec(str(array)))[1].location == f"{array} item 2"


def test_missing_file_is_named():
    with pytest.raises(FileNotFoundError, match="data file not found: /nonexistent/x.jsonl"):
        load_records(DatasetSpec("/nonexistent/x.jsonl", format="gsm8k"))


def test_bad_rows_are_all_reported_with_line_numbers(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [
        {"question": "ok", "answer": "#### 1"},
        {"question": "no answer"},
        "{not json",
        {"question": "q", "answer": "no marker"},
        {"question": "", "answer": "#### 2"},
    ])
    records, problems = read_records(DatasetSpec(str(path), format="gsm8k"))
    assert len(records) == 1
    assert [str(p) for p in problems] == [
        f"{path}:2: missing field 'answer'",
        f"{path}:3: invalid JSON (Expecting property name enclosed in double quotes)",
        f"{path}:4: field 'answer' has no '#### <answer>' line",
        f"{path}:5: empty field 'question'"]
    with pytest.raises(DataError, match=rf"4 bad row\(s\) in {re.escape(str(path))}"):
        load_records(DatasetSpec(str(path), format="gsm8k"))


def test_parquet_missing_column_row_number(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "a", "gt": "1"}, {"text": None, "gt": "2"}]),
                   path)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))} row 2: missing field 'text'"):
        load_records(DatasetSpec(str(path), format="prompt", prompt_key="text", answer_key="gt"))
    with pytest.raises(DataError, match=r"missing field 'prompt'"):
        load_records(DatasetSpec(str(path), format="prompt"))


def test_a_file_that_is_not_parquet_is_named(tmp_path):
    """A .parquet name on CSV text, or a parquet file cut short: a DataError naming the file,
    not pyarrow's ArrowInvalid."""
    text = tmp_path / "rows.parquet"
    text.write_text("question,answer\nq,#### 1\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(text))} is not a readable parquet file"):
        load_records(DatasetSpec(str(text), format="gsm8k"))
    cut = tmp_path / "cut.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "#### 1"}] * 100), cut)
    cut.write_bytes(cut.read_bytes()[:-20])
    with pytest.raises(DataError, match=rf"{re.escape(str(cut))} is not a readable parquet file"):
        load_records(DatasetSpec(str(cut), format="gsm8k"))


def test_format_errors(tmp_path):
    with pytest.raises(DataError, match="unknown dataset format 'csvv'"):
        read_records(DatasetSpec("x", format="csvv"))
    path = _jsonl(tmp_path / "odd.jsonl", [{"foo": 1}])
    with pytest.raises(DataError, match=r"odd.jsonl:1: cannot tell the dataset format"):
        read_records(DatasetSpec(str(path)))
    text = tmp_path / "odd.txt"
    text.write_text("{}\n")
    with pytest.raises(DataError, match=r"unsupported data file type: .*odd.txt"):
        read_records(DatasetSpec(str(text)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="has no rows"):
        load_records(DatasetSpec(str(empty), format="gsm8k"))


def test_max_rows():
    path = SHARED_DATA / "gsm8k" / "test.jsonl"
    assert len(load_records(DatasetSpec(str(path), max_rows=5))) == 5


def test_synthetic_arithmetic_deterministic_and_correct():
    records = load_records(DatasetSpec(format="synthetic", size=50, seed=3))
    again = arithmetic_records(50, seed=3)
    assert [r.messages for r in records] == [r.messages for r in again]
    assert [r.messages for r in arithmetic_records(50, seed=4)] != [r.messages for r in records]
    ops = set()
    for record in records:
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?",
                                record.messages[0]["content"]).groups()
        ops.add(op)
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert record.ground_truth == str(expected)
    assert ops == {"+", "-", "*"}


def test_synthetic_operands_and_operators_are_configurable():
    """`data.synthetic.max_operand` / `operators` reach the records: only those operators, operands
    within the bound (each checked by parsing the prompt), answers computed by hand."""
    records = load_records(DatasetSpec(format="synthetic", size=200, seed=5, max_operand=20,
                                       operators="+-"))
    seen = set()
    for record in records:
        a, op, b = re.fullmatch(r"What is (\d+) ([-+]) (\d+)\?",
                                record.messages[0]["content"]).groups()
        assert 0 <= int(a) <= 20 and 0 <= int(b) <= 20
        assert record.ground_truth == str(int(a) + int(b) if op == "+" else int(a) - int(b))
        seen.add(op)
    assert seen == {"+", "-"}


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen2)


def _template(system: str, user: str) -> str:
    """The tiny model's Qwen-style chat template, written out by hand."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def test_prompts_use_chat_template_and_system_prompt(tokenizer):
    records = arithmetic_records(4, seed=0)
    prompt_set = build_prompts(records, tokenizer, DEFAULT_SYSTEM_PROMPT, max_prompt_length=512)
    assert prompt_set.num_dropped == 0
    for prompt, record in zip(prompt_set.prompts, records):
        assert prompt.text == _template(DEFAULT_SYSTEM_PROMPT, record.messages[0]["content"])
        assert prompt.token_ids == tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
        assert prompt.token_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    bare = build_prompts(records, tokenizer, "", max_prompt_length=512)
    assert bare.prompts[0].text == _template("", records[0].messages[0]["content"])


def test_record_system_message_is_kept(tokenizer):
    record = arithmetic_records(1)[0]
    record.messages = [{"role": "system", "content": "Own."}] + record.messages
    assert chat_messages(record, DEFAULT_SYSTEM_PROMPT) == record.messages


def test_long_prompts_dropped_and_counted(tokenizer):
    records = load_records(DatasetSpec(str(SHARED_DATA / "gsm8k" / "test.jsonl"), max_rows=40))
    lengths = [len(tokenizer(_template("S", r.messages[0]["content"]),
                             add_special_tokens=False)["input_ids"]) for r in records]
    limit = sorted(lengths)[len(lengths) // 2]
    prompt_set = build_prompts(records, tokenizer, "S", max_prompt_length=limit)
    assert prompt_set.num_dropped == sum(n > limit for n in lengths) > 0
    assert len(prompt_set.prompts) == sum(n <= limit for n in lengths)
    assert all(len(p.token_ids) <= limit for p in prompt_set.prompts)
    with pytest.raises(DataError, match=rf"all 40 prompts are longer than "
                                        rf"max_prompt_length={min(lengths) - 1} tokens"):
        build_prompts(records, tokenizer, "S", max_prompt_length=min(lengths) - 1, name="gsm8k")


def test_tokenizer_without_chat_template(tokenizer):
    from copy import deepcopy

    plain = deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(DataError, match="has no chat template"):
        build_prompts(arithmetic_records(2), plain, "", max_prompt_length=64)


def test_loader_covers_each_epoch_and_reshuffles():
    loader = PromptLoader(list(range(10)), batch_size=3, seed=7)
    assert loader.steps_per_epoch == 3
    epochs = [[x for _ in range(3) for x in loader.next_batch()] for _ in range(2)]
    for seen in epochs:  # 9 distinct items per epoch (the 10th is the dropped remainder)
        assert len(set(seen)) == 9
    assert epochs[0] != epochs[1] and loader.epoch == 1
    assert PromptLoader(list(range(10)), 3, seed=7).next_batch() == epochs[0][:3]
    assert PromptLoader(list(range(10)), 3, seed=8).next_batch() != epochs[0][:3]
    assert PromptLoader(list(range(10)), 3, seed=7, shuffle=False).next_batch() == [0, 1, 2]


def test_loader_position_restores_exactly():
    items = [f"p{i}" for i in range(11)]
    straight = PromptLoader(items, 4, seed=1)
    expected = [straight.next_batch() for _ in range(8)]
    first = PromptLoader(items, 4, seed=1)
    for _ in range(3):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = PromptLoader(items, 4, seed=1)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(5)] == expected[3:]


def test_loader_errors():
    with pytest.raises(ValueError, match="3 prompts cannot fill one step of 4"):
        PromptLoader([1, 2, 3], 4, seed=0)
    state = PromptLoader(list(range(8)), 4, seed=0).state_dict()
    with pytest.raises(ValueError, match="saved with seed=0 but this run has seed=1"):
        PromptLoader(list(range(8)), 4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with num_items=8 but this run has num_items=9"):
        PromptLoader(list(range(9)), 4, seed=0).load_state_dict(state)


def test_training_prompts_that_are_validation_prompts_are_dropped(tokenizer, tiny_qwen2):
    """A small synthetic task repeats prompts: every training prompt equal to a validation prompt
    is dropped (validation stays held out), the others are kept in order."""
    from megatron_intuitor.config import load
    from megatron_intuitor.trainer import load_prompt_sets

    cfg = load([f"model.path={tiny_qwen2}", "model.make_tiny=false",
                "data.synthetic.max_operand=3", "data.synthetic.operators=+",
                "data.synthetic.train_size=64", "data.synthetic.val_size=6"])
    train, [val] = load_prompt_sets(cfg, tokenizer)
    validation = {p.record.messages[0]["content"] for p in val.prompts}
    every_train = [r.messages[0]["content"]
                   for r in arithmetic_records(64, seed=cfg.data.seed, max_operand=3,
                                               operators="+")]
    assert [p.record.messages[0]["content"] for p in train.prompts] == \
        [text for text in every_train if text not in validation]
    assert 0 < len(train.prompts) < 64  # 16 distinct prompts: some were validation prompts


def test_arithmetic_space_holds_every_drawable_prompt_once():
    space = arithmetic_space(3, "+-")
    questions = [r.messages[0]["content"] for r in space]
    assert len(questions) == len(set(questions)) == 4 * 4 * 2
    assert questions[:2] == ["What is 0 + 0?", "What is 0 + 1?"]
    assert {(q, r.ground_truth) for q, r in zip(questions, space)} >= {
        ("What is 3 - 2?", "1"), ("What is 1 - 3?", "-2"), ("What is 2 + 3?", "5")}
    drawn = {r.messages[0]["content"] for r in arithmetic_records(300, 1, 3, "+-")}
    assert drawn <= set(questions)
    with pytest.raises(ValueError, match="operators '/'"):
        arithmetic_space(3, "/")
