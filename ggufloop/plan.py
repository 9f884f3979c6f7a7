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
  ``0:20,10:30``         a general schedule: layers 0..19 then 10..29 (no mixing)
  ``none``               the unlooped model
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field

from .errors import PlanError

MIXES = ("none", "uniform", "ema", "autoalign", "noise")
DEFAULT_BETA = 0.5
DEFAULT_TEMPERATURE = 1.0
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


@dataclass(frozen=True)
class Mix:
    """How the passes of a looped block are combined (docs/method.md, "Mixing the passes")."""

    name: str = "none"
    beta: float = DEFAULT_BETA
    temperature: float = DEFAULT_TEMPERATURE
    seed: int = 0

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

    @classmethod
    def parse(cls, text: str) -> Mix:
        """``uniform``, ``ema:0.3``, ``autoalign:0.5``, ``noise:7``."""
        name, _, arg = text.strip().partition(":")
        name = name.strip().lower()
        if name not in MIXES:
            raise PlanError(f"unknown mix {name!r}: expected one of {', '.join(MIXES)}")
        if not arg:
            return cls(name)
        if name not in ("ema", "autoalign", "noise"):
            raise PlanError(f"mix {name!r} takes no parameter, got {arg!r}")
        try:
            value = int(arg) if name == "noise" else float(arg)
        except ValueError:
            raise PlanError(f"bad parameter {arg!r} for mix {name!r}") from None
        if name == "ema":
            return cls(name, beta=value)
        if name == "autoalign":
            return cls(name, temperature=value)
        return cls(name, seed=value)

    def __str__(self) -> str:
        if self.name == "ema" and self.beta != DEFAULT_BETA:
            return f"ema:{f32_text(self.beta)}"
        if self.name == "autoalign" and self.temperature != DEFAULT_TEMPERATURE:
            return f"autoalign:{f32_text(self.temperature)}"
        if self.name == "noise" and self.seed:
            return f"noise:{self.seed}"
        return self.name


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
        body, slash, mix_text = text.partition("/")
        mix = Mix.parse(mix_text) if slash else Mix()
        body = body.strip()
        if body.lower() in ("", "none"):
            return cls(mix=mix)
        if m := _PLAN.match(body):
            start, end, count = (_int(g) for g in m.groups())
            return cls(start, end, count, mix=mix)
        ranges = []
        for part in body.split(","):
            r = _RANGE.match(part)
            if not r:
                raise PlanError(
                    f"cannot parse plan {text!r}: expected START:ENDxCOUNT (such as 10:15x3), "
                    "optionally /MIX, or ranges such as 0:20,10:30"
                )
            ranges.append((_int(r.group(1)), _int(r.group(2))))
        return cls(ranges=tuple(ranges), mix=mix)

    def __str__(self) -> str:
        if self.ranges:
            body = ",".join(f"{a}:{b}" for a, b in self.ranges)
        elif self.start or self.end:
            body = f"{self.start}:{self.end}x{self.count}"
        else:
            body = "none"
        return body if self.mix.name == "none" else f"{body}/{self.mix}"

    def with_mix(self, mix: Mix | str) -> LoopPlan:
        """The same layers with another mix."""
        return LoopPlan(self.start, self.end, self.count, self.ranges, Mix.parse(mix) if isinstance(mix, str) else mix)

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
        ]
        return entries

    def kv_overrides(self) -> dict[str, int | float | str]:
        """The plan as llama-cpp-python's ``kv_overrides`` (also accepted by ``from_metadata``)."""
        out: dict[str, int | float | str] = {}
        for key, kind, value in self.metadata():
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

        mix = Mix(
            str(get(KEY_MIX, "str", "none")),
            float(get(KEY_BETA, "float", DEFAULT_BETA)),
            float(get(KEY_TEMPERATURE, "float", DEFAULT_TEMPERATURE)),
            int(get(KEY_SEED, "int", 0)),
        )
        layers = str(get(KEY_LAYERS, "str", ""))
        block = [get(k, "int", None) for k in (KEY_START, KEY_END, KEY_COUNT)]  # type: ignore[arg-type]
        explicit_none = block == [0, 0, 1]
        if layers:
            if any(v is not None for v in block) and not explicit_none:
                raise PlanError(f"metadata has both {KEY_LAYERS} and a {KEY_START}/{KEY_END}/{KEY_COUNT} plan")
            return cls.parse(layers).with_mix(mix) if mix.name != "none" else cls.parse(layers)
        if all(v is not None for v in block):
            start, end, count = (int(v) for v in block)  # type: ignore[arg-type]
            return cls(start, end, count, mix=mix)
        if any(v is not None for v in block):
            raise PlanError(f"a loop plan needs {KEY_START}, {KEY_END} and {KEY_COUNT} together")
        return cls(mix=mix)
