"""`ggufloop serve`: several plans per server, chosen per request, checked against LoopedLlama.

The server runs as a real subprocess on 127.0.0.1 and is spoken to with the `openai` client.
Every answer is compared with a LoopedLlama of its own running the same plan with the same
sampling (temperature 0, repeat_penalty 1.0: the server's default is 1.1).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ggufloop import LoopedLlama
from ggufloop.cli import main
from ggufloop.plan import LoopPlan

from ports import free_port

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key-1234"
N_CTX = 256
PLANS = {"u": "2:4x3/uniform", "e": "1:5x3/ema:0.8"}
SAMPLING = {"temperature": 0, "extra_body": {"repeat_penalty": 1.0}}
PROMPT = "w1 w2 w3"
MESSAGES = [{"role": "user", "content": "w4 w5"}]


class Server:
    """`ggufloop serve` as a subprocess; ``url`` is its /v1 address."""

    def __init__(self, model: Path, *args: str, key: str | None = KEY) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        env = {k: v for k, v in os.environ.items() if k != "GGUFLOOP_API_KEY"}
        if key is not None:
            env["GGUFLOOP_API_KEY"] = key  # the environment variable, as documented
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ggufloop", "serve", str(model), "--port", str(self.port), *args],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.key = key
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server ended: {self.proc.stderr.read()}")
            try:
                self.get("/models")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        self.close()
        raise RuntimeError("the server did not answer")

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key or self.key or "none", max_retries=0, timeout=120)

    def get(self, path: str, key: str | None = None) -> dict:
        headers = {"Authorization": f"Bearer {key or self.key}"} if (key or self.key) else {}
        with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers), timeout=30) as r:
            return json.load(r)

    def post(self, path: str, body: dict, base: str = "") -> tuple[int, dict]:
        """(status, JSON body) of a POST to /v1<path>, or to <path> at the root with base='/'."""
        url = (f"http://127.0.0.1:{self.port}" if base == "/" else self.url) + path
        req = urllib.request.Request(
            url,
            json.dumps(body).encode(),
            {"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as err:
            return err.code, json.load(err)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.communicate(timeout=30)[1]


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models["llama"][2]


@pytest.fixture(scope="module")
def server(tiny):
    args = [f"--plan={name}={plan}" for name, plan in PLANS.items()]
    srv = Server(tiny, *args, "-c", str(N_CTX))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def reference(tiny):
    """plan text -> a LoopedLlama of its own running that plan (loaded with the plan, not switched)."""
    llms: dict[str, LoopedLlama] = {}

    def get(plan: str) -> LoopedLlama:
        if plan not in llms:
            llms[plan] = LoopedLlama(str(tiny), loop=plan, n_ctx=N_CTX)
        return llms[plan]

    yield get
    for llm in llms.values():
        llm.close()


def expected_completion(llm: LoopedLlama, prompt: str = PROMPT, max_tokens: int = 8, stream: bool = False) -> str:
    """LoopedLlama's text; streamed, as its chunks joined (llama-cpp-python's streaming holds back
    a multi-byte character cut by max_tokens, which the random tiny models produce)."""
    out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0, repeat_penalty=1.0, stream=stream)
    return "".join(c["choices"][0]["text"] for c in out) if stream else out["choices"][0]["text"]


def expected_chat(llm: LoopedLlama, max_tokens: int = 8, stream: bool = False) -> str:
    out = llm.create_chat_completion(MESSAGES, max_tokens=max_tokens, temperature=0, repeat_penalty=1.0, stream=stream)
    if stream:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in out)
    return out["choices"][0]["message"]["content"]


IDS = {"llama": "none", "llama@none": "none", "llama@u": PLANS["u"], "llama@e": PLANS["e"]}


# -- plans chosen per request ------------------------------------------------------------------


def test_models_lists_every_plan(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == list(IDS)
    assert {m.id: m.model_extra["plan"] for m in models.data} == IDS
    assert server.client().models.retrieve("llama@u").id == "llama@u"


@pytest.mark.parametrize("model_id", list(IDS))
def test_each_plan_answers_as_looped_llama(server, reference, model_id):
    client, llm = server.client(), reference(IDS[model_id])
    want_text, want_chat = expected_completion(llm), expected_chat(llm)

    reply = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=8, **SAMPLING)
    assert reply.choices[0].text == want_text and reply.model == model_id
    chat = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=8, **SAMPLING)
    assert chat.choices[0].message.content == want_chat

    chunks = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=8, stream=True, **SAMPLING)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_chat(llm, stream=True)
    chunks = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=8, stream=True, **SAMPLING)
    assert "".join(c.choices[0].text for c in chunks) == expected_completion(llm, stream=True)


def test_the_plans_differ(reference):
    """The equality above means something: the plans give different answers on this model."""
    texts = {plan: expected_completion(reference(plan), max_tokens=12) for plan in set(IDS.values())}
    assert len(set(texts.values())) == len(texts), texts


def test_concurrent_requests_for_two_plans(server, reference):
    want = {
        (m, stream): expected_completion(reference(IDS[m]), max_tokens=12, stream=stream)
        for m in ("llama@u", "llama@e")
        for stream in (False, True)
    }
    got: list[tuple[tuple[str, bool], str]] = []
    errors: list[BaseException] = []

    def ask(model_id: str, stream: bool) -> None:
        try:
            client = server.client()
            args = dict(model=model_id, prompt=PROMPT, max_tokens=12, **SAMPLING)
            if stream:
                text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **args))
            else:
                text = client.completions.create(**args).choices[0].text
            got.append(((model_id, stream), text))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=ask, args=key) for _ in range(2) for key in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(got) == len(threads)
    for key, text in got:
        assert text == want[key], key


def test_unknown_model_is_refused_with_the_allowed_ids(server):
    with pytest.raises(openai.NotFoundError) as caught:
        server.client().completions.create(model="llama@2:4x4", prompt=PROMPT, max_tokens=2)
    assert caught.value.status_code == 404
    assert caught.value.body["allowed"] == list(IDS)
    for model_id in IDS:
        assert model_id in caught.value.message
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)


@pytest.mark.parametrize(
    "extra",
    [
        {"extra_body": {"loop": "2:4x4"}},
        {"extra_body": {"mix": "uniform"}},
        {"extra_body": {"kv_overrides": {"ggufloop.loop.count": 4}}},
        {"extra_body": {"ggufloop.loop.count": 4}},
        {"extra_query": {"plan": "2:4x4"}},
    ],
)
def test_a_plan_passed_any_other_way_is_refused(server, extra):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().completions.create(model="llama@u", prompt=PROMPT, max_tokens=2, **extra)
    assert caught.value.status_code == 400
    assert caught.value.body["allowed"] == list(IDS)


def test_switching_plans_reuses_the_loaded_weights(tiny, reference, monkeypatch):
    """In process: one LoopedLlama, one load from disk, whatever the order of the plans."""
    from llama_cpp import _internals

    from ggufloop import server as srv

    loads = []
    real_init = _internals.LlamaModel.__init__

    def counting_init(self, *args, **kwargs):
        loads.append(kwargs.get("path_model"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(_internals.LlamaModel, "__init__", counting_init)
    config = srv.ServeConfig(tiny, plans={k: LoopPlan.parse(v) for k, v in PLANS.items()}, n_ctx=N_CTX)
    engine = srv.PlanServer(config)
    try:
        assert len(loads) == 1
        llm, weights = engine.llm, engine.llm.model
        for model_id in ["llama@u", "llama@e", "llama", "llama@u", "llama@none"]:

            def call(llm: LoopedLlama, model_id: str = model_id) -> tuple[str, str]:
                return str(llm.plan), expected_completion(llm)

            plan, text = engine.run(model_id, call)
            assert plan == IDS[model_id]
            assert text == expected_completion(reference(IDS[model_id]))
        assert engine.llm is llm and engine.llm.model == weights
        assert len(loads) == 1
    finally:
        engine.close()


# -- security ---------------------------------------------------------------------------------


def test_the_api_key_is_enforced(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").completions.create(model="llama", prompt=PROMPT, max_tokens=2)
    for path in ("/models", "/completions"):
        req = urllib.request.Request(
            server.url + path, b"{}" if path == "/completions" else None, {"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(req, timeout=30)
        assert caught.value.code == 401
    assert server.client().models.list().data  # the right key still works


def test_the_server_binds_loopback_by_default(server):
    out = subprocess.run(
        [sys.executable, "-m", "ggufloop", "serve", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60
    ).stdout
    assert "GGUFLOOP_API_KEY" in out and "127.0.0.1" in out
    with socket.socket() as s:  # listening on loopback, and only there
        assert s.connect_ex(("127.0.0.1", server.port)) == 0
    try:
        addresses = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    except OSError:
        addresses = set()
    for address in addresses:
        if address.startswith("127."):
            continue
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((address, server.port)) != 0


# -- hardening (issue 14) ------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [[999999999], [-1], [288], [5, 288]])
def test_detokenize_out_of_range_is_refused_and_the_server_lives(server, tokens):
    status, body = server.post("/extras/detokenize", {"tokens": tokens}, base="/")
    assert status == 400 and "out of range" in body["error"]["message"]
    assert server.alive()
    status, body = server.post("/extras/detokenize", {"tokens": [259, 287]}, base="/")
    assert status == 200 and body["text"].startswith(" w0")
    reply = server.client().completions.create(model="llama", prompt=PROMPT, max_tokens=2, **SAMPLING)
    assert reply.choices[0].finish_reason == "length"


def test_a_token_id_out_of_range_in_logit_bias_is_refused(server):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().completions.create(model="llama", prompt=PROMPT, max_tokens=2, logit_bias={"99999": 1})
    assert "out of range" in caught.value.message
    assert server.alive()


@pytest.mark.parametrize("grammar", ['root ::= ( "', "root ::= ( ", 'other ::= "a"', 'root ::= root "a"'])
def test_an_invalid_grammar_is_refused_and_the_server_lives(server, grammar):
    for path, body in (
        ("/completions", {"prompt": PROMPT}),
        ("/chat/completions", {"messages": MESSAGES}),
    ):
        status, reply = server.post(path, {**body, "max_tokens": 2, "grammar": grammar})
        assert status == 400 and "grammar" in reply["error"]["message"], reply
        assert server.alive()
    # a valid grammar is used
    status, reply = server.post("/completions", {"prompt": PROMPT, "max_tokens": 4, "grammar": 'root ::= "ab"'})
    assert status == 200 and reply["choices"][0]["text"] == "ab"


def test_validation_errors_are_4xx_without_server_paths(server):
    for body in (
        {"prompt": PROMPT, "max_tokens": "many"},
        {"prompt": 42},
        {"messages": "hello"},
        {"prompt": [{"a": 1}]},
    ):
        path = "/chat/completions" if "messages" in body else "/completions"
        status, reply = server.post(path, body)
        text = json.dumps(reply)
        assert 400 <= status < 500, reply
        assert "site-packages" not in text and ".py" not in text and str(ROOT) not in text, text
    # the answer does not name the model file either
    reply = server.client().completions.create(model="llama", prompt=PROMPT, max_tokens=2, **SAMPLING)
    assert reply.model == "llama" and "gguf" not in reply.model_dump_json()
    assert server.alive()


def test_non_finite_logits_are_an_error_not_an_empty_answer(tiny_models, tmp_path):
    from tiny import make_weights, write_model

    spec = tiny_models["llama"][0]
    weights = make_weights(spec, seed=0)
    weights["output_norm.weight"] = np.full_like(weights["output_norm.weight"], np.nan)
    srv = Server(write_model(tmp_path / "damaged.gguf", spec, weights), "-c", str(N_CTX), key=None)
    try:
        client = srv.client()
        with pytest.raises(openai.InternalServerError) as caught:
            client.completions.create(model="damaged", prompt=PROMPT, max_tokens=4, **SAMPLING)
        assert "non-finite" in caught.value.message
        with pytest.raises(openai.APIError) as caught:
            for _ in client.chat.completions.create(
                model="damaged", messages=MESSAGES, max_tokens=4, stream=True, **SAMPLING
            ):
                pass
        assert "non-finite" in caught.value.message
        assert srv.alive()
        assert srv.get("/models")["data"][0]["id"] == "damaged"  # and it still answers
    finally:
        srv.close()


# -- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--plan", "10:15x3"], "NAME=PLAN"),
        (["--plan", "none=2:4x2"], "reserved"),
        (["--plan", "a@b=2:4x2"], "plan name"),
        (["--plan", "u=2:4x2", "--plan", "u=1:3x2"], "twice"),
        (["--plan", "u=2:9x2"], "out of range"),
        (["--plan", "u=2:4x2/bogus"], "unknown mix"),
    ],
)
def test_bad_plans_are_one_error_line(tiny, args, message):
    res = CliRunner().invoke(main, ["serve", str(tiny), *args])
    assert res.exit_code == 1, res.output
    assert res.output.startswith("error: ") and message in res.output and res.output.count("\n") == 1


# -- the real model ----------------------------------------------------------------------------


@pytest.mark.models
def test_smollm2_plans_chat_and_stream():
    from ggufloop.models import CATALOG

    path = CATALOG["smollm2-135m-instruct"].path  # marked models: make models has fetched it
    srv = Server(path, "--plan", "uniform=10:15x3/uniform", "-c", "512")
    try:
        client = srv.client()
        messages = [{"role": "user", "content": "Name three colors."}]
        for model_id, plan in (("smollm2-135m-instruct@uniform", "10:15x3/uniform"), ("smollm2-135m-instruct", None)):
            llm = LoopedLlama(str(path), loop=plan or LoopPlan(), n_ctx=512)
            want = llm.create_chat_completion(messages, max_tokens=16, temperature=0, repeat_penalty=1.0)
            llm.close()
            want = want["choices"][0]["message"]["content"]
            assert want.strip()
            got = client.chat.completions.create(model=model_id, messages=messages, max_tokens=16, **SAMPLING)
            assert got.choices[0].message.content == want
            chunks = client.chat.completions.create(
                model=model_id, messages=messages, max_tokens=16, stream=True, **SAMPLING
            )
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    finally:
        srv.close()
