"""`ggufloop serve`: llama-cpp-python's OpenAI-compatible server running a loop plan.

The plan reaches the server's own Llama as metadata overrides, so it is fixed for the life of
the server: requests choose a model by alias and cannot change layers or mix.
"""

from __future__ import annotations

import click

from . import _lib
from .cli import command
from .modelinfo import model_info
from .models import resolve
from .plan import LoopPlan, Mix, PlanError


def override_strings(plan: LoopPlan) -> list[str]:
    """The plan as the server's `key=type:value` overrides."""
    if plan.ranges:
        raise PlanError("the server takes start:endxcount plans; for a general schedule, bake it into the file "
                        "(ggufloop bake) and serve that")
    out = []
    for key, value in plan.kv_overrides().items():
        kind = "str" if isinstance(value, str) else "float" if isinstance(value, float) else "int"
        if kind == "str" and not value:
            continue
        out.append(f"{key}={kind}:{value}")
    return out


@command
@click.command()
@click.argument("model")
@click.option("--loop", "loop", default=None, metavar="PLAN", help="Loop plan, e.g. 10:15x3 (default: the file's own).")
@click.option("--mix", default=None, metavar="MIX", help="none, uniform, ema[:beta], autoalign[:T], noise[:seed].")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--ctx-size", "-c", type=click.IntRange(16), default=2048, show_default=True)
@click.option("--n-gpu-layers", "-ngl", type=int, default=0, show_default=True)
@click.option("--threads", "-t", type=click.IntRange(1), default=None)
@click.option("--verbose", "-v", is_flag=True)
def serve(model: str, loop: "str | None", mix: "str | None", host: str, port: int, ctx_size: int,
          n_gpu_layers: int, threads: "int | None", verbose: bool) -> None:
    """Serve MODEL over the OpenAI API (/v1/completions, /v1/chat/completions) with a loop plan."""
    try:
        import uvicorn
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError:
        raise _lib.BackendError("the server needs its extra packages: pip install 'ggufloop[server]'") from None
    _lib.require_patched()
    path = resolve(model)
    info = model_info(path)
    plan = LoopPlan.parse(loop) if loop is not None else info.stored_plan
    if mix is not None:
        plan = plan.with_mix(Mix.parse(mix))
    plan.validate(info.n_layer)
    extra = {"n_threads": threads, "n_threads_batch": threads} if threads else {}
    settings = ModelSettings(model=str(path), model_alias=path.stem, kv_overrides=override_strings(plan), n_ctx=ctx_size,
                             n_gpu_layers=n_gpu_layers, verbose=verbose, **extra)
    click.echo(f"serving {path.name} as '{path.stem}' with plan {plan} on http://{host}:{port}/v1", err=True)
    uvicorn.run(create_app(server_settings=ServerSettings(host=host, port=port), model_settings=[settings]),
                host=host, port=port, log_level="info" if verbose else "warning")
