"""Bad input files refused by the config check (and the converter) before Ray or a model starts,
each naming its key and file (megatron_intuitor/input_files.py): weights missing or truncated,
broken config.json, an uncached hub id offline, sequences longer than the model's positions, a
data directory, a resume path that is not a checkpoint, a truncated .distcp."""
import json
import os
import subprocess
import shutil
import sys
from pathlib import Path

import pytest

from megatron_intuitor.config import ConfigError, load
from repo_paths import REPO



def _problems(overrides) -> str:
    with pytest.raises(ConfigError) as caught:
        load(overrides)
    return str(caught.value)


def _model(path: Path) -> list[str]:
    return [f"model.path={path}", "model.make_tiny=false"]


def test_model_dir_without_weights(tiny_qwen2, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_qwen2, model, ignore=shutil.ignore_patterns("*.safetensors*"))
    assert f"model.path={model} has no *.safetensors weights" in _problems(_model(model))


def test_truncated_safetensors_named_with_its_sizes(tiny_qwen2, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_qwen2, model)
    [weights] = model.glob("*.safetensors")
    full = weights.stat().st_size
    with open(weights, "r+b") as file:
        file.truncate(full - 100)
    assert f"{weights} is truncated: {full - 100} bytes, its header describes {full}" \
        in _problems(_model(model))
    weights.write_bytes(b"\x07")
    assert f"{weights} is truncated: 1 bytes" in _problems(_model(model))


def test_broken_config_json(tiny_qwen2, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_qwen2, model)
    config_file = model / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text('{\n  "hidden_size": 128,\n  oops\n}')
    assert f"model.path: {config_file} is not valid JSON: Expecting property name enclosed in " \
           f"double quotes at line 3 column 3" in _problems(_model(model))
    del config["num_hidden_layers"]
    config_file.write_text(json.dumps(config))
    assert f"model.path: {config_file} has no integer num_hidden_layers" \
        in _problems(_model(model))


def test_unsupported_architecture_is_refused_where_config_json_is_read(tiny_qwen2, tmp_path,
                                                                       preflight):
    """GPT2LMHeadModel in config.json: the config check (and so the preflight and the console
    script) names it and the supported ones, as tools/convert_ckpt.py does."""
    model = tmp_path / "model"
    shutil.copytree(tiny_qwen2, model)
    config_file = model / "config.json"
    config = json.loads(config_file.read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    config_file.write_text(json.dumps(config))
    message = (f"model.path: {config_file} has architectures ['GPT2LMHeadModel'], which the "
               f"bridge cannot map: supported are Qwen2ForCausalLM, LlamaForCausalLM, "
               f"Qwen3ForCausalLM, Qwen3MoeForCausalLM, Qwen2MoeForCausalLM")
    assert message in _problems(_model(model))
    report = preflight.Report()
    preflight.load_config(report, _model(model))
    assert f"FAIL {message}" in report.lines


def test_uncached_hub_id_offline_names_model_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    text = _problems(["task=math_gsm8k", "model.path=NoSuchOrg/no-such-model"])
    assert "model.path=NoSuchOrg/no-such-model is a Hugging Face hub id that is not in the " \
           "local cache, and HF_HUB_OFFLINE=1" in text


def test_sequence_longer_than_the_tiny_models_positions():
    # make_tiny_model builds max_position_embeddings=1024: 64 + 961 = 1025 tokens do not fit.
    assert "data.max_prompt_length + data.max_response_length = 1025 exceeds " \
           "max_position_embeddings=1024 of model.tiny" in _problems(
               ["data.max_response_length=961"])
    load(["data.max_response_length=960"])


def test_data_directory_is_named_as_a_directory(tmp_path):
    assert f"data.train_files[0]={tmp_path} is a directory" in _problems(
        ["data.format=gsm8k", f"data.train_files=[{tmp_path}]"])


def test_resume_path_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert f"trainer.resume: {tmp_path} is not a checkpoint: it has no trainer_state.json" \
        in _problems([f"trainer.resume={tmp_path}"])


@pytest.fixture(scope="module")
def converted_checkpoint(tiny_qwen2, tmp_path_factory) -> Path:
    """A model-only Megatron checkpoint of tiny_qwen2 (TP=1), made by the converter."""
    sys.path.insert(0, str(REPO / "tools"))
    import convert_ckpt

    out = tmp_path_factory.mktemp("ckpt") / "megatron"
    assert convert_ckpt.main(["hf-to-megatron", str(tiny_qwen2), str(out)]) == 0
    return out


def test_resume_checkpoint_of_another_model_size_names_both_sizes(tmp_path,
                                                                 small_megatron_checkpoint):
    """A training checkpoint (with optimizer) of 3 layers, hidden 64, MLP 96, q+k+v 192 rows,
    resumed with the tiny default (2 layers, hidden 128, MLP 256, 4 + 2 x 2 heads of 32): both
    sizes named by the config check, from the checkpoint's .metadata."""
    ckpt = small_megatron_checkpoint(tmp_path / "step_5", has_optimizer=True)
    tiny = ["model.path=", "model.make_tiny=true"]
    assert (f"trainer.resume: {ckpt} holds a model of num_hidden_layers 3, hidden_size 64, "
            f"intermediate_size 96, q+k+v rows per layer 192; the configured model (model.tiny) "
            f"describes num_hidden_layers 2, hidden_size 128, intermediate_size 256, q+k+v rows "
            f"per layer 256: resume a checkpoint of this model, or set model.path to the model "
            f"it was trained from") in _problems([*tiny, f"trainer.resume={ckpt}"])


def test_truncated_distcp_is_named_by_resume_check_and_converter(converted_checkpoint, tmp_path,
                                                                 capsys):
    import convert_ckpt

    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted_checkpoint, ckpt)
    # Intact but model-only (the converter's): no optimizer to resume; model.path is the way.
    assert f"trainer.resume: {ckpt} is a model-only checkpoint (tools/convert_ckpt.py " \
           f"hf-to-megatron writes these): it has no optimizer state to resume. To train from " \
           f"its weights set model.path" in _problems([f"trainer.resume={ckpt}"])
    distcp = sorted(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)[-1]
    full = distcp.stat().st_size
    with open(distcp, "r+b") as file:
        file.truncate(full // 2)
    assert f"trainer.resume: {distcp} is truncated: {full // 2} bytes, the checkpoint's " \
           f".metadata needs {full}" in _problems([f"trainer.resume={ckpt}"])
    assert convert_ckpt.main(["megatron-to-hf", str(ckpt), str(tmp_path / "hf")]) == 2
    assert f"{distcp} is truncated" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_invalid_utf8_row_is_named_with_file_and_line(tmp_path):
    from megatron_intuitor.data.datasets import DataError, DatasetSpec, load_records

    rows = [{"question": "1+1?", "answer": "#### 2"}, {"question": "2+2?", "answer": "#### 4"}]
    lines = [json.dumps(row).encode() for row in rows]
    lines[1] = lines[1].replace(b"2+2", b"2\xff2")
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=rf"{path}:2: invalid UTF-8 \(invalid start byte: "
                                        rf"byte 0xff at column 16\)"):
        load_records(DatasetSpec(path=str(path), format="gsm8k"))
    array = tmp_path / "train.json"
    array.write_bytes(b"[\n" + b",\n".join(lines) + b"\n]\n")
    with pytest.raises(DataError, match=rf"{array}:3: invalid UTF-8"):
        load_records(DatasetSpec(path=str(array), format="gsm8k"))


def _preflight(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_intuitor.preflight", "--",
                           *overrides], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "NO_COLOR": "1", "PYTHONPATH": str(REPO)})


def test_preflight_fails_truncated_weights_bad_resume_and_read_only_output(tiny_qwen2,
                                                                          tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_qwen2, model)
    [weights] = model.glob("*.safetensors")
    with open(weights, "r+b") as file:
        file.truncate(weights.stat().st_size - 1)
    result = _preflight(*_model(model), f"trainer.resume={model}",
                        f"trainer.output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 1
    assert f"FAIL model.path: {weights} is truncated" in result.stderr
    assert f"FAIL trainer.resume: {model} is not a checkpoint" in result.stderr
    assert "ok   model:" not in result.stderr
    (model / "config.json").write_text("{not json")
    result = _preflight(*_model(model), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"FAIL model.path: {model / 'config.json'} is not valid JSON" in result.stderr
    if os.access("/proc/sys", os.W_OK):
        pytest.skip("no read-only directory on this machine (/proc/sys is writable)")
    result = _preflight("trainer.output_dir=/proc/sys/mi_run", cwd=tmp_path)
    assert result.returncode == 1
    assert "FAIL trainer.output_dir=/proc/sys/mi_run: /proc/sys is not writable" in result.stderr


def test_cached_hub_model_is_checked_from_its_cached_config(monkeypatch, tmp_path):
    """A hub id already in the Hugging Face cache: its cached config.json is read (no
    download) and a sequence longer than its positions is refused before anything starts."""
    snapshot = tmp_path / "models--SomeOrg--some-model" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    (snapshot / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"],
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_size": 128, "vocab_size": 1000, "max_position_embeddings": 64}))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    text = _problems(["model.path=SomeOrg/some-model", "model.make_tiny=false"])
    assert f"data.max_prompt_length + data.max_response_length = 96 exceeds " \
           f"max_position_embeddings=64 of {snapshot / 'config.json'}" in text
