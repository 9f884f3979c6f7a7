"""Read a GGUF file's header: checks that catch user mistakes early, and what `ggufloop info` shows."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .plan import LoopPlan

# architectures the patched backend accepts (its allow-list in llama-loop.cpp)
SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")


class ModelFileError(ValueError):
    """The path is not a usable GGUF file."""


def check_gguf(path: "str | os.PathLike") -> None:
    """Raise ModelFileError for a missing, non-GGUF or truncated file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"no such model file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelFileError(f"{path} is not a GGUF file")
    _reader(path)


def _reader(path: Path) -> gguf.GGUFReader:
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the reader raises several types on damaged headers
        raise ModelFileError(f"{path} is not a readable GGUF file (truncated or damaged): {err}") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ModelFileError(f"{path} is truncated: tensor {t.name} ends past the end of the file")
    return reader


def metadata(reader: gguf.GGUFReader) -> dict:
    """Scalar and string metadata as plain Python values (arrays left out)."""
    out = {}
    for name, fld in reader.fields.items():
        if not fld.types or fld.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        value = fld.parts[fld.data[0]]
        if fld.types[0] == gguf.GGUFValueType.STRING:
            out[name] = bytes(value).decode("utf-8", "replace")
        else:
            out[name] = value.item() if isinstance(value, np.ndarray) and value.size == 1 else value
    return out


@dataclass
class ModelInfo:
    path: Path
    arch: str
    n_layer: int
    n_embd: int
    quant: str
    size_bytes: int
    has_chat_template: bool
    stored_plan: LoopPlan

    @property
    def loop_supported(self) -> bool:
        return self.arch in SUPPORTED_ARCHS


def model_info(path: "str | os.PathLike") -> ModelInfo:
    """What a GGUF file holds, read from its header (no weights loaded)."""
    check_gguf(path)
    path = Path(path)
    reader = _reader(path)
    meta = metadata(reader)
    arch = str(meta.get("general.architecture", "unknown"))
    types = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2)
    return ModelInfo(
        path=path,
        arch=arch,
        n_layer=int(meta.get(f"{arch}.block_count", 0)),
        n_embd=int(meta.get(f"{arch}.embedding_length", 0)),
        quant=types.most_common(1)[0][0] if types else "unknown",
        size_bytes=path.stat().st_size,
        has_chat_template="tokenizer.chat_template" in meta,
        stored_plan=LoopPlan.from_metadata(meta),
    )
