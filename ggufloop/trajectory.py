"""Latent trajectories: the residual stream after every virtual layer, and what it says.

States are captured through llama.cpp's graph evaluation callback (the tensors named
``l_out-N``, the state each layer passes on, after mixing), which leaves the model's output
unchanged. The logit lens applies the model's own final norm and output head, read from the
GGUF and dequantized with the gguf package, in numpy.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

from . import _lib
from .runtime import LoopedLlama

_LIB_DIR = Path(llama_cpp.__file__).parent / "lib"


@lru_cache(maxsize=1)
def _ggml_base() -> ctypes.CDLL:
    path = next(p for p in sorted(_LIB_DIR.glob("*ggml-base*")) if p.suffix in (".so", ".dylib", ".dll") or ".so." in p.name)
    lib = ctypes.CDLL(str(path))
    lib.ggml_get_name.argtypes, lib.ggml_get_name.restype = [ctypes.c_void_p], ctypes.c_char_p
    lib.ggml_nelements.argtypes, lib.ggml_nelements.restype = [ctypes.c_void_p], ctypes.c_int64
    lib.ggml_nbytes.argtypes, lib.ggml_nbytes.restype = [ctypes.c_void_p], ctypes.c_size_t
    lib.ggml_is_contiguous.argtypes, lib.ggml_is_contiguous.restype = [ctypes.c_void_p], ctypes.c_bool
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


_LAYER_OUT = re.compile(rb"^l_out-(\d+)$")


def capture(llm: LoopedLlama, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """States [virtual layer, token, n_embd] after every virtual layer, and the logits [token, vocab],
    from one evaluation of tokens in a context of its own."""
    ggml = _ggml_base()
    n_embd, depth = llm.n_embd(), llm.virtual_depth
    states = np.full((depth, len(tokens), n_embd), np.nan, dtype=np.float32)

    @llama_cpp.ggml_backend_sched_eval_callback
    def on_tensor(t, ask, user_data):
        m = _LAYER_OUT.match(ggml.ggml_get_name(t) or b"")
        if ask:
            return m is not None
        if m and ggml.ggml_is_contiguous(t) and ggml.ggml_nbytes(t) == 4 * ggml.ggml_nelements(t):
            il, n = int(m.group(1)), ggml.ggml_nelements(t) // n_embd
            buf = np.empty((n, n_embd), dtype=np.float32)
            ggml.ggml_backend_tensor_get(t, buf.ctypes.data, 0, buf.nbytes)
            states[il, :n] = buf
        return True

    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    params.n_ctx = params.n_batch = params.n_ubatch = max(64, len(tokens))
    params.cb_eval, params.cb_eval_user_data = on_tensor, None
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    if ctx is None:
        raise _lib.BackendError("llama.cpp could not create a tracing context")
    try:
        mix = llm.mix
        _lib.check(_lib.llama_set_loop_mix(ctx, mix.name.encode(), mix.beta, mix.temperature, mix.seed))
        # every position's logits, so no layer prunes its rows to the last token
        batch_all = llama_cpp.llama_batch_init(len(tokens), 0, 1)
        for i, tok in enumerate(tokens):
            batch_all.token[i], batch_all.pos[i], batch_all.n_seq_id[i] = tok, i, 1
            batch_all.seq_id[i][0], batch_all.logits[i] = 0, True
        batch_all.n_tokens = len(tokens)
        if llama_cpp.llama_decode(ctx, batch_all) != 0:
            raise _lib.BackendError("llama_decode failed while tracing")
        n_vocab = llm.n_vocab()
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(tokens), n_vocab)).copy()
        llama_cpp.llama_batch_free(batch_all)
    finally:
        llama_cpp.llama_free(ctx)
    return states, logits


@dataclass
class Head:
    """The model's final norm and output head, as numpy arrays."""

    norm: np.ndarray
    output: np.ndarray  # [vocab, n_embd]
    eps: float
    softcap: float

    def logits(self, states: np.ndarray) -> np.ndarray:
        x = states.astype(np.float64)
        x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * self.norm
        out = x @ self.output.T
        if self.softcap:
            out = np.tanh(out / self.softcap) * self.softcap
        return out


def load_head(path: "str | Path") -> Head:
    """Read output_norm and the output matrix (or the tied embeddings) from a GGUF, dequantized."""
    reader = gguf.GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    tensors = {t.name: t for t in reader.tensors}

    def dense(name: str) -> np.ndarray:
        t = tensors[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64)

    def scalar(key: str, default: float) -> float:
        f = reader.fields.get(key)
        return float(f.parts[f.data[0]][0]) if f else default

    norm = dense("output_norm.weight").reshape(-1)
    out = dense("output.weight" if "output.weight" in tensors else "token_embd.weight").reshape(-1, norm.size)
    return Head(norm, out,
                scalar(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6), scalar(f"{arch}.final_logit_softcapping", 0.0))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def metrics(states: np.ndarray, logits: np.ndarray, schedule: list[int], head: Head, detok, top: int = 5) -> dict:
    """Per virtual layer and token: norm, cosine and relative change to the previous virtual layer and to the
    same physical layer's previous pass, and the logit lens (top tokens, entropy, KL to the final
    distribution, rank of the finally predicted token)."""
    s = states.astype(np.float64)
    depth, n_tok, _ = s.shape
    final_logp = _log_softmax(logits.astype(np.float64))
    final_tok = final_logp.argmax(-1)
    out: dict = {"schedule": schedule, "norm": np.linalg.norm(s, axis=-1).tolist(),
                 "cos_prev": [], "rel_change_prev": [], "pass": [], "cos_prev_pass": [], "rel_change_prev_pass": [],
                 "entropy": [], "kl_to_final": [], "rank_of_final": [], "top": []}
    seen: dict[int, int] = {}
    for v, il in enumerate(schedule):
        prev = s[v - 1] if v else None
        out["cos_prev"].append(_cos(s[v], prev).tolist() if v else [None] * n_tok)
        out["rel_change_prev"].append((np.linalg.norm(s[v] - prev, axis=-1) / np.linalg.norm(prev, axis=-1)).tolist()
                                      if v else [None] * n_tok)
        earlier = seen.get(il)
        out["pass"].append(sum(1 for u in schedule[:v] if u == il))
        out["cos_prev_pass"].append(_cos(s[v], s[earlier]).tolist() if earlier is not None else [None] * n_tok)
        out["rel_change_prev_pass"].append(
            (np.linalg.norm(s[v] - s[earlier], axis=-1) / np.linalg.norm(s[earlier], axis=-1)).tolist()
            if earlier is not None else [None] * n_tok)
        seen[il] = v
        logp = _log_softmax(head.logits(s[v]))
        p = np.exp(logp)
        out["entropy"].append((-(p * logp).sum(-1)).tolist())
        out["kl_to_final"].append((np.exp(final_logp) * (final_logp - logp)).sum(-1).tolist())
        out["rank_of_final"].append([int((logp[i] > logp[i, final_tok[i]]).sum()) for i in range(n_tok)])
        best = np.argsort(-logp, axis=-1)[:, :top]
        out["top"].append([[(detok(int(t)), float(p[i, t])) for t in best[i]] for i in range(n_tok)])
    return out
