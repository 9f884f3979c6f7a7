"""`ggufloop serve` as lm-evaluation-harness's backend (issue 27): `/v1/completions` with `logprobs` and `echo`.

lm-eval's `gguf` and `local-completions` models score a choice by asking the server to echo
context + continuation with each token's log-probability. The server computes them itself (a side
context under the request's plan), not through llama-cpp-python's echo path, which pairs each token
with the wrong row on a model that adds no BOS. Checked here on a real server process against
independent references: a numpy log-softmax over the logits of a fresh full forward pass, the
generated tokens' logits from an incremental one, and the project's Scorer; on a model with BOS and
one without, looped and unlooped. Under the `lm_eval` marker, the real lm-eval runs against it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import gguf
import numpy as np
import pytest
from test_hardening_server import call, still_answers
from test_hardening_server import refused as refused_field
from test_serve import ROOT, Server

from ggufloop.eval.scoring import Scorer
from ggufloop.eval.tasks import Item
from ggufloop.numeric import log_softmax

from conftest import eval_logits, open_model
from tiny import write_model

N_CTX = 256
PLANS = {"none": "none", "u": "2:4x3/uniform", "e": "1:5x3/ema:0.8"}
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
TEXT = "w1 w2 w3 w4 w5"
WORDS = [260, 265, 270, 262, 281, 263]  # " w1", " w6", ...: token ids of words, which text tokenizes to bytes
SPELLED = "".join(f" w{t - 259}" for t in WORDS)  # the text those ids echo as
N_TOP = 5


@contextlib.contextmanager
def _without_bos():
    """gguf's writer, while it runs, marks the file as one whose tokenizer adds no BOS (as SmolLM2's and Qwen2.5's)."""
    plain = gguf.GGUFWriter.add_bos_token_id

    def add(self, token: int) -> None:
        plain(self, token)
        self.add_add_bos_token(False)

    gguf.GGUFWriter.add_bos_token_id = add
    try:
        yield
    finally:
        gguf.GGUFWriter.add_bos_token_id = plain


@pytest.fixture(scope="module")
def tiny_paths(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """ "bos": the tiny llama; "nobos": the same weights, its tokenizer adding no BOS."""
    spec, weights, path = tiny_models["llama"]
    with _without_bos():
        nobos = write_model(tmp_path_factory.mktemp("nobos") / "llama.gguf", spec, weights)
    return {"bos": path, "nobos": nobos}


@pytest.fixture(scope="module")
def servers(tiny_paths):
    out: dict[str, Server] = {}
    plans = [f"--plan={name}={plan}" for name, plan in PLANS.items() if name != "none"]
    try:
        for kind, path in tiny_paths.items():
            out[kind] = Server(path, *plans, "-c", str(N_CTX), "-t", "1")
        yield out
    finally:
        for srv in out.values():
            srv.close()


@pytest.fixture(scope="module")
def references(tiny_paths):
    """(kind, plan) -> a LoopedLlama of its own, loaded with the plan, F16 KV cache and batch 512 as the server's."""
    llms: dict = {}

    def get(kind: str, plan: str):
        if (kind, plan) not in llms:
            loop = None if plan == "none" else plan
            llms[kind, plan] = open_model(tiny_paths[kind], loop=loop, n_ctx=N_CTX, n_batch=512, type_k=1, type_v=1)
        return llms[kind, plan]

    yield get
    for llm in llms.values():
        llm.close()


def completion(srv: Server, body: dict) -> dict:
    status, text = call(srv, "/completions", body, timeout=120)
    assert status == 200, text
    return json.loads(text)


def prompt_tokens(llm, prompt) -> tuple[list[int], int]:
    """The tokens a completion's prompt is decoded as (the BOS the model adds first), and how many BOS."""
    if isinstance(prompt, list):
        return list(prompt), 0
    tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    return tokens, int(tokens[0] == llm.token_bos() and llm._model.add_bos_token())


def token_ids(llm) -> dict[str, int]:
    """token text (as the server writes it) -> id, for the tiny vocabulary (every token's text differs)."""
    from ggufloop.server import _piece, _token_text

    out = {_token_text(_piece(llm._model.vocab, t)): t for t in range(llm.n_vocab())}
    assert len(out) == llm.n_vocab()
    return out


# -- (a) the echoed prompt and the generated tokens against a fresh forward pass -------------------------


@pytest.mark.parametrize("prompt", [TEXT, WORDS], ids=["text", "token-ids"])
@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("kind", ["bos", "nobos"])
def test_echoed_logprobs_are_those_of_a_full_forward_pass(servers, references, kind, plan, prompt):
    srv, llm = servers[kind], references(kind, PLANS[plan])
    body = {"model": f"llama@{plan}", "prompt": prompt, "echo": True, "logprobs": N_TOP, "max_tokens": 4, **GREEDY}
    answer = completion(srv, body)
    lp = answer["choices"][0]["logprobs"]
    tokens, n_bos = prompt_tokens(llm, prompt)
    assert n_bos == (kind == "bos" and isinstance(prompt, str))
    echoed = tokens[n_bos:]
    ids = token_ids(llm)
    generated = [ids[t] for t in lp["tokens"][len(echoed) :]]
    assert [ids[t] for t in lp["tokens"][: len(echoed)]] == echoed
    # 4 tokens, more while llama-cpp-python completes a split character; the end-of-generation token is listed,
    # not counted
    assert generated and answer["usage"]["completion_tokens"] == len([t for t in generated if t != 2])

    # the reference: the prompt in one pass, then each generated token on its own, as generation decodes them
    llm.reset()
    llm.eval(tokens)
    for tok in generated[:-1]:
        llm.eval([tok])
    want = log_softmax(np.array(llm.scores[: len(tokens) + len(generated) - 1], dtype=np.float64))
    every = tokens + generated
    for i, (value, top) in enumerate(zip(lp["token_logprobs"], lp["top_logprobs"])):
        k = n_bos + i  # the position of this entry's token; the row before it predicts it
        if k == 0:
            assert value is None and top is None  # no token before the first: OpenAI's null
            continue
        row = want[k - 1]
        assert value == pytest.approx(row[every[k]], abs=1e-5 if k < len(tokens) else 1e-3), (i, k)
        assert {ids[key] for key in top} == {*np.argsort(-row)[:N_TOP].tolist(), every[k]}
        for key, v in top.items():
            assert v == pytest.approx(row[ids[key]], abs=1e-5 if k < len(tokens) else 1e-3)
        if k >= len(tokens):  # greedy: each generated token is its row's argmax
            assert every[k] == int(np.argmax(row)), (i, k)
    assert lp["token_logprobs"][0] is None if n_bos == 0 else lp["token_logprobs"][0] is not None


def test_the_reference_is_not_the_shifted_pairing(servers, references):
    """What llama-cpp-python's echo gives a model without BOS (row i paired with token i) is not what the
    server answers: the comparison above can tell the two apart."""
    llm = references("nobos", "none")
    answer = completion(servers["nobos"], {"prompt": WORDS, "echo": True, "logprobs": 1, "max_tokens": 0})
    got = answer["choices"][0]["logprobs"]["token_logprobs"][1:]
    rows = log_softmax(eval_logits(llm, WORDS))
    shifted = [rows[k][WORDS[k]] for k in range(1, len(WORDS))]
    right = [rows[k - 1][WORDS[k]] for k in range(1, len(WORDS))]
    assert np.allclose(got, right, atol=1e-5) and not np.allclose(got, shifted, atol=0.1)


@pytest.mark.parametrize("kind", ["bos", "nobos"])
def test_log_likelihood_only_with_max_tokens_0(servers, references, kind):
    llm = references(kind, "none")
    answer = completion(servers[kind], {"prompt": TEXT, "echo": True, "logprobs": 0, "max_tokens": 0})
    choice = answer["choices"][0]
    tokens, n_bos = prompt_tokens(llm, TEXT)
    assert choice["text"] == TEXT and choice["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": len(tokens), "completion_tokens": 0, "total_tokens": len(tokens)}
    assert len(choice["logprobs"]["tokens"]) == len(tokens) - n_bos
    rows = log_softmax(eval_logits(llm, tokens))
    for i, (value, top) in enumerate(zip(choice["logprobs"]["token_logprobs"], choice["logprobs"]["top_logprobs"])):
        k = n_bos + i
        if k:  # logprobs 0: the token's own entry, no alternatives
            assert value == pytest.approx(rows[k - 1][tokens[k]], abs=1e-5)
            assert top == {choice["logprobs"]["tokens"][i]: value}


def test_a_one_token_prompt_without_bos_has_nothing_to_score(servers):
    answer = completion(servers["nobos"], {"prompt": WORDS[:1], "echo": True, "logprobs": 2, "max_tokens": 0})
    lp = answer["choices"][0]["logprobs"]
    assert lp["tokens"] == [" w1"] and lp["token_logprobs"] == [None] and lp["top_logprobs"] == [None]


# -- (b) a continuation's log-likelihood is the Scorer's ----------------------------------------------


@pytest.mark.parametrize("plan", ["none", "u"])
@pytest.mark.parametrize("kind", ["bos", "nobos"])
def test_continuation_logprobs_sum_to_the_scorers_log_likelihood(servers, tiny_paths, kind, plan):
    item = Item("x", ("w1 w2 w3 w4",), (" w5", " w6 w7", " w3"), 0)
    scorer = Scorer(str(tiny_paths[kind]), None if plan == "none" else PLANS[plan], n_ctx=N_CTX, threads=1)
    try:
        want = scorer.score([item])[0]
        prepared = scorer.prepare(item)
    finally:
        scorer.close()
    n_bos = int(kind == "bos")
    for (context, continuation), start, ll in zip(item.requests(), prepared.starts, want):
        # as lm-eval's gguf model asks: the whole text echoed, one token generated and dropped
        body = {"model": f"llama@{plan}", "prompt": context + continuation, "echo": True, "logprobs": 10}
        answer = completion(servers[kind], {**body, "max_tokens": 1, "temperature": 0})
        values = answer["choices"][0]["logprobs"]["token_logprobs"]
        assert sum(values[start - n_bos : -1]) == pytest.approx(ll, abs=1e-3), (continuation, values)


# -- (c) tokens, text_offset and top_logprobs agree with each other ------------------------------------


@pytest.mark.parametrize("kind", ["bos", "nobos"])
def test_offsets_and_top_logprobs_are_consistent_with_the_tokens(servers, kind):
    answer = completion(servers[kind], {"prompt": WORDS, "echo": True, "logprobs": 3, "max_tokens": 5, **GREEDY})
    choice = answer["choices"][0]
    lp = choice["logprobs"]
    n = len(lp["tokens"])
    assert len(lp["text_offset"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    assert choice["text"].startswith(SPELLED)  # token ids echo as their pieces
    assert lp["tokens"][: len(WORDS)] == [f" w{t - 259}" for t in WORDS]
    assert lp["text_offset"][: len(WORDS)] == [len("".join(lp["tokens"][:i])) for i in range(len(WORDS))]
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][-1] <= len(choice["text"])
    if not any(t.startswith("bytes:") for t in lp["tokens"]):  # whole characters: they spell the text
        assert "".join(lp["tokens"]).startswith(choice["text"])
        assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(n)]
    for token, value, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert top[token] == value and 3 <= len(top) <= 4  # the 3 best, and the token itself
        assert all(v <= 0 for v in top.values())
    # not echoed: the generated tokens only, offsets counted from the prompt's end (OpenAI's)
    plain = completion(servers[kind], {"prompt": WORDS, "logprobs": 3, "max_tokens": 5, **GREEDY})["choices"][0]
    assert plain["text"] == choice["text"][len(SPELLED) :]
    assert plain["logprobs"]["tokens"] == lp["tokens"][len(WORDS) :]
    assert plain["logprobs"]["text_offset"] == lp["text_offset"][len(WORDS) :]
    assert plain["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"][len(WORDS) :], abs=1e-3)


def test_a_request_without_logprobs_is_llama_cpp_pythons(servers, references):
    """No logprobs, no echo: the plain path (no side context), the answer as before."""
    status, text = call(servers["bos"], "/completions", {"prompt": TEXT, "max_tokens": 6, **GREEDY})
    assert status == 200 and json.loads(text)["choices"][0]["logprobs"] is None
    want = references("bos", "none").create_completion(TEXT, max_tokens=6, **GREEDY)["choices"][0]["text"]
    assert json.loads(text)["choices"][0]["text"] == want


def test_echo_without_logprobs_and_token_id_prompts(servers):
    answer = completion(servers["nobos"], {"prompt": [WORDS], "echo": True, "max_tokens": 3, **GREEDY})
    choice = answer["choices"][0]
    assert choice["logprobs"] is None
    plain = completion(servers["nobos"], {"prompt": WORDS, "logprobs": 0, "max_tokens": 3, **GREEDY})
    assert choice["text"] == SPELLED + plain["choices"][0]["text"]


# -- (d) what is refused, with one clear message --------------------------------------------------------


def refused(srv: Server, path: str, body: dict, field: str, words: str) -> None:
    status, text = call(srv, path, body)
    assert status == 400, (status, text)
    error = json.loads(text)["error"]
    assert error["param"] == field and words in error["message"], error
    assert "Traceback" not in text and "internal server error" not in text


@pytest.mark.parametrize(
    "path, body, field, words",
    [
        ("/completions", {"prompt": TEXT, "logprobs": 21, "echo": True}, "logprobs", "at most 20"),
        ("/completions", {"prompt": TEXT, "logprobs": 100000}, "logprobs", "at most 20"),
        ("/completions", {"prompt": TEXT, "logprobs": -1, "echo": True}, "logprobs", "greater than or equal to 0"),
        ("/completions", {"prompt": TEXT, "logprobs": 2, "stream": True}, "logprobs", "logprobs with stream"),
        ("/completions", {"prompt": TEXT, "echo": True, "stream": True}, "echo", "echo with stream"),
        ("/completions", {"prompt": TEXT, "echo": True, "logprobs": 1, "suffix": "x"}, "suffix", "suffix with"),
        ("/completions", {"prompt": [1, 2, 9999], "echo": True, "logprobs": 1}, "prompt", "out of range"),
        ("/completions", {"prompt": [[1, 2], [3]], "logprobs": 1}, "prompt", "one prompt per request"),
        ("/completions", {"prompt": [1, 2, 9999]}, "prompt", "out of range"),  # generating from token ids too
        ("/completions", {"prompt": "", "echo": True, "logprobs": 1, "max_tokens": 0}, "prompt", "empty"),
        ("/completions", {"prompt": [WORDS[0]] * 300, "echo": True, "logprobs": 1, "max_tokens": 0}, "prompt", "300"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "w1"}], "logprobs": True}, "logprobs", "chat"),
    ],
)
def test_bad_logprobs_requests_are_a_400_naming_the_field(servers, references, path, body, field, words):
    refused(servers["nobos"], path, {**body, "max_tokens": body.get("max_tokens", 2)}, field, words)
    assert servers["nobos"].alive()
    answer = completion(servers["nobos"], {"prompt": WORDS, "echo": True, "logprobs": 1, "max_tokens": 0})
    rows = log_softmax(eval_logits(references("nobos", "none"), WORDS))
    assert answer["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(
        [rows[k - 1][WORDS[k]] for k in range(1, len(WORDS))], abs=1e-5
    )


@pytest.mark.parametrize("kind", ["bos", "nobos"])
def test_the_tokenizer_endpoints_and_token_id_prompts(servers, tiny_paths, kind):
    """vLLM's /tokenize (add_special_tokens), /detokenize and /tokenizer_info, as lm-eval's remote tokenizer
    reads them, agree with the model's own tokenizer; a generation from a prompt's token ids (taken as
    they are) is the generation from its text."""
    srv = servers[kind]
    llm = open_model(tiny_paths[kind])
    try:
        with_bos = llm.tokenize(TEXT.encode(), add_bos=True, special=True)
        without = llm.tokenize(TEXT.encode(), add_bos=False, special=True)
        eos = llm.detokenize([llm.token_eos()], special=True).decode()
        spelled = llm.detokenize(without).decode()
    finally:
        llm.close()
    assert (with_bos != without) == (kind == "bos")
    for special, want in ((True, with_bos), (False, without)):
        status, text = call(srv, "/tokenize", {"prompt": TEXT, "add_special_tokens": special}, base="/")
        assert status == 200 and json.loads(text)["tokens"] == want, text
    status, text = call(srv, "/detokenize", {"tokens": without}, base="/")
    assert status == 200 and json.loads(text)["prompt"] == spelled and spelled.strip("▁ "), text
    info = json.loads(urlopen_json(srv, "/tokenizer_info"))
    assert info["eos_token"] == eos and info["add_bos_token"] == (kind == "bos") and info["model_max_length"] == N_CTX
    refused_field(srv, "/tokenize", {"prompt": "\ud800"}, "prompt", base="/")
    status, text = call(srv, "/detokenize", {"tokens": [10**6]}, base="/")
    assert status == 400 and json.loads(text)["error"]["param"] == "tokens", text
    for plan in ("none", "u"):
        body = {**GREEDY, "model": f"llama@{plan}", "max_tokens": 8}
        from_text = completion(srv, {**body, "prompt": TEXT})["choices"][0]["text"]
        from_ids = completion(srv, {**body, "prompt": with_bos})["choices"][0]["text"]
        assert from_ids == from_text and from_text, (plan, from_ids, from_text)


def urlopen_json(srv: Server, path: str) -> str:
    """The body of a GET at the server's root."""
    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}{path}", headers={"Authorization": f"Bearer {srv.key}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read().decode()


def test_the_context_limit_for_an_echo_only_request(servers, references):
    """max_tokens 0 with echo needs no room for a generated token: a prompt of n_ctx tokens is scored."""
    answer = completion(servers["nobos"], {"prompt": [WORDS[0]] * N_CTX, "echo": True, "logprobs": 1, "max_tokens": 0})
    assert len(answer["choices"][0]["logprobs"]["tokens"]) == N_CTX
    status, text = call(servers["nobos"], "/completions", {"prompt": [WORDS[0]] * N_CTX, "logprobs": 1})
    assert status == 400 and json.loads(text)["error"]["n_ctx"] == N_CTX, text
    still_answers(servers["bos"], lambda plan: references("bos", plan))


# -- the real lm-evaluation-harness (optional: make lm-eval) ---------------------------------------------


def lm_eval_command() -> str | None:
    """lm-eval's command: $LM_EVAL (which must exist: `make test` sets it), else .venv-lm-eval's, else one
    on the PATH."""
    given = os.environ.get("LM_EVAL")
    if given and not Path(given).exists():
        pytest.fail(f"LM_EVAL is {given}, which does not exist")
    for candidate in (
        given,
        str(ROOT / ".venv-lm-eval" / "bin" / "lm_eval"),
        shutil.which("lm_eval"),
    ):
        if candidate and Path(candidate).exists():
            return candidate
    return None


ARC_ITEMS = 20


def _arc_files(tmp: Path) -> tuple[Path, list[Item]]:
    """ARC-Easy's first items as lm-eval's local JSON task, and as ggufloop's items (same prompt, 0-shot)."""
    from ggufloop.eval.tasks import _rows, resolve_tasks

    task = resolve_tasks("arc_easy")[0]
    items = task.items(shots=0, limit=ARC_ITEMS)
    rows = _rows(task.path)[:ARC_ITEMS]
    data = tmp / "arc_easy.jsonl"
    with data.open("w") as f:
        for r in rows:
            choices = json.loads(r["choices"]) if isinstance(r["choices"], str) else r["choices"]
            f.write(
                json.dumps({"id": r["id"], "question": r["question"], "choices": choices, "answerKey": r["answerKey"]})
            )
            f.write("\n")
    (tmp / "tasks").mkdir()
    (tmp / "tasks" / "arc_easy_local.yaml").write_text(
        "task: arc_easy_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_target: "{{choices.label.index(answerKey)}}"\n'
        'doc_to_choice: "{{choices.text}}"\n'
        "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
        "metadata: {version: 1.0}\n"
    )
    return tmp / "tasks", items


def _lm_eval(backend: str, model_args: str, tasks: Path, task: str, out: Path) -> tuple[list[dict], float]:
    """Run the real lm_eval on a local task; its per-sample records (sorted by doc_id) and the seconds it took."""
    command = lm_eval_command()
    if command is None:
        pytest.skip("lm-eval is not installed: make lm-eval (a venv of its own, .venv-lm-eval), or set LM_EVAL")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = ["--model", backend, "--model_args", model_args, "--tasks", task, "--include_path", str(tasks)]
    started = time.monotonic()
    proc = subprocess.run(
        [command, *args, "--log_samples", "--output_path", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-4000:]
    samples = sorted(out.rglob(f"samples_{task}_*.jsonl"))
    assert samples, proc.stdout[-2000:]
    got = [json.loads(line) for line in samples[-1].read_text().splitlines()]
    return sorted(got, key=lambda s: s["doc_id"]), took


def _base_url(srv: Server, backend: str) -> str:
    """lm-eval's base_url: the server's root for `gguf`, the completions URL for `local-completions`."""
    root = f"http://127.0.0.1:{srv.port}"
    return root if backend == "gguf" else f"{root}/v1/completions"


@pytest.mark.lm_eval
@pytest.mark.models
@pytest.mark.data
@pytest.mark.parametrize(
    "backend, model, plan",
    [
        ("gguf", "smollm2-135m-instruct", "10:15x3/uniform"),
        ("gguf", "gemma3-270m", "6:10x3/uniform"),
        ("local-completions", "smollm2-135m-instruct", "10:15x3/uniform"),
    ],
)
def test_lm_eval_scores_arc_easy_as_ggufloop_eval(tmp_path, backend, model, plan):
    """lm-eval's `gguf` and `local-completions` models against `ggufloop serve` (a looped plan: the
    default for gguf, chosen by model id for local-completions):
    acc and acc_norm item by item, and each choice's log-likelihood, equal ggufloop's Scorer on the same
    items (SmolLM2 adds no BOS, Gemma 3 does). local-completions tokenizes through the server's
    /tokenize (lm-eval's remote tokenizer) and sends token ids; a model that adds a BOS is scored there
    without it (lm-eval asks for no special tokens), which test_local_completions_on_a_bos_model checks."""
    from ggufloop.eval.scoring import accuracy
    from ggufloop.models import resolve

    path = resolve(model)
    tasks, items = _arc_files(tmp_path)
    # gguf sends no model field: the server's default plan; local-completions names the plan's id
    served = ["--loop", plan] if backend == "gguf" else [f"--plan=u={plan}"]
    srv = Server(path, *served, "-c", "1024", "-t", "2", key=None)  # lm-eval sends no key by default
    try:
        args = f"base_url={_base_url(srv, backend)}" + ("" if backend == "gguf" else f",model={path.stem}@u")
        got, took = _lm_eval(backend, args, tasks, "arc_easy_local", tmp_path / "out")
    finally:
        srv.close()
    assert len(got) == ARC_ITEMS
    scorer = Scorer(str(path), plan, n_ctx=1024, threads=2)
    try:
        naive = scorer.score_naive(items)  # a full forward pass per choice, as the server decodes a prompt
        fast = scorer.score(items)  # ggufloop eval's: the context decoded once, each choice's tokens apart
    finally:
        scorer.close()
    flips = 0
    for sample, item, want, lls in zip(got, items, naive, fast):
        lm_lls = [float(ll) for ll, _ in sample["filtered_resps"]]
        assert lm_lls == pytest.approx(want, abs=1e-3), (item.id, lm_lls, want)  # gemma3: 5e-5 (its SWA cache)
        acc, acc_norm = accuracy(item, want)
        assert (sample["acc"], sample["acc_norm"]) == (float(acc), float(acc_norm)), item.id
        # ggufloop eval's answers: the same, but where its batch shapes' noise (on quantized weights) can flip one
        if accuracy(item, lls) != (acc, acc_norm):
            noise = max(abs(a - b) for a, b in zip(lls, want))
            norm = [max(1, len(c)) for _, c in item.requests()]
            margins = [sorted(v)[-1] - sorted(v)[-2] for v in (want, [x / n for x, n in zip(want, norm)])]
            assert min(margins) <= 2 * noise, (item.id, lls, want)
            flips += 1
    print(f"{model}: lm-eval {backend}, {ARC_ITEMS} ARC-Easy items in {took:.1f} s; {flips} flipped by eval's noise")


@pytest.mark.lm_eval
@pytest.mark.models
@pytest.mark.data
def test_local_completions_on_a_bos_model_scores_the_tokens_it_sends(tmp_path):
    """On Gemma 3, whose tokenizer adds a BOS, lm-eval's remote tokenizer asks /tokenize for no special
    tokens, so local-completions sends each request's token ids without the BOS (as it does to vLLM);
    the server scores exactly those ids: every choice's log-likelihood equals a numpy log-softmax over
    a fresh forward pass of the BOS-less tokens, split as lm-eval splits context and continuation."""
    from ggufloop.models import resolve

    model, plan = "gemma3-270m", "6:10x3/uniform"
    path = resolve(model)
    tasks, items = _arc_files(tmp_path)
    srv = Server(path, "--loop", plan, "-c", "1024", "-t", "2", key=None)
    try:
        backend = "local-completions"
        got, _ = _lm_eval(backend, f"base_url={_base_url(srv, backend)}", tasks, "arc_easy_local", tmp_path / "out")
    finally:
        srv.close()
    # the server's F16 KV cache (llama.cpp's default): without its BOS, Gemma 3's log-likelihoods move by
    # up to 1.2 nats between an F16 and an F32 cache (measured on these items; with the BOS, 5e-5)
    llm = open_model(path, plan, n_ctx=256, type_k=1, type_v=1)
    try:
        for sample, item in zip(got, items):
            want = []
            for context, continuation in item.requests():
                ctx = llm.tokenize(context.encode(), add_bos=False, special=True)
                whole = llm.tokenize((context + continuation).encode(), add_bos=False, special=True)
                rows = log_softmax(eval_logits(llm, whole))
                want.append(sum(float(rows[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
            lm_lls = [float(ll) for ll, _ in sample["filtered_resps"]]
            assert lm_lls == pytest.approx(want, abs=1e-3), (item.id, lm_lls, want)
    finally:
        llm.close()


GSM8K_ITEMS, GSM8K_TOKENS = 6, 64


@pytest.mark.lm_eval
@pytest.mark.models
@pytest.mark.data
def test_lm_eval_generation_equals_ggufloops_gsm8k(tmp_path):
    """GSM8K through lm-eval's local-completions (generate_until: token-id prompts, stop sequences,
    max_gen_toks, repeat_penalty 1.0 in the task's generation kwargs) against `ggufloop serve` under a
    plan gives, item by item, the text ggufloop's own GSM8K generator gives for the same prompts (its
    plain format, 8 exemplars). On SmolLM2 a row's logits do not depend on the batch's row count
    (docs/generation.md), so the server's one-row steps and the generator's eight-row ones agree."""
    from ggufloop.eval import gsm8k
    from ggufloop.models import resolve

    model, plan = "smollm2-135m-instruct", "10:15x3/uniform"
    path = resolve(model)
    fmt = gsm8k.FORMATS["plain"]
    gen = gsm8k.Generator(path, plan, threads=2)
    try:
        prompts = gsm8k.Prompts(gen.llm, fmt)
        items = gsm8k.problems(GSM8K_ITEMS)
        texts = [prompts.text(p.question) for p in items]
        gen.set_prefix(prompts.prefix)
        want = dict(
            gen.generate_batch([(i, prompts.tokens(p.question)) for i, p in enumerate(items)], GSM8K_TOKENS, fmt.stops)
        )
    finally:
        gen.close()
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"prompt": t, "answer": p.gold}) + "\n" for t, p in zip(texts, items)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "gsm8k_local.yaml").write_text(
        "task: gsm8k_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        f"generation_kwargs:\n  until: {json.dumps(list(fmt.stops))}\n  do_sample: false\n  temperature: 0.0\n"
        f"  max_gen_toks: {GSM8K_TOKENS}\n  repeat_penalty: 1.0\n"
        "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n"
        "metadata: {version: 1.0}\n"
    )
    srv = Server(path, "--loop", plan, "-c", "2048", "-t", "2", key=None)
    try:
        backend = "local-completions"
        got, took = _lm_eval(
            backend, f"base_url={_base_url(srv, backend)}", tmp_path / "tasks", "gsm8k_local", tmp_path / "out"
        )
    finally:
        srv.close()
    assert len(got) == GSM8K_ITEMS
    for sample in got:
        assert sample["resps"][0][0] == want[sample["doc_id"]].text, sample["doc_id"]
    assert any(w.text.strip() for w in want.values())  # the answers say something
    print(f"{model}: lm-eval {backend}, {GSM8K_ITEMS} GSM8K items ({GSM8K_TOKENS} tokens at most) in {took:.1f} s")
