"""`ggufloop generate`: one completion, streamed; --compare runs it with and without the plan."""

from __future__ import annotations

import time

import click

from .. import rpc
from ..plan import LoopPlan
from .options import describe, load, runtime_options


def stream_completion(llm, prompt: str, max_tokens: int, temp: float, seed: int) -> tuple[int, float]:
    """Stream one completion to stdout; returns (tokens, seconds)."""
    llm.set_seed(seed)
    t0, n = time.perf_counter(), 0
    for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=temp, seed=seed, stream=True):
        choice = chunk["choices"][0]
        click.echo(choice["text"], nl=False)
        rpc.streamed(choice["text"])  # a lost RPC server's error then starts on a line of its own
        n += choice["finish_reason"] is None  # the closing chunk carries no token
    click.echo()
    rpc.streamed("\n")
    return n, time.perf_counter() - t0


@click.command("generate")
@click.argument("model")
@click.argument("prompt")
@click.option("--max-tokens", "-n", type=click.IntRange(1), default=128, show_default=True)
@click.option(
    "--temp", type=click.FloatRange(0.0), default=0.0, show_default=True, help="Sampling temperature (0: greedy)."
)
@click.option("--compare", is_flag=True, help="Also run the prompt without the plan and show both.")
@runtime_options
def command(model: str, prompt: str, max_tokens: int, temp: float, compare: bool, **opts) -> None:
    """Complete PROMPT with MODEL (a GGUF file or a packaged model name) under a loop plan."""
    llm = load(model, **opts)
    looped = llm.plan
    runs = [looped, LoopPlan()] if compare else [looped]
    for plan in runs:
        if plan != llm.plan:
            llm.set_loop(plan)
        if compare:
            click.secho(f"--- {describe(llm)}", fg="cyan", err=True)
        n, secs = stream_completion(llm, prompt, max_tokens, temp, opts["seed"])
        click.secho(f"[{n} tokens, {n / secs:.1f} tok/s, {describe(llm)}]", fg="cyan", err=True)
    llm.close()
