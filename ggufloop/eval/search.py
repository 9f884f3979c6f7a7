"""Find the loop plan that helps a model most, and judge it on items the search never saw.

The search behind ``ggufloop tune``, in three steps; the caller supplies the scoring (llama.cpp,
with every scored item cached in SQLite), this module decides what to score and what it means:

1. ``split_tasks``: every task's items are split, by a stable hash of (seed, task, item id), into a
   *search* part and a *held-out* part. The search looks only at search items, and few-shot
   examples may come only from them (``TaskSplit.fewshot_pool``); the verdict looks only at
   held-out items. Judging the chosen plan on the items it was chosen on would overstate it
   (the winner's curse: the best of 40 noisy scores is biased upwards even when no plan helps).
2. ``successive_halving``: all candidates on a few search items, the best 1/eta of them on eta
   times more, and so on, until ``top_k`` are left, the search items run out, the budget of
   item evaluations would be exceeded, or the caller's ``go_on`` (a time limit) says stop.
   ``full_grid`` scores every candidate on every search item, for the cost comparison
   (``grid_evaluations``) and for small grids.
3. ``verdict``: the baseline and each finalist on the held-out items: the paired difference with
   its bootstrap interval and exact McNemar p-value per (plan, task) and on all tasks pooled,
   Holm-adjusted over all of them, and the winner, which is None when no plan significantly beats
   the unlooped model: a first-class answer, not an error.

Candidates are opaque hashable keys (plan strings in practice); the baseline (``"none"``, the
unlooped model) is not a candidate but is scored on the same items, and every ranking is by the
paired difference against it, macro-averaged over tasks: of accuracy, or (``HalvingConfig.rank``
"margin") of each item's margin, the correct choice's log-likelihood minus the best wrong one's,
which every scored row already holds, so it costs nothing more. The verdict is on accuracy either way.

Why margin is offered, and why accuracy is still the default (docs/search/margin.md, written by
docs/search/margin.py): on simulated benchmarks with known effects, where a plan that answers better
also moves margins the same way, ranking by margin puts the best of 8 candidates first with a third to
a half of the items accuracy needs for the same probability (0/1 accuracy throws away how far each item
is from flipping). On the study's real rows (SmolLM2, WinoGrande, 36 plans on 883 items), where no
plan really helps, the comparison is inconclusive: the two ways of judging a choice on one fixed item
set are biased in opposite directions and disagree, and a plan's margin difference correlates with its
accuracy difference at only r = 0.32 (looping moves the scale of the log-likelihoods, the model's
confidence, as well as their order). Until a model where plans help shows margin's saving on real
rows, the default stays the statistic the verdict uses.

Why not Optuna (its SuccessiveHalvingPruner or HyperbandPruner)
----------------------------------------------------------------
Optuna is the established tool for this kind of search, and was considered; it is not used, and
not a dependency, because its model of the problem does not fit this one:

* Optuna's pruners are *asynchronous* (ASHA), and Optuna never suspends and resumes a trial: a
  trial that reaches a rung is promoted or pruned on the spot, by comparing its intermediate
  value with those that *earlier* trials reported at that rung (among fewer than eta of them, it
  goes on if it is the best so far; the first trial always goes on). Run one trial at a time (one
  llama.cpp model, one plan at a time), the first trials therefore run to the end whatever their
  scores, which candidates survive depends on the order they were tried, and the total cost is
  unknown until the study ends. Our candidates are a small finite list known up front, so the
  synchronous algorithm is possible: a whole rung is scored, then cut. It is deterministic, and
  its cost is known before anything is scored (``halving_schedule``), so ``tune`` can print it
  and keep to a budget exactly.
* Our comparisons are *paired*: at a rung every candidate and the baseline are scored on the
  same items, and the items of a rung extend those of the previous one (a prefix of one seeded
  order), so scores already in the SQLite cache are reused and differences between plans are not
  drowned by item-to-item variation. Optuna's intermediate value is a number per step; it knows
  nothing of item identity, nor of a baseline scored alongside the trials, so all of this would
  have to live in the objective function anyway, leaving Optuna only the bookkeeping of rungs.
* Optuna's (experimental) WilcoxonPruner does pair values by item id, but tests a running trial
  against the current best trial, which must already have been scored on those items, and prunes
  on a p-value looked at after every item; it neither scores a baseline nor keeps a common item
  set per rung, and it needs SciPy.
* Its samplers (TPE, CMA-ES, GP), Optuna's main strength, model a parameter space to propose new
  points; a finite list of plan strings scored exhaustively at rung 0 gives them nothing to do
  (GridSampler would just enumerate it).
* It would keep its own trial storage beside our SQLite cache and bring SQLAlchemy, Alembic and
  friends, for logic that fits in a page here.

Hyperband's hedge over the starting size n0 is the one idea not reproduced; n0 is instead a
setting chosen for the noise level of a benchmark (32 items per task by default).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Literal

from .stats import Comparison, compare, holm

BASELINE = "none"
"""The key under which the unlooped model is scored."""

POOLED = "(all tasks)"
"""The task name of a verdict's comparison on the held-out items of all tasks together."""

ScoreFn = Callable[[Hashable, str, list[str]], Mapping[str, int]]
"""score(candidate or baseline, task, item ids) -> {item id: 1 if answered correctly else 0}."""

MarginFn = Callable[[Hashable, str, list[str]], Mapping[str, float]]
"""margin(candidate or baseline, task, item ids) -> {item id: the correct choice's log-likelihood minus the
best wrong one's}, asked only for items ``score`` has already been asked for (the margin comes with the
same evaluation, so it costs nothing more)."""

Statistic = Literal["accuracy", "margin"]
"""What the search rungs rank candidates by (the verdict is always on accuracy): the paired difference
against the baseline of per-item accuracy (0/1), or of the per-item margin."""

PrefetchFn = Callable[[list[tuple[Hashable, str, list[str]]]], None]
"""prefetch([(candidate or baseline, task, item ids), ...]): optional, told before each rung everything
the rung will ask ``score`` for, so a caller can score it all at once (in parallel); ``score`` is then
called as without it."""

StopReason = Literal["narrowed", "exhausted", "budget", "time", "grid"]

GoOnFn = Callable[["RungPlan", int], bool]
"""go_on(next rung, item evaluations so far) -> whether to start that rung: asked before every rung
after the first (``tune --time-limit`` answers from the clock); False ends the search there."""


# --- 1. the held-out split ---------------------------------------------------------------------


def _unit(*key: object) -> float:
    """A number in [0, 1) fixed by key: sha256, so the same in every process and Python version."""
    digest = hashlib.sha256(json.dumps(key, ensure_ascii=False).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class SplitConfig:
    """How items are split: ``search_fraction`` of each task's items (in expectation) go to the search."""

    seed: int = 0
    search_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.search_fraction < 1.0:
            raise ValueError(f"search_fraction must lie strictly between 0 and 1, not {self.search_fraction}")


@dataclass(frozen=True)
class TaskSplit:
    """One task's items, as the search part and the held-out part (each sorted by item id)."""

    task: str
    search: tuple[str, ...]
    heldout: tuple[str, ...]

    @property
    def fewshot_pool(self) -> frozenset[str]:
        """The items few-shot examples may be drawn from: the search items only, so no held-out
        item ever appears in the prompt of another item."""
        return frozenset(self.search)


def split_task(task: str, item_ids: Iterable[str], config: SplitConfig = SplitConfig()) -> TaskSplit:
    """Split one task's items; an item's side depends only on (seed, task, item id).

    So the split is the same whatever the order or the subset of items it is given, in every
    process, and an item keeps its side when the task gains items.
    """
    ids = list(item_ids)
    if len(set(ids)) != len(ids):
        raise ValueError(f"{task}: duplicate item ids")
    if not all(isinstance(i, str) for i in ids):
        raise TypeError(f"{task}: item ids must be strings")
    search, heldout = [], []
    for i in sorted(ids):
        (search if _unit("split", config.seed, task, i) < config.search_fraction else heldout).append(i)
    return TaskSplit(task, tuple(search), tuple(heldout))


def split_tasks(tasks: Mapping[str, Iterable[str]], config: SplitConfig = SplitConfig()) -> dict[str, TaskSplit]:
    """``split_task`` for every task: task name -> its split."""
    return {t: split_task(t, ids, config) for t, ids in tasks.items()}


def search_ids(splits: Mapping[str, TaskSplit]) -> dict[str, tuple[str, ...]]:
    """task -> its search items: the ``search_items`` argument of the search functions."""
    return {t: s.search for t, s in splits.items()}


def heldout_ids(splits: Mapping[str, TaskSplit]) -> dict[str, tuple[str, ...]]:
    """task -> its held-out items: the items to score the baseline and the finalists on for ``verdict``."""
    return {t: s.heldout for t, s in splits.items()}


# --- 2. the search -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HalvingConfig:
    """Successive halving's settings.

    n0: search items per task at rung 0 (fewer where a task has fewer).
    eta: of a rung's c candidates, the best ceil(c / eta) (at least top_k) go on, to eta times more items.
    top_k: how many finalists the search hands to the verdict; it stops once no more are left.
    budget: the most item evaluations the search may use, counting every (candidate, item) pair
        scored and the baseline's items too, whether or not the caller had them cached; a rung
        that would exceed it is not started. None: no limit.
    seed: seeds the order in which search items are used (independent of the split's seed).
    rank: the statistic the rungs rank by (``Statistic``); "margin" needs a ``margin`` function.
    """

    n0: int = 32
    eta: int = 3
    top_k: int = 1
    budget: int | None = None
    seed: int = 0
    rank: Statistic = "accuracy"

    def __post_init__(self) -> None:
        if self.n0 < 1 or self.eta < 2 or self.top_k < 1:
            raise ValueError("HalvingConfig needs n0 >= 1, eta >= 2 and top_k >= 1")
        if self.budget is not None and self.budget < 0:
            raise ValueError("budget must be >= 0")
        if self.rank not in ("accuracy", "margin"):
            raise ValueError(f"rank is accuracy or margin, not {self.rank!r}")


@dataclass(frozen=True)
class RungPlan:
    """One planned rung: how many candidates, how many items per task (cumulative), and the cost.

    evaluations: the new item evaluations of the rung, baseline included.
    keep: the candidates promoted to the next rung; on the last rung, the finalists.
    """

    index: int
    candidates: int
    items: Mapping[str, int]
    evaluations: int
    keep: int


@dataclass(frozen=True)
class Schedule:
    """The whole search planned before anything is scored: its rungs, why it ends, and its cost."""

    rungs: tuple[RungPlan, ...]
    stop_reason: StopReason
    evaluations: int


def halving_schedule(
    n_candidates: int, task_sizes: Mapping[str, int], config: HalvingConfig = HalvingConfig()
) -> Schedule:
    """The rungs successive halving will run on n_candidates and tasks of these search sizes.

    The number of survivors of each rung does not depend on the scores, so the schedule, and with
    it the exact number of item evaluations, is known in advance. Rung r scores every survivor on
    the first min(n0 * eta**r, size) items of each task; the search stops after the rung that
    leaves top_k candidates ("narrowed"), after the rung that uses every search item
    ("exhausted"), or before a rung that would exceed the budget ("budget").
    """
    sizes = dict(task_sizes)
    if n_candidates < 1:
        raise ValueError("the search needs at least one candidate")
    if not sizes or min(sizes.values()) < 1:
        raise ValueError("the search needs at least one task, and search items in every task")
    rungs: list[RungPlan] = []
    alive, used, prev = n_candidates, 0, {t: 0 for t in sizes}
    reason: StopReason
    for r in itertools.count():
        items = {t: min(config.n0 * config.eta**r, n) for t, n in sizes.items()}
        cost = (alive + 1) * sum(items[t] - prev[t] for t in sizes)
        if config.budget is not None and used + cost > config.budget:
            if not rungs:
                raise ValueError(
                    f"a budget of {config.budget} item evaluations cannot pay for rung 0, which needs {cost}"
                )
            last = rungs.pop()
            rungs.append(
                RungPlan(last.index, last.candidates, last.items, last.evaluations, min(config.top_k, last.candidates))
            )
            reason = "budget"
            break
        used += cost
        keep = min(alive, max(config.top_k, -(-alive // config.eta)))
        if keep <= config.top_k:
            reason = "narrowed"
        elif items == sizes:
            keep, reason = min(config.top_k, alive), "exhausted"
        rungs.append(RungPlan(r, alive, items, cost, keep))
        if keep <= config.top_k:
            break
        alive, prev = keep, items
    return Schedule(tuple(rungs), reason, used)


class TimeLimit:
    """A ``go_on`` that keeps the search within ``seconds`` of its creation: a rung is started only
    if, at the pace of the search so far (seconds per item evaluation, items found in the results
    store included), it would end in time. ``clock`` is for tests."""

    def __init__(self, seconds: float, clock: Callable[[], float] | None = None) -> None:
        if not seconds > 0:
            raise ValueError(f"a time limit must be positive, not {seconds}")
        self.seconds = seconds
        self.clock = clock or time.monotonic
        self.start = self.clock()

    def __call__(self, rung: RungPlan, done: int) -> bool:
        elapsed = self.clock() - self.start
        pace = elapsed / done if done else 0.0
        return elapsed + pace * rung.evaluations <= self.seconds


def grid_evaluations(n_candidates: int, task_sizes: Mapping[str, int]) -> int:
    """Item evaluations of ``full_grid``: every candidate and the baseline on every search item."""
    return (n_candidates + 1) * sum(task_sizes.values())


@dataclass(frozen=True)
class TaskScore:
    """A candidate against the baseline on the first n search items of one task."""

    task: str
    n: int
    acc: float
    base_acc: float
    diff: float


@dataclass(frozen=True)
class RungScore:
    """A candidate at one rung: n items over all tasks; acc, base_acc and diff macro-averaged over tasks;
    margin_diff: the paired difference of the per-item margin, macro-averaged (None unless ranked by it)."""

    rung: int
    n: int
    acc: float
    base_acc: float
    diff: float
    tasks: tuple[TaskScore, ...]
    margin_diff: float | None = None


@dataclass(frozen=True)
class Rung:
    """A rung as it ran: its candidates best first, those it kept, and the evaluations it used."""

    index: int
    items: Mapping[str, int]
    candidates: tuple[Hashable, ...]
    kept: tuple[Hashable, ...]
    evaluations: int


@dataclass(frozen=True)
class SearchResult:
    """What a search found.

    scores: candidate -> its score at each rung it reached.
    ranking: every candidate, those that reached a later rung first, then by their score there
        (ties keep the order the candidates were given in).
    finalists: the first top_k of the ranking: the plans to judge on held-out items.
    evaluations: item evaluations used, baseline included.
    """

    method: Literal["successive_halving", "grid"]
    baseline: Hashable
    rungs: tuple[Rung, ...]
    scores: Mapping[Hashable, tuple[RungScore, ...]]
    ranking: tuple[Hashable, ...]
    finalists: tuple[Hashable, ...]
    evaluations: int
    stop_reason: StopReason

    @property
    def best(self) -> Hashable:
        return self.ranking[0]

    def final_score(self, candidate: Hashable) -> RungScore:
        """The candidate's score on the most items it was scored on."""
        return self.scores[candidate][-1]


@dataclass
class _Ledger:
    """Every (key, task, item) scored in this run: asks the caller only for what it lacks, in one batch.
    binary: the values are accuracies (0 or 1), else finite margins."""

    score: ScoreFn | MarginFn
    binary: bool = True
    seen: dict[tuple[Hashable, str], dict[str, float]] = field(default_factory=dict)
    evaluations: int = 0

    def missing(self, key: Hashable, task: str, ids: Sequence[str]) -> list[str]:
        have = self.seen.get((key, task), {})
        return [i for i in ids if i not in have]

    def ensure(self, key: Hashable, task: str, ids: Sequence[str]) -> list:
        have = self.seen.setdefault((key, task), {})
        missing = self.missing(key, task, ids)
        if missing:
            got = self.score(key, task, list(missing))
            for i in missing:
                if i not in got:
                    raise ValueError(f"score({key!r}, {task!r}, ...) returned no result for item {i!r}")
                have[i] = self._value(key, task, i, got[i])
            self.evaluations += len(missing)
        return [have[i] for i in ids]

    def _value(self, key: Hashable, task: str, item: str, value: object) -> float:
        if self.binary:
            if value not in (0, 1):
                raise ValueError(f"score({key!r}, {task!r}, ...) returned {value!r} for {item!r}; want 0 or 1")
            return int(value)  # type: ignore[call-overload]
        v = float(value)  # type: ignore[arg-type]
        if not math.isfinite(v):
            raise ValueError(f"margin({key!r}, {task!r}, ...) returned {value!r} for {item!r}; want a finite number")
        return v


def _order(task: str, ids: Iterable[str], seed: int) -> tuple[str, ...]:
    """The task's search items in a seeded order fixed by sha256 (not by the order given)."""
    ids = sorted(set(ids))
    return tuple(sorted(ids, key=lambda i: (_unit("order", seed, task, i), i)))


def _run(
    method: Literal["successive_halving", "grid"],
    candidates: Iterable[Hashable],
    orders: Mapping[str, Sequence[str]],
    score: ScoreFn,
    schedule: Schedule,
    baseline: Hashable,
    prefetch: PrefetchFn | None = None,
    go_on: GoOnFn | None = None,
    top_k: int = 1,
    margin: MarginFn | None = None,
) -> SearchResult:
    cands = list(candidates)
    if len(set(cands)) != len(cands):
        raise ValueError("candidates must be distinct")
    if baseline in cands:
        raise ValueError(f"the baseline {baseline!r} is scored anyway; it must not be a candidate")
    position = {c: k for k, c in enumerate(cands)}
    ledger = _Ledger(score)
    margins = _Ledger(margin, binary=False) if margin is not None else None  # no evaluations of its own
    scores: dict[Hashable, list[RungScore]] = {c: [] for c in cands}
    reached = {c: 0 for c in cands}
    key: dict[Hashable, Fraction] = {}
    rungs: list[Rung] = []
    alive = cands
    stop_reason = schedule.stop_reason
    for plan in schedule.rungs:
        if rungs and go_on is not None and not go_on(plan, ledger.evaluations):
            rungs[-1] = replace(rungs[-1], kept=rungs[-1].candidates[:top_k])
            stop_reason = "time"
            break
        before = ledger.evaluations
        items = {t: list(orders[t][: plan.items[t]]) for t in orders}
        if prefetch:
            asked = [(k, t, ledger.missing(k, t, ids)) for k in (baseline, *alive) for t, ids in items.items()]
            prefetch([a for a in asked if a[2]])
        base = {t: ledger.ensure(baseline, t, ids) for t, ids in items.items()}
        base_margin = {t: margins.ensure(baseline, t, ids) for t, ids in items.items()} if margins else {}
        for c in alive:  # one candidate at a time, all its tasks: the caller switches plans least often
            per_task, exact, margin_sum = [], Fraction(0), Fraction(0)
            for t, ids in items.items():
                got, n = ledger.ensure(c, t, ids), len(ids)
                a, b = sum(got), sum(base[t])
                per_task.append(TaskScore(t, n, a / n, b / n, (a - b) / n))
                exact += Fraction(a - b, n)
                if margins:  # exact in Fraction too, so the ranking does not depend on summation order
                    mine = margins.ensure(c, t, ids)
                    margin_sum += (
                        sum((Fraction(x) - Fraction(y) for x, y in zip(mine, base_margin[t])), Fraction(0)) / n
                    )
            m = len(per_task)
            scores[c].append(
                RungScore(
                    plan.index,
                    sum(s.n for s in per_task),
                    sum(s.acc for s in per_task) / m,
                    sum(s.base_acc for s in per_task) / m,
                    float(exact / m),
                    tuple(per_task),
                    float(margin_sum / m) if margins else None,
                )
            )
            key[c], reached[c] = (margin_sum if margins else exact), plan.index
        ranked = sorted(alive, key=lambda c: (-key[c], position[c]))
        rungs.append(
            Rung(plan.index, dict(plan.items), tuple(ranked), tuple(ranked[: plan.keep]), ledger.evaluations - before)
        )
        alive = ranked[: plan.keep]
    assert stop_reason == "time" or ledger.evaluations == schedule.evaluations
    ranking = tuple(sorted(cands, key=lambda c: (-reached[c], -key[c], position[c])))
    return SearchResult(
        method,
        baseline,
        tuple(rungs),
        {c: tuple(s) for c, s in scores.items()},
        ranking,
        ranking[: len(rungs[-1].kept)],
        ledger.evaluations,
        stop_reason,
    )


def successive_halving(
    candidates: Iterable[Hashable],
    search_items: Mapping[str, Iterable[str]],
    score: ScoreFn,
    config: HalvingConfig = HalvingConfig(),
    baseline: Hashable = BASELINE,
    prefetch: PrefetchFn | None = None,
    go_on: GoOnFn | None = None,
    margin: MarginFn | None = None,
) -> SearchResult:
    """Narrow candidates down to ``config.top_k`` finalists by successive halving on the search items.

    Each rung scores the baseline and its candidates on the first items of every task's search
    items in one fixed seeded order, so a rung's items extend the previous rung's and earlier
    scores are reused; ``score`` is called once per (key, task, rung) with only the new items and
    is never asked for the same (key, task, item) twice. Candidates are ranked by their paired
    difference against the baseline on the rung's items, macro-averaged over tasks, of accuracy or,
    with ``config.rank`` "margin", of the per-item margin (``margin`` gives it); ties go to the
    candidate given first. The plan of the run is ``halving_schedule``, unless
    ``go_on`` declines a rung: the search then ends with the best ``top_k`` of the last rung it ran
    (stop reason "time"), as when the budget ends it.
    """
    orders = {t: _order(t, ids, config.seed) for t, ids in search_items.items()}
    cands = list(candidates)
    schedule = halving_schedule(len(cands), {t: len(o) for t, o in orders.items()}, config)
    return _run(
        "successive_halving", cands, orders, score, schedule, baseline, prefetch, go_on, config.top_k,
        _margin_for(config.rank, margin),
    )  # fmt: skip


def _margin_for(rank: Statistic, margin: MarginFn | None) -> MarginFn | None:
    if rank == "margin" and margin is None:
        raise ValueError("ranking by margin needs a margin function")
    return margin if rank == "margin" else None


def full_grid(
    candidates: Iterable[Hashable],
    search_items: Mapping[str, Iterable[str]],
    score: ScoreFn,
    top_k: int = 1,
    baseline: Hashable = BASELINE,
    prefetch: PrefetchFn | None = None,
    rank: Statistic = "accuracy",
    margin: MarginFn | None = None,
) -> SearchResult:
    """Every candidate and the baseline on every search item: one rung, ranked like successive halving.

    Uses ``grid_evaluations`` item evaluations; the reference that successive halving saves on.
    """
    if top_k < 1:
        raise ValueError("top_k must be >= 1")
    orders = {t: tuple(sorted(set(ids))) for t, ids in search_items.items()}
    cands = list(candidates)
    sizes = {t: len(o) for t, o in orders.items()}
    if not cands or not sizes or min(sizes.values()) < 1:
        raise ValueError("the grid needs candidates, tasks, and search items in every task")
    cost = grid_evaluations(len(cands), sizes)
    schedule = Schedule((RungPlan(0, len(cands), sizes, cost, min(top_k, len(cands))),), "grid", cost)
    return _run("grid", cands, orders, score, schedule, baseline, prefetch, margin=_margin_for(rank, margin))


# --- 3. the verdict ----------------------------------------------------------------------------


@dataclass(frozen=True)
class VerdictRow:
    """One finalist against the baseline on the held-out items of one task, or of all (``POOLED``).

    comparison: difference, 95 % paired bootstrap interval (not adjusted) and exact McNemar p.
    p_adjusted: the McNemar p-value Holm-adjusted over every row of the verdict.
    gain / loss: significantly better / worse than the baseline (p_adjusted < alpha).
    """

    plan: Hashable
    task: str
    comparison: Comparison
    p_adjusted: float
    gain: bool
    loss: bool


@dataclass(frozen=True)
class Verdict:
    """Whether any finalist beats the unlooped model on the held-out items.

    One family of comparisons is adjusted together (``correction``, Holm's step-down method):
    every finalist on every task and, with more than one task, on all tasks pooled (micro-average
    over the pooled held-out items). So the chance that the verdict claims any gain or loss that
    is not real is at most alpha.

    task_winners: per task, the finalist with the largest difference among those significantly
        better than the baseline on that task; None when there is none.
    winner: the finalist with the largest pooled difference among those significantly better
        than the baseline on the pooled held-out items (with one task: on that task); None means
        no plan beats the unlooped model.
    """

    alpha: float
    correction: str
    rows: tuple[VerdictRow, ...]
    task_winners: Mapping[str, Hashable | None]
    winner: Hashable | None

    @property
    def beats_baseline(self) -> bool:
        return self.winner is not None

    @property
    def family_size(self) -> int:
        return len(self.rows)

    def row(self, plan: Hashable, task: str = POOLED) -> VerdictRow:
        """The row of plan on task; ``POOLED`` on a single task is that task's row."""
        tasks = {r.task for r in self.rows}
        if task == POOLED and POOLED not in tasks and len(tasks) == 1:
            task = next(iter(tasks))
        for r in self.rows:
            if r.plan == plan and r.task == task:
                return r
        raise KeyError((plan, task))


def verdict(
    baseline: Mapping[str, Mapping[str, int]],
    finalists: Mapping[Hashable, Mapping[str, Mapping[str, int]]],
    alpha: float = 0.05,
    splits: Mapping[str, TaskSplit] | None = None,
) -> Verdict:
    """Judge the finalists against the baseline on held-out items only.

    baseline: task -> {held-out item id: correct}; finalists: plan -> the same for that plan, on
    exactly the same items. Given ``splits``, the items of each task must be exactly its held-out
    part, so no search item can leak into the verdict. Finalists are given best first; a tie
    between winners goes to the one given first.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must lie strictly between 0 and 1")
    tasks = list(baseline)
    if not tasks or not finalists:
        raise ValueError("the verdict needs tasks and finalists")
    if POOLED in tasks:
        raise ValueError(f"{POOLED!r} is reserved for the pooled comparison")
    ids = {t: sorted(baseline[t]) for t in tasks}
    for t in tasks:
        if not ids[t]:
            raise ValueError(f"{t}: no held-out items")
        if splits is not None and set(ids[t]) != set(splits[t].heldout):
            raise ValueError(f"{t}: the verdict's items are not exactly the task's held-out items")
    for plan, per_task in finalists.items():
        if set(per_task) != set(tasks) or any(set(per_task[t]) != set(ids[t]) for t in tasks):
            raise ValueError(f"{plan!r} was not scored on the same held-out items as the baseline")

    raw: list[tuple[Hashable, str, Comparison]] = []
    for plan, per_task in finalists.items():
        b_all: list[int] = []
        p_all: list[int] = []
        for t in tasks:
            b = [int(baseline[t][i]) for i in ids[t]]
            p = [int(per_task[t][i]) for i in ids[t]]
            raw.append((plan, t, compare(b, p)))
            b_all += b
            p_all += p
        if len(tasks) > 1:
            raw.append((plan, POOLED, compare(b_all, p_all)))
    adjusted = holm([c.p_value for _, _, c in raw])
    rows = tuple(
        VerdictRow(plan, t, c, pa, pa < alpha and c.diff > 0, pa < alpha and c.diff < 0)
        for (plan, t, c), pa in zip(raw, adjusted)
    )

    def best(candidates: list[VerdictRow]) -> Hashable | None:
        gains = [r for r in candidates if r.gain]
        return max(gains, key=lambda r: r.comparison.diff).plan if gains else None  # max keeps the first of ties

    overall = POOLED if len(tasks) > 1 else tasks[0]
    return Verdict(
        alpha,
        "holm",
        rows,
        {t: best([r for r in rows if r.task == t]) for t in tasks},
        best([r for r in rows if r.task == overall]),
    )
