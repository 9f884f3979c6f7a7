"""Which plan helps a model? The plan search behind ``ggufloop tune``, on real scoring.

``tune`` splits every task's items into a search part and a held-out part (``search.split_tasks``),
narrows the candidate plans down by successive halving on the search items, paired against the
unlooped model (``search.successive_halving``), and judges the finalists on the held-out items
only (``search.verdict``). Few-shot examples come from search items only. Every scored item goes
to the results store, keyed by its prompt format (which names the split), so a killed run
resumes and nothing is scored twice, across runs and across tune, eval and sweep alike.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import PlanError, TaskError
from ..plan import LoopPlan, Mix
from . import search
from .executors import Executor, open_executor
from .store import Store
from .sweep import block_ranges
from .tasks import FewshotPool, Task, resolve_tasks
from .units import Request, unit_for

if TYPE_CHECKING:
    from .prefix import PrefixConfig
    from .ray_executor import ClusterConfig


@dataclass(frozen=True)
class Candidates:
    """The plans a search considers: every block (s, e) in the start and size windows, at every
    count, under every mix. Windows are FIRST:END in slice semantics; None takes the default,
    the middle half of the stack for starts and 2 to a sixth of the layers (at least 3) for sizes."""

    starts: str | None = None
    sizes: str | None = None
    counts: tuple[int, ...] = (2, 3)
    mixes: tuple[str, ...] = ("none", "uniform", "ema", "autoalign")

    def plans(self, n_layer: int) -> list[str]:
        starts = self.starts or f"{n_layer // 4}:{max(n_layer // 4 + 1, (3 * n_layer) // 4)}"
        sizes = self.sizes or f"2:{max(4, n_layer // 6 + 1)}"
        mixes = [Mix.parse(m) for m in self.mixes]
        if any(k < 2 for k in self.counts):
            raise PlanError("loop counts of the search must be >= 2 (1 is the unlooped model, always the baseline)")
        out = [
            str(LoopPlan(s, e, k, mix=mix))
            for s, e in block_ranges(n_layer, starts, sizes)
            for k in self.counts
            for mix in mixes
        ]
        for plan in out:
            LoopPlan.parse(plan).validate(n_layer)
        if not out:
            raise PlanError(
                f"no candidate plan: the windows --starts {starts} --sizes {sizes} hold no block of a "
                f"{n_layer}-layer model"
            )
        return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Prefilter:
    """A first stage on cheap tasks (multiple-choice): successive halving over every candidate on their
    search items keeps the best ``keep``, and only those go on to the main search (a generative task,
    whose items cost hundreds of times more). Its items are split like the main tasks', and the verdict
    never looks at them."""

    tasks: tuple[Task, ...]
    keep: int = 8
    halving: search.HalvingConfig = search.HalvingConfig()
    shots: int | None = None  # its few-shot examples; None: the run's (tune's ``shots``)


@dataclass(frozen=True)
class PrefilterResult:
    tasks: list[str]
    setup: Setup
    result: search.SearchResult

    def to_json(self) -> dict:
        r = self.result
        return {
            "tasks": self.tasks,
            "shots": self.setup.shots,
            "candidates": len(self.setup.plans),
            "kept": list(r.finalists),
            "evaluations": r.evaluations,
            "grid_evaluations": self.setup.grid_evaluations,
            "stop_reason": r.stop_reason,
        }


@dataclass
class TuneResult:
    model: str
    tasks: list[str]
    shots: dict[str, int]
    split: search.SplitConfig
    halving: search.HalvingConfig
    splits: dict[str, search.TaskSplit]
    candidates: list[str]
    result: search.SearchResult
    grid_evaluations: int
    verdict: search.Verdict
    heldout_acc: dict[str, dict[str, float]]  # plan ("none" too) -> task -> accuracy on held-out items
    time_limit: float | None = None  # seconds the search was allowed, if limited
    prefilter: PrefilterResult | None = None  # the first stage, when there was one

    def to_json(self) -> dict:
        """Everything a reader needs to check the run: the split, every candidate's search scores,
        the winner (or null) and the held-out comparisons."""

        def cmp(row: search.VerdictRow) -> dict:
            c = row.comparison
            return {
                "plan": row.plan,
                "task": row.task,
                "n": c.n,
                "base_acc": c.base_acc,
                "plan_acc": c.plan_acc,
                "diff": c.diff,
                "ci_low": c.ci_low,
                "ci_high": c.ci_high,
                "p_mcnemar": c.p_value,
                "p_holm": row.p_adjusted,
                "gain": row.gain,
                "loss": row.loss,
            }

        return {
            "model": self.model,
            "tasks": self.tasks,
            "shots": self.shots,
            "prefilter": self.prefilter.to_json() if self.prefilter else None,
            "split": {
                "seed": self.split.seed,
                "search_fraction": self.split.search_fraction,
                "items": {t: {"search": list(s.search), "heldout": list(s.heldout)} for t, s in self.splits.items()},
            },
            "search": {
                "method": self.result.method,
                "n0": self.halving.n0,
                "eta": self.halving.eta,
                "top_k": self.halving.top_k,
                "budget": self.halving.budget,
                "time_limit_s": self.time_limit,
                "seed": self.halving.seed,
                "rank": self.halving.rank,
                "stop_reason": self.result.stop_reason,
                "evaluations": self.result.evaluations,
                "grid_evaluations": self.grid_evaluations,
                "candidates": len(self.candidates),
                "rungs": [
                    {
                        "index": r.index,
                        "items": dict(r.items),
                        "candidates": len(r.candidates),
                        "kept": list(r.kept),
                        "evaluations": r.evaluations,
                    }
                    for r in self.result.rungs
                ],
                "scores": {
                    c: [
                        {
                            "rung": s.rung,
                            "n": s.n,
                            "acc": s.acc,
                            "base_acc": s.base_acc,
                            "diff": s.diff,
                            **({} if s.margin_diff is None else {"margin_diff": s.margin_diff}),
                        }
                        for s in self.result.scores[c]
                    ]
                    for c in self.result.scores
                },
                "ranking": list(self.result.ranking),
                "finalists": list(self.result.finalists),
            },
            "verdict": {
                "alpha": self.verdict.alpha,
                "correction": self.verdict.correction,
                "winner": self.verdict.winner,
                "task_winners": dict(self.verdict.task_winners),
                "comparisons": [cmp(r) for r in self.verdict.rows],
            },
        }


@dataclass(frozen=True)
class Setup:
    """A tune run planned before anything is scored: its candidates, split, and total cost."""

    plans: list[str]
    splits: dict[str, search.TaskSplit]
    pools: dict[str, FewshotPool]
    search_evaluations: int
    grid_evaluations: int
    evaluations: int  # in all: the search, then the baseline and the finalists on the held-out items
    schedule: search.Schedule | None = None  # successive halving's rungs (None for the grid)
    prefilter: Setup | None = None  # the first stage's own setup; then the main search has its keep candidates
    halving: search.HalvingConfig | None = None  # the settings it was prepared with (kept for a prefilter's)
    shots: int | None = None  # a prefilter stage's own few-shot examples (None: the run's)


def prepare(
    model: str | Path,
    tasks: list[Task],
    candidates: Candidates,
    *,
    limit: int | None = None,
    split: search.SplitConfig = search.SplitConfig(),
    halving: search.HalvingConfig = search.HalvingConfig(),
    grid: bool = False,
    prefilter: Prefilter | None = None,
) -> Setup:
    """The candidates, the split of every task's items (the first ``limit`` of each, when given)
    and the number of item evaluations of the run; raises PlanError/TaskError on bad settings.
    With a prefilter, the main search's cost is that of its ``keep`` survivors."""
    from ..gguf_io import model_info

    plans = candidates.plans(model_info(model).n_layer)
    first = None
    if prefilter is not None:
        keep = replace(prefilter.halving, top_k=min(prefilter.keep, len(plans)))
        first = prepare(model, list(prefilter.tasks), candidates, limit=limit, split=split, halving=keep)
        first = replace(first, shots=prefilter.shots)
        n_main = min(prefilter.keep, len(plans))
    else:
        n_main = len(plans)
    ids = {t.name: [ex.id for ex in (t.examples()[:limit] if limit else t.examples())] for t in tasks}
    try:
        splits = search.split_tasks(ids, split)
        for t, sp in splits.items():
            if not sp.search or not sp.heldout:
                raise TaskError(f"{t}: {len(ids[t])} items are too few to split into search and held-out parts")
        sizes = {t: len(sp.search) for t, sp in splits.items()}
        grid_n = search.grid_evaluations(len(plans), sizes)
        schedule = None
        if grid:
            n, finalists = search.grid_evaluations(n_main, sizes), min(halving.top_k, n_main)
        else:
            schedule = search.halving_schedule(n_main, sizes, halving)
            n, finalists = schedule.evaluations, schedule.rungs[-1].keep
    except ValueError as err:
        raise PlanError(str(err)) from None
    pools = {
        t: FewshotPool(f"split:{split.seed}:{split.search_fraction:g}", sp.fewshot_pool) for t, sp in splits.items()
    }
    total = (
        n
        + (1 + finalists) * sum(len(sp.heldout) for sp in splits.values())
        + (first.search_evaluations if first else 0)
    )
    return Setup(plans, splits, pools, n, grid_n, total, schedule, first, halving)


def tune(
    model: str | Path,
    tasks: list[Task],
    setup: Setup,
    *,
    shots: int | None = None,
    limit: int | None = None,
    halving: search.HalvingConfig = search.HalvingConfig(),
    split: search.SplitConfig = search.SplitConfig(),
    grid: bool = False,
    db: str | Path | None = None,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
    cluster: ClusterConfig | None = None,
    time_limit: float | None = None,
    executor: Executor | None = None,
    prefix: PrefixConfig | None = None,
) -> TuneResult:
    """Search setup's candidates on the search items, then judge the finalists on the held-out items.

    The settings must be those ``setup`` was prepared with. grid: score every candidate on every
    search item instead of successive halving (the cost reference). progress(n) is called as
    items are scored or found in the store. cluster: score on that Ray cluster, every rung's
    candidates at once, instead of in this process one candidate after another. time_limit:
    seconds from now within which the search must end (``search.TimeLimit``: a rung that would
    not end in time at the pace so far is not started); the held-out scoring comes after it.
    executor: what scores the main tasks (a GenerativeExecutor for gsm8k; it is closed here), made
    by ``executor_for`` on the same store. With ``setup.prefilter``, its tasks run first, on
    the local or cluster executor, and only its survivors are searched. prefix: prefix reuse's settings
    (``prefix``; None: off), for the multiple-choice scoring.
    """
    go_on = search.TimeLimit(time_limit) if time_limit else None
    store = Store(db) if db else Store()
    store.check_writable()
    sha = store.model_sha(model)
    first = None
    plans = setup.plans
    if setup.prefilter is not None:
        own = setup.prefilter.shots
        first = _prefilter(
            model, store, sha, setup.prefilter, shots if own is None else own, limit, threads, cluster, progress, go_on
        )
        plans = list(first.result.finalists)
    if executor is None:
        executor = open_executor(model, store, sha, threads, cluster, prefix=prefix)

    def request(plan: Hashable, task: str, item_ids: list[str]) -> Request:
        return Request(str(plan), task, shots, limit, tuple(item_ids), setup.pools[task])

    def score(plan: Hashable, task: str, item_ids: list[str]) -> Mapping[str, int]:
        rows = executor.run([request(plan, task, item_ids)], progress)[0]
        return {i: rows[i][0] for i in item_ids}

    def prefetch(asked: list[tuple[Hashable, str, list[str]]]) -> None:
        executor.run([request(*a) for a in asked], progress)

    batch = prefetch if cluster else None  # one process scores one plan at a time: no gain from batching
    margin = _margins(store, sha, list(setup.splits), shots, setup.pools) if halving.rank == "margin" else None
    try:
        search_items = search.search_ids(setup.splits)
        if grid:
            result = search.full_grid(
                plans, search_items, score, top_k=halving.top_k, prefetch=batch, rank=halving.rank, margin=margin
            )
        else:
            result = search.successive_halving(
                plans, search_items, score, halving, prefetch=batch, go_on=go_on, margin=margin
            )
        held = search.heldout_ids(setup.splits)
        finalists = (search.BASELINE, *result.finalists)
        if batch:
            batch([(p, t, list(held[t])) for p in finalists for t in held])
        scored = {p: {t: score(p, t, list(held[t])) for t in held} for p in finalists}
    finally:
        executor.close()
        store.close()
    judged = search.verdict(scored[search.BASELINE], {p: scored[p] for p in result.finalists}, splits=setup.splits)
    heldout_acc = {p: {t: sum(v.values()) / len(v) for t, v in per.items()} for p, per in scored.items()}
    used_shots = {t.name: t.default_shots if shots is None else shots for t in tasks}
    return TuneResult(
        str(model),
        [t.name for t in tasks],
        used_shots,
        split,
        halving,
        setup.splits,
        setup.plans,
        result,
        setup.grid_evaluations,
        judged,
        heldout_acc,
        time_limit,
        first,
    )


def _prefilter(
    model: str | Path,
    store: Store,
    sha: str,
    setup: Setup,
    shots: int | None,
    limit: int | None,
    threads: int | None,
    cluster: ClusterConfig | None,
    progress: Callable[[int], None] | None,
    go_on: search.TimeLimit | None,
) -> PrefilterResult:
    """The first stage: successive halving of every candidate on the prefilter tasks' search items."""
    executor = open_executor(model, store, sha, threads, cluster)

    def score(plan: Hashable, task: str, item_ids: list[str]) -> Mapping[str, int]:
        req = Request(str(plan), task, shots, limit, tuple(item_ids), setup.pools[task])
        rows = executor.run([req], progress)[0]
        return {i: rows[i][0] for i in item_ids}

    margin = _margins(store, sha, list(setup.splits), shots, setup.pools) if setup.halving.rank == "margin" else None
    try:
        result = search.successive_halving(
            setup.plans, search.search_ids(setup.splits), score, setup.halving, go_on=go_on, margin=margin
        )
    finally:
        executor.close()
    return PrefilterResult(sorted(setup.splits), setup, result)


def _margins(
    store: Store, sha: str, names: Sequence[str], shots: int | None, pools: Mapping[str, FewshotPool]
) -> search.MarginFn:
    """The search's margin function over multiple-choice tasks: each scored row's margin, read from the
    store where the executor has just written it."""
    by_name = {name: resolve_tasks(name)[0] for name in names}

    def margin(plan: Hashable, task: str, item_ids: list[str]) -> Mapping[str, float]:
        return store.margins(unit_for(sha, by_name[task], shots, str(plan), pools[task]), item_ids)

    return margin
