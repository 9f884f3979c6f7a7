"""`ggufloop info MODEL`: what a GGUF file holds and whether it can loop."""

from __future__ import annotations

import click

KV_NOTE = "one KV slot per layer, not per pass (the unlooped model's KV memory); not exact: logits depend on n_ubatch"


def rows(model: str) -> list[tuple[str, str]]:
    """(label, value) lines about a model file, read from its header."""
    from .._lib import supported_archs
    from ..gguf_io import model_info
    from ..models import resolve

    mi = model_info(resolve(model))
    support = "yes" if mi.loop_supported else f"no (supported: {', '.join(supported_archs())})"
    return [
        ("file", str(mi.path)),
        ("architecture", mi.arch),
        ("layers", str(mi.n_layer)),
        ("width", str(mi.n_embd)),
        ("quantization", mi.quant),
        ("size", f"{mi.size_bytes / 2**20:.1f} MiB"),
        ("chat template", "yes" if mi.has_chat_template else "no"),
        ("looping supported", support),
        ("stored plan", str(mi.stored_plan)),
        *([("KV mode", f"{mi.stored_plan.kv}: {KV_NOTE}")] if mi.stored_plan.kv != "exact" else []),
    ]


@click.command("info")
@click.argument("model", required=False)
@click.option("--archs", is_flag=True, help="List the architectures the backend can loop, one a line, and exit.")
def command(model: str | None, archs: bool) -> None:
    """Show a model's architecture, layers, width, quantization, size and stored plan.

    MODEL is a GGUF file, a packaged model name, hf:ORG/REPO[:QUANT] or ollama:NAME[:TAG] (see `ggufloop models list`).
    """
    if archs:
        from .._lib import require_patched, supported_archs

        require_patched()
        for arch in supported_archs():
            click.echo(arch)
        return
    if model is None:
        raise click.UsageError("give a MODEL, or --archs")
    for key, value in rows(model):
        click.echo(f"{key:>18}: {value}")
