"""The quantization scale (issue 26, item 5): how far requantizations of one packaged model move it, beside
how far loop plans do, all measured by llama.cpp's own llama-perplexity --kl-divergence against the
packaged file on the same tokens, so that a plan reads as "moves the model like going to Q3_K".

The ladder starts from an already-quantized source: the packaged file (SmolLM2-135M's is Q4_1) is
dequantized to F32 with the patched tree's llama-quantize, and every rung is quantized from that F32 file.
The rungs therefore measure the extra error of requantizing a Q4_1 model, not a quantization of the
original bf16 weights. The plans are read from the KLD map (kld-<model>.json): per (K, mix) panel, the
block that moves the model least and the median block; and `make chat`'s default.

    .venv/bin/python docs/reproduction/kld/scale.py [--model smollm2-135m-instruct] [--chunks 20] [-t 2]

Writes docs/reproduction/kld/scale-<model>.{json,md}; the quantized files go to results/quant/ (not in git).
Resumable: a file or a measurement already made is not made again (they are kept in the JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from ggufloop import tools
from ggufloop.eval import perplexity as ppl
from ggufloop.models import resolve
from ggufloop.plan import LoopPlan

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
CHAT_DEFAULT = "10:15x3/uniform"


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {Path(cmd[0]).name} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def plans_from_map(model: str) -> list[tuple[str, str]]:
    """(plan, why) from the model's KLD map: per (K, mix), the least-moving and the median block."""
    cells = json.loads((HERE / f"kld-{model}.json").read_text())["cells"]
    out: list[tuple[str, str]] = []
    for count in sorted({c["count"] for c in cells}):
        for mix in ("none", "uniform"):
            panel = sorted(
                (c for c in cells if c["count"] == count and c["mix"] == mix), key=lambda c: c["stats"]["kld"]["mean"]
            )
            if panel:
                out.append((panel[0]["plan"], f"K={count} {mix}: least KLD of {len(panel)} blocks"))
                out.append((panel[len(panel) // 2]["plan"], f"K={count} {mix}: median block"))
    if CHAT_DEFAULT not in [p for p, _ in out]:
        out.append((CHAT_DEFAULT, "make chat's default"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--chunks", type=int, default=20, help="chunks of -c 512 tokens (each scores its second half)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()

    source = resolve(args.model)
    work = ROOT / "results" / "quant" / args.model
    work.mkdir(parents=True, exist_ok=True)
    out_json = HERE / f"scale-{args.model}.json"
    done = json.loads(out_json.read_text()) if out_json.exists() else {}
    if done.get("chunks") != args.chunks:
        done = {}
    rows: dict[str, dict] = done.get("rows", {})
    quantize, perplexity = str(tools.program("llama-quantize")), str(tools.program("llama-perplexity"))

    text = work / "lambada.txt"
    text.write_text("\n\n".join(ppl.lambada_passages()))
    shape = [
        "-c",
        "512",
        "-b",
        "512",
        "-ub",
        "512",
        "--chunks",
        str(args.chunks),
        "-t",
        str(args.threads),
        "-fa",
        "off",
    ]
    base = work / f"base-{args.chunks}.kld"
    if not base.exists():
        run([perplexity, "-m", str(source), "-f", str(text), *shape, "--kl-divergence-base", str(base)])

    f32 = work / "F32.gguf"
    if not f32.exists():
        run([quantize, "--allow-requantize", str(source), str(f32), "F32"])
    files = {"F32 (dequantized)": f32}
    for kind in TYPES:
        path = work / f"{kind}.gguf"
        if not path.exists():
            run([quantize, str(f32), str(path), kind])
        files[kind] = path

    todo: list[tuple[str, str, list[str], Path]] = [(name, "quantization", [], path) for name, path in files.items()]
    for plan, why in plans_from_map(args.model):
        extra = [a for kv in LoopPlan.parse(plan).override_strings() for a in ("--override-kv", kv)]
        todo.append((plan, why, extra, source))
    for name, why, extra, path in todo:
        if name in rows:
            continue
        t0 = time.monotonic()
        stats = ppl.read_llama_perplexity(
            run([perplexity, "-m", str(path), *shape, "--kl-divergence-base", str(base), "--kl-divergence", *extra])
        )
        rows[name] = {
            "kind": why,
            "file_mib": round(path.stat().st_size / 2**20, 1),
            "seconds": round(time.monotonic() - t0, 1),
            **stats,
        }
        print(f"{name}: mean KLD {stats['kld_mean']:.4f}", flush=True)
        out_json.write_text(json.dumps({"model": args.model, "chunks": args.chunks, "rows": rows}, indent=1))

    n_tokens = args.chunks * (512 - 1 - 256)
    lines = [
        f"# The quantization scale of {args.model} (generated by `docs/reproduction/kld/scale.py`)",
        "",
        f"Against the packaged file ({source.name}, {source.stat().st_size / 2**20:.0f} MiB), on {n_tokens} LAMBADA tokens ({args.chunks} chunks of 512,"
        " the second half of each scored), by llama-perplexity --kl-divergence (flash attention off)."
        " Requantizations are made from the packaged file dequantized to F32, so the ladder starts from a"
        " quantized source. Sorted by mean KLD; ± is llama-perplexity's standard error.",
        "",
        "| what | kind | mean KLD | 99 % KLD | same top | RMS Δp | ln(PPL/PPL base) | file MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in sorted(rows.items(), key=lambda kv: kv[1]["kld_mean"]):
        size = f"{r['file_mib']:.0f}" if r["kind"] == "quantization" else "(packaged)"
        lines.append(
            f"| {name} | {r['kind']} | {r['kld_mean']:.4f} ± {r.get('kld_mean_se', math.nan):.1g} | {r['kld_p99']:.3f} "
            f"| {100 * r['same_top']:.1f} ± {100 * r.get('same_top_se', math.nan):.1f} % | {100 * r['dp_rms']:.2f} % "
            f"| {r['ln_ratio']:+.4f} ± {r.get('ln_ratio_se', math.nan):.4f} | {size} |"
        )
    (HERE / f"scale-{args.model}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {HERE / f'scale-{args.model}.md'}")


if __name__ == "__main__":
    main()
