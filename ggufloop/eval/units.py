"""The unit of evaluation: its results key and the one loop that scores its items into the store.

A unit is one (model, task, shots, prompt format, plan): the rows of its items are stored under
this key, whichever executor scores them (this process, worker processes, a Ray cluster:
``executors``). Every executor asks ``unit_for`` for the key and ``score_rows`` for the rows, so
they cannot disagree about either (they once did: the Ray driver keyed units without the shot
count). A ``Request`` is what callers (eval, sweep, tune) ask an executor to score.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..plan import LoopPlan
from .scoring import Scorer, accuracy
from .store import Row, Store, Unit
from .tasks import FewshotPool, Item, Task

CHUNK_ITEMS = 16
"""Items scored per call, locally and per Ray task alike, so every executor's log-likelihoods are equal."""

Rows = dict[str, tuple[int, int]]
"""A unit's results: item -> (correct, correct under acc_norm)."""
Progress = Callable[[int], None]


@dataclass(frozen=True)
class Request:
    """Items of one (plan, task) to have scored: the task's first ``limit`` items (``ids``: only
    those, in that order), with ``shots`` few-shot examples drawn from ``pool`` (see Task.items)."""

    plan: str
    task: str
    shots: int | None = None
    limit: int | None = None
    ids: tuple[str, ...] | None = None
    pool: FewshotPool | None = None


def unit_for(
    model_sha: str, task: Task, shots: int | None, plan: LoopPlan | str | None, pool: FewshotPool | None
) -> Unit:
    """The key of a task's rows for a model file (sha256) and plan, with ``shots`` few-shot examples
    (None: the task's default) drawn from ``pool`` (None: the task's own source)."""
    shots = task.default_shots if shots is None else shots
    return Unit(model_sha, task.name, shots, task.prompt_key(pool, shots), str(LoopPlan.parse(plan)))


def request_items(task: Task, unit: Unit, request: Request) -> list[Item]:
    """The items a request asks for, in its order."""
    items = task.items(unit.shots, request.limit, pool=request.pool)
    if request.ids is None:
        return items
    by_id = {it.id: it for it in items}
    return [by_id[i] for i in request.ids]


def score_rows(scorer: Scorer, items: list[Item]) -> list[Row]:
    """The rows of items under the scorer's current plan: every choice's log-likelihood and the accuracies."""
    return [Row(it.id, ll, it.gold, *accuracy(it, ll)) for it, ll in zip(items, scorer.score(items))]


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def run_unit(
    scorer: Scorer,
    store: Store,
    model_sha: str,
    task: Task,
    shots: int | None,
    limit: int | None,
    progress: Progress | None = None,
    ids: list[str] | None = None,
    pool: FewshotPool | None = None,
) -> Rows:
    """Score one (plan, task) unit under the scorer's plan, skipping what the store has, CHUNK_ITEMS at a
    time; returns item -> (correct, correct_norm).

    ``ids`` restricts the unit to those items (in that order); ``pool`` restricts where few-shot
    examples come from (see Task.items)."""
    unit = unit_for(model_sha, task, shots, scorer.plan, pool)
    request = Request(str(scorer.plan), task.name, unit.shots, limit, tuple(ids) if ids is not None else None, pool)
    items = request_items(task, unit, request)
    done = store.done(unit)
    todo = [it for it in items if it.id not in done]
    if progress and len(items) > len(todo):
        progress(len(items) - len(todo))
    for chunk in _chunks(todo, CHUNK_ITEMS):
        store.add(unit, score_rows(scorer, chunk))
        if progress:
            progress(len(chunk))
    rows = store.rows(unit)
    return {it.id: rows[it.id] for it in items}
