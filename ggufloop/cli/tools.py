"""`ggufloop tools`: where llama.cpp's own programs from the patched tree are, and a plan as the
``--override-kv`` arguments they take."""

from __future__ import annotations

import shlex

import click

from .options import plan_from, plan_options


@click.command("tools")
@click.argument("name", required=False)
@plan_options(default_help="")
def command(name: str | None, loop: str | None, mix: str | None, decode: str | None, moe: str | None) -> None:
    """Where llama.cpp's programs are, and a plan as their --override-kv arguments.

    The backend's build also makes llama.cpp's own rpc-server, llama-perplexity, llama-quantize,
    llama-bench and llama-completion from the patched tree, next to its libraries. Each runs a loop
    plan given as metadata overrides, except llama-bench, which takes none: give it a copy of the
    model with the plan baked in (`ggufloop bake`); a baked plan needs no arguments in any of them.
    Without NAME: every program and its path. With NAME: that program's path. With --loop (and
    --mix, --decode, --moe): the plan as the arguments, quoted for a shell.

    \b
      ggufloop tools
      M=$(ggufloop models path smollm2-135m-instruct)
      ggufloop bake "$M" --loop 10:15x3/uniform -o looped.gguf
      $(ggufloop tools llama-bench) -m "$M" -m looped.gguf
      $(ggufloop tools llama-completion) -m "$M" -no-cnv -n 32 \\
          -p "The capital of France is" $(ggufloop tools --loop 10:15x3/uniform)
    """
    from .. import tools
    from ..errors import OptionError

    plan = plan_from(loop, mix, None, decode, moe)
    if name is not None and name not in tools.PROGRAMS:
        raise OptionError(f"unknown program {name!r}: expected one of {', '.join(tools.PROGRAMS)}")
    if plan is not None:
        if name is not None:
            raise OptionError("give a program NAME or a plan (--loop ...), not both: the plan's arguments go after it")
        click.echo(shlex.join(a for kv in plan.override_strings() for a in ("--override-kv", kv)))
        return
    if name is not None:
        click.echo(tools.program(name))
        return
    for program, (_, what) in tools.PROGRAMS.items():
        path = tools.find(program)
        click.echo(f"{program:<17} {path if path else '(missing: rebuild with `make backend`)'}  # {what}")
