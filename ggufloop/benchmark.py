"""Speed and memory of looping, measured side by side in one run.

Every variant runs in its own process (the stock library and the patched one cannot share a
process), with the same threads and flags; variants are interleaved and repeated and medians
reported. Variants: stock llama-cpp-python (``make stock``), the patched build with no plan, the
patched build with a plan at K = 2, 3, 4 (naive, and each mix and rule at K = 3), and the stock
build running a file whose layers are physically duplicated to the same schedule. Every looped
variant of the patched build also times decoding under decode bypass (generated tokens run the
block once), against the unlooped decode. On a GPU build, ``n_gpu_layers`` offloads layers and every
variant can also run with CUDA graphs off (ggml's GGML_CUDA_DISABLE_GRAPHS), to show whether a plan keeps them.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import paths
from .gguf_io import model_info
from .plan import KV_MODES, MIX_SPECS, LoopPlan

STOCK_PYTHON = paths.stock_python()  # GGUFLOOP_STOCK_PYTHON, else .venv-stock/bin/python here (make stock)
# every mix and rule is measured at K = 3; a weight table costs what the paper-* rules cost (same ops)
MIXES = tuple(n for n, m in MIX_SPECS.items() if n != "none" and m.kind != "table")
KV_SHARED = tuple(kv for kv in KV_MODES if kv != "exact")  # the KV modes with one slot per layer


@dataclass
class Variant:
    name: str
    python: str  # interpreter: the patched or the stock environment
    model: str
    plan: str = "none"  # passed as metadata overrides (the stock build ignores them)
    ideal: float = 1.0  # virtual depth / physical depth
    env: dict[str, str] = field(default_factory=dict)  # set in the variant's process only
    base: str = "patched, no plan"  # the variant its time ratios are taken against


@dataclass
class Result:
    variant: str
    prefill_tps: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)
    bypass_decode_tps: list[float] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)
    weights_mib: float = 0.0
    kv_mib: float = 0.0


def _rss_mib() -> float:
    """Resident memory of this process now (Linux), or its peak elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(spec: dict) -> dict:
    """Runs in the variant's own process: load, warm up, time prefill and decode."""
    import llama_cpp

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def log(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    kv = LoopPlan.parse(spec["plan"]).kv_overrides() if spec["plan"] != "none" else None
    rss0 = _rss_mib()
    n_prompt, n_decode = spec["n_prompt"], spec["n_decode"]
    llm = llama_cpp.Llama(
        spec["model"],
        n_ctx=n_prompt + n_decode + 16,
        n_batch=n_prompt,
        n_ubatch=n_prompt,
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        n_gpu_layers=spec.get("n_gpu_layers", 0),
        kv_overrides=kv,
        verbose=False,
    )
    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))  # Llama() installs its own logger
    tokens = [(i * 7919) % (llm.n_vocab() - 100) + 50 for i in range(n_prompt + n_decode)]
    llm.eval(tokens[:32])  # warm-up
    prefill, decode, bypass = [], [], []
    for _ in range(spec.get("inner", 3)):  # the best of a few: other load on the machine only slows runs down
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(tokens[:n_prompt])
        t1 = time.perf_counter()
        for tok in tokens[n_prompt:]:
            llm.eval([tok])
        t2 = time.perf_counter()
        prefill.append(t1 - t0)
        decode.append(t2 - t1)
        if spec.get("bypass"):
            bypass.append(_bypass_decode(llm, tokens, n_prompt))
    kv_mib = sum(float(m) for m in re.findall(r"llama_kv_cache: size = +([0-9.]+) MiB", "".join(lines)))
    out = {
        "prefill_tps": n_prompt / min(prefill),
        "decode_tps": n_decode / min(decode),
        "bypass_decode_tps": n_decode / min(bypass) if bypass else None,
        "rss_mib": _rss_mib() - rss0,
        "weights_mib": llama_cpp.llama_model_size(llm.model) / 2**20,
        "kv_mib": kv_mib,
    }
    llm.close()
    return out


def _bypass_decode(llm, tokens: list[int], n_prompt: int) -> float:
    """Seconds to decode tokens[n_prompt:] again after the prompt, as generated tokens under decode bypass."""
    import llama_cpp

    from . import _lib

    _lib.check(_lib.llama_set_loop_decode(llm.ctx, b"bypass"))
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), -1, n_prompt, -1)
    llm.n_tokens = n_prompt
    _lib.llama_set_loop_generating(llm.ctx, True)
    t0 = time.perf_counter()
    for tok in tokens[n_prompt:]:
        llm.eval([tok])
    seconds = time.perf_counter() - t0
    _lib.llama_set_loop_generating(llm.ctx, False)
    _lib.check(_lib.llama_set_loop_decode(llm.ctx, b"full"))
    return seconds


def run_variant(v: Variant, threads: int, n_prompt: int, n_decode: int, n_gpu_layers: int = 0) -> dict:
    spec = {"model": v.model, "plan": v.plan, "threads": threads, "n_prompt": n_prompt, "n_decode": n_decode}
    spec["bypass"] = v.python == sys.executable and LoopPlan.parse(v.plan).count > 1
    spec["n_gpu_layers"] = n_gpu_layers
    proc = subprocess.run(
        [v.python, "-m", "ggufloop.benchmark", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, **v.env},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"variant {v.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


GRAPHS_OFF = " [CUDA graphs off]"


def variants(
    model: Path,
    start: int,
    end: int,
    counts: tuple[int, ...],
    stock: bool,
    work: Path,
    mixes: tuple[str, ...] | None = None,
    duplicated: bool = False,
    graphs_off: bool = False,
    kv_modes: bool = False,
) -> list[Variant]:
    """The variants of one model; the duplicated files are written into work. Mixes: every one at K = 3
    (None), or these at every K. The physically duplicated file runs in the stock build when there is one,
    else (``duplicated``) in the patched build without a plan. ``graphs_off`` adds a copy of every variant with
    CUDA graphs disabled, its ratios taken against the unlooped variant with them disabled too. ``kv_modes`` adds
    the KV modes first and last of the naive plan at every K (its vs_naive ratios: against the exact plan)."""
    from .gguf_io import write_duplicated

    n_layer = model_info(model).n_layer
    me = sys.executable
    out = [Variant("patched, no plan", me, str(model))]
    if stock:
        out.insert(0, Variant("stock", str(STOCK_PYTHON), str(model)))
    for k in counts:
        plan = LoopPlan(start, end, k)
        ideal = plan.virtual_depth(n_layer) / n_layer
        out.append(Variant(f"{start}:{end}x{k} none", me, str(model), str(plan), ideal))
        if kv_modes:
            out += [Variant(f"{start}:{end}x{k} kv={kv}", me, str(model), f"{plan}@kv={kv}", ideal) for kv in KV_SHARED]
        if mixes is not None or k == 3:
            chosen = MIXES if mixes is None else mixes
            out += [Variant(f"{start}:{end}x{k} {mix}", me, str(model), f"{plan}/{mix}", ideal) for mix in chosen]
        if stock or duplicated:
            dup = work / f"{model.stem}-dup-{start}-{end}x{k}.gguf"
            if not dup.exists():
                write_duplicated(model, dup, plan.schedule(n_layer))
            python, who = (str(STOCK_PYTHON), "stock") if stock else (me, "patched")
            out.append(Variant(f"{start}:{end}x{k} duplicated file ({who})", python, str(dup), "none", ideal))
    if graphs_off:
        off = {"GGML_CUDA_DISABLE_GRAPHS": "1"}
        out += [
            Variant(v.name + GRAPHS_OFF, v.python, v.model, v.plan, v.ideal, off, "patched, no plan" + GRAPHS_OFF)
            for v in list(out)
        ]
    return out


def summarize(results: dict[str, Result], vs: list[Variant]) -> list[dict]:
    """Medians and the ratios the targets are stated in."""
    med = {name: (statistics.median(r.prefill_tps), statistics.median(r.decode_tps)) for name, r in results.items()}
    rows = []
    for v in vs:
        r = results[v.name]
        p, d = med[v.name]
        base = med[v.base]
        suffix = v.name[len(v.name) - len(GRAPHS_OFF) :] if v.name.endswith(GRAPHS_OFF) else ""
        naive = med.get(f"{v.name.split()[0]} none{suffix}") if "/" in v.plan or "@kv=" in v.plan else None
        rows.append(
            {
                "variant": v.name,
                "ideal_ratio": round(v.ideal, 4),
                "prefill_tps": round(p, 1),
                "decode_tps": round(d, 1),
                "prefill_time_ratio": round(base[0] / p, 4),
                "decode_time_ratio": round(base[1] / d, 4),
                "bypass_decode_tps": round(statistics.median(r.bypass_decode_tps), 1) if r.bypass_decode_tps else None,
                "bypass_vs_unlooped_decode": (
                    round(base[1] / statistics.median(r.bypass_decode_tps), 4) if r.bypass_decode_tps else None
                ),
                "vs_ideal_prefill": round(base[0] / p / v.ideal, 4),
                "vs_ideal_decode": round(base[1] / d / v.ideal, 4),
                "vs_naive_prefill": round(naive[0] / p, 4) if naive else None,
                "vs_naive_decode": round(naive[1] / d, 4) if naive else None,
                "speed_vs_stock_prefill": round(p / med["stock"][0], 4) if "stock" in med else None,
                "speed_vs_stock_decode": round(d / med["stock"][1], 4) if "stock" in med else None,
                "rss_mib": round(statistics.median(r.rss_mib), 1),
                "weights_mib": round(r.weights_mib, 2),
                "kv_mib": round(r.kv_mib, 2),
            }
        )
    return rows


def markdown(model: str, rows: list[dict], meta: dict) -> str:
    cols = [
        "variant",
        "prefill_tps",
        "decode_tps",
        "ideal_ratio",
        "prefill_time_ratio",
        "decode_time_ratio",
        "bypass_decode_tps",
        "bypass_vs_unlooped_decode",
        "vs_naive_prefill",
        "vs_naive_decode",
        "speed_vs_stock_prefill",
        "speed_vs_stock_decode",
        "weights_mib",
        "kv_mib",
        "rss_mib",
    ]
    out = [f"### {model}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |")
    return "\n".join(out) + "\n"


def scoring_speed(model: Path, task: str, limit: int, threads: int) -> dict:
    """Shared-context scoring against one full forward pass per choice, and against plain prefill speed."""
    import llama_cpp

    from .eval.scoring import Scorer
    from .eval.tasks import TASKS

    items = TASKS[task].items(limit=limit)
    scorer = Scorer(str(model), None, threads=threads)
    n_tokens = sum(len(t) for it in items for t in scorer.prepare(it).tokens)
    t0 = time.perf_counter()
    fast = scorer.score(items)
    t1 = time.perf_counter()
    naive = scorer.score_naive(items)
    t2 = time.perf_counter()
    scorer.close()
    llm = llama_cpp.Llama(
        str(model), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    prompt = [(i * 7919) % (llm.n_vocab() - 100) + 50 for i in range(512)]
    llm.eval(prompt[:32])
    llm.reset()
    t3 = time.perf_counter()
    llm.eval(prompt)
    prefill_tps = 512 / (time.perf_counter() - t3)
    llm.close()
    agree = max(abs(a - b) for fa, na in zip(fast, naive) for a, b in zip(fa, na))
    return {
        "task": task,
        "items": len(items),
        "scored_tokens": n_tokens,
        "shared_s": round(t1 - t0, 2),
        "naive_s": round(t2 - t1, 2),
        "speedup": round((t2 - t1) / (t1 - t0), 2),
        "scored_tokens_per_s": round(n_tokens / (t1 - t0), 1),
        "prefill_tokens_per_s": round(prefill_tps, 1),
        "prefill_over_scoring": round(prefill_tps / (n_tokens / (t1 - t0)), 2),
        "max_ll_difference": agree,
    }


def generation_speed(
    model: Path, plans: list[str], rows: list[int], items: int, max_new_tokens: int, repeats: int, threads: int
) -> list[dict]:
    """Batched GSM8K generation: aggregate generated tokens per second at each number of rows per step
    (``Generator.ROWS``), under each plan, end to end (the shared prefix, every prompt's own tokens and the
    steps; the seconds in llama_decode of the prompts and of the steps are reported apart), on the same
    ``items`` problems; rows x plans interleaved within each repeat, medians reported,
    and the answers compared across row counts (they agree only where the kernels do not change: see
    ``Generator``)."""
    from .eval import gsm8k

    gen = gsm8k.Generator(model, threads=threads)
    try:
        fmt = gsm8k.format_for(model)
        prompts = gsm8k.Prompts(gen.llm, fmt)
        gen.set_prefix(prompts.prefix)
        batch = [(f"gsm8k item {p.id}", prompts.tokens(p.question)) for p in gsm8k.problems(items)]
        times: dict[tuple[str, int], list[float]] = {}
        parts: dict[tuple[str, int], list[tuple[float, float, int]]] = {}  # prompt s, step s, decodes
        answers: dict[tuple[str, int], dict] = {}
        for _ in range(repeats):
            for plan in plans:
                gen.set_plan(plan)
                for r in rows:
                    gen.ROWS = r
                    before, steps = dict(gen.seconds), gen.decodes
                    t0 = time.perf_counter()
                    answers[plan, r] = dict(gen.generate_batch(batch, max_new_tokens, fmt.stops))
                    times.setdefault((plan, r), []).append(time.perf_counter() - t0)
                    spent = {k: gen.seconds[k] - before[k] for k in before}
                    parts.setdefault((plan, r), []).append((spent["prompt"], spent["step"], gen.decodes - steps))
    finally:
        gen.close()
    out = []
    for plan in plans:
        one = statistics.median(times[plan, rows[0]])
        for r in rows:
            got = answers[plan, r]
            n_tokens = sum(len(g.tokens) for g in got.values())
            t = statistics.median(times[plan, r])
            out.append(
                {
                    "plan": plan,
                    "rows": r,
                    "items": len(got),
                    "generated_tokens": n_tokens,
                    "seconds": round(t, 2),
                    "tokens_per_s": round(n_tokens / t, 1),
                    "prompt_s": round(statistics.median(p for p, _, _ in parts[plan, r]), 2),
                    "steps_s": round(statistics.median(st for _, st, _ in parts[plan, r]), 2),
                    f"speedup_vs_{rows[0]}_row": round(one / t, 2),
                    f"answers_as_with_{rows[0]}_row": sum(got[k] == answers[plan, rows[0]][k] for k in got),
                }
            )
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def page(meta: dict, report: list[str]) -> str:
    head = [
        "# Benchmarks",
        "",
        f"Machine: {meta['cpu']} ({meta['machine']}), {meta['threads']} threads, Python {meta['python']}, "
        f"{meta['date']}. Prefill: {meta['prompt_tokens']} tokens in one batch; decode: {meta['decode_tokens']} "
        f"tokens one at a time. Medians of {meta['repeats']} interleaved runs, each in its own process and timing "
        "the best of 3 passes.",
        "",
        "Reproduce: `make bench` (or `ggufloop bench MODEL ...`).",
        "",
        "Columns: `*_time_ratio` is the variant's time over the unlooped patched build's; `ideal_ratio` is "
        "(L + (K-1)m)/L; `bypass_decode_tps` is the decode speed of the looped variant under decode bypass "
        "(generated tokens run the block once) and `bypass_vs_unlooped_decode` its time over the unlooped decode's; "
        "`vs_naive_*` is a mix's time over naive looping on the same plan; `speed_vs_stock_*` is "
        "speed over the stock build's. Memory in MiB: weights and KV cache as llama.cpp reports them; "
        "`rss_mib` is the growth of the process's resident memory from before loading the model to after "
        "decoding (mapped weights that were touched, KV cache, compute buffers).",
        "",
    ]
    return "\n".join(head + report)


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
