"""ctypes declarations of the C functions that ggufloop's patch adds to llama.cpp.

The same shared library as llama-cpp-python's own bindings; declared in its style. When the
installed llama-cpp-python is a stock build, the functions are missing and ``require_patched``
says how to build the patched one.
"""

from __future__ import annotations

import ctypes
import os

from llama_cpp import llama_cpp as _llama

from .errors import BackendError

_lib = _llama._lib

PATCHED = hasattr(_lib, "llama_loop_last_error")


def require_patched() -> None:
    """Raise BackendError unless llama-cpp-python is ggufloop's patched build."""
    if not PATCHED:
        raise BackendError(
            "the installed llama-cpp-python is not ggufloop's patched build, so it cannot loop layers; "
            "build it with `make backend` (GGUFLOOP_BACKEND=cpu|metal|cuda)"
        )


def _declare(name: str, argtypes: list, restype):
    if not PATCHED or not hasattr(_lib, name):  # a stock build, or a patched build older than this module
        return None
    fn = getattr(_lib, name)
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


llama_model_p = _llama.llama_model_p_ctypes
llama_context_p = _llama.llama_context_p_ctypes

# int32_t llama_model_n_layer_phys(const struct llama_model * model);
llama_model_n_layer_phys = _declare("llama_model_n_layer_phys", [llama_model_p], ctypes.c_int32)

# int32_t llama_model_layer_schedule(const struct llama_model * model, int32_t * layers, int32_t n_max);
llama_model_layer_schedule = _declare(
    "llama_model_layer_schedule", [llama_model_p, ctypes.POINTER(ctypes.c_int32), ctypes.c_int32], ctypes.c_int32
)

# bool llama_model_loop_plan(const struct llama_model * model, int32_t * start, int32_t * end, int32_t * count);
llama_model_loop_plan = _declare(
    "llama_model_loop_plan",
    [llama_model_p, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int32)],
    ctypes.c_bool,
)

# int32_t llama_model_set_loop(struct llama_model * model, int32_t start, int32_t end, int32_t count);
llama_model_set_loop = _declare(
    "llama_model_set_loop", [llama_model_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32], ctypes.c_int32
)

# int32_t llama_model_set_loop_tail(struct llama_model * model, int32_t start, int32_t end, int32_t count);
llama_model_set_loop_tail = _declare(
    "llama_model_set_loop_tail", [llama_model_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32], ctypes.c_int32
)

# int32_t llama_model_set_layer_schedule(struct llama_model * model, const char * layers);
llama_model_set_layer_schedule = _declare(
    "llama_model_set_layer_schedule", [llama_model_p, ctypes.c_char_p], ctypes.c_int32
)

# int32_t llama_set_loop_mix(struct llama_context * ctx, const char * mix,
#                            float beta, float temperature, uint32_t seed);
llama_set_loop_mix = _declare(
    "llama_set_loop_mix",
    [llama_context_p, ctypes.c_char_p, ctypes.c_float, ctypes.c_float, ctypes.c_uint32],
    ctypes.c_int32,
)

# const char * llama_get_loop_mix(const struct llama_context * ctx, float * beta, float * temperature, uint32_t * seed);
llama_get_loop_mix = _declare(
    "llama_get_loop_mix",
    [llama_context_p, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_uint32)],
    ctypes.c_char_p,
)

# int32_t llama_set_loop_rule(struct llama_context * ctx, const char * rule, float param,
#                             const float * weights, int32_t n_weights);
llama_set_loop_rule = _declare(
    "llama_set_loop_rule",
    [llama_context_p, ctypes.c_char_p, ctypes.c_float, ctypes.POINTER(ctypes.c_float), ctypes.c_int32],
    ctypes.c_int32,
)

# const char * llama_get_loop_rule(const struct llama_context * ctx, float * param, float * weights,
#                                  int32_t n_max, int32_t * n_weights);
llama_get_loop_rule = _declare(
    "llama_get_loop_rule",
    [
        llama_context_p,
        ctypes.POINTER(ctypes.c_float),
        ctypes.POINTER(ctypes.c_float),
        ctypes.c_int32,
        ctypes.POINTER(ctypes.c_int32),
    ],
    ctypes.c_char_p,
)

# int32_t llama_set_loop_decode(struct llama_context * ctx, const char * decode);
llama_set_loop_decode = _declare("llama_set_loop_decode", [llama_context_p, ctypes.c_char_p], ctypes.c_int32)

# const char * llama_get_loop_decode(const struct llama_context * ctx);
llama_get_loop_decode = _declare("llama_get_loop_decode", [llama_context_p], ctypes.c_char_p)

# void llama_set_loop_generating(struct llama_context * ctx, bool generating);
llama_set_loop_generating = _declare("llama_set_loop_generating", [llama_context_p, ctypes.c_bool], None)

# int32_t llama_set_loop_moe(struct llama_context * ctx, const char * moe);
llama_set_loop_moe = _declare("llama_set_loop_moe", [llama_context_p, ctypes.c_char_p], ctypes.c_int32)

# const char * llama_get_loop_moe(const struct llama_context * ctx);
llama_get_loop_moe = _declare("llama_get_loop_moe", [llama_context_p], ctypes.c_char_p)

# int32_t llama_model_set_loop_kv(struct llama_model * model, const char * kv);
llama_model_set_loop_kv = _declare("llama_model_set_loop_kv", [llama_model_p, ctypes.c_char_p], ctypes.c_int32)

# const char * llama_model_get_loop_kv(const struct llama_model * model);
llama_model_get_loop_kv = _declare("llama_model_get_loop_kv", [llama_model_p], ctypes.c_char_p)

# const char * llama_loop_last_error(void);
llama_loop_last_error = _declare("llama_loop_last_error", [], ctypes.c_char_p)

# const char * llama_loop_supported_archs(void);
llama_loop_supported_archs = _declare("llama_loop_supported_archs", [], ctypes.c_char_p)


def supported_archs() -> tuple[str, ...]:
    """The architectures the backend can loop, as the backend itself lists them (empty when stock)."""
    if not PATCHED:
        return ()
    if llama_loop_supported_archs is None:
        raise BackendError("the installed backend predates this ggufloop: rebuild it with `make backend`")
    return tuple(a for a in llama_loop_supported_archs().decode().split(",") if a)


def last_error() -> str:
    """The reason of the backend's last refusal in this thread ('' when none)."""
    return llama_loop_last_error().decode("utf-8", "replace") if PATCHED else ""


def check(status: int) -> None:
    """Raise BackendError with llama.cpp's reason when a ggufloop C call refused."""
    if status != 0:
        raise BackendError(last_error() or "refused by the backend")


_log_sink = None


def quiet_logs() -> None:
    """Drop llama.cpp's log lines (its refusals reach users through exceptions instead)."""
    global _log_sink

    @_llama.llama_log_callback
    def sink(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        pass

    _log_sink = sink  # the C side keeps only a pointer
    _llama.llama_log_set(sink, ctypes.c_void_p(0))


# -- ggml's backend registry (stock ggml API, in the libraries libllama links) -------------------
# Used to split a model over RPC servers (ggufloop.rpc): llama-cpp-python ignores its rpc_servers
# parameter, so ggufloop registers the remote devices itself. ggml_backend_reg_t and
# ggml_backend_dev_t are opaque pointers.


def _declare_ggml(name: str, argtypes: list, restype):
    if not hasattr(_lib, name):
        return None
    fn = getattr(_lib, name)
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


GGML_BACKEND_DEVICE_TYPE_CPU, GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU = 0, 1, 2

ggml_backend_reg_by_name = _declare_ggml("ggml_backend_reg_by_name", [ctypes.c_char_p], ctypes.c_void_p)
ggml_backend_reg_name = _declare_ggml("ggml_backend_reg_name", [ctypes.c_void_p], ctypes.c_char_p)
ggml_backend_reg_get_proc_address = _declare_ggml(
    "ggml_backend_reg_get_proc_address", [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p
)
ggml_backend_reg_dev_count = _declare_ggml("ggml_backend_reg_dev_count", [ctypes.c_void_p], ctypes.c_size_t)
ggml_backend_reg_dev_get = _declare_ggml(
    "ggml_backend_reg_dev_get", [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_void_p
)
ggml_backend_dev_count = _declare_ggml("ggml_backend_dev_count", [], ctypes.c_size_t)
ggml_backend_dev_get = _declare_ggml("ggml_backend_dev_get", [ctypes.c_size_t], ctypes.c_void_p)
ggml_backend_dev_name = _declare_ggml("ggml_backend_dev_name", [ctypes.c_void_p], ctypes.c_char_p)
ggml_backend_dev_description = _declare_ggml("ggml_backend_dev_description", [ctypes.c_void_p], ctypes.c_char_p)
ggml_backend_dev_type = _declare_ggml("ggml_backend_dev_type", [ctypes.c_void_p], ctypes.c_int)
ggml_backend_dev_backend_reg = _declare_ggml("ggml_backend_dev_backend_reg", [ctypes.c_void_p], ctypes.c_void_p)
ggml_backend_dev_memory = _declare_ggml(
    "ggml_backend_dev_memory",
    [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)],
    None,
)

# ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint);  (via get_proc_address)
ggml_backend_rpc_add_server_t = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)

# typedef void (*ggml_abort_callback_t)(const char * error_message);
# ggml_abort_callback_t ggml_set_abort_callback(ggml_abort_callback_t callback);
ggml_abort_callback_t = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
ggml_set_abort_callback = _declare_ggml("ggml_set_abort_callback", [ggml_abort_callback_t], ctypes.c_void_p)


# -- fatal errors ------------------------------------------------------------------------------
# llama-cpp-python points file descriptor 2 at /dev/null while it loads a model or a context
# (verbose=False), so an abort inside llama.cpp (GGML_ABORT, a failed GGML_ASSERT) would end the
# process without a word. ggml hands the message to this callback before it aborts; it goes to the
# stderr the process had when ggufloop loaded the library.
_STDERR_FD = os.dup(2)


@ggml_abort_callback_t
def _report_abort(message: bytes | None) -> None:
    os.write(_STDERR_FD, b"error: llama.cpp stopped the process: " + (message or b"(no message)") + b"\n")


if ggml_set_abort_callback is not None:
    ggml_set_abort_callback(_report_abort)
