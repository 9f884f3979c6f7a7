"""`ggufloop eval` and `ggufloop report`: benchmark accuracy of a plan against the unlooped model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .cli import command, quiet_llama_logs
from .evaluate import evaluate
from .models import resolve
from .plan import LoopPlan, Mix
from .store import DEFAULT_DB, Store
from .tasks import resolve_tasks


def comparison_table(results: list[dict]) -> str:
    """Markdown: baseline, plan, difference with its 95 % interval and McNemar p, per task."""
    head = ("| task | shots | n | base acc | plan acc | diff [95% CI] | p | base acc_norm | plan acc_norm | "
            "diff_norm [95% CI] | p_norm |\n" + "|---" * 11 + "|")
    lines = [head]
    for r in results:
        a, an = r["acc"], r["acc_norm"]
        lines.append(
            f"| {r['task']} | {r['shots']} | {a['n']} | {a['base_acc']:.4f} | {a['plan_acc']:.4f} | "
            f"{a['diff']:+.4f} [{a['ci_low']:+.4f}, {a['ci_high']:+.4f}] | {a['p_value']:.3g} | "
            f"{an['base_acc']:.4f} | {an['plan_acc']:.4f} | {an['diff']:+.4f} [{an['ci_low']:+.4f}, "
            f"{an['ci_high']:+.4f}] | {an['p_value']:.3g} |")
    mmlu = [r for r in results if r["task"].startswith("mmlu:")]
    if mmlu:
        base = sum(r["acc"]["base_acc"] for r in mmlu) / len(mmlu)
        plan = sum(r["acc"]["plan_acc"] for r in mmlu) / len(mmlu)
        lines.append(f"| mmlu (macro, {len(mmlu)} subjects) | 5 | {sum(r['acc']['n'] for r in mmlu)} | {base:.4f} | "
                     f"{plan:.4f} | {plan - base:+.4f} | | | | | |")
    return "\n".join(lines)


@command
@click.command("eval")
@click.argument("model")
@click.option("--tasks", default="winogrande,arc_easy", show_default=True,
              help="Comma-separated: winogrande, arc_easy, arc_challenge, hellaswag, piqa, boolq, openbookqa, "
                   "mmlu (57 subjects) or mmlu:SUBJECT.")
@click.option("--loop", "loop", required=True, metavar="PLAN", help="The plan to compare with the unlooped model.")
@click.option("--mix", default=None, metavar="MIX", help="none, uniform, ema[:beta], autoalign[:T], noise[:seed].")
@click.option("--limit", type=click.IntRange(1), default=None, help="Score only the first N items of each task.")
@click.option("--shots", type=click.IntRange(0), default=None, help="Few-shot examples (default: the paper's per task).")
@click.option("--db", type=click.Path(dir_okay=False), default=str(DEFAULT_DB), show_default=True,
              help="Results database (resumes from it).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the results here.")
@click.option("--threads", "-t", type=click.IntRange(1), default=None)
def eval_command(model: str, tasks: str, loop: str, mix: "str | None", limit: "int | None", shots: "int | None",
                 db: str, json_out: "str | None", threads: "int | None") -> None:
    """Score MODEL on benchmarks with and without a loop plan, item by item, resumably."""
    quiet_llama_logs()
    plan = LoopPlan.parse(loop)
    if mix is not None:
        plan = plan.with_mix(Mix.parse(mix))
    task_list = resolve_tasks(tasks)
    path = resolve(model)
    total = 2 * sum(len(t.items(shots, limit)) for t in task_list)
    with click.progressbar(length=total, label="scoring", file=sys.stderr, show_eta=True) as bar:
        results = evaluate(path, task_list, plan, shots, limit, db, threads, progress=bar.update)
    click.echo(f"\n{path.name}: plan {plan} against the unlooped model (paired bootstrap 95% CI, exact McNemar p)\n")
    click.echo(comparison_table(results))
    for r in results:
        if r["fewshot_source"] and r["shots"]:
            click.echo(f"  {r['task']}: few-shot examples from {r['fewshot_source']}", err=True)
    out = Path(json_out) if json_out else Path(db).parent / f"eval-{path.stem}-{str(plan).replace('/', '_')}.json"
    out.write_text(json.dumps({"model": str(path), "plan": str(plan), "results": results}, indent=1))
    click.echo(f"\nwrote {out}", err=True)


@command
@click.command()
@click.option("--db", type=click.Path(dir_okay=False, exists=True), default=str(DEFAULT_DB), show_default=True)
def report(db: str) -> None:
    """Every configuration in the results database, as a Markdown table."""
    store = Store(db)
    click.echo("| model | task | shots | plan | n | acc | acc_norm |\n|---|---|---|---|---|---|---|")
    for name, task, shots, plan, n, acc, acc_norm in store.summary():
        click.echo(f"| {name} | {task} | {shots} | {plan} | {n} | {acc:.4f} | {acc_norm:.4f} |")
    store.close()
