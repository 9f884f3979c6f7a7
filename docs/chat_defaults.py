"""How well the default chat model answers simple factual questions, by plan and sampling: the
measurement behind `make chat`'s defaults (docs/chat-defaults.md).

    .venv/bin/python docs/chat_defaults.py [MODEL] > docs/chat-defaults.md

An answer counts as right when it contains the expected word (case-insensitive) within its
first 48 tokens. Each configuration answers every question in a fresh conversation with the
model's chat template; sampled configurations run with several seeds.
"""

from __future__ import annotations

import sys
import time

from ggufloop._lib import quiet_logs
from ggufloop.eval.stats import compare
from ggufloop.models import resolve
from ggufloop.runtime import LoopedLlama

QUESTIONS = [
    ("What is the capital of France?", ["paris"]),
    ("What is the capital of Germany?", ["berlin"]),
    ("What is the capital of Italy?", ["rome"]),
    ("What is the capital of Spain?", ["madrid"]),
    ("What is the capital of Japan?", ["tokyo"]),
    ("What is the capital of Canada?", ["ottawa"]),
    ("What is the largest planet in our solar system?", ["jupiter"]),
    ("Which planet is known as the Red Planet?", ["mars"]),
    ("How many days are there in a week?", ["7", "seven"]),
    ("How many legs does a spider have?", ["8", "eight"]),
    ("Who wrote Romeo and Juliet?", ["shakespeare"]),
    ("Who painted the Mona Lisa?", ["leonardo", "da vinci"]),
    ("What color is a clear daytime sky?", ["blue"]),
    ("What is 2 plus 2?", ["4", "four"]),
    ("What is the square root of 81?", ["9", "nine"]),
    ("At what temperature in Celsius does water freeze?", ["0", "zero"]),
    ("Who was the first president of the United States?", ["washington"]),
    ("What is the largest ocean on Earth?", ["pacific"]),
    ("What is the chemical symbol for gold?", ["au"]),
    ("What is the tallest mountain in the world?", ["everest"]),
    ("What language is mainly spoken in Brazil?", ["portuguese"]),
    ("On which continent is Egypt?", ["africa"]),
    ("What is the currency of Japan?", ["yen"]),
    ("What gas do plants absorb from the air?", ["carbon dioxide", "co2"]),
]
PLANS = ["none", "10:15x2/uniform", "10:15x3/uniform", "10:15x3"]
SAMPLING = [(0.0, [0]), (0.7, [0, 1, 2])]  # (temperature, seeds)


def answers(llm: LoopedLlama, temp: float, seed: int) -> list[int]:
    out = []
    for question, expected in QUESTIONS:
        llm.set_seed(seed)
        reply = llm.create_chat_completion(
            [{"role": "user", "content": question}], max_tokens=48, temperature=temp, seed=seed
        )["choices"][0]["message"]["content"].lower()
        out.append(int(any(word in reply for word in expected)))
    return out


def main(model: str = "smollm2-135m-instruct") -> None:
    quiet_logs()
    path = resolve(model)
    llm = LoopedLlama(str(path), n_ctx=512, n_threads=2, n_threads_batch=2)
    t0 = time.time()
    rows, base = [], {}
    for plan in PLANS:
        llm.set_loop(plan)
        for temp, seeds in SAMPLING:
            right = [a for seed in seeds for a in answers(llm, temp, seed)]
            if plan == "none":
                base[temp] = right
            rows.append((plan, temp, len(seeds), right))
    llm.close()
    print(f"# Chat defaults: {path.stem} on {len(QUESTIONS)} factual questions\n")
    print(
        f"Command: `.venv/bin/python docs/chat_defaults.py {model}` ({time.time() - t0:.0f} s here). Right: the answer"
    )
    print("contains the expected word within 48 tokens. Difference: against the unlooped model at the same")
    print("temperature and seeds, paired by question, with its 95 % bootstrap interval and exact McNemar p.\n")
    print("| plan | temperature | seeds | right | share | difference [95% CI] | p |\n|---|---|---|---|---|---|---|")
    for plan, temp, n_seeds, right in rows:
        c = compare(base[temp], right)
        diff = "" if plan == "none" else f"{c.diff:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}]"
        p = "" if plan == "none" else f"{c.p_value:.3g}"
        share = f"{sum(right)}/{len(right)} | {sum(right) / len(right):.2f}"
        print(f"| {plan} | {temp} | {n_seeds} | {share} | {diff} | {p} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
