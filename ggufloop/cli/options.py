"""Options and helpers shared by the commands: the plan options (``--loop``/``--mix``, parsed
here and nowhere else), the runtime options of commands that run a model, model loading, and
llama.cpp's log handling. Nothing here loads llama.cpp until a command runs a model.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import OptionError
from ..plan import DECODES, MOES, LoopPlan, Mix, mix_help
from ..plan import MIXES as PLAN_MIXES

if TYPE_CHECKING:
    from ..eval.prefix import PrefixConfig
    from ..gguf_io import ModelInfo
    from ..runtime import LoopedLlama

LOOP_HELP = (
    "Loop plan, e.g. 10:15x3 (layers 10..14, 3 passes in total), 10:15x3/uniform (with its mix) or "
    "0:20,10:30 (a general schedule); options @bypass, @freeze, and @kv=first or @kv=last: one KV slot per "
    "layer instead of per pass, the unlooped model's KV memory, not exact (logits then depend on the ubatch size)."
)
DEFAULT_CTX = 2048
MIX_HELP = f"How passes are mixed: {mix_help()} (docs/method.md)."
DECODE_HELP = (
    "What generated tokens run: full (the plan) or bypass (the block once; prompts still run the plan). "
    "Default: the plan's own (PLAN@bypass), else full."
)
MOE_HELP = (
    "MoE models: how the block's expert routers treat the later passes: free (route anew) or freeze (reuse "
    "pass 0's experts and gate weights). Default: the plan's own (PLAN@freeze), else free."
)


def plan_options(
    required: bool = False, default_help: str = " Default: the plan stored in the file, if any."
) -> Callable:
    """--loop PLAN, --mix MIX, --decode MODE and --moe ROUTING; the command receives them as the strings
    ``loop``, ``mix``, ``decode`` and ``moe`` (combine them with ``plan_from``)."""

    def decorate(fn: Callable) -> Callable:
        fn = click.option("--moe", default=None, type=click.Choice(MOES), metavar="ROUTING", help=MOE_HELP)(fn)
        fn = click.option("--decode", default=None, type=click.Choice(DECODES), metavar="MODE", help=DECODE_HELP)(fn)
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


def plan_from(
    loop: str | None,
    mix: str | None,
    stored: LoopPlan | None = None,
    decode: str | None = None,
    moe: str | None = None,
) -> LoopPlan | None:
    """The plan that --loop, --mix, --decode and --moe ask for: --loop's plan (else the stored one), with
    --mix's mix, --decode's mode and --moe's routing when given; None when no option is given and there
    is no stored plan to fall back on."""
    if loop is None and mix is None and decode is None and moe is None:
        return stored
    plan = LoopPlan.parse(loop) if loop is not None else (stored or LoopPlan())
    plan = plan.with_mix(Mix.parse(mix)) if mix is not None else plan
    plan = plan.with_decode(decode) if decode is not None else plan
    return plan.with_moe(moe) if moe is not None else plan


def split_list(text: str) -> list[str]:
    """Split a comma-separated list at the commas outside brackets, so that an inline weight table
    (``uniform,weights:[[1,0],[0.5,0.5]]``) stays one item."""
    items, depth, current = [], 0, []
    for ch in text:
        depth += (ch in "[(") - (ch in "])")
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def parse_mixes(text: str) -> tuple[str, ...]:
    """``none,uniform,ema:0.3`` -> the mixes, each checked."""
    mixes = tuple(str(Mix.parse(m)) for m in split_list(text))
    if not mixes:
        raise OptionError(f"no mix given: expected a comma-separated list of {', '.join(PLAN_MIXES)}")
    return mixes


def parse_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise OptionError(f"bad counts {text!r}: expected comma-separated integers such as 2,3,4") from None
    if not counts:
        raise OptionError("no count given")
    return counts


_SECONDS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``1.5h`` (a bare number is seconds) -> seconds."""
    t = text.strip().lower()
    unit, number = (t[-1], t[:-1]) if t[-1:] in _SECONDS else ("s", t)
    try:
        value = float(number)
    except ValueError:
        raise OptionError(
            f"bad duration {text!r}: expected a number with s, m or h, such as 90s, 30m or 1.5h"
        ) from None
    if not (value > 0 and value != float("inf")):
        raise OptionError(f"bad duration {text!r}: it must be positive and finite")
    return value * _SECONDS[unit]


def _cannot_create_in(folder: Path) -> str | None:
    """None when a file can be created in folder, else why not: a real attempt (os.access misjudges
    root, read-only mounts and special filesystems such as /proc)."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".ggufloop-probe-")
    except OSError as err:
        return err.strerror or str(err)
    os.close(fd)
    os.unlink(name)
    return None


def writable_dir(path: str | Path) -> Path:
    """path as an output folder, created if needed; checked before any work starts."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OptionError(f"cannot create the output folder {out}: {err.strerror}") from None
    if why := _cannot_create_in(out):
        raise OptionError(f"cannot write to the output folder {out}: {why}")
    return out


def writable_file(path: str | Path) -> Path:
    """path as an output file whose folder exists and is writable; checked before any work starts."""
    out = Path(path)
    if out.is_dir():
        raise OptionError(f"{out} is a folder: give a file name")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise OptionError(f"cannot write {out}: its folder does not exist")
    if why := _cannot_create_in(parent):
        raise OptionError(f"cannot write {out}: {why}")
    if out.exists() and not os.access(out, os.W_OK):
        raise OptionError(f"cannot write {out}: permission denied")
    return out


def store_options(fn: Callable) -> Callable:
    """--shots, --db and --cluster: the options of every command that scores benchmark items."""
    from ..eval.store import DEFAULT_DB

    options = [
        click.option(
            "--shots", type=click.IntRange(0), default=None, help="Few-shot examples (default: the paper's per task)."
        ),
        click.option(
            "--db",
            type=click.Path(dir_okay=False),
            default=str(DEFAULT_DB),
            show_default=True,
            help="Results database (resumes from it: nothing is scored twice).",
        ),
        click.option(
            "--cluster",
            default=None,
            metavar="ADDRESS",
            help="Score on this Ray cluster (an address, or auto); --threads is then per unit of work (default 1).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


RPC_HELP = (
    "Split the model over llama.cpp RPC servers (started with `ggufloop rpc-server` on each machine): "
    "their devices take the offloaded layers, then this machine's GPUs."
)
NGL_HELP = (
    "Physical layers taken off this machine's CPU, onto its GPUs and the --rpc servers; the first "
    "layers stay on the CPU (-1: all). Default: 0, or -1 with --rpc."
)
TENSOR_SPLIT_HELP = (
    "Each device's share of the offloaded layers, in device order (the --rpc servers' devices, then "
    "this machine's GPUs), e.g. 3,1. Default: by free memory."
)


def placement_options(fn: Callable) -> Callable:
    """--rpc HOST:PORT[,...], --tensor-split and -ngl; the command receives them as ``rpc``,
    ``tensor_split`` and ``n_gpu_layers`` (combine them with ``Placement.from_options``)."""
    options = [
        click.option("--n-gpu-layers", "-ngl", type=int, default=None, help=NGL_HELP),
        click.option("--rpc", default=None, metavar="HOST:PORT[,HOST:PORT...]", help=RPC_HELP),
        click.option("--tensor-split", default=None, metavar="SHARES", help=TENSOR_SPLIT_HELP),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def prefix_cache_option(fn: Callable) -> Callable:
    """--prefix-cache MiB: prefix reuse for searches over naive block plans (ggufloop/eval/prefix.py)."""
    return click.option(
        "--prefix-cache",
        type=click.IntRange(0),
        default=0,
        show_default=True,
        metavar="MIB",
        help="Score block plans s:e xK (any mix but noise) from layer s on, on the unlooped model's states kept for "
        "every item (exact: the full run's scores bit for bit; llama, qwen2, qwen3, gemma3), in at most MIB MiB "
        "of memory (about tokens x width x 4 bytes per item and block start; over it, states are recomputed). "
        "0: off. Saves the first s layers of every candidate's evaluation, for one capture pass per item.",
    )(fn)


def prefix_config(path: Path, plans: list, mib: int) -> PrefixConfig | None:
    """--prefix-cache's settings for these plans (None: off); says how many of them it scores from their
    block's first layer on, and why not the rest."""
    if not mib:
        return None
    from ..eval.prefix import PrefixConfig, refusal
    from ..gguf_io import model_info
    from ..plan import LoopPlan

    arch = model_info(path).arch
    why = [refusal(LoopPlan.parse(str(p)), arch) for p in plans]
    reasons = sorted({w for w in why if w})
    click.echo(
        f"prefix reuse: {why.count(None)} of {len(plans)} plans from their block's first layer on"
        + (f" (the others: {'; '.join(reasons)})" if reasons else ""),
        err=True,
    )
    return PrefixConfig.for_plans(mib << 20, plans, arch)


def runtime_options(fn: Callable) -> Callable:
    """Options shared by every command that runs a model (the plan options included)."""
    options = [
        click.option(
            "--threads", "-t", type=click.IntRange(1), default=None, help="CPU threads (default: llama.cpp's choice)."
        ),
        click.option(
            "--ctx-size",
            "-c",
            type=click.IntRange(16, 2**31 - 1),
            default=None,
            help="Context size in tokens, at most the model's trained context (default: 2048, or the trained "
            "context when it is smaller).",
        ),
        click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed."),
        click.option("--verbose", "-v", is_flag=True, help="Show llama.cpp's logs."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return plan_options()(placement_options(fn))


def quiet_llama_logs() -> None:
    """Drop llama.cpp's informational log lines; errors reach users through exceptions instead."""
    from .._lib import quiet_logs

    quiet_logs()


def load(
    model: str | None,
    loop: str | None,
    mix: str | None,
    threads: int | None,
    ctx_size: int | None,
    n_gpu_layers: int | None,
    seed: int,
    verbose: bool,
    rpc: str | None = None,
    tensor_split: str | None = None,
    decode: str | None = None,
    moe: str | None = None,
    **extra: Any,
) -> LoopedLlama:
    """Resolve the model argument and open it with the plan and the placement the options ask for."""
    from ..gguf_io import model_info
    from ..models import resolve
    from ..rpc import Placement
    from ..runtime import LoopedLlama

    placement = Placement.from_options(rpc, tensor_split, n_gpu_layers)
    if not verbose:
        quiet_llama_logs()
    path = resolve(model)
    info = model_info(path)
    stored = info.stored_plan if loop is None and (mix, decode, moe) != (None, None, None) else None
    plan = plan_from(loop, mix, stored, decode, moe)
    if ctx_size is None:
        ctx_size = min(DEFAULT_CTX, info.context_length or DEFAULT_CTX)
    check_context(info, ctx_size, (plan or info.stored_plan).virtual_depth(info.n_layer))
    return LoopedLlama(
        str(path),
        loop=plan,
        n_ctx=ctx_size,
        n_threads=threads,
        n_threads_batch=threads,  # prompt processing too: llama-cpp-python's default is every core
        seed=seed,
        verbose=verbose,
        **placement.llama_kwargs(),
        **extra,
    )


def check_context(info: ModelInfo, n_ctx: int, depth: int) -> None:
    """Refuse a context larger than the model's trained context, or whose KV cache would not fit in memory."""
    if info.context_length and n_ctx > info.context_length:
        raise OptionError(
            f"--ctx-size {n_ctx} is larger than the context {info.path.name} was trained on "
            f"({info.context_length} tokens)"
        )
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    need = info.kv_bytes(n_ctx, depth)
    if need > memory:
        raise OptionError(
            f"--ctx-size {n_ctx} needs a KV cache of {need / 2**30:.1f} GiB at virtual depth {depth}, "
            f"more than this machine's {memory / 2**30:.1f} GiB of memory"
        )


def describe(llm: LoopedLlama) -> str:
    """One line on what the model runs (and where, when it is split over RPC servers)."""
    where = (
        f", offloaded to {', '.join(d.name + ' ' + (d.endpoint or 'local') for d in llm.devices)}"
        if llm.devices
        else ""
    )
    return f"plan {llm.plan}, virtual depth {llm.virtual_depth} of {llm.n_layer_phys} layers{where}"
