"""`ggufloop bake`: a copy of a GGUF file with a loop plan stored in its metadata.

Only the metadata is rewritten; tensors are copied byte for byte, so any build of the patched
backend, llama.cpp's own tools included, runs the file looped by default.
"""

from __future__ import annotations

import click

from .options import plan_from, plan_options, writable_file


@click.command("bake")
@click.argument("model")
@plan_options(required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The new GGUF file.")
def command(model: str, loop: str, mix: str | None, decode: str | None, moe: str | None, output: str) -> None:
    """Store a loop plan in a copy of MODEL's metadata (tensors unchanged)."""
    from ..errors import PlanError
    from ..gguf_io import metadata, open_gguf, write_plan
    from ..models import resolve

    plan = plan_from(loop, mix, decode=decode, moe=moe)
    path = resolve(model)
    if why := plan.routing_refusal(metadata(open_gguf(path))):  # what generate and chat would refuse
        raise PlanError(why)
    out = write_plan(path, writable_file(output), plan)
    click.echo(f"wrote {out} with plan {plan}")
