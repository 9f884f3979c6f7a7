"""ggufloop: inner loop inference for GGUF models on llama.cpp.

A frozen transformer re-applies a block of its layers several times at inference, weights
shared, each repetition with its own KV cache slot; the passes can be mixed (regularized
looping). docs/method.md explains the method.

The public names are imported on first use, so ``import ggufloop.plan`` (or ``ggufloop --help``)
does not load the native library.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BackendError": ".errors",
    "LoopedLlama": ".runtime",
    "SideContext": ".runtime",
    "LoopPlan": ".plan",
    "Mix": ".plan",
    "PlanError": ".errors",
    "ModelFileError": ".errors",
    "ModelInfo": ".gguf_io",
    "model_info": ".gguf_io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ggufloop' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
