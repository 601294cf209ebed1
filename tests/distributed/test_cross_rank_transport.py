"""The cross-rank weight transport between a training rank and a rollout rank of its own, two
processes with no default torch.distributed world, joined by a gloo group on its own TCPStore
(the server on a free port): after the broadcast the engine generates transformers' greedy
tokens for the SENT weights (not the ones it was built from), the version arrives with them,
and a transfer whose buckets carry two versions is refused."""
import multiprocessing
import os
import traceback

import pytest
import torch
from safetensors.torch import load_file

NEW_TOKENS = 10
BUCKET_BYTES = 64 * 1024  # many buckets for a ~1 MB model


def _prompts():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (5, 13)]


def _training_rank(ports, backend, device, sent_dir):
    from megatron_intuitor.rollout.transport import (BroadcastSender, cross_rank_group,
                                                     cross_rank_store)

    store = cross_rank_store("127.0.0.1", server=True)
    ports.put(store.port)
    group = cross_rank_group(store, 0, 2, backend)
    weights = load_file(os.path.join(sent_dir, "model.safetensors"), device=str(device))
    sender = BroadcastSender(lambda: iter(weights.items()), group, torch.float32,
                             BUCKET_BYTES, device)
    report = sender.push(version=7)
    # a broken transfer: its first bucket says version 8, the next one 9
    mixed = list(weights.items())
    sender._send(8, mixed[:1], last=False)
    try:
        sender._send(9, mixed[1:], last=True)
    except RuntimeError:  # the receiver refused at the header and hung up before the tensors
        pass
    return {"buckets": report.buckets, "bytes": report.bytes}


def _rollout_rank(ports, backend, device, built_dir, prompts):
    from megatron_intuitor.rollout.engine import RolloutEngine, SamplingConfig
    from megatron_intuitor.rollout.transport import (cross_rank_group, cross_rank_store,
                                                     receive_weights)

    store = cross_rank_store("127.0.0.1", ports.get(timeout=120))
    group = cross_rank_group(store, 1, 2, backend)
    engine = RolloutEngine(built_dir, dtype=torch.float32, max_model_len=128, seed=0)
    greedy = SamplingConfig(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    before = [s.response_token_ids for s in engine.generate(prompts, greedy)]
    version, _ = receive_weights(engine, group, device)
    after = [s.response_token_ids for s in engine.generate(prompts, greedy)]
    try:
        receive_weights(engine, group, device)
        refused = None
    except RuntimeError as error:
        refused = str(error)
    engine.shutdown()
    return {"before": before, "after": after, "version": version, "refused": refused}


def _run(role, queue, results, backend, device, *args):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        results.put((role.__name__, "ok", role(queue, backend, device, *args)))
    except BaseException:
        results.put((role.__name__, "error", traceback.format_exc()))


def _hf_greedy(model_dir, prompts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS)[0, len(p):].tolist() for p in prompts]


def check_transfer(tmp_path, backend: str, devices: tuple[torch.device, torch.device]):
    """A training rank on devices[0] broadcasts a tiny model the engine on devices[1] was not
    built from; the assertions of this file's docstring."""
    from megatron_intuitor.models.tiny import make_tiny_model

    # untied (tied, a random tiny model repeats its last prompt token whatever its seed)
    built = make_tiny_model(tmp_path / "built", vocab_size=1003, seed=0,
                            tie_word_embeddings=False)
    sent = make_tiny_model(tmp_path / "sent", vocab_size=1003, seed=1,
                           tie_word_embeddings=False)
    prompts = _prompts()
    context = multiprocessing.get_context("spawn")
    ports, results = context.Queue(), context.Queue()
    procs = [context.Process(target=_run, args=(_training_rank, ports, results, backend,
                                                devices[0], str(sent))),
             context.Process(target=_run, args=(_rollout_rank, ports, results, backend,
                                                devices[1], str(built), prompts))]
    for proc in procs:
        proc.start()
    outcome = {}
    for _ in procs:
        name, status, value = results.get(timeout=600)
        assert status == "ok", f"{name} failed:\n{value}"
        outcome[name] = value
    for proc in procs:
        proc.join(timeout=60)
    training, rollout = outcome["_training_rank"], outcome["_rollout_rank"]
    # the engine starts from dummy weights (it never reads a checkpoint's), then the sent ones
    assert rollout["after"] == _hf_greedy(sent, prompts) != rollout["before"]
    assert rollout["after"] != _hf_greedy(built, prompts)  # the two models differ
    assert rollout["version"] == 7
    assert training["buckets"] > 1  # bounded buckets
    assert "version 9 inside the transfer of version 8" in rollout["refused"]


@pytest.mark.slow
def test_broadcast_gives_the_separate_engine_the_sent_weights(tmp_path):
    check_transfer(tmp_path, "gloo", (torch.device("cpu"), torch.device("cpu")))
