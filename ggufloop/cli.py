"""The `ggufloop` command line: a thin layer over the Python API, one module per command."""

from __future__ import annotations

import ctypes
import sys
from typing import Any, Callable

import click

from . import _lib
from .models import ModelFetchError
from .modelinfo import ModelFileError
from .plan import LoopPlan, Mix, PlanError
from .tasks import TaskError

USER_ERRORS = (PlanError, _lib.BackendError, ModelFileError, ModelFetchError, TaskError, FileNotFoundError)


class Group(click.Group):
    """Ends a user mistake with a one-line error and exit code 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ggufloop")
def main() -> None:
    """Inner loop inference for GGUF models: re-run a block of layers at inference time.

    A plan such as 10:15x3 runs layers 0..9, then 10..14 three times, then the rest; weights
    are shared and every pass has its own KV cache. --mix chooses how passes are combined
    (none, uniform, ema[:beta], autoalign[:T], noise[:seed]).
    """


_llama_log_sink = None


def quiet_llama_logs() -> None:
    """Drop llama.cpp's log lines (errors reach users through exceptions instead)."""
    global _llama_log_sink
    import llama_cpp

    @llama_cpp.llama_log_callback
    def sink(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        pass

    _llama_log_sink = sink
    llama_cpp.llama_log_set(sink, ctypes.c_void_p(0))


def runtime_options(fn: Callable) -> Callable:
    """Options shared by every command that runs a model."""
    options = [
        click.option("--loop", "loop", default=None, metavar="PLAN",
                     help="Loop plan, e.g. 10:15x3 (layers 10..14, 3 passes) or 0:20,10:30. Default: the plan stored in the file, if any."),
        click.option("--mix", default=None, metavar="MIX",
                     help="How passes are mixed: none, uniform, ema[:beta], autoalign[:T], noise[:seed]."),
        click.option("--threads", "-t", type=click.IntRange(1), default=None, help="CPU threads (default: llama.cpp's choice)."),
        click.option("--ctx-size", "-c", type=click.IntRange(16), default=2048, show_default=True, help="Context size in tokens."),
        click.option("--n-gpu-layers", "-ngl", type=int, default=0, show_default=True,
                     help="Physical layers to offload to the GPU (-1: all)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed."),
        click.option("--verbose", "-v", is_flag=True, help="Show llama.cpp's logs."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def load(model: "str | None", loop: "str | None", mix: "str | None", threads: "int | None", ctx_size: int,
         n_gpu_layers: int, seed: int, verbose: bool, **extra: Any):
    """Resolve the model argument and open it with the plan."""
    from .models import resolve
    from .runtime import LoopedLlama

    if not verbose:
        quiet_llama_logs()
    plan = LoopPlan.parse(loop) if loop is not None else None
    if mix is not None:
        plan = (plan or LoopPlan()).with_mix(Mix.parse(mix))
    path = resolve(model)
    return LoopedLlama(str(path), loop=plan, n_ctx=ctx_size, n_threads=threads, n_gpu_layers=n_gpu_layers,
                       seed=seed, verbose=verbose, **extra)


def describe(llm) -> str:
    """One line on what the model runs."""
    return f"plan {llm.plan}, virtual depth {llm.virtual_depth} of {llm.n_layer_phys} layers"


def command(fn: Callable) -> Callable:
    """Register a command module's click command on the group."""
    main.add_command(fn)
    return fn


# each command module registers its command on import
from . import bake, bench, chat, eval_cmd, generate, info, models_cmd, serve, sweep, trace  # noqa: E402,F401
