"""`ggufloop trace`: what looping does to the hidden state, pass by pass, in pictures."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from . import plots
from .cli import command, quiet_llama_logs
from .models import resolve
from .plan import LoopPlan, Mix
from .runtime import LoopedLlama
from .trajectory import capture, load_head, metrics

CURVES = [("norm", "hidden-state norm"), ("cos_prev", "cos to previous virtual layer"),
          ("rel_change_prev", "relative change to previous layer"), ("cos_prev_pass", "cos to same layer, previous pass"),
          ("entropy", "logit-lens entropy (nats)"), ("kl_to_final", "KL(final || lens)")]


def trace_runs(model: Path, prompt: str, plan: LoopPlan, mixes: list[str], threads: "int | None") -> dict:
    """Metrics of the unlooped model and of the plan under each mix, on one model load."""
    llm = LoopedLlama(str(model), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    head = load_head(model)
    tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True)

    def detok(t: int) -> str:
        return llm.detokenize([t]).decode("utf-8", "replace")

    runs, words = {}, [detok(t) for t in tokens]
    try:
        for label, p in [("unlooped", LoopPlan())] + [(m, plan.with_mix(Mix.parse(m))) for m in mixes]:
            llm.set_loop(p)
            states, logits = capture(llm, tokens)
            runs[label] = {"plan": str(p), **metrics(states, logits, llm.schedule, head, detok)}
    finally:
        llm.close()
    return {"model": str(model), "prompt": prompt, "tokens": words, "runs": runs}


def _mean(rows: list) -> np.ndarray:
    """Mean over tokens per virtual layer; NaN where a metric is undefined (no previous pass)."""
    vals = [[x for x in r if x is not None] for r in rows]
    return np.array([float(np.mean(v)) if v else np.nan for v in vals])


def plot_curves(data: dict, plan: LoopPlan, path: Path) -> None:
    fig, axes = plots.subplots(2, 3, figsize=(15, 8))
    m = plan.end - plan.start
    for ax, (key, title) in zip(axes.flat, CURVES):
        for t in range(1, plan.count):
            ax.axvspan(plan.start + t * m - 0.5, plan.start + (t + 1) * m - 0.5, color="orange", alpha=0.12 * t)
        for label, run in data["runs"].items():
            y = _mean(run[key])
            ax.plot(range(len(y)), y, marker=".", label=f"{label} ({run['plan']})")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("virtual layer")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{Path(data['model']).stem}: mean over {len(data['tokens'])} tokens; shaded: repeated passes", fontsize=11)
    plots.save(fig, path)


def plot_lens(run: dict, tokens: list[str], title: str, path: Path) -> None:
    """Virtual layer x token: the logit lens's top token and its probability."""
    prob = np.array([[cell[0][1] for cell in row] for row in run["top"]])
    fig, ax = plots.subplots(figsize=(1.1 * len(tokens) + 2, 0.28 * len(prob) + 2))
    ax.imshow(prob, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    for v, row in enumerate(run["top"]):
        for i, cell in enumerate(row):
            ax.text(i, v, repr(cell[0][0])[1:-1][:8], ha="center", va="center", fontsize=6,
                    color="white" if cell[0][1] < 0.6 else "black")
    ax.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=60, fontsize=7)
    ax.set_yticks(range(len(prob)), [f"{v}:L{il}" for v, il in enumerate(run["schedule"])], fontsize=6)
    ax.set_xlabel("input token (the lens predicts the next one)")
    ax.set_ylabel("virtual layer : physical layer")
    ax.set_title(title, fontsize=10)
    plots.save(fig, path)


def summary(data: dict, plan: LoopPlan) -> list[str]:
    """Per run: depth, how much passes move the state, how close the block's output is to the final answer."""
    lines = []
    for label, run in data["runs"].items():
        kl = _mean(run["kl_to_final"])
        looped = run["plan"] != "none"
        block_end = plan.start + (plan.count if looped else 1) * (plan.end - plan.start) - 1
        cos_pass = [x for x in _mean(run["cos_prev_pass"]) if not np.isnan(x)]
        last_top = run["top"][-1][-1][0]
        lines.append(f"{label:>10} ({run['plan']}): depth {len(kl)}, mean cos to the previous pass "
                     f"{np.mean(cos_pass) if cos_pass else float('nan'):.4f}, KL(final||lens) after the block "
                     f"{kl[block_end]:.3g}, next token {last_top[0]!r} p={last_top[1]:.2f}")
    return lines


@command
@click.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--loop", "loop", required=True, metavar="PLAN", help="A block plan, e.g. 10:15x3.")
@click.option("--mix", default="none", show_default=True, metavar="MIX", help="The plan's mix.")
@click.option("--compare", default=None, metavar="MIXES", help="Other mixes to overlay, comma-separated (e.g. none,uniform).")
@click.option("--threads", "-t", type=click.IntRange(1), default=None)
@click.option("-o", "--output", type=click.Path(file_okay=False), default="traces", show_default=True)
def trace(model: str, prompt: str, loop: str, mix: str, compare: "str | None", threads: "int | None", output: str) -> None:
    """Capture the residual stream after every virtual layer for PROMPT; metrics as JSON, figures as PNG."""
    quiet_llama_logs()
    plan = LoopPlan.parse(loop)
    if plan.ranges or not plan.end:
        raise click.BadParameter("trace takes a block plan START:ENDxCOUNT", param_hint="--loop")
    mixes = list(dict.fromkeys([mix] + [m.strip() for m in (compare or "").split(",") if m.strip()]))
    path = resolve(model)
    data = trace_runs(path, prompt, plan, mixes, threads)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"trace-{path.stem}-{plan.start}_{plan.end}x{plan.count}"
    (out / f"{stem}.json").write_text(json.dumps(data))
    plot_curves(data, plan, out / f"{stem}-curves.png")
    for label, run in data["runs"].items():
        plot_lens(run, data["tokens"], f"logit lens, {path.stem}, {run['plan']}",
                  out / f"{stem}-lens-{label.replace(':', '_')}.png")
    click.echo("\n".join(summary(data, plan)))
    click.echo(f"wrote {out / stem}.json and figures", err=True)
