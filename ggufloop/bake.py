"""`ggufloop bake`: a copy of a GGUF file with a loop plan stored in its metadata.

Only the metadata is rewritten (with the gguf package); tensors are copied byte for byte, so any
build of the patched backend, llama.cpp's own tools included, runs the file looped by default.
"""

from __future__ import annotations

from pathlib import Path

import click
import gguf

from .cli import command
from .gguf_rewrite import rewrite_gguf
from .modelinfo import check_gguf, model_info
from .models import resolve
from .plan import KEY_LAYERS, LoopPlan, Mix, PlanError


def bake_plan(src: "str | Path", dst: "str | Path", plan: LoopPlan) -> Path:
    """Write dst: src with plan in its ggufloop.* metadata keys (any earlier plan replaced)."""
    src, dst = Path(src), Path(dst)
    check_gguf(src)
    if src.resolve() == dst.resolve():
        raise PlanError("the output must be a new file, not the model itself")
    plan.validate(model_info(src).n_layer)

    def add_plan(writer: gguf.GGUFWriter) -> None:
        for key, value in plan.kv_overrides().items():
            if isinstance(value, int):
                writer.add_uint32(key, value)
            elif isinstance(value, float):
                writer.add_float32(key, value)
            elif key != KEY_LAYERS or value:
                writer.add_string(key, value)

    return rewrite_gguf(gguf.GGUFReader(src), dst, add=add_plan)


@command
@click.command()
@click.argument("model")
@click.option("--loop", "loop", required=True, metavar="PLAN", help="The plan to store, e.g. 10:15x3.")
@click.option("--mix", default=None, metavar="MIX", help="none, uniform, ema[:beta], autoalign[:T], noise[:seed].")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The new GGUF file.")
def bake(model: str, loop: str, mix: "str | None", output: str) -> None:
    """Store a loop plan in a copy of MODEL's metadata (tensors unchanged)."""
    plan = LoopPlan.parse(loop)
    if mix is not None:
        plan = plan.with_mix(Mix.parse(mix))
    out = bake_plan(resolve(model), output, plan)
    click.echo(f"wrote {out} with plan {plan}")
