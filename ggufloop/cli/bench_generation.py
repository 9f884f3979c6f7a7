"""`ggufloop bench-generation`: throughput of batched GSM8K generation at 1/4/8/16 rows per step."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .options import quiet_llama_logs


@click.command("bench-generation")
@click.argument("model", default="qwen2.5-coder-0.5b-instruct")
@click.option(
    "--loop",
    "plans",
    default="none,8:12x3/uniform",
    show_default=True,
    help="Comma-separated plans to measure (none: the unlooped model).",
)
@click.option("--rows", default="1,4,8,16", show_default=True, help="Rows per step to compare; the first is the base.")
@click.option("--items", type=click.IntRange(1), default=16, show_default=True, help="GSM8K problems, the first N.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--repeats", "-r", type=click.IntRange(1), default=2, show_default=True)
@click.option("--threads", "-t", type=click.IntRange(1), default=2, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the rows as JSON.")
def command(
    model: str, plans: str, rows: str, items: int, max_new_tokens: int, repeats: int, threads: int, json_out: str | None
) -> None:
    """Aggregate tokens per second of GSM8K generation with 1, 4, 8, 16 prompts per step, unlooped and looped.

    Every variant generates the same problems end to end (prefix, prompts, steps) on one model load,
    interleaved and repeated, medians reported. The last column counts the answers equal to those of the
    first row count: the study generates with 8 rows (Generator.ROWS), whose answers do not depend on their
    companions; another row count may give other answers, since llama.cpp's kernels change with the
    batch's shape.
    """
    from ..benchmark import cpu_name, generation_speed
    from ..errors import OptionError
    from ..models import resolve
    from ..plan import LoopPlan
    from .options import parse_counts

    quiet_llama_logs()
    path = resolve(model)
    names = [str(LoopPlan.parse(p.strip())) for p in plans.split(",") if p.strip()]
    counts = list(parse_counts(rows))
    if min(counts) < 1:
        raise OptionError(f"bad --rows {rows!r}: every count of rows is at least 1")
    out = generation_speed(path, names, counts, items, max_new_tokens, repeats, threads)
    cols = list(out[0])
    click.echo(
        f"{path.stem}, {cpu_name()}, {threads} threads, {items} GSM8K problems, up to {max_new_tokens} new tokens, "
        f"medians of {repeats} ({time.strftime('%Y-%m-%d')})\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)
    )
    for r in out:
        click.echo("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if json_out:
        Path(json_out).write_text(json.dumps(out, indent=1))
