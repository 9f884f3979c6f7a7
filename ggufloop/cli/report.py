"""`ggufloop report`: everything in the results database, as a Markdown table."""

from __future__ import annotations

from pathlib import Path

import click

from ..eval.store import DEFAULT_DB


def md_cell(text: str) -> str:
    """A value as one Markdown table cell: a '|' or a line break in a name cannot start another cell or row."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


@click.command("report")
@click.option("--db", type=click.Path(dir_okay=False), default=str(DEFAULT_DB), show_default=True)
@click.option(
    "--export",
    "export_to",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="FILE.csv[.gz]",
    help="Also write every scored item to this file (results that travel with git or to another machine).",
)
@click.option(
    "--import",
    "import_from",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    metavar="FILE.csv[.gz]",
    help="First add the rows of an exported file that the database lacks.",
)
def command(db: str, export_to: str | None, import_from: str | None) -> None:
    """Every configuration in the results database, as a Markdown table.

    The 'imported' column counts the rows that came from --import files rather than being scored here."""
    from ..eval.store import Store

    if import_from is None and not Path(db).exists():
        raise FileNotFoundError(f"no results database at {db}: score something first (ggufloop eval, sweep, tune)")
    store = Store(db)
    if export_to:
        store.check_export_target(Path(export_to))  # before anything is imported or written
    if import_from:
        click.echo(f"imported {store.import_rows(import_from)} new rows from {import_from}", err=True)
    click.echo("| model | task | shots | prompt | plan | n | acc | acc_norm | imported |\n" + "|---" * 9 + "|")
    for name, task, shots, prompt, plan, n, acc, acc_norm, imported in store.summary():
        cells = [md_cell(str(v)) for v in (name, task, shots, prompt, plan, n)]
        click.echo(f"| {' | '.join(cells)} | {acc:.4f} | {acc_norm:.4f} | {imported} |")
    if export_to:
        click.echo(f"exported {store.export_rows(export_to)} rows to {export_to}", err=True)
    store.close()
