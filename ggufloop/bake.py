"""`ggufloop bake`: a copy of a GGUF file with a loop plan stored in its metadata.

Only the metadata is rewritten (with the gguf package); tensors are copied byte for byte, so any
build of the patched backend, llama.cpp's own tools included, runs the file looped by default.
"""

from __future__ import annotations

from pathlib import Path

import click
import gguf

from .cli import command
from .modelinfo import check_gguf, model_info
from .models import resolve
from .plan import KEY_COUNT, KEY_END, KEY_LAYERS, KEY_START, LoopPlan, Mix, PlanError


def bake_plan(src: "str | Path", dst: "str | Path", plan: LoopPlan) -> Path:
    """Write dst: src with plan in its ggufloop.* metadata keys (any earlier plan replaced)."""
    src, dst = Path(src), Path(dst)
    check_gguf(src)
    if src.resolve() == dst.resolve():
        raise PlanError("the output must be a new file, not the model itself")
    plan.validate(model_info(src).n_layer)
    reader = gguf.GGUFReader(src)
    arch = bytes(reader.fields[gguf.Keys.General.ARCHITECTURE].parts[-1]).decode()
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith(("GGUF.", "ggufloop.")):
            continue
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), val_type, sub_type=sub_type)
    for key, value in plan.kv_overrides().items():
        if key in (KEY_START, KEY_END, KEY_COUNT) or isinstance(value, int):
            writer.add_uint32(key, int(value))
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif key != KEY_LAYERS or value:
            writer.add_string(key, value)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    return dst


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
