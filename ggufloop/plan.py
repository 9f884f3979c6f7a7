"""The loop plan: which layers run, how many times, and how the passes are mixed.

This module is ggufloop's one plan codec: the notation below, validation, and every encoding
of a plan for the backend (metadata keys, ``kv_overrides``, ``--override-kv`` strings, GGUF
fields). It needs neither llama.cpp nor numpy. The method is explained in docs/method.md.

Notation (slice semantics, as everywhere in ggufloop):
  ``10:15x3``            layers 0..9, then 10..14 three times, then 15..L-1
  ``10:15x3/uniform``    the same, passes mixed by a running mean
  ``10:15x3/ema:0.3``    mixed by ``(1-beta)*reference + beta*current``, beta = 0.3
  ``10:15x3/autoalign:0.5`` softmax over passes of cos(reference, pass)/T, T = 0.5
  ``10:15x3/noise:7``    the paper's random-direction control, seed 7
  ``10:15x6/anchored``   a block rule, once per pass at the block's last layer: ``euler[:h]``,
                         ``anchored[:beta]``, ``inputanchor[:a]``, ``momentum[:mu]``
  ``10:15x3/paper-ema``  the paper code's softmax'd rows: ``paper-no``, ``paper-uniform``, ``paper-ema[:beta]``
  ``10:15x3/weights:w.json`` a per-layer weight table from a JSON or .npy file, or inline JSON
                         (``weights:[[1,0],[0.5,0.5]]``); docs/method.md gives the layout
  ``10:15x6/anchored@bypass`` generated tokens run the block once (``@full``, the default: the plan)
  ``10:15x3@freeze``     MoE models: later passes reuse pass 0's expert routing (``@free``, the default)
  ``10:15x3@kv=first``   one KV slot per layer, not per pass, keeping pass 0's K/V (``@kv=last``: the last
                         pass's); not exact: attention across ubatches changes (``@kv=exact``, the default)
  ``0:20,10:30``         a general schedule: layers 0..19 then 10..29 (no mixing)
  ``none``               the unlooped model
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field, replace
from typing import BinaryIO

from .errors import PlanError


@dataclass(frozen=True)
class MixSpec:
    """One way to combine the passes, as the backend offers it (docs/method.md defines each).

    kind: ``layer`` (llama_set_loop_mix: after every block layer), ``block`` (a block rule of the backend's
    rule table, once per pass at the block's last layer), ``preset`` (the rule table's per-layer preset rows)
    or ``table`` (the rule table's weight table). ``param``: the parameter's name in the notation (None: it
    takes none), ``default`` its default (None: none, or one that depends on the plan), ``range`` a
    human-readable domain; ``summary`` one line for the help and the README's table."""

    name: str
    kind: str
    summary: str
    param: str | None = None
    default: float | None = None
    range: str = ""

    @property
    def is_rule(self) -> bool:
        """Set through the backend's rule table (llama_set_loop_rule) rather than llama_set_loop_mix."""
        return self.kind != "layer"

    @property
    def notation(self) -> str:
        return (
            f"{self.name}:FILE" if self.kind == "table" else f"{self.name}[:{self.param}]" if self.param else self.name
        )


# every mix, in the order of the help; one entry per mix drives the lists below, parsing and every help text
MIX_SPECS: dict[str, MixSpec] = {
    m.name: m
    for m in (
        MixSpec("none", "layer", "naive looping: each pass takes the previous pass's output"),
        MixSpec("uniform", "layer", "each block layer's output replaced by the running mean over passes"),
        MixSpec("ema", "layer", "(1-beta)·reference + beta·current", "beta", 0.5, "[0, 1]"),
        MixSpec("autoalign", "layer", "per token, softmax over passes of cos(reference, pass)/T", "T", 1.0, "> 0"),
        MixSpec("noise", "layer", "control: the uniform update's size in a random direction", "seed", 0, "[0, 2**32)"),
        MixSpec("euler", "block", "x ← x + h·(g(x) − x) (default h = 1/K)", "h", None, "[0, 1]"),
        MixSpec(
            "anchored", "block", "damped passes from g(x0), output beta·g(x0) + (1−beta)·h_K", "beta", 0.5, "[0, 1]"
        ),
        MixSpec("inputanchor", "block", "x ← a·g(x) + (1−a)·x0", "a", 0.5, "[0, 1]"),
        MixSpec("momentum", "block", "heavy ball: x ← x + (g(x) − x)/K + mu·(x − x_prev)", "mu", 0.5, "[0, 1]"),
        MixSpec("paper-no", "preset", "the authors' code's effective weights for no regularization (softmax'd rows)"),
        MixSpec("paper-uniform", "preset", "the authors' code's effective uniform weights"),
        MixSpec("paper-ema", "preset", "the authors' code's effective ema weights", "beta", 0.5, "[0, 1]"),
        MixSpec("weights", "table", "any per-layer linear mix: a JSON or .npy table of weight rows"),
    )
}
MIXES = tuple(MIX_SPECS)
BLOCK_RULES = tuple(n for n, m in MIX_SPECS.items() if m.kind == "block")  # once per pass, at the block's last layer
PAPER_RULES = tuple(n for n, m in MIX_SPECS.items() if m.kind == "preset")  # the paper code's preset rows, softmax'd
RULES = tuple(n for n, m in MIX_SPECS.items() if m.is_rule)  # the backend's rule table (llama_set_loop_rule)
# a rule's default parameter; None: it has none, or one that depends on the plan (euler's h = 1/K)
RULE_DEFAULTS: dict[str, float | None] = {
    n: m.default for n, m in MIX_SPECS.items() if m.is_rule and m.default is not None
}
RULE_PARAMS = tuple(n for n, m in MIX_SPECS.items() if m.is_rule and m.param)  # the rules with a parameter, in [0, 1]
LAYER_PARAMS = tuple(n for n, m in MIX_SPECS.items() if m.kind == "layer" and m.param)  # ema, autoalign, noise


def mix_help() -> str:
    """The list of mixes as every --help gives it, from MIX_SPECS."""
    groups = {"layer": [], "block": [], "preset": [], "table": []}
    for m in MIX_SPECS.values():
        groups[m.kind].append(m.notation)
    return (
        f"{', '.join(groups['layer'])}; block rules {', '.join(groups['block'])}; the paper code's "
        f"{', '.join(groups['preset'])}; {', '.join(groups['table'])} (a table)"
    )


def mix_table() -> str:
    """The README's table of mixes (tools/archs_doc.py writes it between its markers), from MIX_SPECS."""
    rows = ["| mix | kind | what it does | parameter |", "|---|---|---|---|"]
    for m in MIX_SPECS.values():
        domain = f"in {m.range}" if m.range[:1] in "[(" else m.range
        param = f"{m.param} {domain}" + (f", default {m.default:g}" if m.default is not None else "") if m.param else ""
        rows.append(f"| `{m.notation}` | {m.kind} | {m.summary} | {param} |")
    return "\n".join(rows)


DECODES = ("full", "bypass")
MOES = ("free", "freeze")  # MoE routing of the later passes: their own, or pass 0's (routing freeze)
KV_MODES = (
    "exact",
    "first",
    "last",
)  # the KV slots of the passes: one each, or one per layer keeping pass 0's/the last's
DEFAULT_BETA = MIX_SPECS["ema"].default
DEFAULT_TEMPERATURE = MIX_SPECS["autoalign"].default
MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS
FLT_MAX = 3.4028234663852886e38
MIN_TEMPERATURE = 1 / FLT_MAX  # below it 1/T overflows float32 and autoalign's weights become inf - inf = NaN
MAX_KV_STR = 127  # llama_model_kv_override.val_str is char[128]

KEY_START = "ggufloop.loop.start"
KEY_END = "ggufloop.loop.end"
KEY_COUNT = "ggufloop.loop.count"
KEY_LAYERS = "ggufloop.layers"
KEY_MIX = "ggufloop.loop.mix"
KEY_BETA = "ggufloop.loop.beta"
KEY_TEMPERATURE = "ggufloop.loop.temperature"
KEY_SEED = "ggufloop.loop.seed"
KEY_PARAM = "ggufloop.loop.param"  # a rule's parameter; < 0: its default
KEY_WEIGHTS = "ggufloop.loop.weights"  # float32 array: the weight table, [m][K][K] flattened
KEY_DECODE = "ggufloop.loop.decode"  # "full" or "bypass"
KEY_MOE = "ggufloop.loop.moe"  # "free" or "freeze"
KEY_KV = "ggufloop.loop.kv"  # "exact", "first" or "last"


def f32(value: float) -> float:
    """value rounded to float32, the precision the backend keeps: a mix parameter is stored so."""
    try:
        return struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def f32_text(value: float) -> str:
    """The shortest decimal text that reads back to the same float32 (0.3333333, 1e-07, 0.25)."""
    for digits in range(1, 10):
        text = f"{value:.{digits}g}"
        if f32(float(text)) == f32(value):
            return text if ("e" in text or "." in text or "inf" in text or "nan" in text) else f"{text}.0"
    return repr(value)


Table = tuple[tuple[tuple[float, ...], ...], ...]  # a weight table [m][K][K] (m = 1: the same rows for every layer)


@dataclass(frozen=True)
class Mix:
    """How the passes of a looped block are combined (docs/method.md, "Mixing the passes").

    ``param`` is a rule's parameter (None: its default); ``table`` the weight table of the
    ``weights`` rule, [m][K][K] with m = 1 when every block layer has the same rows."""

    name: str = "none"
    beta: float = DEFAULT_BETA
    temperature: float = DEFAULT_TEMPERATURE
    seed: int = 0
    param: float | None = None
    table: Table = ()

    def __post_init__(self) -> None:
        # one canonical value: what the backend keeps (float32), so text, store keys and read-back agree
        object.__setattr__(self, "beta", f32(self.beta))
        object.__setattr__(self, "temperature", f32(self.temperature))
        if self.name not in MIXES:
            raise PlanError(f"unknown mix {self.name!r}: expected one of {', '.join(MIXES)}")
        if not (0.0 <= self.beta <= 1.0):
            raise PlanError(f"ema beta must be in [0, 1], got {self.beta}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise PlanError(f"autoalign temperature must be > 0, got {self.temperature}")
        if not math.isfinite(f32(1.0 / self.temperature)):
            raise PlanError(
                f"autoalign temperature must be at least {MIN_TEMPERATURE:.4g}, got {self.temperature:.4g}: "
                "below it 1/T overflows float32 and the weights are not finite"
            )
        if not (0 <= self.seed < 2**32):
            raise PlanError(f"noise seed must be in [0, 2**32), got {self.seed}")
        param = self.param if self.param is not None else RULE_DEFAULTS.get(self.name)
        if param is not None:
            if self.name not in RULE_PARAMS:
                raise PlanError(f"mix {self.name!r} takes no parameter, got {param}")
            param = f32(param)
            if not (0.0 <= param <= 1.0):
                raise PlanError(f"the parameter of mix {self.name!r} must be in [0, 1], got {param}")
        object.__setattr__(self, "param", param)
        if self.name == "weights":
            object.__setattr__(self, "table", check_table(self.table))
        elif self.table:
            raise PlanError(f"mix {self.name!r} takes no weight table")

    @property
    def is_rule(self) -> bool:
        """A mix of the backend's rule table (llama_set_loop_rule) rather than of llama_set_loop_mix."""
        return self.name in RULES

    @classmethod
    def parse(cls, text: str) -> Mix:
        """``uniform``, ``ema:0.3``, ``autoalign:0.5``, ``noise:7``, ``euler:0.5``, ``weights:FILE``."""
        name, _, arg = text.strip().partition(":")
        name = name.strip().lower()
        if name not in MIXES:
            raise PlanError(f"unknown mix {name!r}: expected one of {', '.join(MIXES)}")
        if name == "weights":
            if not arg.strip():
                raise PlanError("mix 'weights' needs a table: weights:FILE (.json or .npy) or inline JSON")
            return cls(name, table=read_table(arg.strip()))
        if not arg:
            return cls(name)
        if name not in LAYER_PARAMS + RULE_PARAMS:
            raise PlanError(f"mix {name!r} takes no parameter, got {arg!r}")
        try:
            value = int(arg) if name == "noise" else float(arg)
        except ValueError:
            raise PlanError(f"bad parameter {arg!r} for mix {name!r}") from None
        if name == "ema":
            return cls(name, beta=value)
        if name == "autoalign":
            return cls(name, temperature=value)
        if name == "noise":
            return cls(name, seed=value)
        return cls(name, param=value)

    def __str__(self) -> str:
        if self.name == "ema" and self.beta != DEFAULT_BETA:
            return f"ema:{f32_text(self.beta)}"
        if self.name == "autoalign" and self.temperature != DEFAULT_TEMPERATURE:
            return f"autoalign:{f32_text(self.temperature)}"
        if self.name == "noise" and self.seed:
            return f"noise:{self.seed}"
        if self.name == "weights":
            return f"weights:{table_text(self.table)}"
        if self.param is not None and self.param != RULE_DEFAULTS.get(self.name):
            return f"{self.name}:{f32_text(self.param)}"
        return self.name


MAX_TABLE_BYTES = 8 * 2**20  # a weight table's JSON, inline or in a file: K = 512 in shortest form is ~3 MB


def _shown(text: str, limit: int = 80) -> str:
    """text as a message names it: cut short, with its length, when it is long."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def read_table(source: str) -> Table:
    """A weight table from a .json or .npy file, or inline JSON (text starting with '[').

    Bounded before anything is read: a file must be a regular file, a .npy header must declare
    [K][K] or [m][K][K] within the plan limits (``table_shape``) before its data is read, and JSON
    is at most ``MAX_TABLE_BYTES``; what is too large or too deep is a PlanError, never a
    MemoryError or a RecursionError."""
    try:
        if source.startswith("["):
            if len(source) > MAX_TABLE_BYTES:
                raise PlanError(
                    f"the inline weight table has {len(source)} characters, more than {MAX_TABLE_BYTES}: "
                    "give it as a file (weights:FILE)"
                )
            return _as_table(_json(source, "the inline weight table"), "the inline table")
        with _open_regular(source) as f:
            if source.lower().endswith(".npy"):
                return _as_table(_read_npy(f, _shown(source)), _shown(source))
            data = f.read(MAX_TABLE_BYTES + 1)
            if len(data) > MAX_TABLE_BYTES:
                raise PlanError(f"weight table {_shown(source)} is larger than {MAX_TABLE_BYTES} bytes")
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                raise PlanError(f"weight table {_shown(source)} is not valid JSON: {err}") from None
            return _as_table(_json(text, f"weight table {_shown(source)}"), _shown(source))
    except MemoryError:
        raise PlanError(f"weight table {_shown(source)} is too large to read") from None


def _json(text: str, what: str) -> object:
    """text parsed as JSON; PlanError when it is not JSON or is nested too deeply to parse."""
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise PlanError(f"{what} is not valid JSON: {err.msg} at character {err.pos}") from None
    except RecursionError:
        raise PlanError(f"{what} is nested too deeply: a weight table is [K][K] or [m][K][K] nested lists") from None
    except ValueError as err:  # an integer of more digits than Python converts
        raise PlanError(f"{what} is not a usable table: {err}") from None


def _open_regular(source: str) -> BinaryIO:
    """The file source names, open for reading in binary; PlanError unless it exists and is a regular
    file (a FIFO is opened without blocking, so that it is refused rather than waited on)."""
    import os
    import stat

    try:
        fd = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise PlanError(f"weight table {_shown(source)} not found (weights:FILE takes a .json or .npy file)") from None
    except OSError as err:
        raise PlanError(f"cannot read weight table {_shown(source)}: {err.strerror or err}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kinds = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}
        kind = kinds.get(stat.S_IFMT(mode), "a socket")
        raise PlanError(f"weight table {_shown(source)} is not a regular file (it is {kind})")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _read_npy(f: BinaryIO, source: str) -> list:
    """The array of an open .npy file as nested lists; its header is read and its shape checked
    (``table_shape``) before any data, so a header that declares a huge array costs nothing."""
    import numpy as np
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = npy.read_array_header_2_0(f)
        else:
            raise PlanError(f"weight table {source} is a .npy file of format {version}, expected (1, 0) or (2, 0)")
    except (ValueError, OSError) as err:
        raise PlanError(f"weight table {source} is not a readable .npy array: {err}") from None
    if dtype.hasobject or dtype.kind not in "fiu":
        raise PlanError(f"weight table {source} holds {dtype}, not numbers")
    m, K = table_shape(shape, source)
    size = m * K * K * dtype.itemsize
    data = f.read(size)
    if len(data) < size:
        raise PlanError(
            f"weight table {source} is truncated: its header declares shape {tuple(shape)}, "
            f"{size} bytes of data, and it holds {len(data)}"
        )
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return array.astype(np.float64).tolist()


def table_shape(shape: tuple[int, ...], source: str = "the weight table") -> tuple[int, int]:
    """(m, K) of a table of this shape, [K][K] (m = 1) or [m][K][K]; PlanError unless it is one and
    some plan could run it: K <= MAX_LAYERS and m * K <= MAX_LAYERS, since a plan with m block
    layers and K passes runs at least m * K virtual layers."""
    dims = tuple(int(n) for n in shape)
    if len(dims) not in (2, 3) or dims[-1] != dims[-2]:
        raise PlanError(f"{source}: a weight table is [K][K] or [m][K][K], got shape {dims}")
    m, K = (1, dims[0]) if len(dims) == 2 else dims[:2]
    if not (m and K):
        raise PlanError(f"{source} is empty")
    if K > MAX_LAYERS or m * K > MAX_LAYERS:
        raise PlanError(
            f"{source}: a weight table of {m} x {K} x {K} is too large: a plan that uses it runs at least "
            f"{m * K} virtual layers, more than llama.cpp's limit of {MAX_LAYERS}"
        )
    return m, K


def _as_table(data: object, source: str) -> Table:
    """Nested lists [K][K] or [m][K][K] of numbers as a table [m][K][K], checked for shape (and its
    size, ``table_shape``) before any number is converted."""
    d, x = 0, data
    while isinstance(x, list) and d < 4:
        d, x = d + 1, (x[0] if x else None)
    if d == 2:
        data = [data]
    elif d != 3:
        levels = "more than 3" if d == 4 else str(d)
        raise PlanError(f"{source}: a weight table is [K][K] or [m][K][K] nested lists, got {levels} levels")
    assert isinstance(data, list)
    K = table_shape((len(data), len(data[0]), len(data[0])), source)[1]  # at most MAX_LAYERS layers from here on
    for j, layer in enumerate(data):
        if not isinstance(layer, list) or any(not isinstance(r, list) for r in layer[: K + 1]):
            raise PlanError(f"{source}: every block layer's entry must be a [K][K] list of rows")
        if len(layer) != K or any(len(row) != K for row in layer):
            raise PlanError(f"{source}: block layer {j} is not a {K} x {K} table (every layer: K rows of K weights)")
    rows: list = []
    for layer in data:
        out = []
        for row in layer:
            if any(isinstance(v, bool) or not isinstance(v, int | float) for v in row):
                raise PlanError(f"{source}: weights must be numbers")
            out.append(tuple(_float(v) for v in row))
        rows.append(tuple(out))
    return check_table(tuple(rows), source)


def _float(value: int | float) -> float:
    """value as a float; an integer beyond float's range is infinite (and refused as not finite)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def check_table(table: Table, source: str = "the weight table") -> Table:
    """The table in float32 and canonical form ([1][K][K] when every layer has the same rows);
    PlanError unless it is [m][K][K], finite, row 0 is [1, 0, ...] and weights of later passes are 0."""
    if not table or not table[0]:
        raise PlanError(f"{source} is empty")
    K = len(table[0])
    table_shape((len(table), K, K), source)
    for j, layer in enumerate(table):
        if len(layer) != K or any(len(row) != K for row in layer):
            raise PlanError(f"{source}: block layer {j} is not a {K} x {K} table (every layer: K rows of K weights)")
        for t, row in enumerate(layer):
            for tau, w in enumerate(row):
                if not math.isfinite(w):
                    raise PlanError(f"{source}: weight [{j}][{t}][{tau}] = {w} is not finite")
                expected = (1.0 if tau == 0 else 0.0) if t == 0 else (0.0 if tau > t else w)
                if w != expected:
                    rule = (
                        "pass 0 is the reference: its row is [1, 0, ...]"
                        if t == 0
                        else "a pass mixes only the passes so far: weights with tau > t are 0"
                    )
                    raise PlanError(f"{source}: weight [{j}][{t}][{tau}] = {w} is not allowed ({rule})")
    table = tuple(tuple(tuple(f32(w) for w in row) for row in layer) for layer in table)
    return table[:1] if all(layer == table[0] for layer in table) else table


def table_text(table: Table) -> str:
    """The table as compact JSON ([K][K] when every layer has the same rows), exact in float32."""

    def rows(layer: tuple) -> str:
        return "[" + ",".join("[" + ",".join(f32_text(w) for w in row) + "]" for row in layer) + "]"

    return rows(table[0]) if len(table) == 1 else "[" + ",".join(rows(layer) for layer in table) + "]"


def _int(digits: str) -> int:
    """A layer index or count from the notation, refused before it can wrap in a narrower C type."""
    if len(digits.lstrip("0")) > 6:
        raise PlanError(
            f"{digits[:12]}{'...' if len(digits) > 12 else ''} is too large: layer indices and counts "
            f"are at most {MAX_LAYERS}"
        )
    return int(digits)


_PLAN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*[xX]\s*(\d+)\s*$")
_RANGE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class LoopPlan:
    """A block plan (start, end, count) or a general schedule (ranges), with its mix.

    ``start``/``end``/``count`` follow slice semantics: layers start..end-1, count passes in
    total (1 = the ordinary model). ``ranges`` is set instead for a general schedule.
    """

    start: int = 0
    end: int = 0
    count: int = 1
    ranges: tuple[tuple[int, int], ...] = ()
    mix: Mix = field(default_factory=Mix)
    decode: str = "full"  # what generated tokens run: the plan (full) or the block once (bypass)
    moe: str = "free"  # how MoE layers route the later passes: anew (free) or as pass 0 did (freeze)
    kv: str = "exact"  # the passes' KV slots: one each (exact), or one per layer keeping pass 0's or the last's K/V

    def __post_init__(self) -> None:
        for n in (self.start, self.end, self.count, *(x for r in self.ranges for x in r)):
            if isinstance(n, bool) or not isinstance(n, int):
                raise PlanError(f"layer indices and counts are integers, got {n!r}")
            if n > MAX_LAYERS:
                raise PlanError(f"{n} is too large: layer indices and counts are at most {MAX_LAYERS}")
        if self.ranges:
            if self.count != 1 or self.start or self.end:
                raise PlanError("a plan is either start:end xcount or a list of ranges, not both")
            if self.mix.name != "none":
                raise PlanError(f"mix {self.mix.name!r} needs a start:end xcount plan, not a general schedule")
            for a, b in self.ranges:
                if not (0 <= a < b):
                    raise PlanError(f"bad range {a}:{b}: need 0 <= start < end")
        elif self.is_looped or self.start or self.end:
            if not (0 <= self.start < self.end):
                raise PlanError(f"bad block {self.start}:{self.end}: need 0 <= start < end")
            if self.count < 1:
                raise PlanError(f"loop count must be >= 1 (1 = the unlooped model), got {self.count}")
        elif self.mix.name != "none":
            raise PlanError(f"mix {self.mix.name!r} needs a start:end xcount plan")
        if self.decode not in DECODES:
            raise PlanError(f"unknown decode mode {self.decode!r}: expected full or bypass")
        if self.decode == "bypass" and not self.end:
            raise PlanError("decode bypass needs a start:end xcount plan (generated tokens run its block once)")
        if self.moe not in MOES:
            raise PlanError(f"unknown MoE routing {self.moe!r}: expected free or freeze")
        if self.moe == "freeze" and not self.end:
            raise PlanError(
                "MoE routing freeze needs a start:end xcount plan (its later passes reuse pass 0's routing)"
            )
        if self.kv not in KV_MODES:
            raise PlanError(f"unknown KV mode {self.kv!r}: expected exact, first or last")
        if self.kv != "exact" and not (self.end and self.count >= 2):
            raise PlanError(
                f"KV mode {self.kv!r} needs a start:end xcount plan with count >= 2 (its later passes share "
                "pass 0's KV slot)"
            )
        table = self.mix.table
        if table:
            m, K = self.end - self.start, self.count
            if len(table[0]) != K or len(table) not in (1, m):
                raise PlanError(
                    f"the weight table is {len(table)} x {len(table[0])} x {len(table[0])}; plan "
                    f"{self.start}:{self.end}x{K} needs [{K}][{K}] rows or [{m}][{K}][{K}] (block layer, pass, pass)"
                )

    @property
    def is_looped(self) -> bool:
        """True when the plan changes the model (more than one pass, or a general schedule)."""
        return self.count > 1 or bool(self.ranges)

    @classmethod
    def parse(cls, text: str | LoopPlan | None) -> LoopPlan:
        """Parse the notation in the module docstring; None, '' and 'none' give the unlooped plan."""
        if isinstance(text, LoopPlan):
            return text
        if text is None:
            return cls()
        if not isinstance(text, str):
            raise PlanError(f"a plan is a string such as '10:15x3', got {type(text).__name__}")
        text, options = _options(text)
        body, slash, mix_text = text.partition("/")
        mix = Mix.parse(mix_text) if slash else Mix()
        body = body.strip()
        if body.lower() in ("", "none"):
            return cls(mix=mix, **options)
        if m := _PLAN.match(body):
            start, end, count = (_int(g) for g in m.groups())
            return cls(start, end, count, mix=mix, **options)
        ranges = []
        for part in body.split(","):
            r = _RANGE.match(part)
            if not r:
                raise PlanError(
                    f"cannot parse plan {text!r}: expected START:ENDxCOUNT (such as 10:15x3), "
                    "optionally /MIX, or ranges such as 0:20,10:30"
                )
            ranges.append((_int(r.group(1)), _int(r.group(2))))
        return cls(ranges=tuple(ranges), mix=mix, **options)

    def __str__(self) -> str:
        if self.ranges:
            body = ",".join(f"{a}:{b}" for a, b in self.ranges)
        elif self.start or self.end:
            body = f"{self.start}:{self.end}x{self.count}"
        else:
            body = "none"
        text = body if self.mix.name == "none" else f"{body}/{self.mix}"
        text = text if self.decode == "full" else f"{text}@{self.decode}"
        text = text if self.moe == "free" else f"{text}@{self.moe}"
        return text if self.kv == "exact" else f"{text}@kv={self.kv}"

    def with_mix(self, mix: Mix | str) -> LoopPlan:
        """The same layers, decode mode, MoE routing and KV mode with another mix."""
        return replace(self, mix=Mix.parse(mix) if isinstance(mix, str) else mix)

    def with_decode(self, decode: str) -> LoopPlan:
        """The same plan with another decode mode (full or bypass)."""
        return replace(self, decode=decode.strip().lower())

    def with_moe(self, moe: str) -> LoopPlan:
        """The same plan with another MoE routing (free or freeze)."""
        return replace(self, moe=moe.strip().lower())

    def with_kv(self, kv: str) -> LoopPlan:
        """The same plan with another KV mode (exact, first or last)."""
        return replace(self, kv=kv.strip().lower())

    def weights(self) -> list[float]:
        """The weight table of a ``weights`` mix as the backend takes it: [m][K][K] flattened."""
        table = self.mix.table
        if not table:
            return []
        m = self.end - self.start
        layers = table * m if len(table) == 1 else table
        return [w for layer in layers for row in layer for w in row]

    def schedule(self, n_layer: int) -> list[int]:
        """The physical layer of each virtual layer, for a model of n_layer layers."""
        self.validate(n_layer)
        if self.ranges:
            return [il for a, b in self.ranges for il in range(a, b)]
        if not (self.start or self.end):
            return list(range(n_layer))
        block = list(range(self.start, self.end))
        return list(range(self.start)) + block * self.count + list(range(self.end, n_layer))

    def validate(self, n_layer: int) -> None:
        """Raise PlanError saying what is wrong and what would be valid for a model of n_layer layers."""
        spans = self.ranges or (((self.start, self.end),) if self.end else ())
        for a, b in spans:
            if b > n_layer:
                raise PlanError(
                    f"block {a}:{b} is out of range: the model has {n_layer} layers, "
                    f"so a block is start:end with 0 <= start < end <= {n_layer}"
                )
        depth = self.virtual_depth(n_layer)
        if depth > MAX_LAYERS:
            raise PlanError(f"plan {self} gives {depth} virtual layers, more than llama.cpp's limit of {MAX_LAYERS}")

    def routing_refusal(self, metadata: dict) -> str | None:
        """Why the model of this GGUF metadata cannot run the plan's MoE routing, or None: routing freeze
        needs a mixture-of-experts model. The one check of ``LoopedLlama.set_loop`` and ``bake``."""
        if self.moe != "freeze":
            return None
        arch = str(metadata.get("general.architecture", "unknown"))
        try:
            n_expert = int(metadata.get(f"{arch}.expert_count", 0))
        except (TypeError, ValueError):
            n_expert = 0
        if n_expert:
            return None
        return f"MoE routing freeze needs a mixture-of-experts model; this {arch} model has no experts"

    def virtual_depth(self, n_layer: int) -> int:
        """Number of layers the plan runs: L + (K-1)*m for a block plan."""
        if self.ranges:
            return sum(b - a for a, b in self.ranges)
        return n_layer + (self.count - 1) * (self.end - self.start)

    def metadata(self) -> list[tuple[str, str, int | float | str]]:
        """(key, type, value) of every ggufloop.* key that makes the patched backend run this plan;
        type is 'int', 'float' or 'str'. Every encoding below (overrides, GGUF fields) comes from here.

        A general schedule also sends the block keys as 0:0x1 (no block plan), so that it replaces
        a block plan stored in the file; an explicit unlooped plan does the same."""
        entries: list[tuple[str, str, int | float | str]] = []
        if self.ranges:
            entries.append((KEY_LAYERS, "str", ",".join(f"{a}:{b}" for a, b in self.ranges)))
        entries += [
            (KEY_START, "int", self.start),
            (KEY_END, "int", self.end),
            (KEY_COUNT, "int", self.count),
            (KEY_MIX, "str", self.mix.name),
            (KEY_BETA, "float", self.mix.beta),
            (KEY_TEMPERATURE, "float", self.mix.temperature),
            (KEY_SEED, "int", self.mix.seed),
            (KEY_PARAM, "float", -1.0 if self.mix.param is None else self.mix.param),
            (KEY_DECODE, "str", self.decode),
            (KEY_MOE, "str", self.moe),
            (KEY_KV, "str", self.kv),
        ]
        if self.mix.table:
            entries.append((KEY_WEIGHTS, "floats", tuple(self.weights())))
        return entries

    def kv_overrides(self) -> dict[str, int | float | str]:
        """The plan as llama-cpp-python's ``kv_overrides`` (also accepted by ``from_metadata``).

        An override holds no array: for a ``weights`` mix the overrides load the plan unmixed, and
        the table is set on the context afterwards (LoopedLlama does; ``bake`` stores it)."""
        out: dict[str, int | float | str] = {}
        plan = self.with_mix(Mix()) if self.mix.table else self
        for key, kind, value in plan.metadata():
            if kind == "str" and len(str(value).encode()) > MAX_KV_STR:
                raise PlanError(
                    f"schedule {self} is too long for a metadata override ({MAX_KV_STR} bytes); "
                    "bake it into the file with `ggufloop bake`"
                )
            out[key] = value
        return out

    def override_strings(self) -> list[str]:
        """The plan as llama.cpp's ``--override-kv KEY=TYPE:VALUE`` strings (also the server's);
        floats are written exactly."""
        if self.mix.table:
            raise PlanError(
                "a weight table cannot be passed as --override-kv; bake it into the file with `ggufloop bake`"
            )
        self.kv_overrides()  # the same length checks
        return [
            f"{key}={kind}:{value!r}" if kind == "float" else f"{key}={kind}:{value}"
            for key, kind, value in self.metadata()
        ]

    @classmethod
    def from_metadata(cls, meta: dict) -> LoopPlan:
        """The plan stored in GGUF metadata (ggufloop.* keys), or the unlooped plan.

        A key of the wrong type or out of range is a PlanError that names the key and what it
        should hold, as the backend refuses it."""

        def get(key: str, kind: str, default: int | float | str) -> int | float | str:
            if key not in meta:
                return default
            value = meta[key]
            expected = {"int": "an integer", "float": "a float", "str": "a string"}[kind]
            ok = (
                isinstance(value, int) and not isinstance(value, bool)
                if kind == "int"
                else isinstance(value, float)
                if kind == "float"
                else isinstance(value, str)
            )
            if not ok:
                raise PlanError(f"metadata key {key} must be {expected}, got {type(value).__name__} {value!r}")
            if kind == "int" and not (0 <= value < 2**32):
                raise PlanError(f"metadata key {key} must be in [0, 2**32), got {value}")
            return value

        name = str(get(KEY_MIX, "str", "none"))
        param = float(get(KEY_PARAM, "float", -1.0))
        table: Table = ()
        if name == "weights":
            flat = meta.get(KEY_WEIGHTS)
            if not isinstance(flat, list | tuple) or not all(isinstance(w, float) for w in flat):
                raise PlanError(f"metadata key {KEY_WEIGHTS} must be an array of floats for mix 'weights'")
            table = _table_from_flat(list(flat), meta.get(KEY_START), meta.get(KEY_END), meta.get(KEY_COUNT))
        mix = Mix(
            name,
            float(get(KEY_BETA, "float", DEFAULT_BETA)),
            float(get(KEY_TEMPERATURE, "float", DEFAULT_TEMPERATURE)),
            int(get(KEY_SEED, "int", 0)),
            param=None if param < 0 or name not in RULE_PARAMS else param,
            table=table,
        )
        decode = str(get(KEY_DECODE, "str", "full"))
        moe = str(get(KEY_MOE, "str", "free"))
        kv = str(get(KEY_KV, "str", "exact"))
        layers = str(get(KEY_LAYERS, "str", ""))
        block = [get(k, "int", None) for k in (KEY_START, KEY_END, KEY_COUNT)]  # type: ignore[arg-type]
        explicit_none = block == [0, 0, 1]
        if layers:
            if any(v is not None for v in block) and not explicit_none:
                raise PlanError(f"metadata has both {KEY_LAYERS} and a {KEY_START}/{KEY_END}/{KEY_COUNT} plan")
            plan = cls.parse(layers).with_mix(mix) if mix.name != "none" else cls.parse(layers)
            plan = plan.with_decode(decode) if decode != "full" else plan
            plan = plan.with_moe(moe) if moe != "free" else plan
            return plan.with_kv(kv) if kv != "exact" else plan
        if all(v is not None for v in block):
            start, end, count = (int(v) for v in block)  # type: ignore[arg-type]
            return cls(start, end, count, mix=mix, decode=decode, moe=moe, kv=kv)
        if any(v is not None for v in block):
            raise PlanError(f"a loop plan needs {KEY_START}, {KEY_END} and {KEY_COUNT} together")
        return cls(mix=mix, decode=decode, moe=moe, kv=kv)


def _options(text: str) -> tuple[str, dict[str, str]]:
    """Split the trailing ``@option`` words off a plan's text: a decode mode (full, bypass), an MoE
    routing (free, freeze) and a KV mode (kv=exact, kv=first, kv=last), each at most once."""
    options: dict[str, str] = {}
    names = {"decode": "decode mode", "moe": "MoE routing", "kv": "KV mode"}
    whole = text
    while True:
        head, at, tail = text.rpartition("@")
        word = tail.strip().lower()
        kind = "decode" if word in DECODES else "moe" if word in MOES else None
        if word.startswith("kv=") or word == "kv":
            kind, word = "kv", word.partition("=")[2].strip()
            if word not in KV_MODES:
                raise PlanError(f"plan {whole!r}: unknown KV mode {word!r}: expected @kv=exact, @kv=first or @kv=last")
        if not at or kind is None:
            return text, options
        if kind in options:
            raise PlanError(f"plan {whole!r} gives the {names[kind]} twice")
        options[kind] = word
        text = head


def _table_from_flat(flat: list[float], start: object, end: object, count: object) -> Table:
    """The weight table [m][K][K] of a flat array of m*K*K weights (the backend's layout)."""
    if not all(isinstance(v, int) for v in (start, end, count)) or not flat:
        raise PlanError(f"metadata key {KEY_WEIGHTS} needs a start:end xcount plan and at least one weight")
    m, K = int(end) - int(start), int(count)  # type: ignore[call-overload]
    if m <= 0 or len(flat) != m * K * K:
        raise PlanError(f"metadata key {KEY_WEIGHTS} has {len(flat)} weights; the plan needs {m} x {K} x {K}")
    return tuple(tuple(tuple(flat[(j * K + t) * K : (j * K + t + 1) * K]) for t in range(K)) for j in range(m))
