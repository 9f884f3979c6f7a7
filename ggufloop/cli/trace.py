"""`ggufloop trace`: what looping does to the hidden state, pass by pass, in pictures."""

from __future__ import annotations

import json

import click

from .options import plan_from, plan_options, quiet_llama_logs, split_list, writable_dir

MAX_PROMPT_TOKENS = 256  # as trajectory.MAX_TRACE_TOKENS, here so that --help loads no llama.cpp
HELP = (
    "Capture the residual stream after every virtual layer for PROMPT; metrics as JSON, figures as PNG.\n\n"
    f"PROMPT is at most {MAX_PROMPT_TOKENS} tokens (and the model's context): every virtual layer's logit "
    "lens keeps a distribution over the vocabulary for each token, so memory grows with the prompt."
)


@click.command("trace", help=HELP)
@click.argument("model")
@click.argument("prompt")
@plan_options(required=True)
@click.option(
    "--compare", default=None, metavar="MIXES", help="Other mixes to overlay, comma-separated (e.g. none,uniform)."
)
@click.option("--threads", "-t", type=click.IntRange(1), default=None)
@click.option("-o", "--output", type=click.Path(file_okay=False), default="traces", show_default=True)
def command(
    model: str,
    prompt: str,
    loop: str,
    mix: str | None,
    decode: str | None,
    moe: str | None,
    compare: str | None,
    threads: int | None,
    output: str,
) -> None:
    """Capture the residual stream after every virtual layer for PROMPT; metrics as JSON, figures as PNG."""
    from .. import plots
    from ..models import resolve
    from ..trajectory import summary, trace_runs

    quiet_llama_logs()
    plan = plan_from(loop, mix, decode=decode, moe=moe)
    if plan.ranges or not plan.end:
        raise click.BadParameter("trace takes a block plan START:ENDxCOUNT", param_hint="--loop")
    mixes = list(dict.fromkeys([str(plan.mix)] + split_list(compare or "")))
    for m in mixes:
        plan.with_mix(m)  # every mix checked before any work
    out = writable_dir(output)
    path = resolve(model)
    data = trace_runs(path, prompt, plan, mixes, threads, MAX_PROMPT_TOKENS)
    stem = f"trace-{path.stem}-{plan.start}_{plan.end}x{plan.count}"
    (out / f"{stem}.json").write_text(json.dumps(data))
    plots.trace_curves(data, plan, out / f"{stem}-curves.png")
    for label, run in data["runs"].items():
        plots.logit_lens(
            run,
            data["tokens"],
            f"logit lens, {path.stem}, {run['plan']}",
            out / f"{stem}-lens-{label.replace(':', '_')}.png",
        )
    click.echo("\n".join(summary(data, plan)))
    click.echo(f"wrote {out / stem}.json and figures", err=True)
