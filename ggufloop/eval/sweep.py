"""Sweeps over block ranges: every (s, e) of a window scored as independent, resumable units.

Each (plan, task) is a unit of work in the results database, so a sweep can be stopped and
restarted, and its units run on any executor (``executors``: this process, worker processes, Ray).
This module holds the sweep's blocks and its analysis: the paired comparison of every block.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import PlanError
from .stats import compare, holm
from .store import Store, Unit


def block_ranges(n_layer: int, starts: str | None, sizes: str | None) -> list[tuple[int, int]]:
    """Every (s, e) with s in the start window and e - s in the size window (S0:S1, slice semantics)."""

    def window(text: str | None, lo: int, hi: int) -> range:
        if not text:
            return range(lo, hi)
        a, _, b = text.partition(":")
        try:
            return range(int(a), int(b) if b else int(a) + 1)
        except ValueError:
            raise PlanError(f"bad window {text!r}: expected FIRST:END, such as 4:12") from None

    return [(s, s + m) for s in window(starts, 0, n_layer) for m in window(sizes, 1, n_layer + 1) if s + m <= n_layer]


@dataclass(frozen=True)
class Cell:
    """One block of a sweep against the unlooped model on the same items."""

    start: int
    end: int
    n: int
    acc: float
    base_acc: float
    diff: float
    ci_low: float
    ci_high: float
    p: float  # exact McNemar
    p_holm: float  # Holm-adjusted over every cell of the sweep


def cells(base: Mapping[str, int], correct: Mapping[tuple[int, int], Mapping[str, int]], ids: list[str]) -> list[Cell]:
    """Every block's paired comparison with the unlooped model (base: item -> 0/1) on items ids,
    Holm-adjusted over the blocks (correct: block -> item -> 0/1)."""
    raw = [((s, e), compare([base[i] for i in ids], [rows[i] for i in ids])) for (s, e), rows in correct.items()]
    adjusted = holm([c.p_value for _, c in raw]) if raw else []
    return [
        Cell(s, e, c.n, c.plan_acc, c.base_acc, c.diff, c.ci_low, c.ci_high, c.p_value, pa)
        for ((s, e), c), pa in zip(raw, adjusted)
    ]


def stored_correct(store: Store, unit: Unit) -> dict[str, int]:
    """item -> correct (0/1) of a multiple-choice unit's stored rows."""
    return {i: r[0] for i, r in store.rows(unit).items()}
