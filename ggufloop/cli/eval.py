"""`ggufloop eval`: benchmark accuracy of a plan against the unlooped model, item by item."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .options import placement_options, plan_from, plan_options, quiet_llama_logs, store_options


@click.command("eval")
@click.argument("model")
@click.option(
    "--tasks",
    default="winogrande,arc_easy",
    show_default=True,
    help="Comma-separated: winogrande, arc_easy, arc_challenge, hellaswag, piqa, boolq, openbookqa, "
    "mmlu (57 subjects) or mmlu:SUBJECT.",
)
@plan_options(required=True)
@click.option("--limit", type=click.IntRange(1), default=None, help="Score only the first N items of each task.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the results here.")
@click.option("--threads", "-t", type=click.IntRange(1), default=None)
@store_options
@placement_options
def command(
    model: str,
    tasks: str,
    loop: str,
    mix: str | None,
    decode: str | None,
    moe: str | None,
    limit: int | None,
    shots: int | None,
    db: str,
    json_out: str | None,
    threads: int | None,
    cluster: str | None,
    n_gpu_layers: int | None,
    rpc: str | None,
    tensor_split: str | None,
) -> None:
    """Score MODEL on benchmarks with and without a loop plan, item by item, resumably."""
    from ..eval.cluster import ClusterConfig
    from ..eval.evaluate import comparison_table, evaluate
    from ..eval.tasks import resolve_tasks
    from ..models import resolve
    from ..rpc import Placement

    placement = Placement.from_options(rpc, tensor_split, n_gpu_layers)
    quiet_llama_logs()
    plan = plan_from(loop, mix, decode=decode, moe=moe)
    task_list = resolve_tasks(tasks)
    path = resolve(model)
    total = 2 * sum(len(t.items(shots, limit)) for t in task_list)
    with click.progressbar(length=total, label="scoring", file=sys.stderr, show_eta=True) as bar:
        on = ClusterConfig(cluster, threads or 1) if cluster else None
        results = evaluate(
            path, task_list, plan, shots, limit, db, threads, progress=bar.update, cluster=on, placement=placement
        )
    click.echo(f"\n{path.name}: plan {plan} against the unlooped model (paired bootstrap 95% CI, exact McNemar p)\n")
    click.echo(comparison_table(results))
    for r in results:
        if r["fewshot_source"] and r["shots"]:
            click.echo(f"  {r['task']}: few-shot examples from {r['fewshot_source']}", err=True)
    out = Path(json_out) if json_out else Path(db).parent / f"eval-{path.stem}-{str(plan).replace('/', '_')}.json"
    out.write_text(json.dumps({"model": str(path), "plan": str(plan), "results": results}, indent=1))
    click.echo(f"\nwrote {out}", err=True)
