"""Write a GGUF whose layers are physically duplicated to a schedule ("passthrough" merge).

The alternative ggufloop replaces: same compute as a plan, but the weights grow by the repeated
layers. Used as the independent reference and by the benchmark. Tensors are copied byte for byte.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf

from .gguf_rewrite import DROP, architecture, rewrite_gguf
from .modelinfo import check_gguf

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")

# llama.cpp's period of sliding-window layers when a file has a window but no pattern key
_DEFAULT_SWA_PERIOD = {"gemma3": 6}


def _swa_flags(reader: gguf.GGUFReader, arch: str, n_layer: int) -> "list[bool] | None":
    """Gemma-style sliding-window flags per layer, from an array or a period (llama.cpp's rule)."""
    field = reader.fields.get(f"{arch}.attention.sliding_window_pattern")
    if field is None:
        if f"{arch}.attention.sliding_window" not in reader.fields or arch not in _DEFAULT_SWA_PERIOD:
            return None
        period = _DEFAULT_SWA_PERIOD[arch]
    elif field.types[0] == gguf.GGUFValueType.ARRAY:
        return [bool(v) for v in field.contents()]
    else:
        period = int(field.contents())
    return [period == 0 or il % period < period - 1 for il in range(n_layer)]


def write_duplicated(src: "str | Path", dst: "str | Path", schedule: list[int]) -> Path:
    """dst runs physical layers schedule[v] as its layers v = 0..len-1, with no loop plan."""
    check_gguf(src)
    reader = gguf.GGUFReader(src)
    arch = architecture(reader)
    n_layer = int(reader.fields[f"{arch}.block_count"].contents())
    swa = _swa_flags(reader, arch, n_layer)

    def edit(name: str, value):
        if name == f"{arch}.block_count":
            return len(schedule)
        if name == f"{arch}.attention.sliding_window_pattern":
            return DROP  # written anew below, one flag per layer
        if isinstance(value, list) and name.startswith(f"{arch}.") and len(value) == n_layer:
            return [value[il] for il in schedule]  # a per-layer hyperparameter
        return value

    def add_pattern(writer: gguf.GGUFWriter) -> None:
        if swa is not None:  # each copy keeps its source layer's attention type
            writer.add_array(f"{arch}.attention.sliding_window_pattern", [swa[il] for il in schedule])

    tensors: list[tuple[str, gguf.ReaderTensor]] = []
    layers: dict[int, list[tuple[str, gguf.ReaderTensor]]] = {}
    for t in reader.tensors:
        m = _BLOCK.match(t.name)
        if m:
            layers.setdefault(int(m.group(1)), []).append((m.group(2), t))
        else:
            tensors.append((t.name, t))
    for v, il in enumerate(schedule):
        tensors += [(f"blk.{v}.{suffix}", t) for suffix, t in layers[il]]
    return rewrite_gguf(reader, dst, edit, add_pattern, tensors)
