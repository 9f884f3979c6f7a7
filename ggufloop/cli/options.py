"""Options and helpers shared by the commands: the plan options (``--loop``/``--mix``, parsed
here and nowhere else), the runtime options of commands that run a model, model loading, and
llama.cpp's log handling. Nothing here loads llama.cpp until a command runs a model.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from ..plan import LoopPlan, Mix

if TYPE_CHECKING:
    from ..runtime import LoopedLlama

LOOP_HELP = (
    "Loop plan, e.g. 10:15x3 (layers 10..14, 3 passes in total), 10:15x3/uniform (with its mix) or "
    "0:20,10:30 (a general schedule)."
)
MIX_HELP = "How passes are mixed: none, uniform, ema[:beta], autoalign[:T], noise[:seed]."


def plan_options(
    required: bool = False, default_help: str = " Default: the plan stored in the file, if any."
) -> Callable:
    """--loop PLAN and --mix MIX; the command receives them as the strings ``loop`` and ``mix``
    (combine them with ``plan_from``)."""

    def decorate(fn: Callable) -> Callable:
        fn = click.option("--mix", default=None, metavar="MIX", help=MIX_HELP + " Default: the plan's own.")(fn)
        return click.option(
            "--loop",
            "loop",
            required=required,
            default=None,
            metavar="PLAN",
            help=LOOP_HELP + ("" if required else default_help),
        )(fn)

    return decorate


def plan_from(loop: str | None, mix: str | None, stored: LoopPlan | None = None) -> LoopPlan | None:
    """The plan that --loop and --mix ask for: --loop's plan (else the stored one), with --mix's mix
    when given; None when neither option is given and there is no stored plan to fall back on."""
    if loop is None and mix is None:
        return stored
    plan = LoopPlan.parse(loop) if loop is not None else (stored or LoopPlan())
    return plan.with_mix(Mix.parse(mix)) if mix is not None else plan


def runtime_options(fn: Callable) -> Callable:
    """Options shared by every command that runs a model (the plan options included)."""
    options = [
        click.option(
            "--threads", "-t", type=click.IntRange(1), default=None, help="CPU threads (default: llama.cpp's choice)."
        ),
        click.option(
            "--ctx-size", "-c", type=click.IntRange(16), default=2048, show_default=True, help="Context size in tokens."
        ),
        click.option(
            "--n-gpu-layers",
            "-ngl",
            type=int,
            default=0,
            show_default=True,
            help="Physical layers to offload to the GPU (-1: all).",
        ),
        click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed."),
        click.option("--verbose", "-v", is_flag=True, help="Show llama.cpp's logs."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return plan_options()(fn)


_llama_log_sink = None


def quiet_llama_logs() -> None:
    """Drop llama.cpp's informational log lines; errors reach users through exceptions instead."""
    global _llama_log_sink
    import llama_cpp

    @llama_cpp.llama_log_callback
    def sink(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        pass

    _llama_log_sink = sink
    llama_cpp.llama_log_set(sink, ctypes.c_void_p(0))


def load(
    model: str | None,
    loop: str | None,
    mix: str | None,
    threads: int | None,
    ctx_size: int,
    n_gpu_layers: int,
    seed: int,
    verbose: bool,
    **extra: Any,
) -> LoopedLlama:
    """Resolve the model argument and open it with the plan the options ask for."""
    from ..gguf_io import model_info
    from ..models import resolve
    from ..runtime import LoopedLlama

    if not verbose:
        quiet_llama_logs()
    path = resolve(model)
    stored = model_info(path).stored_plan if loop is None and mix is not None else None
    plan = plan_from(loop, mix, stored)
    return LoopedLlama(
        str(path),
        loop=plan,
        n_ctx=ctx_size,
        n_threads=threads,
        n_gpu_layers=n_gpu_layers,
        seed=seed,
        verbose=verbose,
        **extra,
    )


def describe(llm: LoopedLlama) -> str:
    """One line on what the model runs."""
    return f"plan {llm.plan}, virtual depth {llm.virtual_depth} of {llm.n_layer_phys} layers"
