"""How much an item's score depends on how it is batched, on the packaged SmolLM2 (Q4_1).

    .venv/bin/python docs/reproduction/batch_noise.py > docs/reproduction/batch-noise.md

Two measurements, each with llama.cpp's default F16 KV cache and with an F32 one:
1. one text through the model in one batch and token by token (one sequence, no scoring code);
2. the first 60 WinoGrande items scored in one group (several items per batch), one item at a time,
   and naively (every choice its own full sequence): the largest log-likelihood difference and the
   items whose answer changes.
"""

from __future__ import annotations

import numpy as np

from ggufloop._lib import quiet_logs
from ggufloop.eval.scoring import Scorer
from ggufloop.eval.tasks import resolve_tasks
from ggufloop.models import resolve
from ggufloop.numeric import log_softmax
from ggufloop.runtime import LoopedLlama

TEXT = b"The trophy doesn't fit into the brown suitcase because the trophy is too large, said the man to his friend."
KV = {"F16": 1, "F32": 0}  # ggml types


def one_sequence(model: str, kv: int) -> tuple[float, float]:
    """(max |logit difference|, |difference of the summed log-probabilities|): one batch vs token by token."""
    llm = LoopedLlama(model, n_ctx=256, n_batch=256, n_ubatch=256, logits_all=True, type_k=kv, type_v=kv)
    try:
        toks = llm.tokenize(TEXT)
        runs = []
        for step in (len(toks), 1):
            llm.reset()
            for i in range(0, len(toks), step):
                llm.eval(toks[i : i + step])
            runs.append(np.array(llm.scores[: len(toks)], dtype=np.float64))
    finally:
        llm.close()
    lp = [log_softmax(r)[np.arange(len(toks) - 1), toks[1:]].sum() for r in runs]
    return float(np.abs(runs[0] - runs[1]).max()), float(abs(lp[0] - lp[1]))


def scoring(model: str, kv: int, n: int = 60) -> dict[str, tuple[float, int]]:
    items = list(resolve_tasks("winogrande")[0].items(0))[:n]
    scorer = Scorer(model, None, kv_type=kv)
    try:
        grouped = np.array(scorer.score(items))
        alone = np.array([scorer.score([it])[0] for it in items])
        naive = np.array(scorer.score_naive(items))
    finally:
        scorer.close()

    def diff(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
        return float(np.abs(a - b).max()), int(np.sum(np.argmax(a, 1) != np.argmax(b, 1)))

    return {"grouped vs alone": diff(grouped, alone), "alone vs naive": diff(alone, naive)}


def main() -> None:
    quiet_logs()
    model = str(resolve("smollm2-135m-instruct"))
    print("# How much a score depends on batching (SmolLM2-135M, Q4_1, CPU)\n")
    print("| KV cache | one sequence: max logit difference, batch vs token by token | its summed log-prob |")
    print("|---|---|---|")
    for name, kv in KV.items():
        logit, lp = one_sequence(model, kv)
        print(f"| {name} | {logit:.4g} | {lp:.4g} nats |")
    print("\n| KV cache | scoring (60 WinoGrande items) | max log-likelihood difference | answers changed |")
    print("|---|---|---|---|")
    for name, kv in KV.items():
        for what, (d, flips) in scoring(model, kv).items():
            print(f"| {name} | {what} | {d:.3f} nats | {flips} of 60 |")


if __name__ == "__main__":
    main()
