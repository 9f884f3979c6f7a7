"""Benchmark evaluation of loop plans: resumable, one batch of items at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..plan import LoopPlan
from ..rpc import Placement
from .scoring import Scorer, accuracy
from .stats import Comparison, compare
from .store import Row, Store, Unit
from .tasks import FewshotPool, Task

if TYPE_CHECKING:
    from .cluster import ClusterConfig


@dataclass(frozen=True)
class TaskResult:
    task: str
    shots: int
    plan: str
    n: int
    acc: float
    acc_norm: float


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
    progress: Callable[[int], None] | None = None,
    batch_items: int = 16,
    ids: list[str] | None = None,
    pool: FewshotPool | None = None,
) -> dict[str, tuple[int, int]]:
    """Score one (plan, task) unit, skipping what the store has; returns item -> (correct, correct_norm).

    ``ids`` restricts the unit to those items (in that order); ``pool`` restricts where few-shot
    examples come from (see Task.items)."""
    shots = task.default_shots if shots is None else shots
    items = task.items(shots, limit, pool=pool)
    if ids is not None:
        by_id = {it.id: it for it in items}
        items = [by_id[i] for i in ids]
    unit = Unit(model_sha, task.name, shots, task.prompt_key(pool, shots), str(scorer.plan))
    done = store.done(unit)
    todo = [it for it in items if it.id not in done]
    if progress and len(items) > len(todo):
        progress(len(items) - len(todo))
    for chunk in _chunks(todo, batch_items):
        lls = scorer.score(chunk)
        store.add(unit, [Row(it.id, ll, it.gold, *accuracy(it, ll)) for it, ll in zip(chunk, lls)])
        if progress:
            progress(len(chunk))
    rows = store.rows(unit)
    return {it.id: rows[it.id] for it in items}


def summarize(task: str, shots: int, plan: str, rows: dict[str, tuple[int, int]]) -> TaskResult:
    n = len(rows)
    return TaskResult(task, shots, plan, n, sum(c for c, _ in rows.values()) / n, sum(c for _, c in rows.values()) / n)


def paired(base: dict[str, tuple[int, int]], plan: dict[str, tuple[int, int]], norm: bool = False) -> Comparison:
    ids = sorted(base)
    k = 1 if norm else 0
    return compare([base[i][k] for i in ids], [plan[i][k] for i in ids])


def evaluate(
    model: str | Path,
    tasks: list[Task],
    plan: LoopPlan | str,
    shots: int | None = None,
    limit: int | None = None,
    db: str | Path | None = None,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
    cluster: ClusterConfig | None = None,
    placement: Placement | None = None,
) -> list[dict]:
    """Baseline and plan on every task: accuracies and the paired comparison of acc and acc_norm.

    cluster: score the units on that Ray cluster instead of in this process (see cluster.py).
    placement: where the model's layers run in this process (local by default; RPC servers, ``ggufloop.rpc``)."""
    from .cluster import Request, open_executor

    store = Store(db) if db else Store()
    store.check_writable()
    sha = store.model_sha(model)
    plan = LoopPlan.parse(plan)
    executor = open_executor(model, store, sha, threads, cluster, placement)
    out = []
    try:
        got = executor.run([Request(p, t.name, shots, limit) for p in ("none", str(plan)) for t in tasks], progress)
        base_rows = {t.name: rows for t, rows in zip(tasks, got)}
        plan_rows = {t.name: rows for t, rows in zip(tasks, got[len(tasks) :])}
        for t in tasks:
            s = t.default_shots if shots is None else shots
            rows = plan_rows[t.name]
            out.append(
                {
                    "task": t.name,
                    "shots": s,
                    "fewshot_source": t.fewshot_source,
                    "baseline": asdict(summarize(t.name, s, "none", base_rows[t.name])),
                    "plan": asdict(summarize(t.name, s, str(plan), rows)),
                    "acc": asdict(paired(base_rows[t.name], rows)),
                    "acc_norm": asdict(paired(base_rows[t.name], rows, norm=True)),
                }
            )
    finally:
        executor.close()
        store.close()
    return out


def comparison_table(results: list[dict]) -> str:
    """Markdown: baseline, plan, difference with its 95 % interval and McNemar p, per task."""
    head = (
        "| task | shots | n | base acc | plan acc | diff [95% CI] | p | base acc_norm | plan acc_norm | "
        "diff_norm [95% CI] | p_norm |\n" + "|---" * 11 + "|"
    )
    lines = [head]
    for r in results:
        a, an = r["acc"], r["acc_norm"]
        lines.append(
            f"| {r['task']} | {r['shots']} | {a['n']} | {a['base_acc']:.4f} | {a['plan_acc']:.4f} | "
            f"{a['diff']:+.4f} [{a['ci_low']:+.4f}, {a['ci_high']:+.4f}] | {a['p_value']:.3g} | "
            f"{an['base_acc']:.4f} | {an['plan_acc']:.4f} | {an['diff']:+.4f} [{an['ci_low']:+.4f}, "
            f"{an['ci_high']:+.4f}] | {an['p_value']:.3g} |"
        )
    mmlu = [r for r in results if r["task"].startswith("mmlu:")]
    if mmlu:
        base = sum(r["acc"]["base_acc"] for r in mmlu) / len(mmlu)
        plan = sum(r["acc"]["plan_acc"] for r in mmlu) / len(mmlu)
        lines.append(
            f"| mmlu (macro, {len(mmlu)} subjects) | 5 | {sum(r['acc']['n'] for r in mmlu)} | {base:.4f} | "
            f"{plan:.4f} | {plan - base:+.4f} | | | | | |"
        )
    return "\n".join(lines)
