"""What the run reports or refuses around the step loop, without Ray or a model: a run whose
updates are all skipped as non-finite stops (non-zero exit), dropped validation prompts are
reported, and a data error reaches the console as its message, not a traceback."""
import json
import logging
import os
import subprocess
import sys
import types

import pytest

from megatron_intuitor import metrics, trainer
from megatron_intuitor.config import load, training_schedule


class _Loader:
    def next_batch(self):
        return []


class _Logger:
    def __init__(self):
        self.steps = []

    def log(self, step, values):
        self.steps.append(step)

    def start_progress(self, first_step, total_steps):
        pass

    def alert(self, step, title, message):
        raise AssertionError(f"no guard is configured, yet: {title}: {message}")


def _fit(skipped_per_step, max_skipped):
    """Trainer.fit over steps whose metrics say how many optimizer steps were skipped (the tiny
    config has one optimizer step per training step)."""
    cfg = load(["trainer.val_every=0", "trainer.save_every=0", "trainer.resume=disable",
                f"trainer.max_consecutive_skipped_steps={max_skipped}"])
    schedule = training_schedule(cfg, 1024)._replace(training_steps=len(skipped_per_step))
    tokenizer = types.SimpleNamespace(eos_token_id=1, pad_token_id=0)
    # No actor: train_step (the only user of it here) is replaced below.
    run = trainer.Trainer(cfg, schedule, None, _Loader(), [], _Logger(), tokenizer)
    run.save = lambda step: None
    run.train_step = lambda step, prompts: {metrics.SKIPPED_STEPS: skipped_per_step[step - 1]}
    return run


def test_consecutive_skipped_steps_stop_the_run():
    run = _fit([1, 1, 0, 1, 1, 1, 0], max_skipped=3)
    with pytest.raises(trainer.TrainingStopped, match=r"steps 4-6: every optimizer step was "
                                                      r"skipped .*max_consecutive_skipped_steps=3"
                                                      r"\); the weights have not changed since "
                                                      r"step 3"):
        run.fit()
    assert run.logger.steps == [1, 2, 3, 4, 5, 6]  # the failing steps' metrics are logged
    never = _fit([1] * 5, max_skipped=0)
    never.fit()
    assert never.logger.steps == [1, 2, 3, 4, 5]


def test_dropped_validation_prompts_are_reported(tiny_qwen2, tmp_path, caplog):
    from transformers import AutoTokenizer

    rows = [{"question": "What is 1+1?", "answer": "#### 2"},
            {"question": "What is " + "1+" * 200 + "1?", "answer": "#### 201"}]
    val = tmp_path / "gsm8k" / "test.jsonl"
    val.parent.mkdir()
    val.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = load([f"data.val_files=[{{name:null,format:gsm8k,path:'{val}'}}]",
                "data.max_prompt_length=100"])
    with caplog.at_level(logging.WARNING, logger="megatron_intuitor"):
        _, [val_set] = trainer.load_prompt_sets(cfg, AutoTokenizer.from_pretrained(tiny_qwen2))
    assert len(val_set.prompts) == 1
    assert f"validation set {val}: dropped 1 of 2 prompts longer than " \
           f"data.max_prompt_length=100" in caplog.text


def test_data_error_is_printed_without_traceback(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_bytes(b'{"question": "1+1?", "answer": "#### 2"}\n{"question": "\xff"}\n')
    result = subprocess.run(
        [sys.executable, "-m", "megatron_intuitor.main", "data.format=gsm8k",
         f"data.train_files=[{train}]", f"trainer.output_dir={tmp_path / 'run'}",
         f"logger.log_dir={tmp_path / 'logs'}", "logger.backends=[jsonl]"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{train}:2: invalid UTF-8" in result.stderr
    assert "Traceback" not in result.stderr


def test_output_dir_under_a_file_is_named_before_hydra_writes(tmp_path):
    """trainer.output_dir below a file: Hydra would make its run dir there first and fail with
    a traceback; the console script names the key and the file, exit 2."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = subprocess.run(
        [sys.executable, "-m", "megatron_intuitor.main", f"trainer.output_dir={blocker / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip() == (f"megatron-intuitor: trainer.output_dir={blocker / 'run'}: "
                                     f"{blocker} is a file, not a directory")


def test_downloaded_hub_model_is_validated_before_ray(tiny_qwen2, tmp_path, monkeypatch):
    """A hub id that was not cached passes the config check unseen; once downloaded, its files
    are checked like a local checkpoint's before Ray starts (here: a truncated weight file)."""
    import shutil

    from megatron_intuitor.config import ConfigError

    snapshot = tmp_path / "snapshot"
    shutil.copytree(tiny_qwen2, snapshot)
    [weights] = snapshot.glob("*.safetensors")
    with open(weights, "r+b") as file:
        file.truncate(weights.stat().st_size - 10)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    cfg = load(["model.path=SomeOrg/not-cached", "model.make_tiny=false",
                f"trainer.output_dir={tmp_path / 'run'}"])
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo_id: str(snapshot))
    with pytest.raises(ConfigError, match=rf"model.path: {weights} is truncated"):
        trainer.run(cfg)
