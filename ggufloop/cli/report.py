"""`ggufloop report`: everything in the results database, as a Markdown table."""

from __future__ import annotations

import click

from ..eval.store import DEFAULT_DB


@click.command("report")
@click.option("--db", type=click.Path(dir_okay=False, exists=True), default=str(DEFAULT_DB), show_default=True)
def command(db: str) -> None:
    """Every configuration in the results database, as a Markdown table."""
    from ..eval.store import Store

    store = Store(db)
    click.echo("| model | task | shots | prompt | plan | n | acc | acc_norm |\n|---|---|---|---|---|---|---|---|")
    for name, task, shots, prompt, plan, n, acc, acc_norm in store.summary():
        click.echo(f"| {name} | {task} | {shots} | {prompt} | {plan} | {n} | {acc:.4f} | {acc_norm:.4f} |")
    store.close()
