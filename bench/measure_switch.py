"""Should a layer schedule be a load-time parameter or switchable on a loaded model? Measure both.

For each packaged model present in models/, side by side, with a warm page cache, the median of
--repeat runs after one warm-up:

  reload      LoopedLlama(path, loop=plan) with mmap, then close: model load + context
  set_loop    LoopedLlama.set_loop(plan) on a loaded model: free the context, llama_model_set_loop,
              a new context, set the mix (what the current API does)
  model load  llama_model_load_from_file with mmap + llama_model_free (no context)
  model set   llama_model_set_loop alone (no context)
  context     llama_init_from_model + llama_free (what both ways pay)

    .venv/bin/python bench/measure_switch.py [--repeat 7] [--n-ctx 2048]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path

import llama_cpp

from ggufloop import LoopedLlama, _lib
from ggufloop.models import CATALOG

_QUIET = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
MODELS = ["smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"]


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up: page cache, allocator
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def plans(n_layer: int) -> tuple[str, str]:
    """Two plans of the same model to switch between (a mid block, three passes, two blocks)."""
    s = n_layer // 3
    return f"{s}:{s + 4}x3/uniform", f"{s + 2}:{s + 6}x3/uniform"


def measure(path: Path, repeat: int, n_ctx: int) -> dict[str, float]:
    kw = dict(n_ctx=n_ctx, n_threads=2, use_mmap=True, verbose=False)
    llm = LoopedLlama(str(path), **kw)
    a, b = plans(llm.n_layer_phys)
    llm.close()

    out = {"reload": median_ms(lambda: LoopedLlama(str(path), loop=a, **kw).close(), repeat)}

    llm = LoopedLlama(str(path), loop=a, **kw)
    which = [b, a]

    def switch() -> None:
        llm.set_loop(which[0])
        which.reverse()

    out["set_loop"] = median_ms(switch, repeat)
    llm.close()

    mparams = llama_cpp.llama_model_default_params()
    mparams.use_mmap = True
    out["model load"] = median_ms(
        lambda: llama_cpp.llama_model_free(llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)), repeat
    )

    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    n = llama_cpp.llama_model_n_layer(model)
    s = n // 3
    blocks = [(s + 2, s + 6), (s, s + 4)]

    def model_set() -> None:
        start, end = blocks[0]
        assert _lib.llama_model_set_loop(model, start, end, 3) == 0, _lib.last_error()
        blocks.reverse()

    out["model set"] = median_ms(model_set, repeat)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_threads, cparams.n_threads_batch = n_ctx, 2, 2
    out["context"] = median_ms(lambda: llama_cpp.llama_free(llama_cpp.llama_init_from_model(model, cparams)), repeat)
    llama_cpp.llama_model_free(model)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--n-ctx", type=int, default=2048)
    args = ap.parse_args()
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))

    cols = ["reload", "set_loop", "model load", "model set", "context"]
    print(f"n_ctx {args.n_ctx}, median of {args.repeat} after a warm-up, milliseconds\n")
    print("| model | size MB | " + " | ".join(cols) + " |")
    print("|---|---:|" + "---:|" * len(cols))
    for name in MODELS:
        path = CATALOG[name].path
        if not path.exists():
            print(f"| {name} | (not fetched: make models) |")
            continue
        r = measure(path, args.repeat, args.n_ctx)
        print(
            f"| {name} | {path.stat().st_size / 1e6:.0f} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |",
            flush=True,
        )


if __name__ == "__main__":
    main()
