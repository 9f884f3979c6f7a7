"""`ggufloop bench-scoring`: speed of benchmark scoring, shared contexts against one pass per choice."""

from __future__ import annotations

import click

from .options import quiet_llama_logs


@click.command("bench-scoring")
@click.argument("model", default="smollm2-135m-instruct")
@click.option("--tasks", default="arc_easy,hellaswag,winogrande", show_default=True)
@click.option("--limit", type=click.IntRange(1), default=40, show_default=True)
@click.option("--threads", "-t", type=click.IntRange(1), default=2, show_default=True)
def command(model: str, tasks: str, limit: int, threads: int) -> None:
    """Speed of benchmark scoring: shared contexts against one forward pass per choice.

    "scored tokens" counts every choice's full token sequence, as the naive method evaluates them.
    """
    from ..benchmark import scoring_speed
    from ..eval.tasks import resolve_tasks
    from ..models import resolve

    quiet_llama_logs()
    path = resolve(model)
    rows = [scoring_speed(path, t.name, limit, threads) for t in resolve_tasks(tasks)]
    cols = list(rows[0])
    click.echo(f"{path.stem}, {threads} threads\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        click.echo("| " + " | ".join(str(r[c]) for c in cols) + " |")
