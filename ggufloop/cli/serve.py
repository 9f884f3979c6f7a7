"""`ggufloop serve`: one model over the OpenAI API, with several loop plans chosen per request.

The logic is in ``ggufloop.server``; this command parses the options, loads the model once and
runs uvicorn.
"""

from __future__ import annotations

import math

import click

from ..plan import LoopPlan
from .options import check_context, placement_options, plan_from, plan_options

API_KEY_ENV = "GGUFLOOP_API_KEY"  # ggufloop.server.API_KEY_ENV, repeated so --help needs no FastAPI
MAX_INPUT_CHARS = 1_000_000  # ggufloop.server.DEFAULT_MAX_INPUT_CHARS, repeated for the same reason


@click.command("serve")
@click.argument("model")
@click.option(
    "--plan",
    "plans",
    multiple=True,
    metavar="NAME=PLAN",
    help="A plan offered as model id <stem>@NAME (repeatable), e.g. uniform=10:15x3/uniform. "
    "<stem>@none (the unlooped model) and <stem> (the default plan) are always offered.",
)
@plan_options(default_help=" The default plan, served as <stem>; default: the plan stored in the file, if any.")
@click.option(
    "--api-key",
    envvar=API_KEY_ENV,
    show_envvar=True,
    default=None,
    metavar="KEY",
    help="Ask every request for 'Authorization: Bearer KEY' (else 401). Printable ASCII, no blank at either end.",
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told otherwise)."
)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--ctx-size", "-c", type=click.IntRange(16), default=2048, show_default=True)
@click.option(
    "--max-tokens",
    type=click.IntRange(1),
    default=None,
    metavar="N",
    help="The most tokens one request generates: a request asking for more, or for no limit, gets N "
    "instead (clamped, not refused). Default: the context size.",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="The most seconds of generation one request gets, counted from when it has the model and checked "
    "after each token: the answer then ends with the text so far and finish_reason 'length', as at "
    "max_tokens (a stream: its last chunk, then [DONE]). Default: no limit.",
)
@click.option(
    "--max-input-chars",
    type=click.IntRange(1),
    default=MAX_INPUT_CHARS,
    show_default=True,
    metavar="N",
    help="The most characters of text one request sends (prompt, messages, /extras/tokenize input: its "
    "strings together), and the most token ids of a detokenize request; more is refused with 400.",
)
@placement_options
@click.option("--threads", "-t", type=click.IntRange(1), default=None)
@click.option("--verbose", "-v", is_flag=True)
def command(
    model: str,
    plans: tuple[str, ...],
    loop: str | None,
    mix: str | None,
    decode: str | None,
    moe: str | None,
    api_key: str | None,
    host: str,
    port: int,
    ctx_size: int,
    max_tokens: int | None,
    request_timeout: float | None,
    max_input_chars: int,
    n_gpu_layers: int | None,
    rpc: str | None,
    tensor_split: str | None,
    threads: int | None,
    verbose: bool,
) -> None:
    """Serve MODEL over the OpenAI API (/v1/models, /v1/completions, /v1/chat/completions).

    Every plan is an OpenAI model id: requests choose one with the `model` field, and the
    loaded weights switch between plans without reloading. Example:

      ggufloop serve smollm2-135m-instruct --plan uniform=10:15x3/uniform --plan ema=10:15x3/ema:0.3
    """
    from ..errors import BackendError, OptionError, PlanError
    from ..gguf_io import model_info
    from ..models import resolve
    from ..rpc import Placement

    if api_key is not None:
        check_api_key(api_key)
    if request_timeout is not None and not math.isfinite(request_timeout):
        raise OptionError(f"--request-timeout takes a finite number of seconds, not {request_timeout}")
    placement = Placement.from_options(rpc, tensor_split, n_gpu_layers)
    try:
        import uvicorn

        from .. import server
    except ImportError:
        raise BackendError("the server needs its extra packages: pip install 'ggufloop[server]'") from None
    from .. import _lib

    _lib.require_patched()
    if not verbose:
        _lib.quiet_logs()
    path = resolve(model)
    info = model_info(path)
    named: dict[str, LoopPlan] = {}
    for text in plans:
        name, plan = server.parse_named_plan(text)
        if name in named:
            raise PlanError(f"plan name {name!r} is given twice")
        named[name] = plan
    default = plan_from(loop, mix, info.stored_plan, decode, moe)
    config = server.ServeConfig(
        model_path=path,
        plans=named,
        default=default,
        n_ctx=ctx_size,
        n_gpu_layers=placement.n_gpu_layers,
        rpc=placement.rpc,
        tensor_split=placement.tensor_split,
        threads=threads,
        api_key=api_key,
        verbose=verbose,
        max_tokens=max_tokens,
        request_timeout=request_timeout,
        max_input_chars=max_input_chars,
    )
    ids = server.model_ids(config)
    for plan in ids.values():
        plan.validate(info.n_layer)
    check_context(info, ctx_size, max(plan.virtual_depth(info.n_layer) for plan in ids.values()))
    engine = server.PlanServer(config)
    click.echo(
        f"serving {path.name} as '{config.stem}' with plan {ids[config.stem]} on http://{host}:{port}/v1", err=True
    )
    for model_id, plan in ids.items():
        click.echo(f"  model {model_id}: plan {plan}", err=True)
    for device in engine.llm.devices:
        click.echo(f"  offloading to {device}", err=True)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: serving on {host} without an API key: anyone who can reach it can use it", err=True)
    try:
        uvicorn.run(server.create_app(engine), host=host, port=port, log_level="info" if verbose else "warning")
    finally:
        engine.close()


def check_api_key(key: str) -> None:
    """Refuse a key no client could send: empty, with a blank at either end (HTTP strips it), or with a
    character outside printable ASCII (header encodings differ between clients)."""
    from ..errors import OptionError

    where = f"--api-key (or {API_KEY_ENV})"
    if not key.strip():
        raise OptionError(f"{where} is empty: give a key, or leave the option out to serve without one")
    if key != key.strip():
        raise OptionError(f"{where} starts or ends with a blank, which no client can send: remove it")
    if not (key.isascii() and key.isprintable()):
        raise OptionError(
            f"{where} holds a character outside printable ASCII, which clients cannot all send alike: "
            "use letters, digits and punctuation"
        )
