"""`ggufloop chat`: an interactive looped chat with the model's own chat template."""

from __future__ import annotations

import sys
import time

import click

from .. import rpc
from ..errors import UserError
from ..plan import LoopPlan, Mix
from .options import describe, load, runtime_options

HELP = (
    "commands: /loop PLAN (e.g. /loop 12:16x2 keeps the mix, decode mode and MoE routing, /loop none), /mix MIX "
    "(e.g. /mix anchored:0.5), /decode full|bypass (bypass: answers run the block once), "
    "/moe free|freeze (MoE models: freeze reuses pass 0's expert routing), "
    "/compare (the last message again, unlooped), /reset, /quit"
)


def stream_reply(llm, messages: list[dict], max_tokens: int, temp: float) -> str:
    """Stream the assistant's answer to stdout and return it; an answer that reaches the end of the
    context stops there, with a notice."""
    t0, n, parts = time.perf_counter(), 0, []
    stream = llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=temp, stream=True)
    try:
        for chunk in stream:
            choice = chunk["choices"][0]
            text = choice["delta"].get("content") or ""
            if text:
                click.echo(text, nl=False)
                rpc.streamed(text)  # a lost RPC server's error then starts on a line of its own
                parts.append(text)
                n += 1
    except RuntimeError as err:  # llama.cpp found no room in the KV cache for the next token
        from .._compat import context_is_full

        if not context_is_full(err) or not parts:
            raise
        click.secho(" (the answer reached the end of the context)", fg="yellow", err=True)
    finally:
        stream.close()
    secs = time.perf_counter() - t0
    click.echo()
    rpc.streamed("\n")
    click.secho(f"[{n} tokens, {n / secs:.1f} tok/s, {describe(llm)}]", fg="cyan", err=True)
    return "".join(parts)


def reply(llm, messages: list[dict], max_tokens: int, temp: float) -> str | None:
    """Answer the last user message; when the conversation outgrows the context, drop the oldest
    exchanges (with a notice) until it fits; a message that alone does not fit is refused (None)."""
    while True:
        try:
            return stream_reply(llm, messages, max_tokens, temp)
        except ValueError as err:
            from .._compat import prompt_exceeds_context

            if prompt_exceeds_context(err) is None:
                raise
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:  # only the new message left
            messages.pop()
            click.echo(
                f"error: this message does not fit in the context of {llm.n_ctx()} tokens "
                "(shorten it, or start the chat with a larger --ctx-size)"
            )
            return None
        dropped = messages[first : first + 2]
        del messages[first : first + 2]
        click.secho(f"(context full: the oldest exchange was dropped, {len(dropped)} messages)", fg="yellow", err=True)


def compare(llm, messages: list[dict], max_tokens: int, temp: float, seed: int) -> None:
    """Answer the last user message again without the plan, under the looped answer, then go back to
    the plan: what looping changes, side by side (same sampling, same seed)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None:
        click.echo("error: /compare needs a message to answer first")
        return
    plan = llm.plan
    if not plan.is_looped:
        click.echo("error: the chat runs no plan (/loop PLAN first), so there is nothing to compare")
        return
    llm.set_loop(LoopPlan())
    try:
        llm.set_seed(seed)
        click.secho(f"--- without the plan ({describe(llm)}):", fg="cyan")
        stream_reply(llm, messages[: last + 1], max_tokens, temp)
    finally:
        llm.set_loop(plan)
    click.secho(f"--- back to {describe(llm)}", fg="cyan")


def handle_command(llm, line: str, messages: list[dict], settings: dict) -> bool:
    """Run a /command; returns False to quit."""
    cmd, _, arg = line.partition(" ")
    if cmd in ("/quit", "/exit"):
        return False
    try:
        if cmd == "/reset":
            del messages[1 if messages and messages[0]["role"] == "system" else 0 :]
            llm.reset()
            click.echo("(conversation cleared)")
        elif cmd == "/loop" and arg:
            plan = LoopPlan.parse(arg)
            if "/" not in arg and plan.end and not plan.ranges:
                plan = plan.with_mix(llm.mix)  # new layers, same mix
            if "@" not in arg and plan.end and not plan.ranges:
                plan = plan.with_decode(llm.decode).with_moe(llm.moe)  # and the same decode mode and routing
            llm.set_loop(plan)
            click.echo(f"({describe(llm)})")
        elif cmd == "/compare":
            compare(llm, messages, **settings)
        elif cmd == "/mix" and arg:
            llm.set_mix(Mix.parse(arg))
            click.echo(f"({describe(llm)})")
        elif cmd == "/decode" and arg:
            llm.set_decode(arg.strip().lower())
            click.echo(f"({describe(llm)})")
        elif cmd == "/moe" and arg:
            llm.set_moe(arg.strip().lower())
            click.echo(f"({describe(llm)})")
        else:
            click.echo(HELP)
    except UserError as err:
        click.echo(f"error: {err}")
    return True


@click.command("chat")
@click.argument("model", required=False)
@click.option("--max-tokens", "-n", type=click.IntRange(1), default=256, show_default=True, help="Longest answer.")
@click.option("--temp", type=click.FloatRange(0.0), default=0.7, show_default=True, help="Sampling temperature.")
@click.option("--system", default=None, help="A system message.")
@runtime_options
def command(model: str | None, max_tokens: int, temp: float, system: str | None, **opts) -> None:
    """Chat with MODEL under a loop plan; MODEL defaults to the packaged SmolLM2-135M-Instruct.

    Type a message and press Enter; /loop, /mix, /reset and /quit change the session, and
    /compare answers the last message again without the plan.
    """
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 become U+FFFD, not a crash
    llm = load(model, **opts)
    click.echo(f"ggufloop chat: {describe(llm)}. {HELP}")
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            click.echo()
            break
        if not line:
            continue
        if line.startswith("/"):
            settings = {"max_tokens": max_tokens, "temp": temp, "seed": opts["seed"]}
            if not handle_command(llm, line, messages, settings):
                break
            continue
        messages.append({"role": "user", "content": line})
        llm.set_seed(opts["seed"])  # every answer seeded alike, so /compare sees the same sampling
        answer = reply(llm, messages, max_tokens, temp)
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    llm.close()
