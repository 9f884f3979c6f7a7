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
    p_value: float  # exact McNemar
    only_base: int  # items the baseline gets right and the plan wrong
    only_plan: int


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b and c."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


_MAX_DISCRETE_VALUES = 64  # above this, resample items in chunks
_CHUNK_ELEMENTS = 1 << 20  # item indices drawn at once on the chunked path (8 MB of int64)


def paired_bootstrap(base: np.ndarray, plan: np.ndarray, resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of mean(plan - base), resampling items, in memory bounded by resamples.

    Per-item differences that take few distinct values (paired 0/1 correctness: -1, 0, +1) are
    resampled exactly in distribution without drawing items: the counts of each value in a
    resample of n items are Multinomial(n, observed proportions), so a resample's mean is
    counts @ values / n and memory is resamples x (number of values). Other inputs draw item
    indices in chunks of about _CHUNK_ELEMENTS, never resamples x n at once.
    """
    b, p = np.asarray(base, dtype=np.float64).ravel(), np.asarray(plan, dtype=np.float64).ravel()
    if len(b) != len(p):
        raise ValueError("paired_bootstrap needs the same items for base and plan")
    d = p - b
    n = len(d)
    if n == 0:
        raise ValueError("paired_bootstrap needs at least one item")
    rng = np.random.default_rng(seed)
    values, counts = np.unique(d, return_counts=True)
    if len(values) <= _MAX_DISCRETE_VALUES:
        means = rng.multinomial(n, counts / n, size=resamples) @ values / n
    else:
        means = np.empty(resamples)
        step = max(1, _CHUNK_ELEMENTS // n)
        for start in range(0, resamples, step):
            stop = min(resamples, start + step)
            means[start:stop] = d[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def holm(pvalues: list[float] | np.ndarray) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control), in the input order.

    The k-th smallest of m p-values becomes max over j <= k of (m - j + 1) * p_(j), capped at 1:
    rejecting every hypothesis whose adjusted p-value is below alpha is Holm's procedure at alpha.
    """
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    m = len(p)
    if m == 0:
        return []
    if np.any(np.isnan(p)) or np.any(p < 0) or np.any(p > 1):
        raise ValueError("p-values must lie in [0, 1]")
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = stepped
    return [float(x) for x in out]


def compare(base: list[int] | np.ndarray, plan: list[int] | np.ndarray) -> Comparison:
    """Accuracy difference of plan over base, with its interval and p-value (same items, same order)."""
    b, p = np.asarray(base, dtype=bool), np.asarray(plan, dtype=bool)
    if len(b) != len(p) or len(b) == 0:
        raise ValueError("compare needs the same, non-empty set of items for both")
    lo, hi = paired_bootstrap(b, p)
    only_base, only_plan = int(np.sum(b & ~p)), int(np.sum(~b & p))
    return Comparison(
        len(b),
        float(b.mean()),
        float(p.mean()),
        float(p.mean() - b.mean()),
        lo,
        hi,
        mcnemar_exact(only_base, only_plan),
        only_base,
        only_plan,
    )
