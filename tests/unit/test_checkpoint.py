"""Distributed checkpoints: TP/PP resharding of the model, exact resume (optimizer state, Adam
step, RNG, extra), atomic publication and retention."""
import json
import random

import numpy as np
import pytest
import torch

from megatron_intuitor.local_ranks import run_distributed

VOCAB = 1100  # Megatron pads it to 1152 at TP=1 and 1280 at TP=2: loads across TP cope with both
SEQ = 16


@pytest.fixture(scope="module")
def tiny_qwen2_vocab1100(tmp_path_factory):
    """Tied Qwen2 (the last pipeline stage holds a copy of the embedding)."""
    from megatron_intuitor.models.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("qwen2_v1100"), vocab_size=VOCAB))


def _build(model_dir: str, tp: int, pp: int, seed: int, with_optimizer: bool):
    """This rank's chunks of the tiny model, randomly initialised from `seed` (CPU init: the
    same weights at every TP/PP), optionally wrapped in DDP with distributed Adam."""
    from megatron_intuitor.models.config import (build_model, load_hf_config,
                                                 transformer_config_from_hf)
    from megatron_intuitor.models.optimizer import build_optimizer
    from megatron_intuitor.parallel import ParallelSizes, init_model_parallel

    sizes = ParallelSizes(tp, pp)
    init_model_parallel(sizes, seed=seed)
    hf_config = load_hf_config(model_dir)
    chunks = build_model(hf_config, transformer_config_from_hf(hf_config, sizes))
    if not with_optimizer:
        return chunks, None
    return build_optimizer(chunks, lr=1e-2, weight_decay=0.1)


def _batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    return ids, torch.arange(SEQ).unsqueeze(0).expand(2, -1)


def _run(chunks, ids, positions, train: bool):
    """One forward(+backward) through the pipeline; returns the full-vocab logits on the last
    stage (None elsewhere) when not training."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    captured = []

    def forward_step(_, chunk):
        if train:
            out = chunk(ids, positions, None, labels=ids)
            return out, lambda o: (o.float().mean(), {})
        out = chunk(ids, positions, None)

        def keep(o):
            captured.append(gather_from_tensor_model_parallel_region(o)[..., :VOCAB].detach())
            return o.float().sum() * 0, {}
        return out, keep

    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]),
                                model=chunks, num_microbatches=1, seq_length=SEQ,
                                micro_batch_size=2, forward_only=not train)
    return captured[0] if captured else None


def _train_step(chunks, optimizer, step):
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    _run(chunks, *_batch(step), train=True)
    ok, grad_norm, _ = optimizer.step()
    assert ok
    return grad_norm


def _local_params(chunks):
    from megatron.core.utils import unwrap_model

    return {name: p.detach().clone() for chunk in chunks
            for name, p in unwrap_model(chunk).named_parameters()}


def _random_draws():
    return [random.random(), float(np.random.rand()), float(torch.rand(()))]


def _switch_layout(model_dir, tp, pp, seed):
    """Rebuild the model-parallel groups in this process at another TP/PP, then the model."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    return _build(model_dir, tp, pp, seed, with_optimizer=False)


def _resume_in_place(rank, world, model_dir, root):
    """TP=2: train 2 steps with checkpoints (keep_last=2), then step 3 uninterrupted; then a
    second model + fresh optimizer (other init) loads the latest checkpoint and takes step 3
    too. Returns both step-3 results and the RNG draws after save/after load."""
    from megatron_intuitor.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    chunks, optimizer = _build(model_dir, 2, 1, seed=1, with_optimizer=True)
    for step in (1, 2):
        _train_step(chunks, optimizer, step)
        save_checkpoint(root, step, chunks, optimizer, extra={"data_position": 10 * step},
                        keep_last=2)
    draws = _random_draws()
    grad_norm = _train_step(chunks, optimizer, 3)
    uninterrupted = (_local_params(chunks), grad_norm, draws)

    # A fresh optimizer, as in a new process: torch has not created any Adam state yet.
    chunks, optimizer = _build(model_dir, 2, 1, seed=99, with_optimizer=True)
    extra = load_checkpoint(latest_checkpoint(root), chunks, optimizer)
    draws = _random_draws()
    grad_norm = _train_step(chunks, optimizer, 3)
    resumed = (_local_params(chunks), grad_norm, draws)
    save_checkpoint(root, 3, chunks, optimizer, keep_last=2)
    return uninterrupted, resumed, extra


def _reshard_logits(rank, world, model_dir, root):
    """Save at TP=2, then load the model at PP=2 and at TP=1 (DP=2) in the same processes."""
    from megatron_intuitor.checkpoint import load_checkpoint, save_checkpoint

    chunks, _ = _build(model_dir, 2, 1, seed=5, with_optimizer=False)
    path = save_checkpoint(root, 1, chunks)
    results = {"saved": _run(chunks, *_batch(0), train=False)}
    for tp, pp in ((1, 2), (1, 1)):
        chunks, _ = _switch_layout(model_dir, tp, pp, seed=123)
        before = _run(chunks, *_batch(0), train=False)
        extra = load_checkpoint(path, chunks)
        results[f"tp{tp}pp{pp}"] = (before, _run(chunks, *_batch(0), train=False), extra)
    return results


@pytest.mark.slow
def test_tp2_checkpoint_loads_at_pp2_and_tp1_with_same_logits(tmp_path, tiny_qwen2_vocab1100):
    ranks = run_distributed(_reshard_logits, 2, tiny_qwen2_vocab1100, str(tmp_path))
    reference = ranks[0]["saved"]
    assert torch.equal(ranks[1]["saved"], reference)
    for layout in ("tp1pp2", "tp1pp1"):
        last_stage = [r[layout] for r in ranks if r[layout][1] is not None]
        assert len(last_stage) == (1 if layout == "tp1pp2" else 2)
        for before, after, extra in last_stage:
            assert extra == {"step": 1}
            assert (before - reference).abs().max() > 0.1  # the load is what makes them equal
            torch.testing.assert_close(after, reference, rtol=0, atol=1e-5,
                                       msg=f"logits after loading at {layout}")


@pytest.mark.slow
def test_resume_continues_exactly_and_keeps_last(tmp_path, tiny_qwen2_vocab1100):
    root = tmp_path / "ckpts"
    (root / ".tmp_step_7").mkdir(parents=True)  # a save killed earlier: ignored, then removed
    ranks = run_distributed(_resume_in_place, 2, tiny_qwen2_vocab1100, str(root))
    for rank, (uninterrupted, resumed, extra) in enumerate(ranks):
        params, grad_norm, draws = uninterrupted
        params_r, grad_norm_r, draws_r = resumed
        assert extra == {"data_position": 20, "step": 2}
        assert draws_r == draws, f"rank {rank}: RNG streams differ after resume"
        assert grad_norm_r == pytest.approx(grad_norm, rel=1e-6)
        assert params.keys() == params_r.keys()
        for name in params:
            torch.testing.assert_close(params_r[name], params[name], rtol=0, atol=1e-7,
                                       msg=f"rank {rank} {name} after step 3")
    assert sorted(p.name for p in root.iterdir()) == ["step_2", "step_3"]


def _complete(path):
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"format_version": 1, "step": 0}))


def test_latest_checkpoint_ignores_temporary_and_incomplete_dirs(tmp_path):
    from megatron_intuitor.checkpoint import latest_checkpoint

    assert latest_checkpoint(tmp_path / "nothing_yet") is None
    _complete(tmp_path / "step_3")
    _complete(tmp_path / "step_12")
    _complete(tmp_path / ".tmp_step_40")  # killed mid-save (even if it got far)
    _complete(tmp_path / ".old_step_41")  # displaced by a re-save
    (tmp_path / "step_30").mkdir()  # no trainer state: not written by us
    (tmp_path / "step_50").write_text("a file")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_12"  # 12 > 3: numeric, not lexical


def test_bad_checkpoint_inputs_fail_clearly(tmp_path):
    from megatron_intuitor.checkpoint import load_checkpoint, read_trainer_state, save_checkpoint

    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_trainer_state(tmp_path / "step_1")
    (tmp_path / "step_2").mkdir()
    with pytest.raises(FileNotFoundError, match="trainer_state.json is missing"):
        load_checkpoint(tmp_path / "step_2", [torch.nn.Linear(1, 1)])
    with pytest.raises(TypeError, match=r"bad keys: \['sampler'\]"):
        save_checkpoint(tmp_path, 1, [torch.nn.Linear(1, 1)],
                        extra={"data_position": 3, "sampler": object()})
    with pytest.raises(ValueError, match="non-negative"):
        save_checkpoint(tmp_path, -1, [torch.nn.Linear(1, 1)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2"]  # nothing was written


def _named_tensors():
    gen = torch.Generator().manual_seed(0)
    yield "model.embed_tokens.weight", torch.randn(50, 8, generator=gen).to(torch.bfloat16)
    yield "model.norm.weight", torch.randn(8, generator=gen)
    yield "lm_head.weight", torch.randn(50, 8, generator=gen, dtype=torch.float64)
    yield "model.layers.0.mlp.up_proj.weight", torch.randn(16, 8, generator=gen)


def test_save_hf_checkpoint_shards_index_and_assets(tmp_path, tiny_qwen2):
    from safetensors import safe_open

    from megatron_intuitor.checkpoint import save_hf_checkpoint

    out = tmp_path / "hf"
    # 1 KiB shards: the 800-byte bf16 embedding fits, then each bigger tensor opens a new shard.
    save_hf_checkpoint(_named_tensors(), out, assets_dir=tiny_qwen2, max_shard_bytes=1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    expected = dict(_named_tensors())
    assert set(index["weight_map"]) == set(expected)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in expected.values())
    shards = sorted({*index["weight_map"].values()})
    assert shards == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    for name, tensor in expected.items():
        with safe_open(out / index["weight_map"][name], "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            loaded = handle.get_tensor(name)
        assert loaded.dtype == tensor.dtype and torch.equal(loaded, tensor), name
    for asset in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / asset).read_bytes() == (tiny_qwen2 / asset).read_bytes()
    assert not any(p.name.startswith(".tmp_") for p in tmp_path.iterdir())


def test_save_hf_checkpoint_refuses_nonempty_output_and_leaves_nothing_when_killed(tmp_path):
    from megatron_intuitor.checkpoint import save_hf_checkpoint

    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        save_hf_checkpoint(_named_tensors(), out)
    assert (out / "keep.txt").read_text() == "user data"

    def dies_half_way():
        yield from list(_named_tensors())[:2]
        raise KeyboardInterrupt  # the conversion is killed

    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        save_hf_checkpoint(dies_half_way(), fresh, max_shard_bytes=1)
    assert not fresh.exists()
    save_hf_checkpoint(_named_tensors(), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").is_file()


def test_prune_keeps_the_newest_and_the_protected_steps(tmp_path):
    from megatron_intuitor.checkpoint import _prune

    for step in (1, 2, 3, 4, 5):
        (tmp_path / f"step_{step}").mkdir()
    (tmp_path / ".tmp_step_6").mkdir()  # a save that never finished
    _prune(tmp_path, keep_last=2, keep_steps=(2,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2", "step_4", "step_5"]
    _prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4", "step_5"]


def _save_until_the_disk_fills(rank, world, model_dir, root):
    """Save step 1, then step 2 with every storage write failing as on a full disk (ENOSPC
    where the bytes go to the file); returns the error's name and what it is explained as."""
    import errno
    import os

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_intuitor.checkpoint import disk_full_explanation, save_checkpoint

    chunks, optimizer = _build(model_dir, 1, 1, seed=1, with_optimizer=True)
    _train_step(chunks, optimizer, 1)
    save_checkpoint(root, 1, chunks, optimizer)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    filesystem_async._write_item = no_space
    try:
        save_checkpoint(root, 2, chunks, optimizer)
    except BaseException as error:  # torch's CheckpointException is a BaseException
        return type(error).__name__, disk_full_explanation(error, root, 2)
    return None


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_explained_and_publishes_nothing(tmp_path,
                                                                     tiny_qwen2_vocab1100):
    """ENOSPC inside Megatron's writer: the save fails, no step_2 appears, and the error is
    recognised through dist_checkpointing's wrapping, with the free space and the size of the
    last checkpoint (step_1, summed here file by file)."""
    import os
    import re

    root = tmp_path / "ckpts"
    [result] = run_distributed(_save_until_the_disk_fills, 1, tiny_qwen2_vocab1100, str(root))
    assert result is not None, "the save did not fail"
    _, explanation = result
    step_1 = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root / "step_1")
                 for f in files)
    assert re.fullmatch(rf"No space left on device while saving checkpoint step_2 in "
                        rf"{re.escape(str(root))}: \d+\.\d+ (MiB|GiB) free there, a checkpoint "
                        rf"needs ~{step_1 / 2**20:.1f} MiB \(as step_1\)", explanation or ""), \
        explanation
    assert not (root / "step_2").exists() and (root / "step_1" / "trainer_state.json").is_file()


def test_trainer_stops_on_a_full_disk_naming_the_output_dir_and_sizes(tmp_path):
    """The controller's side: a rank's ENOSPC (its traceback text inside WorkerDiedError)
    becomes TrainingStopped naming trainer.output_dir, the free space and, with no complete
    checkpoint yet, the bytes the failed save wrote; any other save error is left alone."""
    import re
    from types import SimpleNamespace

    from megatron_intuitor.config import load
    from megatron_intuitor.trainer import Trainer, TrainingStopped
    from megatron_intuitor.workers.group import WorkerDiedError

    class _Actor:
        error: Exception

        def save_checkpoint(self, root, step, extra, keep_last, keep_steps=()):
            raise self.error

    class _Loader:
        def state_dict(self):
            return {}

    cfg = load([f"trainer.output_dir={tmp_path}"])
    tokenizer = SimpleNamespace(eos_token_id=1, pad_token_id=0)
    actor = _Actor()
    trainer = Trainer(cfg, None, actor, _Loader(), [], None, tokenizer)
    partial = tmp_path / "checkpoints" / ".tmp_step_3"
    partial.mkdir(parents=True)
    (partial / "__0_0.distcp").write_bytes(b"\0" * (3 << 20))
    rank_text = "Traceback (most recent call last):\n  ...\nOSError: [Errno 28] No space left " \
                "on device"
    actor.error = WorkerDiedError("worker rank 0 raised in ActorWorker.save_checkpoint: ...")
    actor.error.__cause__ = RuntimeError(rank_text)
    with pytest.raises(TrainingStopped) as stopped:
        trainer.save(3)
    assert re.fullmatch(
        rf"trainer.output_dir={re.escape(str(tmp_path))}: No space left on device while saving "
        rf"checkpoint step_3 in {re.escape(str(tmp_path / 'checkpoints'))}: \d+\.\d+ (MiB|GiB) "
        rf"free there, a checkpoint needs more than the 3.0 MiB written before the disk filled; "
        rf"free space or set trainer.output_dir elsewhere", str(stopped.value)), stopped.value
    actor.error = WorkerDiedError("worker rank 1 died: killed")
    with pytest.raises(WorkerDiedError, match="rank 1 died"):
        trainer.save(3)
