"""Value rules of configuration keys: (full key, predicate, what is expected). Each settings class
lists the rules of the keys its fields come from, next to those fields (`ppo.PPOSettings`,
`config.OptimizerSettings`, ...); `config.validate` checks them all before anything else and
reports every failure with its key. Depends on nothing of the package, so that any module can
own a settings class without importing `config`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf

Rule = tuple[str, Callable[[Any], bool], str]

_MISSING = object()


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def positive_int(value: Any) -> bool:
    return is_int(value) and value >= 1


def one_of(choices: Sequence) -> Callable[[Any], bool]:
    return lambda value: value in choices


def choice(key: str, choices: Sequence[str]) -> Rule:
    """The rule of a key whose value is one of `choices`."""
    return key, one_of(choices), f"one of {', '.join(choices)}"


def check_rules(cfg: DictConfig, rules: Sequence[Rule]) -> list[str]:
    """'<key>=<value>: expected <what>' (or '<key> is missing') for every rule `cfg` breaks."""
    problems = []
    for key, is_valid, expected in rules:
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is _MISSING:
            problems.append(f"{key} is missing")
        elif not is_valid(value):
            problems.append(f"{key}={value!r}: expected {expected}")
    return problems
