"""All GGUF reading and writing: headers and model info, metadata rewrites, plans stored in a
file, physically duplicated layers, and the output head's tensors.

Only the gguf package and numpy; no llama.cpp. Tensor bytes are always copied unchanged.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .errors import ModelFileError, OptionError
from .plan import KEY_WEIGHTS, LoopPlan, PlanError

DROP = object()  # returned by an edit function to leave a field out


# -- reading ---------------------------------------------------------------------------------


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """A reader of a GGUF file whose header and tensor table are complete, or ModelFileError.

    Parsing a header takes seconds for a large vocabulary (the gguf package builds every token
    string), and one command asks for the same file several times (model info, then the load), so
    the reader of an unchanged file (same path, size and modification time) is parsed once."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"no such model file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelFileError(f"{path} is not a GGUF file")
    st = path.stat()
    return _read_gguf(str(path.resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=2)
def _read_gguf(path: str, size: int, mtime_ns: int) -> gguf.GGUFReader:
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the reader raises several types on damaged headers
        raise ModelFileError(f"{path} is not a readable GGUF file (truncated or damaged): {err}") from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ModelFileError(f"{path} is truncated: tensor {t.name} ends past the end of the file")
    return reader


def architecture(reader: gguf.GGUFReader) -> str:
    field = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    return bytes(field.parts[-1]).decode("utf-8", "replace") if field is not None else "unknown"


def metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Scalar and string metadata as plain Python values (arrays left out, except the float32 array
    ggufloop.loop.weights, as a list of floats)."""
    out: dict[str, Any] = {}
    for name, fld in reader.fields.items():
        if name == KEY_WEIGHTS and fld.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32]:
            out[name] = [float(fld.parts[i][0]) for i in fld.data]
            continue
        if not fld.types or fld.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        value = fld.parts[fld.data[0]]
        if fld.types[0] == gguf.GGUFValueType.STRING:
            out[name] = bytes(value).decode("utf-8", "replace")
        else:
            value = value.item() if isinstance(value, np.ndarray) and value.size == 1 else value
            out[name] = bool(value) if fld.types[0] == gguf.GGUFValueType.BOOL else value
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
    context_length: int = 0  # trained context, 0 when the file does not say
    kv_width: int = 0  # keys' (and values') width per layer and token: heads_kv * head size

    def kv_bytes(self, n_ctx: int, depth: int | None = None, bytes_per_value: int = 2) -> int:
        """KV cache size of a context of n_ctx tokens over depth (virtual) layers, F16 by default."""
        return 2 * (depth or self.n_layer) * n_ctx * (self.kv_width or self.n_embd) * bytes_per_value

    @property
    def loop_supported(self) -> bool:
        from ._lib import supported_archs

        return self.arch in supported_archs()


def model_info(path: str | os.PathLike) -> ModelInfo:
    """What a GGUF file holds, read from its header (no weights loaded)."""
    path = Path(path)
    reader = open_gguf(path)
    meta = metadata(reader)
    arch = architecture(reader)
    types = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2)
    try:
        stored = LoopPlan.from_metadata(meta)
    except PlanError as err:
        raise ModelFileError(f"{path} stores an invalid loop plan: {err}") from None
    return ModelInfo(
        path=path,
        arch=arch,
        n_layer=int(meta.get(f"{arch}.block_count", 0)),
        n_embd=int(meta.get(f"{arch}.embedding_length", 0)),
        quant=types.most_common(1)[0][0] if types else "unknown",
        size_bytes=path.stat().st_size,
        has_chat_template="tokenizer.chat_template" in meta,
        stored_plan=stored,
        context_length=_int(meta.get(f"{arch}.context_length")),
        kv_width=_kv_width(meta, arch),
    )


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else 0


def _kv_width(meta: dict[str, Any], arch: str) -> int:
    heads = _int(meta.get(f"{arch}.attention.head_count"))
    heads_kv = _int(meta.get(f"{arch}.attention.head_count_kv")) or heads
    head = _int(meta.get(f"{arch}.attention.key_length")) or (
        _int(meta.get(f"{arch}.embedding_length")) // heads if heads else 0
    )
    return heads_kv * head


@dataclass
class HeadTensors:
    """The model's final norm and output matrix, dequantized, with the norm's epsilon and the final
    logit soft-cap (0 when none)."""

    norm: np.ndarray  # [n_embd]
    output: np.ndarray  # [vocab, n_embd]
    eps: float
    softcap: float


def read_head(path: str | os.PathLike) -> HeadTensors:
    """output_norm and the output matrix (or the tied embeddings) of a GGUF file, as float64."""
    reader = open_gguf(path)
    arch = architecture(reader)
    meta = metadata(reader)
    tensors = {t.name: t for t in reader.tensors}

    def dense(name: str) -> np.ndarray:
        t = tensors[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64)

    norm = dense("output_norm.weight").reshape(-1)
    out = dense("output.weight" if "output.weight" in tensors else "token_embd.weight").reshape(-1, norm.size)
    return HeadTensors(
        norm,
        out,
        float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        float(meta.get(f"{arch}.final_logit_softcapping", 0.0)),
    )


# -- writing ---------------------------------------------------------------------------------


def rewrite_gguf(
    reader: gguf.GGUFReader,
    dst: str | Path,
    edit: Callable[[str, Any], Any] = lambda name, value: value,
    add: Callable[[gguf.GGUFWriter], None] = lambda writer: None,
    tensors: list[tuple[str, gguf.ReaderTensor]] | None = None,
) -> Path:
    """Write dst from reader: every field through edit (DROP leaves it out; ggufloop.* keys are
    always left out), then add's fields, then tensors (default: the reader's, in order).

    The file is written under a temporary name in dst's folder and renamed into place, so an
    interrupted write never leaves a damaged dst; dst must not be the file being read (checked by
    device and inode, so hard links and symlinks are caught too)."""
    dst = Path(dst)
    src = Path(reader.data.filename) if hasattr(reader.data, "filename") else None
    if src is not None and dst.exists() and os.path.samefile(src, dst):
        raise OptionError(f"the output {dst} is the model itself (the same file): write a new file")
    if dst.is_dir():
        raise OptionError(f"the output {dst} is a folder: give a file name")
    if not dst.resolve().parent.is_dir() or not os.access(dst.resolve().parent, os.W_OK):
        raise OptionError(f"cannot write {dst}: its folder does not exist or is not writable")
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        _write(reader, tmp, edit, add, tensors)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _write(
    reader: gguf.GGUFReader,
    dst: Path,
    edit: Callable[[str, Any], Any],
    add: Callable[[gguf.GGUFWriter], None],
    tensors: list[tuple[str, gguf.ReaderTensor]] | None,
) -> None:
    writer = gguf.GGUFWriter(dst, arch=architecture(reader), endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith(("GGUF.", "ggufloop.")):
            continue
        value = edit(field.name, field.contents())
        if value is DROP:
            continue
        val_type = field.types[0]
        if val_type == gguf.GGUFValueType.ARRAY and len(value) == 0:
            continue  # the gguf package cannot write an empty array; llama.cpp reads none as empty
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


def write_plan(src: str | Path, dst: str | Path, plan: LoopPlan) -> Path:
    """Write dst: src with plan in its ggufloop.* metadata keys (any earlier plan replaced)."""
    src, dst = Path(src), Path(dst)
    reader = open_gguf(src)
    plan.validate(model_info(src).n_layer)
    plan.kv_overrides()  # the same limits as an override

    def add_plan(writer: gguf.GGUFWriter) -> None:
        for key, kind, value in plan.metadata():
            if kind == "int":
                writer.add_uint32(key, int(value))
            elif kind == "float":
                writer.add_float32(key, float(value))
            elif kind == "floats":
                writer.add_array(key, [float(v) for v in value])  # type: ignore[union-attr]
            else:
                writer.add_string(key, str(value))

    return rewrite_gguf(reader, dst, add=add_plan)


# physically duplicated layers ("passthrough" merge): the same compute as a plan, with the repeated
# layers' weights copied; the independent reference of the tests and a variant of the benchmark
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")

# arrays of a fixed length, which a model with as many layers must not have remapped
_NOT_PER_LAYER = (".rope.dimension_sections",)

# llama.cpp's period of sliding-window layers when a file has a window but no pattern key
_DEFAULT_SWA_PERIOD = {"gemma3": 6}


def _swa_flags(reader: gguf.GGUFReader, arch: str, n_layer: int) -> list[bool] | None:
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


def write_duplicated(src: str | Path, dst: str | Path, schedule: list[int]) -> Path:
    """dst runs physical layers schedule[v] as its layers v = 0..len-1, with no loop plan."""
    reader = open_gguf(src)
    arch = architecture(reader)
    n_layer = int(reader.fields[f"{arch}.block_count"].contents())
    swa = _swa_flags(reader, arch, n_layer)

    def edit(name: str, value):
        if name == f"{arch}.block_count":
            return len(schedule)
        if name == f"{arch}.attention.sliding_window_pattern":
            return DROP  # written anew below, one flag per layer
        per_layer = name.startswith(f"{arch}.") and not name.endswith(_NOT_PER_LAYER)
        if isinstance(value, list) and per_layer and len(value) == n_layer:
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
