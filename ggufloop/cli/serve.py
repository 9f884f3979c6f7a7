"""`ggufloop serve`: llama-cpp-python's OpenAI-compatible server running a loop plan.

The plan reaches the server's own Llama as metadata overrides, so it is fixed for the life of
the server: requests choose a model by alias and cannot change layers or mix.
"""

from __future__ import annotations

import click

from .options import plan_from, plan_options


@click.command("serve")
@click.argument("model")
@plan_options()
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told otherwise)."
)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--ctx-size", "-c", type=click.IntRange(16), default=2048, show_default=True)
@click.option("--n-gpu-layers", "-ngl", type=int, default=0, show_default=True)
@click.option("--threads", "-t", type=click.IntRange(1), default=None)
@click.option("--verbose", "-v", is_flag=True)
def command(
    model: str,
    loop: str | None,
    mix: str | None,
    host: str,
    port: int,
    ctx_size: int,
    n_gpu_layers: int,
    threads: int | None,
    verbose: bool,
) -> None:
    """Serve MODEL over the OpenAI API (/v1/completions, /v1/chat/completions) with a loop plan."""
    from .. import _lib
    from ..errors import BackendError, PlanError
    from ..gguf_io import model_info
    from ..models import resolve

    try:
        import uvicorn
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError:
        raise BackendError("the server needs its extra packages: pip install 'ggufloop[server]'") from None
    _lib.require_patched()
    path = resolve(model)
    info = model_info(path)
    plan = plan_from(loop, mix, info.stored_plan)
    plan.validate(info.n_layer)
    if plan.ranges:
        raise PlanError(
            "the server takes start:endxcount plans; for a general schedule, bake it into the file "
            "(ggufloop bake) and serve that"
        )
    extra = {"n_threads": threads, "n_threads_batch": threads} if threads else {}
    settings = ModelSettings(
        model=str(path),
        model_alias=path.stem,
        kv_overrides=plan.override_strings(),
        n_ctx=ctx_size,
        n_gpu_layers=n_gpu_layers,
        verbose=verbose,
        **extra,
    )
    click.echo(f"serving {path.name} as '{path.stem}' with plan {plan} on http://{host}:{port}/v1", err=True)
    uvicorn.run(
        create_app(server_settings=ServerSettings(host=host, port=port), model_settings=[settings]),
        host=host,
        port=port,
        log_level="info" if verbose else "warning",
    )
