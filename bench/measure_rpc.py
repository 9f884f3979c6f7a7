"""Speed of a model split over llama.cpp RPC servers on loopback, against the same model all local.

Starts two ``ggufloop rpc-server`` processes on free loopback ports, then, in this process, loads
the model once per variant and measures prefill (one batch of --prompt tokens) and decode
(--decode single-token steps), median of --repeat interleaved runs after a warm-up. Variants: all local, and
split (CPU | server 1 | server 2) with the looped block inside one device or across one or two
device boundaries. Every process (this one, each server) runs --threads threads, so on one machine
the split adds no compute and the numbers show what the split costs: the activations that cross a
device boundary, and one round trip per graph split.

    .venv/bin/python bench/measure_rpc.py --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))


def start(port_log: Path, threads: int) -> tuple[subprocess.Popen, int]:
    from ggufloop import rpc

    from ports import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ggufloop", "rpc-server", "--port", str(port), "--threads", str(threads)],
        stdout=open(port_log, "w"),
        stderr=subprocess.STDOUT,
    )
    for _ in range(300):
        try:
            rpc.probe(rpc.Endpoint("127.0.0.1", port), timeout=2)
            return proc, port
        except rpc.RpcError:
            time.sleep(0.1)
    raise SystemExit(f"rpc-server did not start: {port_log.read_text()}")


def run_once(llm, prompt: list[int], n_decode: int) -> tuple[float, float]:
    """Prefill and decode tokens/s of one run from an empty cache."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([prompt[-1]])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_decode / (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a packaged name or a GGUF path")
    ap.add_argument("--prompt", type=int, default=128, help="prefill tokens")
    ap.add_argument("--decode", type=int, default=32, help="decode steps")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="threads of this process and of each server")
    ap.add_argument("--ngl", type=int, default=20, help="layers off the local CPU in the split variants")
    args = ap.parse_args()

    import llama_cpp

    from ggufloop import LoopedLlama, _lib, model_info

    _lib.quiet_logs()
    from ggufloop.models import resolve

    args.model = str(resolve(args.model))
    info = model_info(args.model)
    L = info.n_layer
    # layers of the split: CPU 0..c-1, server 1 c..m-1, server 2 m..L-1 (+ output), even split
    c = L + 1 - args.ngl
    m = c + args.ngl // 2
    plans = [
        ("none", "none"),
        (f"{c + 1}:{c + 5}x3/uniform", "inside server 1"),
        (f"{c - 2}:{c + 2}x3/uniform", "across CPU / server 1"),
        (f"{m - 2}:{m + 2}x3/uniform", "across server 1 / server 2"),
    ]
    logs = Path("/tmp")
    (p1, port1), (p2, port2) = (
        start(logs / "rpc-bench-0.log", args.threads),
        start(logs / "rpc-bench-1.log", args.threads),
    )
    endpoints = f"127.0.0.1:{port1},127.0.0.1:{port2}"
    prompt = [(17 * i + 5) % 1000 + 10 for i in range(args.prompt)]
    layout = f"CPU 0..{c - 1}, server 1 {c}..{m - 1}, server 2 {m}..{L - 1}+output"
    print(f"{Path(args.model).name}: {L} layers; split: {layout}")
    print(f"threads {args.threads} per process, prompt {args.prompt}, decode {args.decode}, median of {args.repeat}\n")
    print("| plan | looped block | graph splits local / split | prefill tok/s local | split | decode local | split |")
    print("|---|---|---|---:|---:|---:|---:|")
    try:
        log: list[str] = []

        @llama_cpp.llama_log_callback
        def keep(level: int, text: bytes, user_data: object) -> None:
            log.append(text.decode("utf-8", "replace"))

        for plan, where in plans:
            log.clear()
            llama_cpp.llama_log_set(keep, None)  # the graph's splits (one per device change), as llama.cpp counts
            models = {
                name: LoopedLlama(
                    args.model,
                    loop=plan,
                    n_ctx=args.prompt + args.decode + 8,
                    n_batch=args.prompt,
                    n_threads=args.threads,
                    n_threads_batch=args.threads,
                    **extra,
                )
                for name, extra in (
                    ("local", {}),
                    ("split", {"rpc": endpoints, "n_gpu_layers": args.ngl, "tensor_split": [1.0, 1.0]}),
                )
            }
            _lib.quiet_logs()
            splits = re.findall(r"splits = (\d+)", "".join(log))
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
            try:
                for i in range(args.repeat + 1):  # interleaved; the first round warms up
                    for name, llm in models.items():
                        result = run_once(llm, prompt, args.decode)
                        if i:
                            runs[name].append(result)
            finally:
                for llm in models.values():
                    llm.close()
            (lp, ld), (sp, sd) = (
                tuple(statistics.median(r[k] for r in runs[name]) for k in (0, 1)) for name in ("local", "split")
            )
            print(
                f"| {plan} | {where if plan != 'none' else '-'} | {splits[0]} / {splits[-1]} | "
                f"{lp:.1f} | {sp:.1f} ({sp / lp - 1:+.0%}) | "
                f"{ld:.1f} | {sd:.1f} ({sd / ld - 1:+.0%}) |",
                flush=True,
            )
    finally:
        for p in (p1, p2):
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
