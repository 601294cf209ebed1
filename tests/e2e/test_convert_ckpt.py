"""tools/convert_ckpt.py: HF -> Megatron (TP=2) -> HF (another layout) is bit-identical, --verify
compares real logits, and bad input is refused before any rank starts."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from repo_paths import REPO

TOOL = REPO / "tools" / "convert_ckpt.py"


def _tool_module():
    """The tool imported as module `convert_ckpt` (its spawned ranks re-import it by that name,
    so tools/ goes on sys.path, which spawned children inherit)."""
    if str(TOOL.parent) not in sys.path:
        sys.path.insert(0, str(TOOL.parent))
    import convert_ckpt

    return convert_ckpt


def _convert(*args, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"convert_ckpt {args} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr[-4000:]}")
    return result


def _hf_tensors(model_dir: Path) -> dict:
    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def _assert_bit_identical(original: Path, exported: Path) -> None:
    want, got = _hf_tensors(original), _hf_tensors(exported)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8)), name
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(want)
    for asset in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (exported / asset).read_bytes() == (original / asset).read_bytes(), asset


def _verified_diff(stdout: str) -> float:
    [line] = [line for line in stdout.splitlines() if line.startswith("verify:")]
    assert line.endswith("OK"), line
    return float(line.split("=")[1].split()[0])


@pytest.mark.slow
def test_round_trip_tp2_to_pp2_is_bit_identical_and_verifies(tiny_qwen2, tmp_path):
    """Tied fp32 Qwen2 (vocab 1003, padded): to TP=2 and back out at PP=2, --verify both ways."""
    ckpt, out = tmp_path / "megatron", tmp_path / "hf"
    result = _convert("hf-to-megatron", tiny_qwen2, ckpt, "--tp", 2, "--verify")
    assert _verified_diff(result.stdout) < 1e-4
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "hf" / "config.json").is_file()
    result = _convert("megatron-to-hf", ckpt, out, "--pp", 2, "--verify")
    assert _verified_diff(result.stdout) < 1e-4
    _assert_bit_identical(tiny_qwen2, out)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_moe_round_trip_ep2_to_tp2_is_bit_identical_and_verifies(tmp_path):
    """Qwen2-MoE (Qwen3-MoE's experts and router plus a gated shared expert and q/k/v biases;
    Qwen3-MoE goes through the converter in tests/e2e/test_moe_run.py): written at EP=2
    (experts split over two ranks) and read back at TP=2 (each expert split over two ranks),
    --verify both ways."""
    from megatron_intuitor.models.tiny import make_tiny_model

    hf_dir = make_tiny_model(tmp_path / "qwen2_moe", arch="qwen2_moe", vocab_size=1003)
    ckpt, out = tmp_path / "megatron", tmp_path / "hf"
    result = _convert("hf-to-megatron", hf_dir, ckpt, "--ep", 2, "--verify")
    assert _verified_diff(result.stdout) < 1e-4
    result = _convert("megatron-to-hf", ckpt, out, "--tp", 2, "--verify")
    assert _verified_diff(result.stdout) < 1e-4
    _assert_bit_identical(hf_dir, out)


@pytest.mark.slow
def test_bf16_untied_round_trip_keeps_dtype_and_shards(tmp_path):
    """bf16 untied Llama: dtype kept bit for bit (Megatron's local norms are float32 inside),
    and a small --max-shard-size splits the export into several shards."""
    from megatron_intuitor.models.tiny import make_tiny_model

    hf_dir = make_tiny_model(tmp_path / "llama_bf16", arch="llama", vocab_size=1003,
                             tie_word_embeddings=False, dtype=torch.bfloat16)
    ckpt, out = tmp_path / "megatron", tmp_path / "hf"
    tool = _tool_module()  # in this process (the CLI itself is exercised above): faster
    assert tool.main(["hf-to-megatron", str(hf_dir), str(ckpt), "--tp", "2"]) == 0
    assert tool.main(["megatron-to-hf", str(ckpt), str(out), "--max-shard-size", "300KB"]) == 0
    _assert_bit_identical(hf_dir, out)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    # The largest tensor (256 KB embedding) fits a shard; each shard <= 300 KB + its header.
    assert len(shards) > 2 and all(p.stat().st_size < 310_000 for p in out.glob("*.safetensors"))
    assert next(iter(_hf_tensors(out).values())).dtype == torch.bfloat16


def _broken_copy(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_bad_input_is_refused_before_any_work(tiny_qwen2, tmp_path, capsys):
    tool = _tool_module()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    cases = {
        "is not a directory": ["hf-to-megatron", tmp_path / "missing", tmp_path / "o1"],
        "no HF config": ["hf-to-megatron", no_config, tmp_path / "o2"],
        "unsupported architecture": [
            "hf-to-megatron", _broken_copy(tiny_qwen2, tmp_path / "gpt2",
                                           architectures=["GPT2LMHeadModel"]), tmp_path / "o3"],
        "does not divide num_attention_heads": ["hf-to-megatron", tiny_qwen2, tmp_path / "o4",
                                                "--tp", "3"],
        "larger than num_hidden_layers": ["hf-to-megatron", tiny_qwen2, tmp_path / "o5",
                                          "--pp", "4"],
        "is not empty": ["hf-to-megatron", tiny_qwen2, busy],
        "trainer_state.json is missing": ["megatron-to-hf", no_config, tmp_path / "o6"],
    }
    for message, argv in cases.items():
        assert tool.main([str(arg) for arg in argv]) == 2, message
        err = capsys.readouterr().err
        assert "error:" in err and message in err, (message, err)
    assert (busy / "notes.txt").read_text() == "keep me"
    # No output or temporary directory was created.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "gpt2", "no_config"]


def test_missing_tensor_and_hf_dir_of_another_size_are_refused_before_any_rank(
        tiny_qwen2, tmp_path, capsys, small_megatron_checkpoint):
    """hf-to-megatron with a tensor missing from the safetensors, and megatron-to-hf --hf-dir of
    another model size: exit 2 with the tensor / both sizes named, no rank started (no
    output), in the parent's seconds."""
    from safetensors.torch import load_file, save_file

    tool = _tool_module()
    missing = tmp_path / "missing_norm"
    shutil.copytree(tiny_qwen2, missing)
    [weights] = missing.glob("*.safetensors")
    tensors = load_file(weights)
    del tensors["model.norm.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    assert tool.main(["hf-to-megatron", str(missing), str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "missing tensors: model.norm.weight" in err, err

    ckpt = small_megatron_checkpoint(tmp_path / "small_ckpt", has_optimizer=False)
    hf = json.loads((Path(tiny_qwen2) / "config.json").read_text())
    qkv = (hf["num_attention_heads"] + 2 * hf["num_key_value_heads"]) * (
        hf["hidden_size"] // hf["num_attention_heads"])
    assert tool.main(["megatron-to-hf", str(ckpt), str(tmp_path / "o2"), "--hf-dir",
                      str(tiny_qwen2)]) == 2
    err = capsys.readouterr().err
    assert (f"error: {ckpt} holds a model of num_hidden_layers 3, hidden_size 64, "
            f"intermediate_size 96, q+k+v rows per layer 192; --hf-dir {tiny_qwen2} describes "
            f"num_hidden_layers {hf['num_hidden_layers']}, hidden_size {hf['hidden_size']}, "
            f"intermediate_size {hf['intermediate_size']}, q+k+v rows per layer {qkv}: pass "
            f"the --hf-dir of the model this checkpoint was trained from") in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["missing_norm", "small_ckpt"]


def test_verify_fails_when_logits_differ(tiny_qwen2, capsys):
    tool = _tool_module()
    ids, lengths = tool.verify_token_ids(tiny_qwen2, 1003)
    assert ids.shape[0] == len(tool.VERIFY_PROMPTS) and max(lengths) == ids.shape[1]
    reference = tool.hf_logits(tiny_qwen2, ids)
    assert tool._report_verify([None, reference.clone()], tiny_qwen2, ids, lengths, 1e-4)
    wrong = reference.clone()
    wrong[1, lengths[1] - 1, 7] += 1e-3  # one logit of the last real token of one prompt
    assert not tool._report_verify([wrong], tiny_qwen2, ids, lengths, 1e-4)
    assert "FAILED" in capsys.readouterr().out
    short = min(range(len(lengths)), key=lengths.__getitem__)
    assert lengths[short] < ids.shape[1]
    padding_only = reference.clone()
    padding_only[short, lengths[short]:] += 1.0  # right padding of the shorter prompt: ignored
    assert tool._report_verify([padding_only], tiny_qwen2, ids, lengths, 1e-4)
