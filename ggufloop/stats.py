"""Paired comparisons of a plan against the unlooped baseline on the same items."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Comparison:
    n: int
    base_acc: float
    plan_acc: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float      # exact McNemar
    only_base: int      # items the baseline gets right and the plan wrong
    only_plan: int


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b and c."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap(base: np.ndarray, plan: np.ndarray, resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of mean(plan - base), resampling items."""
    d = plan.astype(np.float64) - base.astype(np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def compare(base: "list[int] | np.ndarray", plan: "list[int] | np.ndarray") -> Comparison:
    """Accuracy difference of plan over base, with its interval and p-value (same items, same order)."""
    b, p = np.asarray(base, dtype=bool), np.asarray(plan, dtype=bool)
    if len(b) != len(p) or len(b) == 0:
        raise ValueError("compare needs the same, non-empty set of items for both")
    lo, hi = paired_bootstrap(b, p)
    only_base, only_plan = int(np.sum(b & ~p)), int(np.sum(~b & p))
    return Comparison(len(b), float(b.mean()), float(p.mean()), float(p.mean() - b.mean()), lo, hi,
                      mcnemar_exact(only_base, only_plan), only_base, only_plan)
