"""Collapse signals of self-certainty RL, and a guard that raises alarms on them.

Intrinsic rewards such as self-certainty rise and then fall: runs hack the reward with repeated
tokens or short, over-confident answers, entropy collapses and held-out accuracy peaks early
("No Free Lunch", arXiv 2506.17219; Co-rewarding, arXiv 2508.00410). The signals here, each
logged as `intuitor/collapse/<signal>` every step, make that visible:

    repetitive_share   share of responses whose distinct n-gram ratio is below a threshold
    distinct_ngram     the mean distinct n-gram ratio (1 = no repeated n-gram)
    truncated_share    share of responses cut at max_response_length (finish reason "length")
    short_share        share of responses with fewer than `short_tokens` tokens (0 = empty)
    entropy_drop       1 - entropy / (mean entropy of the first `entropy_baseline_steps` steps)
    sc_group_spread    mean over prompt groups of the std of self-certainty (0 = no signal)
    kl_jump            KL loss / mean KL loss of the previous `kl_window` steps (all > 0)
    val_acc_drop       best validation accuracy so far minus the current one, while validation
                       self-certainty is above its value at that best (reward up, accuracy down)

`CollapseMonitor` keeps the little history these need and compares each signal against its
threshold in `CollapseConfig`; thresholds are None (off) by default. Pure Python and torch: no
Ray, no config system (the trainer builds `CollapseConfig` from `trainer.guard`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Sequence

import torch

PREFIX = "intuitor/collapse/"
ACTIONS = ("warn", "stop", "rollback")
AFTER_ROLLBACK = ("continue", "stop")

# signal -> (config key of its threshold, True when values ABOVE the threshold are alarming)
THRESHOLDS = {
    "repetitive_share": ("max_repetitive_share", True),
    "truncated_share": ("max_truncated_share", True),
    "short_share": ("max_short_share", True),
    "entropy_drop": ("max_entropy_drop", True),
    "sc_group_spread": ("min_sc_group_spread", False),
    "kl_jump": ("max_kl_jump", True),
    "val_acc_drop": ("max_val_acc_drop", True),
}


# Thresholds on signals that lie in [0, 1] (shares of responses, an accuracy drop): one outside
# can never (or always) alarm, which silently turns the guard off (or into noise).
UNIT_INTERVAL_THRESHOLDS = ("max_repetitive_share", "max_truncated_share", "max_short_share",
                            "max_val_acc_drop")


SIGNALS = ("repetitive_share", "distinct_ngram", "truncated_share", "short_share",
           "entropy_drop", "sc_group_spread", "kl_jump", "val_acc_drop")


def signal_name(signal: str) -> str:
    """The metric name of a signal: intuitor/collapse/<signal>."""
    return PREFIX + signal


class CollapseConfigError(ValueError):
    """Invalid guard settings; `problems` names each bad key."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class CollapseConfig:
    """How the signals are measured, their alarm thresholds (None: off) and the action."""

    action: str = "warn"  # warn | stop | rollback
    after_rollback: str = "continue"  # continue | stop: what a rollback does next
    max_rollbacks: int = 1  # further alarms after this many rollbacks stop the run
    ngram: int = 3  # n of the distinct n-gram ratio
    repetitive_ratio: float = 0.5  # a response with a lower distinct n-gram ratio is repetitive
    short_tokens: int = 2  # a response with fewer tokens is "short"
    entropy_baseline_steps: int = 3  # entropy_drop is relative to the mean of the first steps
    kl_window: int = 3  # kl_jump is relative to the mean KL of this many previous steps
    max_repetitive_share: Optional[float] = None
    max_truncated_share: Optional[float] = None
    max_short_share: Optional[float] = None
    max_entropy_drop: Optional[float] = None
    min_sc_group_spread: Optional[float] = None
    max_kl_jump: Optional[float] = None
    max_val_acc_drop: Optional[float] = None

    def __post_init__(self) -> None:
        problems = []
        if self.action not in ACTIONS:
            problems.append(f"action={self.action!r}: expected one of {', '.join(ACTIONS)}")
        if self.after_rollback not in AFTER_ROLLBACK:
            problems.append(f"after_rollback={self.after_rollback!r}: expected one of "
                            f"{', '.join(AFTER_ROLLBACK)}")
        if not (isinstance(self.max_rollbacks, int) and self.max_rollbacks >= 0):
            problems.append(f"max_rollbacks={self.max_rollbacks!r}: expected an integer >= 0")
        for key in ("ngram", "entropy_baseline_steps", "kl_window"):
            if not (isinstance(getattr(self, key), int) and getattr(self, key) >= 1):
                problems.append(f"{key}={getattr(self, key)!r}: expected an integer >= 1")
        if not (isinstance(self.short_tokens, int) and self.short_tokens >= 0):
            problems.append(f"short_tokens={self.short_tokens!r}: expected an integer >= 0")
        if not (isinstance(self.repetitive_ratio, (int, float))
                and 0 < self.repetitive_ratio <= 1):
            problems.append(f"repetitive_ratio={self.repetitive_ratio!r}: expected a number "
                            f"in (0, 1]")
        for key, _ in THRESHOLDS.values():
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float))
                                          and not isinstance(value, bool) and math.isfinite(value)):
                problems.append(f"{key}={value!r}: expected null (off) or a number")
            elif value is not None and key in UNIT_INTERVAL_THRESHOLDS and not 0 <= value <= 1:
                problems.append(f"{key}={value!r}: expected null (off) or a number in [0, 1] "
                                f"(its signal is a share; outside, the guard never alarms)")
        if problems:
            raise CollapseConfigError(problems)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "CollapseConfig":
        """From a plain mapping (the `trainer.guard` config group); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CollapseConfigError([f"{key}: unknown key (known: {', '.join(sorted(known))})"
                                       for key in unknown])
        return cls(**values)

    @property
    def enabled(self) -> bool:
        """Whether any threshold is set (signals are computed and logged either way)."""
        return any(getattr(self, key) is not None for key, _ in THRESHOLDS.values())


@dataclass(frozen=True)
class Alarm:
    """One signal past its threshold at one step."""

    signal: str
    value: float
    threshold: float
    above: bool  # the alarm is for values above the threshold (else below)
    step: int

    def message(self) -> str:
        relation = ">" if self.above else "<"
        return (f"collapse alarm at step {self.step}: {signal_name(self.signal)} = "
                f"{self.value:.4g} {relation} threshold {self.threshold:.4g}")


# ------------------------------------------------------------------------------ the signals


def distinct_ngram_ratio(token_ids: Sequence[int], n: int) -> float:
    """Distinct n-grams / n-grams of one response; 1.0 when it has no n-gram (shorter than n)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    count = len(token_ids) - n + 1
    if count <= 0:
        return 1.0
    tokens = tuple(token_ids)
    return len({tokens[i:i + n] for i in range(count)}) / count


def repetition(ratios: Sequence[float], ratio_threshold: float) -> tuple[float, float]:
    """(share of responses whose distinct n-gram ratio is below `ratio_threshold`, mean ratio)
    from the responses' `distinct_ngram_ratio`s."""
    if not len(ratios):
        raise ValueError("no responses")
    ratios = [float(r) for r in ratios]
    return sum(r < ratio_threshold for r in ratios) / len(ratios), sum(ratios) / len(ratios)


def share_truncated(truncated: Sequence[bool]) -> float:
    """Share of responses the engine stopped at max_tokens (finish reason "length")."""
    if not len(truncated):
        raise ValueError("no responses")
    return sum(bool(t) for t in truncated) / len(truncated)


def share_short(lengths: Sequence[int], short_tokens: int) -> float:
    """Share of responses with fewer than `short_tokens` tokens."""
    if not len(lengths):
        raise ValueError("no responses")
    return sum(int(length) < short_tokens for length in lengths) / len(lengths)


def group_spread(rewards: torch.Tensor, group_index: Sequence[int] | torch.Tensor) -> float:
    """Mean over prompt groups of the unbiased std of the rewards within the group."""
    keys = group_index.tolist() if isinstance(group_index, torch.Tensor) else list(group_index)
    if rewards.dim() != 1 or len(keys) != rewards.numel():
        raise ValueError(f"rewards {tuple(rewards.shape)} must be [batch] with one group index "
                         f"each, got {len(keys)}")
    groups: dict[Any, list[float]] = {}
    for key, value in zip(keys, rewards.double().tolist()):
        groups.setdefault(key, []).append(value)
    stds = [torch.tensor(values, dtype=torch.float64).std().item()
            for values in groups.values() if len(values) > 1]
    if not stds:
        raise ValueError("every group has a single response: no spread within groups")
    return sum(stds) / len(stds)


# ------------------------------------------------------------------------------ the monitor


class CollapseMonitor:
    """Computes the signals step by step (keeping the history they need) and raises alarms."""

    def __init__(self, config: CollapseConfig) -> None:
        self.config = config
        self._entropies: list[float] = []  # the first entropy_baseline_steps steps
        self._kls: list[float] = []  # the last kl_window steps
        self._best_val: dict[str, tuple[float, float]] = {}  # dataset -> (acc, self-cert.)

    def step_signals(self, distinct_ngram: Sequence[float], truncated: Sequence[bool],
                     response_lengths: Sequence[int], self_certainty: torch.Tensor,
                     group_index: Sequence[int] | torch.Tensor, entropy: float,
                     kl: Optional[float]) -> dict[str, float]:
        """The training-step signals {signal: value}; a signal without enough history yet
        (entropy_drop in its baseline steps, kl_jump until `kl_window` previous steps all had a
        KL above 0) is left out; `kl` None (no KL loss) leaves kl_jump out. Per response:
        `distinct_ngram` its `distinct_ngram_ratio` with n = `config.ngram` (computed where the
        token ids are), `truncated` whether it was cut at max_tokens, `response_lengths`."""
        cfg = self.config
        repetitive, mean_ratio = repetition(distinct_ngram, cfg.repetitive_ratio)
        signals = {
            "repetitive_share": repetitive,
            "distinct_ngram": mean_ratio,
            "truncated_share": share_truncated(truncated),
            "short_share": share_short(response_lengths, cfg.short_tokens),
            "sc_group_spread": group_spread(self_certainty, group_index),
        }
        if len(self._entropies) < cfg.entropy_baseline_steps:
            self._entropies.append(float(entropy))
        else:
            baseline = sum(self._entropies) / len(self._entropies)
            if baseline > 0:
                signals["entropy_drop"] = 1.0 - float(entropy) / baseline
        if kl is not None:
            # KL starts at 0 (policy = reference): a ratio to a window holding those first
            # near-zero steps would be large in any run, so it waits for a window of KL > 0
            if len(self._kls) == cfg.kl_window and min(self._kls) > 0:
                signals["kl_jump"] = float(kl) / (sum(self._kls) / len(self._kls))
            self._kls = (self._kls + [float(kl)])[-cfg.kl_window:]
        return signals

    def validation_signals(self, results: Mapping[str, tuple[float, float]]) -> dict[str, float]:
        """val_acc_drop from {dataset: (accuracy, mean self-certainty)} of one validation: per
        dataset, its best accuracy so far minus this one while its self-certainty is above its
        value at that best (else 0); the largest over the datasets."""
        drops = []
        for dataset, (accuracy, self_certainty) in results.items():
            accuracy, self_certainty = float(accuracy), float(self_certainty)
            best = self._best_val.get(dataset)
            if best is None or accuracy >= best[0]:
                self._best_val[dataset] = (accuracy, self_certainty)
                drops.append(0.0)
            else:
                drops.append(best[0] - accuracy if self_certainty > best[1] else 0.0)
        return {"val_acc_drop": max(drops)} if drops else {}

    def alarms(self, step: int, signals: Mapping[str, float]) -> list[Alarm]:
        """The signals past their thresholds, in the order of `THRESHOLDS`."""
        found = []
        for signal, (key, above) in THRESHOLDS.items():
            threshold = getattr(self.config, key)
            if threshold is None or signal not in signals:
                continue
            value = float(signals[signal])
            if (value > threshold) if above else (value < threshold):
                found.append(Alarm(signal, value, float(threshold), above, step))
        return found

    def state_dict(self) -> dict:
        return {"entropies": list(self._entropies), "kls": list(self._kls),
                "best_val": {k: list(v) for k, v in self._best_val.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._entropies, self._kls = list(state["entropies"]), list(state["kls"])
        self._best_val = {k: tuple(v) for k, v in state["best_val"].items()}
