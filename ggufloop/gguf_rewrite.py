"""Rewrite a GGUF file's metadata and tensor list; tensor bytes are copied unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

DROP = object()  # returned by an edit function to leave a field out


def architecture(reader: gguf.GGUFReader) -> str:
    return bytes(reader.fields[gguf.Keys.General.ARCHITECTURE].parts[-1]).decode()


def rewrite_gguf(reader: gguf.GGUFReader, dst: "str | Path",
                 edit: Callable[[str, Any], Any] = lambda name, value: value,
                 add: Callable[[gguf.GGUFWriter], None] = lambda writer: None,
                 tensors: "list[tuple[str, gguf.ReaderTensor]] | None" = None) -> Path:
    """Write dst from reader: every field through edit (DROP leaves it out; ggufloop.* keys are
    always left out), then add's fields, then tensors (default: the reader's, in order)."""
    writer = gguf.GGUFWriter(dst, arch=architecture(reader), endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith(("GGUF.", "ggufloop.")):
            continue
        value = edit(field.name, field.contents())
        if value is DROP:
            continue
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, val_type, sub_type=sub_type)
    add(writer)
    tensors = [(t.name, t) for t in reader.tensors] if tensors is None else tensors
    for name, t in tensors:
        writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, t in tensors:
        writer.write_tensor_data(np.asarray(t.data), tensor_endianess=reader.endianess)
    writer.close()
    return Path(dst)
