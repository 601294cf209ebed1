"""Does a score pick the right response within a prompt's group? The figures of
`tools/best_of_n.py --dump` (docs/experiments.md, section 1), from one row per sampled response.

Every figure is a ratio of sums over prompts (a mean over prompts has denominators 1), so a
bootstrap over prompts resamples the per-prompt numerators and denominators together and
recomputes the ratio: `bootstrap_interval`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_intuitor.evaluation.best_of_n import majority_index, most_certain


@dataclass(frozen=True)
class Response:
    """One sampled response as the dump holds it."""
    self_certainty: float
    length: int
    answer: Optional[str]
    correct: bool
    answer_self_certainty: Optional[float] = None  # token mean over the extracted answer
    rest_self_certainty: Optional[float] = None    # token mean over the other tokens
    truncated: bool = False  # cut at the response length limit


Group = Sequence[Response]  # one prompt's responses, in sample order
PerPrompt = tuple[np.ndarray, np.ndarray]  # (numerators, denominators), one entry per prompt


def _ones(values: Sequence[float]) -> PerPrompt:
    return np.asarray(values, dtype=np.float64), np.ones(len(values))


def ratio(per_prompt: PerPrompt) -> float:
    """sum(numerators) / sum(denominators); nan when the denominators sum to 0."""
    numerators, denominators = per_prompt
    total = denominators.sum()
    return float(numerators.sum() / total) if total else float("nan")


def pick_accuracy(groups: Sequence[Group], n: int, pick: str) -> PerPrompt:
    """Per prompt, whether the response picked from its first `n` is correct: `best` the most
    self-certain, `majority` the most common answer (none: incorrect), `mean` the share correct
    (a random pick), `pass` any correct."""
    values = []
    for group in groups:
        head = group[:n]
        correct = [r.correct for r in head]
        if pick == "best":
            values.append(correct[most_certain([r.self_certainty for r in head])])
        elif pick == "majority":
            voted = majority_index([r.answer for r in head])
            values.append(voted is not None and correct[voted])
        elif pick == "mean":
            values.append(sum(correct) / len(head))
        elif pick == "pass":
            values.append(any(correct))
        else:
            raise ValueError(f"unknown pick {pick!r}: best, majority, mean or pass")
    return _ones(values)


def difference(first: PerPrompt, second: PerPrompt) -> PerPrompt:
    """Per prompt, first - second of two means over the same prompts."""
    if not (np.all(first[1] == 1) and np.all(second[1] == 1)):
        raise ValueError("difference of per-prompt means only (denominators 1)")
    return first[0] - second[0], first[1]


def mixed_share(groups: Sequence[Group], n: int) -> PerPrompt:
    """Per prompt, whether its first `n` responses are neither all correct nor all wrong."""
    return _ones([0 < sum(r.correct for r in group[:n]) < len(group[:n]) for group in groups])


def pairwise_wins(groups: Sequence[Group], n: int,
                  positive: Callable[[Response], bool]) -> PerPrompt:
    """Per prompt, over its first `n` responses: (wins, pairs), a pair being one `positive`
    and one other response, a win the positive one having the higher self-certainty (a tie
    counts 1/2). Pooled, wins / pairs is the within-prompt AUROC."""
    wins, pairs = [], []
    for group in groups:
        scores = np.array([r.self_certainty for r in group[:n]], dtype=np.float64)
        is_positive = np.array([positive(r) for r in group[:n]], dtype=bool)
        up, down = scores[is_positive], scores[~is_positive]
        difference_matrix = up[:, None] - down[None, :]
        wins.append((difference_matrix > 0).sum() + 0.5 * (difference_matrix == 0).sum())
        pairs.append(up.size * down.size)
    return np.asarray(wins, dtype=np.float64), np.asarray(pairs, dtype=np.float64)


def within_prompt_correlation(groups: Sequence[Group], n: int,
                              value: Callable[[Response], float]) -> float:
    """Pearson correlation of self-certainty with `value` after centring both within each
    prompt's first `n` responses (nan when either has no within-prompt variation)."""
    scores, values = [], []
    for group in groups:
        head = group[:n]
        s = np.array([r.self_certainty for r in head], dtype=np.float64)
        v = np.array([value(r) for r in head], dtype=np.float64)
        scores.append(s - s.mean())
        values.append(v - v.mean())
    s, v = np.concatenate(scores), np.concatenate(values)
    norm = np.sqrt((s * s).sum() * (v * v).sum())
    return float((s * v).sum() / norm) if norm else float("nan")


def answer_minus_rest(groups: Sequence[Group], n: int) -> PerPrompt:
    """Per prompt: (sum over its answered responses among the first `n` of answer-token minus
    other-token self-certainty, their count); responses without both parts are left out."""
    sums, counts = [], []
    for group in groups:
        gaps = [r.answer_self_certainty - r.rest_self_certainty for r in group[:n]
                if r.answer_self_certainty is not None and r.rest_self_certainty is not None]
        sums.append(sum(gaps))
        counts.append(len(gaps))
    return np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)


def bootstrap_interval(per_prompt: PerPrompt, resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of `ratio` over `resamples` draws of the prompts with replacement;
    draws whose denominators sum to 0 are left out."""
    numerators, denominators = per_prompt
    if numerators.size == 0:
        raise ValueError("bootstrap over no prompts")
    draws = np.random.default_rng(seed).integers(0, numerators.size,
                                                 size=(resamples, numerators.size))
    totals = denominators[draws].sum(axis=1)
    keep = totals > 0
    ratios = numerators[draws].sum(axis=1)[keep] / totals[keep]
    if ratios.size == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


def report(groups: Sequence[Group], greedy_correct: Sequence[bool], ns: Sequence[int] = (4, 8),
           resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Every figure of docs/experiments.md section 1, each ratio with `<name>_low` and
    `<name>_high` (its 95% bootstrap interval over prompts). Every group must hold at least
    max(ns) responses."""
    if len(groups) != len(greedy_correct) or not groups:
        raise ValueError(f"{len(groups)} groups and {len(greedy_correct)} greedy results: one "
                         f"of each per prompt needed")
    short = [i for i, group in enumerate(groups) if len(group) < max(ns)]
    if short:
        raise ValueError(f"prompts {short[:5]}: fewer than {max(ns)} responses")
    figures: dict[str, PerPrompt] = {"greedy": _ones([float(c) for c in greedy_correct])}
    for n in ns:
        mean = pick_accuracy(groups, n, "mean")
        best = pick_accuracy(groups, n, "best")
        figures.update({
            f"mean@{n}": mean, f"best@{n}": best, f"maj@{n}": pick_accuracy(groups, n, "majority"),
            f"pass@{n}": pick_accuracy(groups, n, "pass"),
            f"best_minus_mean@{n}": difference(best, mean), f"mixed@{n}": mixed_share(groups, n),
            f"auroc@{n}": pairwise_wins(groups, n, lambda r: r.correct),
            f"answerless_auroc@{n}": pairwise_wins(groups, n, lambda r: r.answer is None),
            f"answer_minus_rest@{n}": answer_minus_rest(groups, n),
            # the length confound: the same AUROC among the responses that finished
            f"auroc_finished@{n}": pairwise_wins(
                [[r for r in group[:n] if not r.truncated] for group in groups], n,
                lambda r: r.correct)})
    result = {"prompts": float(len(groups))}
    for name, per_prompt in figures.items():
        low, high = bootstrap_interval(per_prompt, resamples, seed)
        result.update({name: ratio(per_prompt), f"{name}_low": low, f"{name}_high": high})
    for n in ns:
        result[f"auroc_pairs@{n}"] = float(figures[f"auroc@{n}"][1].sum())
        result[f"answerless_pairs@{n}"] = float(figures[f"answerless_auroc@{n}"][1].sum())
        result[f"answerless_share@{n}"] = float(np.mean([r.answer is None for group in groups
                                                         for r in group[:n]]))
        result[f"truncated_share@{n}"] = float(np.mean([r.truncated for group in groups
                                                        for r in group[:n]]))
        result[f"length_corr@{n}"] = within_prompt_correlation(groups, n, lambda r: r.length)
    return result


def decision(result: dict[str, float], n: int = 8) -> dict[str, bool]:
    """docs/experiments.md's decision rule on a `report`: each condition and `passes`."""
    conditions = {
        "best_minus_mean": (result[f"best_minus_mean@{n}"] >= 0.05
                            and result[f"best_minus_mean@{n}_low"] > 0),
        "auroc": result[f"auroc@{n}"] >= 0.60 and result[f"auroc@{n}_low"] > 0.5,
        # nan (no answer-less response) is no preference
        "no_answerless_preference": not result[f"answerless_auroc@{n}_low"] > 0.5}
    return {**conditions, "passes": all(conditions.values())}


def responses_from_rows(rows: Sequence[dict], n: int) -> tuple[list[list[Response]], list[bool]]:
    """Each prompt's responses and its greedy result from `tools/best_of_n.py --dump` rows, in
    prompt order; a prompt without its greedy row and `n` sampled rows (a run cut short while
    writing it) is left out."""
    greedy: dict[int, bool] = {}
    sampled: dict[int, dict[int, Response]] = {}
    for row in rows:
        if row["sample"] == "greedy":
            greedy[row["prompt"]] = bool(row["correct"])
        else:
            sampled.setdefault(row["prompt"], {})[row["sample"]] = Response(
                self_certainty=row["self_certainty"], length=row["length"],
                answer=row["answer"], correct=bool(row["correct"]),
                answer_self_certainty=row["answer_self_certainty"],
                rest_self_certainty=row["rest_self_certainty"],
                truncated=row.get("finish_reason") == "length")
    complete = [p for p in sorted(greedy) if len(sampled.get(p, {})) == n]
    return ([[sampled[p][k] for k in range(n)] for p in complete],
            [greedy[p] for p in complete])
