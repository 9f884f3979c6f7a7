"""ggufloop: inner loop inference for GGUF models on llama.cpp.

A frozen transformer re-applies a block of its layers several times at inference, weights
shared, each repetition with its own KV cache slot; the passes can be mixed (regularized looping).
"""

from ._lib import BackendError
from .modelinfo import ModelFileError, ModelInfo, model_info
from .plan import LoopPlan, Mix, PlanError
from .runtime import LoopedLlama

__all__ = ["BackendError", "LoopPlan", "LoopedLlama", "Mix", "ModelFileError", "ModelInfo", "PlanError", "model_info"]
__version__ = "0.1.0"
