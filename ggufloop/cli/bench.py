"""`ggufloop bench`: speed and memory of looping, measured side by side in one run (see
ggufloop.benchmark for the variants and how they are timed)."""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict

import click

from ..plan import LoopPlan
from .options import parse_counts, parse_mixes, quiet_llama_logs, writable_dir


@click.command("bench")
@click.argument("models", nargs=-1)
@click.option("--block", default=None, metavar="S:E", help="Block to loop (default: the middle third of the layers).")
@click.option("--counts", default="2,3,4", show_default=True, help="Loop counts K to measure.")
@click.option("--repeats", "-r", type=click.IntRange(1), default=3, show_default=True)
@click.option("--threads", "-t", type=click.IntRange(1), default=2, show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(8), default=512, show_default=True)
@click.option("--decode-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("--no-stock", is_flag=True, help="Skip the stock-build variants (no `make stock`).")
@click.option(
    "--mixes",
    default=None,
    metavar="MIX,...",
    help="Time these mixes (a comma-separated list, as sweep's) at every K (default: every mix, at K = 3 only).",
)
@click.option(
    "--duplicated",
    is_flag=True,
    help="Also time the physically duplicated file without the stock build (the patched build, no plan).",
)
@click.option(
    "--kv-modes",
    is_flag=True,
    help="Also time the KV modes first and last (one KV slot per layer, not exact) of the naive plan at every K.",
)
@click.option("--n-gpu-layers", "-ngl", type=int, default=0, show_default=True, help="Layers offloaded (-1: all).")
@click.option(
    "--cuda-graphs-off",
    is_flag=True,
    help="Time every variant also with CUDA graphs disabled (GGML_CUDA_DISABLE_GRAPHS), on a CUDA build.",
)
@click.option("-o", "--output", type=click.Path(file_okay=False), default="docs", show_default=True)
def command(
    models: tuple[str, ...],
    block: str | None,
    counts: str,
    repeats: int,
    threads: int,
    prompt_tokens: int,
    decode_tokens: int,
    no_stock: bool,
    mixes: str | None,
    duplicated: bool,
    kv_modes: bool,
    n_gpu_layers: int,
    cuda_graphs_off: bool,
    output: str,
) -> None:
    """Measure prefill and decode speed and memory of looping on MODELS (default: those `make models` fetches)."""
    from .. import paths, plots
    from ..benchmark import STOCK_PYTHON, Result, cpu_name, markdown, page, run_variant, summarize, variants
    from ..gguf_io import model_info
    from ..models import fetch_default, resolve

    quiet_llama_logs()
    stock = not no_stock
    if stock and not STOCK_PYTHON.exists():
        raise FileNotFoundError(
            f"the stock build is missing ({STOCK_PYTHON}): run `make stock` here or set GGUFLOOP_STOCK_PYTHON, "
            "or pass --no-stock"
        )
    out_dir = writable_dir(output)
    work = paths.cache_dir() / "bench"  # the duplicated files
    work.mkdir(parents=True, exist_ok=True)
    ks = parse_counts(counts)
    # naive looping (mix none) is timed at every K anyway
    chosen = tuple(m for m in parse_mixes(mixes) if m != "none") if mixes is not None else None
    meta = {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_name(),
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "n_gpu_layers": n_gpu_layers,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    report, data = [], {"meta": meta, "models": {}}
    for name in models or fetch_default():
        path = resolve(name)
        n_layer = model_info(path).n_layer
        if block:
            blk = LoopPlan.parse(f"{block}x2")
            blk.validate(n_layer)
            s, e = blk.start, blk.end
        else:
            s, e = n_layer // 3, n_layer // 3 + max(1, n_layer // 6)
        vs = variants(path, s, e, ks, stock, work, chosen, duplicated, cuda_graphs_off, kv_modes)
        results = {v.name: Result(v.name) for v in vs}
        with click.progressbar(length=repeats * len(vs), label=f"{path.stem}", file=sys.stderr) as bar:
            for _ in range(repeats):
                for v in vs:  # interleaved, so drift in machine load hits every variant alike
                    m = run_variant(v, threads, prompt_tokens, decode_tokens, n_gpu_layers)
                    r = results[v.name]
                    r.prefill_tps.append(m["prefill_tps"])
                    r.decode_tps.append(m["decode_tps"])
                    if m.get("bypass_decode_tps"):
                        r.bypass_decode_tps.append(m["bypass_decode_tps"])
                    r.rss_mib.append(m["rss_mib"])
                    r.weights_mib, r.kv_mib = m["weights_mib"], m["kv_mib"]
                    bar.update(1)
        rows = summarize(results, vs)
        data["models"][path.stem] = {
            "block": f"{s}:{e}",
            "n_layer": n_layer,
            "rows": rows,
            "raw": [asdict(r) for r in results.values()],
        }
        report.append(markdown(f"{path.stem} ({n_layer} layers, block {s}:{e})", rows, meta))
        click.echo(report[-1])
    (out_dir / "benchmarks.json").write_text(json.dumps(data, indent=1))
    plots.bench_ratios(data, out_dir / "benchmarks.png")
    (out_dir / "benchmarks.md").write_text(page(meta, report) + "\n![time ratios](benchmarks.png)\n")
    click.echo(f"wrote {out_dir / 'benchmarks.md'} and {out_dir / 'benchmarks.json'}", err=True)
