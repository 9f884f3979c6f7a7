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

import llama_cpp
import numpy as np

from .errors import OptionError
from .gguf_io import read_head
from .numeric import log_softmax
from .plan import LoopPlan, Mix
from .runtime import LoopedLlama

_LIB_DIR = Path(llama_cpp.__file__).parent / "lib"


@lru_cache(maxsize=1)
def _ggml_base() -> ctypes.CDLL:
    path = next(
        p for p in sorted(_LIB_DIR.glob("*ggml-base*")) if p.suffix in (".so", ".dylib", ".dll") or ".so." in p.name
    )
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

    n = max(64, len(tokens))
    with llm.side_context(n, n, cb_eval=on_tensor) as ctx:
        # every position's logits, so no layer prunes its rows to the last token
        logits = ctx.decode_all(tokens)
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


def load_head(path: str | Path) -> Head:
    """The model's final norm and output head (or tied embeddings), dequantized from its GGUF."""
    h = read_head(path)
    return Head(h.norm, h.output, h.eps, h.softcap)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def metrics(states: np.ndarray, logits: np.ndarray, schedule: list[int], head: Head, detok, top: int = 5) -> dict:
    """Per virtual layer and token: norm, cosine and relative change to the previous virtual layer and to the
    same physical layer's previous pass, and the logit lens (top tokens, entropy, KL to the final
    distribution, rank of the finally predicted token)."""
    s = states.astype(np.float64)
    depth, n_tok, _ = s.shape
    final_logp = log_softmax(logits.astype(np.float64))
    final_tok = final_logp.argmax(-1)
    out: dict = {
        "schedule": schedule,
        "norm": np.linalg.norm(s, axis=-1).tolist(),
        "cos_prev": [],
        "rel_change_prev": [],
        "pass": [],
        "cos_prev_pass": [],
        "rel_change_prev_pass": [],
        "entropy": [],
        "kl_to_final": [],
        "rank_of_final": [],
        "top": [],
    }
    seen: dict[int, int] = {}
    for v, il in enumerate(schedule):
        prev = s[v - 1] if v else None
        out["cos_prev"].append(_cos(s[v], prev).tolist() if v else [None] * n_tok)
        out["rel_change_prev"].append(
            (np.linalg.norm(s[v] - prev, axis=-1) / np.linalg.norm(prev, axis=-1)).tolist() if v else [None] * n_tok
        )
        earlier = seen.get(il)
        out["pass"].append(sum(1 for u in schedule[:v] if u == il))
        out["cos_prev_pass"].append(_cos(s[v], s[earlier]).tolist() if earlier is not None else [None] * n_tok)
        out["rel_change_prev_pass"].append(
            (np.linalg.norm(s[v] - s[earlier], axis=-1) / np.linalg.norm(s[earlier], axis=-1)).tolist()
            if earlier is not None
            else [None] * n_tok
        )
        seen[il] = v
        logp = log_softmax(head.logits(s[v]))
        p = np.exp(logp)
        out["entropy"].append((-(p * logp).sum(-1)).tolist())
        out["kl_to_final"].append((np.exp(final_logp) * (final_logp - logp)).sum(-1).tolist())
        out["rank_of_final"].append([int((logp[i] > logp[i, final_tok[i]]).sum()) for i in range(n_tok)])
        best = np.argsort(-logp, axis=-1)[:, :top]
        out["top"].append([[(detok(int(t)), float(p[i, t])) for t in best[i]] for i in range(n_tok)])
    return out


# -- traces of several mixes on one model load ---------------------------------------------


# the longest prompt traced: every virtual layer's logit lens is a [token, vocabulary] array, so memory and
# time grow with tokens x vocabulary x depth (3,000 tokens of a 49k vocabulary reached 9.8 GB)
MAX_TRACE_TOKENS = 256


def trace_runs(
    model: Path,
    prompt: str,
    plan: LoopPlan,
    mixes: list[str],
    threads: int | None,
    max_tokens: int = MAX_TRACE_TOKENS,
) -> dict:
    """Metrics of the unlooped model and of the plan under each mix, on one model load, for a prompt
    of at most max_tokens tokens (OptionError for an empty or a longer prompt, before any is traced)."""
    if not prompt:
        raise OptionError("the prompt is empty: trace follows a prompt's tokens through the layers")
    llm = LoopedLlama(str(model), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True)
    trained = llama_cpp.llama_model_n_ctx_train(llm.model)
    limit = min(max_tokens, trained)
    if not tokens or len(tokens) > limit:
        llm.close()
        if not tokens:
            raise OptionError("the prompt gives no tokens: trace follows a prompt's tokens through the layers")
        why = f"the model's context of {trained}" if trained < max_tokens else f"trace's limit of {max_tokens}"
        raise OptionError(f"the prompt has {len(tokens)} tokens, more than {why}: shorten it")
    head = load_head(model)

    def detok(t: int) -> str:
        return llm.detokenize([t]).decode("utf-8", "replace")

    runs, words = {}, [detok(t) for t in tokens]
    try:
        for label, p in [("unlooped", LoopPlan())] + [(m, plan.with_mix(Mix.parse(m))) for m in mixes]:
            llm.set_loop(p)
            states, logits = capture(llm, tokens)
            runs[label] = {"plan": str(p), **metrics(states, logits, llm.schedule, head, detok)}
    finally:
        llm.close()
    return {"model": str(model), "prompt": prompt, "tokens": words, "runs": runs}


def mean_over_tokens(rows: list) -> np.ndarray:
    """Mean over tokens per virtual layer; NaN where a metric is undefined (no previous pass)."""
    vals = [[x for x in r if x is not None] for r in rows]
    return np.array([float(np.mean(v)) if v else np.nan for v in vals])


def summary(data: dict, plan: LoopPlan) -> list[str]:
    """Per run: depth, how much passes move the state, how close the block's output is to the final answer."""
    lines = []
    for label, run in data["runs"].items():
        kl = mean_over_tokens(run["kl_to_final"])
        looped = run["plan"] != "none"
        block_end = plan.start + (plan.count if looped else 1) * (plan.end - plan.start) - 1
        cos_pass = [x for x in mean_over_tokens(run["cos_prev_pass"]) if not np.isnan(x)]
        last_top = run["top"][-1][-1][0]
        lines.append(
            f"{label:>10} ({run['plan']}): depth {len(kl)}, mean cos to the previous pass "
            f"{np.mean(cos_pass) if cos_pass else float('nan'):.4f}, KL(final||lens) after the block "
            f"{kl[block_end]:.3g}, next token {last_top[0]!r} p={last_top[1]:.2f}"
        )
    return lines
