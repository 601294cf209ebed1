"""Self-certainty best-of-N: selection against a naive float64 reference on transformers logits,
majority vote and metrics by hand, and tools/best_of_n.py end to end on a tiny model."""
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_intuitor.data.records import PromptRecord
from megatron_intuitor.evaluation import best_of_n as bon
from repo_paths import REPO
from scoring_reference import reference_token_scores



def _math(answer: str, source: str = "toy") -> PromptRecord:
    return PromptRecord(messages=[{"role": "user", "content": "q"}], ground_truth=answer,
                        data_source=source, task="math", location="test")


def _naive_sequence_self_certainty(model, prompt_ids, response_ids, temperature, vocab_size):
    """The float64 oracle's self-certainty over the real vocabulary, token mean over the
    response; one unpadded forward per response."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    rows = logits[len(prompt_ids) - 1:ids.shape[1] - 1]  # the rows predicting response tokens
    return reference_token_scores(rows, temperature=temperature,
                                  vocab_size=vocab_size).self_certainty.mean().item()


def test_selection_equals_naive_float64_reference(tiny_qwen2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()
    vocab_size, temperature, n = model.config.vocab_size, 0.7, 4
    torch.manual_seed(0)
    picked, reference_picked = [], []
    for prompt_index in range(6):
        prompt = torch.randint(0, vocab_size, (5 + prompt_index,)).tolist()
        with torch.no_grad():  # N sampled responses of different lengths (EOS disabled)
            responses = [model.generate(torch.tensor([prompt]), do_sample=True, top_k=0,
                                        temperature=1.0, max_new_tokens=3 + 2 * k,
                                        min_new_tokens=3 + 2 * k)[0, len(prompt):].tolist()
                         for k in range(n)]
        fused = bon.hf_sequence_self_certainty(model, prompt, responses, temperature, vocab_size)
        naive = [_naive_sequence_self_certainty(model, prompt, r, temperature, vocab_size)
                 for r in responses]
        error = max(abs(f - r) for f, r in zip(fused, naive))
        ordered = sorted(naive, reverse=True)
        assert error < 1e-5
        assert ordered[0] - ordered[1] > 10 * error  # the choice is not decided by rounding
        picked.append(bon.most_certain(fused))
        reference_picked.append(max(range(n), key=naive.__getitem__))
    assert picked == reference_picked
    assert len(set(picked)) > 1  # the reference does not always pick the same position


def test_most_certain_and_majority_ties_take_the_first():
    assert bon.most_certain([1.0, 3.0, 3.0, 2.0]) == 1
    assert bon.majority_index(["4", None, "5", "5", "4"]) == 0  # 4 and 5 tie, 4 seen first
    assert bon.majority_index([None, "7", "5", "7"]) == 1
    assert bon.majority_index([None, None]) is None


def test_extract_answer_reads_box_then_last_number():
    record = _math("4")
    assert bon.extract_answer(record, r"so \boxed{ 4 } and 5") == "4"
    assert bon.extract_answer(record, "it is 1,234 then") == "1234"
    assert bon.extract_answer(record, "no idea") is None


def test_best_of_n_metrics_by_hand():
    records = [_math("4"), _math("9"), _math("2", source="other")]
    responses = [[r"\boxed{4}", r"\boxed{5}", r"\boxed{5}"],  # best (0.9) right, majority 5 wrong
                 [r"\boxed{9}", r"\boxed{9}", r"\boxed{1}"],  # best (2.0) wrong, majority right
                 ["3", "nothing", "1"]]                          # none right
    certainty = [[0.9, 0.1, 0.2], [0.5, 0.4, 2.0], [1.0, 1.0, 1.0]]
    metrics = bon.best_of_n_metrics(records, responses, certainty)
    assert metrics == {"val/toy/acc_sc_best_of_3": 0.5, "val/toy/maj@3": 0.5,
                       "val/toy/pass@3": 1.0, "val/other/acc_sc_best_of_3": 0.0,
                       "val/other/maj@3": 0.0, "val/other/pass@3": 0.0}


def test_best_of_n_metrics_checks_counts():
    with pytest.raises(ValueError, match="prompt 1: 1 responses and 2 scores, expected N=2"):
        bon.best_of_n_metrics([_math("1"), _math("2")], [["a", "b"], ["c"]],
                              [[0.0, 1.0], [0.0, 1.0]])


@pytest.mark.slow
def test_tool_runs_on_a_tiny_model(tiny_qwen2, tmp_path):
    """The whole synthetic space of operands 0..2 but one excluded prompt, in chunks, with the
    per-response dump: one greedy and N sampled rows per prompt, consistent with the metrics;
    --report-from on the dump prints the same report."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    (tmp_path / "exclude.txt").write_text("What is 0 + 1?\n")
    dump = tmp_path / "dump.jsonl"
    run = subprocess.run([sys.executable, str(REPO / "tools" / "best_of_n.py"), str(tiny_qwen2),
                          "--synthetic-space", "+-", "2", "--exclude",
                          str(tmp_path / "exclude.txt"), "-n", "3", "--chunk-prompts", "8",
                          "--max-response-length", "16", "--dump", str(dump)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["prompts"] == 17 and result["n"] == 3  # 3 x 3 x 2 - 1
    names = bon.metric_names("synthetic_arithmetic", 3)
    best, majority, passed = (result[names[k]] for k in ("best", "majority", "pass"))
    assert 0.0 <= best <= passed <= 1.0 and majority <= passed
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(rows) == 17 * 4 and "What is 0 + 1?" not in {r["question"] for r in rows}
    greedy = [r["correct"] for r in rows if r["sample"] == "greedy"]
    assert result["val/synthetic_arithmetic/acc"] == pytest.approx(sum(greedy) / 17, abs=1e-4)
    assert result["report"]["prompts"] == 17
    again = subprocess.run([sys.executable, str(REPO / "tools" / "best_of_n.py"),
                            "--report-from", str(dump), "-n", "3"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["report"] == result["report"]


def test_answer_token_mask_marks_the_tokens_over_the_answer():
    record = _math("12")
    # tokens "The sum", " is \boxed{", "1", "2}", "." -> character ends
    text = r"The sum is \boxed{12}."
    ends = [7, 18, 19, 21, 22]
    assert bon.answer_token_mask(record, text, ends) == [False, False, True, True, False]
    # no box: the last number ("3" of "so 3 left"), which token 1 covers
    assert bon.answer_token_mask(record, "it is 1, so 3 left", [8, 13, 18]) == [False, True,
                                                                                 False]
    assert bon.answer_token_mask(record, "no idea", [2, 7]) is None
    code = PromptRecord(messages=[], ground_truth=None, data_source="c", task="code",
                        location="t")
    assert bon.answer_token_mask(code, "x = 1", [5]) is None


def test_tool_refuses_a_model_dir_without_weights(tiny_qwen2, tmp_path):
    """config.json and tokenizer but no *.safetensors: a usage error naming the directory,
    before vLLM starts (no traceback)."""
    import shutil

    model = tmp_path / "no_weights"
    shutil.copytree(tiny_qwen2, model, ignore=shutil.ignore_patterns("*.safetensors*"))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(REPO / "tools" / "best_of_n.py"), str(model),
                          "--synthetic", "4"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"error: model_dir={model} has no *.safetensors weights" in run.stderr
    assert "Traceback" not in run.stderr
