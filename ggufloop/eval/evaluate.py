"""Benchmark evaluation of loop plans: resumable, one batch of items at a time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import OptionError, TaskError
from ..plan import LoopPlan
from ..rpc import Placement
from .executors import open_executor
from .stats import Comparison, compare
from .store import GenerationRow, Store, Unit
from .tasks import Task
from .units import Request, unit_for

if TYPE_CHECKING:
    from .gsm8k import Generator, Problem, PromptFormat, Prompts
    from .ray_executor import ClusterConfig


@dataclass(frozen=True)
class TaskResult:
    task: str
    shots: int
    plan: str
    n: int
    acc: float
    acc_norm: float


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
                    "imported": sum(
                        store.imported(unit_for(sha, t, s, p, None), got_rows)
                        for p, got_rows in (("none", base_rows[t.name]), (str(plan), rows))
                    ),
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
            f"| mmlu (macro, {len(mmlu)} subjects) | {mmlu[0]['shots']} | {sum(r['acc']['n'] for r in mmlu)} | "
            f"{base:.4f} | "
            f"{plan:.4f} | {plan - base:+.4f} | | | | | |"
        )
    return "\n".join(lines)


# -- generative tasks (gsm8k) ---------------------------------------------------------------


def run_generative_unit(
    generator: Generator,
    prompts: Prompts,
    store: Store,
    unit: Unit,
    problems: list[Problem],
    max_new_tokens: int,
    progress: Callable[[int], None] | None = None,
) -> dict[str, GenerationRow]:
    """Generate and score one (plan, format) unit of GSM8K problems under the generator's current plan,
    skipping what the store has; each answer is committed as soon as it is scored. Every prompt is
    checked against the context before the first is generated."""
    from .gsm8k import flexible_extract, is_correct, strict_match

    done = store.generated(unit, max_new_tokens)
    todo = [p for p in problems if p.id not in done]
    if progress and len(problems) > len(todo):
        progress(len(problems) - len(todo))
    if todo:
        tokens = {p.id: prompts.tokens(p.question) for p in todo}
        for p in todo:
            generator.check_fits(tokens[p.id], max_new_tokens, f"{unit.task} item {p.id}")
        generator.set_prefix(prompts.prefix)
    fmt = prompts.fmt
    by_id = {p.id: p for p in todo}
    batch = [(f"{unit.task} item {p.id}", tokens[p.id]) for p in todo]
    for name, g in generator.generate_batch(batch, max_new_tokens, fmt.stops):
        p = by_id[name.rsplit(" ", 1)[1]]
        strict, flexible = strict_match(fmt, g.text), flexible_extract(g.text)
        row = GenerationRow(
            p.id,
            g.text,
            len(g.tokens),
            g.hit_limit,
            strict,
            flexible,
            p.gold,
            is_correct(strict, p.gold),
            is_correct(flexible, p.gold),
        )
        store.add_generations(unit, max_new_tokens, [row])
        if progress:
            progress(1)
    rows = store.generations(unit, max_new_tokens)
    return {p.id: rows[p.id] for p in problems}


class GenerativeExecutor:
    """GSM8K answers for sweep and tune, as the Executor protocol asks for them: per request, item ->
    (correct, correct) under ``metric`` (``flexible``: flexible-extract, ``strict``: strict-match), on
    one model load whose plan is switched as needed, loaded only when something is left to generate.
    Requests' shots and pools do not apply (the exemplars are the 8 fixed ones, outside the test split);
    every answer is stored (text and both filters) and reused across eval, sweep and tune."""

    METRICS = ("flexible", "strict")

    def __init__(
        self,
        model: str | Path,
        store: Store,
        model_sha: str,
        threads: int | None = None,
        fmt: PromptFormat | str | None = None,
        max_new_tokens: int | None = None,
        metric: str = "flexible",
        shots: int | None = None,
        placement: Placement | None = None,
    ) -> None:
        from . import gsm8k

        self.shots = gsm8k.check_shots(shots)
        if metric not in self.METRICS:
            raise OptionError(f"unknown gsm8k metric {metric!r}: expected flexible or strict")
        self.model, self.store, self.model_sha = model, store, model_sha
        self.threads, self.placement, self.metric = threads, placement, metric
        self.fmt = fmt if isinstance(fmt, gsm8k.PromptFormat) else gsm8k.format_for(model, fmt)
        self.max_new_tokens = gsm8k.DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        self.problems = {p.id: p for p in gsm8k.problems()}
        self.generator: Generator | None = None
        self.prompts: Prompts | None = None

    def unit(self, plan: str) -> Unit:
        from . import gsm8k

        return Unit(self.model_sha, gsm8k.TASK, self.shots, self.fmt.key(), str(LoopPlan.parse(plan)))

    def run(self, requests, progress: Callable[[int], None] | None = None) -> list[dict[str, tuple[int, int]]]:
        from . import gsm8k

        out = []
        for req in requests:
            if req.task != gsm8k.TASK:
                raise TaskError(f"the generative executor runs gsm8k, not {req.task!r}")
            ids = list(req.ids) if req.ids is not None else list(self.problems)[: req.limit]
            problems = [self.problems[i] for i in ids]
            unit = self.unit(req.plan)
            if {p.id for p in problems} <= self.store.generated(unit, self.max_new_tokens):
                rows = self.store.generations(unit, self.max_new_tokens)
                if progress:
                    progress(len(problems))
            else:
                if self.generator is None:
                    self.generator = gsm8k.Generator(
                        self.model, unit.plan, threads=self.threads, placement=self.placement
                    )
                    self.prompts = gsm8k.Prompts(self.generator.llm, self.fmt, unit.shots)
                elif str(self.generator.plan) != unit.plan:
                    self.generator.set_plan(unit.plan)
                rows = run_generative_unit(
                    self.generator, self.prompts, self.store, unit, problems, self.max_new_tokens, progress
                )
            pick = (lambda r: r.correct_flexible) if self.metric == "flexible" else (lambda r: r.correct_strict)
            out.append({i: (int(pick(rows[i])),) * 2 for i in ids})
        return out

    def close(self) -> None:
        if self.generator is not None:
            self.generator.close()
            self.generator = None


def _generation_summary(rows: dict[str, GenerationRow]) -> dict:
    n = len(rows)
    return {
        "n": n,
        "strict": sum(r.correct_strict for r in rows.values()) / n,
        "flexible": sum(r.correct_flexible for r in rows.values()) / n,
        "hit_limit": sum(r.hit_limit for r in rows.values()),
        "mean_tokens": sum(r.n_tokens for r in rows.values()) / n,
    }


def evaluate_gsm8k(
    model: str | Path,
    plan: LoopPlan | str,
    fmt: PromptFormat | str | None = None,
    shots: int | None = None,
    limit: int | None = None,
    db: str | Path | None = None,
    threads: int | None = None,
    max_new_tokens: int | None = None,
    progress: Callable[[int], None] | None = None,
    placement: Placement | None = None,
) -> dict:
    """GSM8K answers of the unlooped model and of the plan (stored, resumable), compared paired under
    both filters (strict-match, flexible-extract). ``fmt``: a format or its name (default: the
    model's, see gsm8k.format_for); ``shots``: the first of the 8 exemplars (default all 8). The model is
    loaded only when something is left to generate."""
    from . import gsm8k

    fmt = fmt if isinstance(fmt, gsm8k.PromptFormat) else gsm8k.format_for(model, fmt)
    shots = gsm8k.check_shots(shots)
    max_new_tokens = gsm8k.DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    problems = gsm8k.problems(limit)
    store = Store(db) if db else Store()
    generator = None
    try:
        store.check_writable()
        sha = store.model_sha(model)
        plan = LoopPlan.parse(plan)
        got = {}
        for p in (str(plan), "none"):  # the plan first: one the model refuses fails at once
            unit = Unit(sha, gsm8k.TASK, shots, fmt.key(), p)
            if {pr.id for pr in problems} <= store.generated(unit, max_new_tokens):
                got[p] = _stored(store, unit, problems, max_new_tokens, progress)
                continue
            if generator is None:
                generator = gsm8k.Generator(model, p, threads=threads, placement=placement)
                prompts = gsm8k.Prompts(generator.llm, fmt, shots)
            else:
                generator.set_plan(p)
            got[p] = run_generative_unit(generator, prompts, store, unit, problems, max_new_tokens, progress)
    finally:
        if generator is not None:
            generator.close()
        store.close()
    base, looped = got["none"], got[str(plan)]
    ids = [p.id for p in problems]
    return {
        "task": gsm8k.TASK,
        "format": fmt.name,
        "prompt": fmt.key(),
        "lm_eval": fmt.lm_eval,
        "shots": shots,
        "max_new_tokens": max_new_tokens,
        "baseline": {"plan": "none", **_generation_summary(base)},
        "plan": {"plan": str(plan), **_generation_summary(looped)},
        "strict": asdict(compare([base[i].correct_strict for i in ids], [looped[i].correct_strict for i in ids])),
        "flexible": asdict(compare([base[i].correct_flexible for i in ids], [looped[i].correct_flexible for i in ids])),
    }


def _stored(
    store: Store, unit: Unit, problems: list[Problem], max_new_tokens: int, progress: Callable[[int], None] | None
) -> dict[str, GenerationRow]:
    rows = store.generations(unit, max_new_tokens)
    if progress:
        progress(len(problems))
    return {p.id: rows[p.id] for p in problems}


def generation_table(results: list[dict]) -> str:
    """Markdown: per generative task and filter, baseline, plan, difference with its 95 % interval and
    McNemar p, and how many answers ran out of tokens."""
    head = (
        "| task | format | shots | n | filter | base acc | plan acc | diff [95% CI] | p | hit limit (base, plan) |\n"
        + "|---" * 10
        + "|"
    )
    lines = [head]
    for r in results:
        for name, key in (("strict-match", "strict"), ("flexible-extract", "flexible")):
            a = r[key]
            lines.append(
                f"| {r['task']} | {r['format']} | {r['shots']} | {a['n']} | {name} | {a['base_acc']:.4f} | "
                f"{a['plan_acc']:.4f} | {a['diff']:+.4f} [{a['ci_low']:+.4f}, {a['ci_high']:+.4f}] | "
                f"{a['p_value']:.3g} | {r['baseline']['hit_limit']}, {r['plan']['hit_limit']} |"
            )
    return "\n".join(lines)
