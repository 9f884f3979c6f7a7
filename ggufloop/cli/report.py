"""`ggufloop report`: everything in the results database, as Markdown tables (accuracy, then perplexity)."""

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
@click.option(
    "--export-generations",
    "export_gen",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="FILE.csv[.gz]",
    help="Also write every generation of a generative task (gsm8k: text, answers, scores) to this file.",
)
@click.option(
    "--import-generations",
    "import_gen",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    metavar="FILE.csv[.gz]",
    help="First add the generations of an exported file that the database lacks (each rescored from its text).",
)
def command(
    db: str, export_to: str | None, import_from: str | None, export_gen: str | None, import_gen: str | None
) -> None:
    """Every configuration in the results database, as a Markdown table.

    The 'imported' column counts the rows that came from --import files rather than being scored here.
    Perplexity results (`ggufloop perplexity`) and generative tasks (gsm8k) follow in tables of their own."""
    from ..eval.store import Store

    if import_from is None and import_gen is None and not Path(db).exists():
        raise FileNotFoundError(
            f"no results database at {db}: score something first (ggufloop eval, sweep, tune, perplexity)"
        )
    store = Store(db)
    for target in (export_to, export_gen):
        if target:
            store.check_export_target(Path(target))  # before anything is imported or written
    if import_from:
        click.echo(f"imported {store.import_rows(import_from)} new rows from {import_from}", err=True)
    if import_gen:
        click.echo(f"imported {store.import_generations(import_gen)} new generations from {import_gen}", err=True)
    click.echo("| model | task | shots | prompt | plan | n | acc | acc_norm | imported |\n" + "|---" * 9 + "|")
    for name, task, shots, prompt, plan, n, acc, acc_norm, imported in store.summary():
        cells = [md_cell(str(v)) for v in (name, task, shots, prompt, plan, n)]
        click.echo(f"| {' | '.join(cells)} | {acc:.4f} | {acc_norm:.4f} | {imported} |")
    perplexity = store.perplexity_summary()
    if perplexity:
        click.echo(
            "\n| model | text | c | chunks | plan | tokens | PPL | PPL base | ln(PPL ratio) | mean KLD | 99% KLD "
            "| RMS Δp | same top |\n" + "|---" * 13 + "|"
        )
        for name, text, n_ctx, chunks, plan, n, ppl, base, ln, ln_se, kld, kld_se, p99, rms, same in perplexity:
            cells = [md_cell(str(v)) for v in (name, text, n_ctx, chunks, plan, n)]
            click.echo(
                f"| {' | '.join(cells)} | {ppl:.4f} | {base:.4f} | {ln:.5f} ± {ln_se:.5f} | {kld:.5f} ± {kld_se:.5f} "
                f"| {p99:.5f} | {100 * rms:.3f} % | {100 * same:.2f} % |"
            )
    generations = store.generation_summary()
    if generations:
        click.echo(
            "\n| model | task | shots | prompt | plan | max new | n | strict-match | flexible-extract | hit limit "
            "| imported |\n" + "|---" * 11 + "|"
        )
        for name, task, shots, prompt, plan, limit, n, strict, flexible, hit, imported in generations:
            cells = [md_cell(str(v)) for v in (name, task, shots, prompt, plan, limit, n)]
            click.echo(f"| {' | '.join(cells)} | {strict:.4f} | {flexible:.4f} | {hit} | {imported} |")
    if export_to:
        click.echo(f"exported {store.export_rows(export_to)} rows to {export_to}", err=True)
    if export_gen:
        click.echo(f"exported {store.export_generations(export_gen)} generations to {export_gen}", err=True)
    store.close()
