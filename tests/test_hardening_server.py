"""`ggufloop serve` against a hostile client (issue 23, findings F6, F8 and the server part of F9).

Every client mistake is a 400 naming the field at fault, never a 500, and the server answers a
normal request correctly right after (the answer is compared with a LoopedLlama of its own). The
limits (--max-tokens, --request-timeout, --max-input-chars) hold, tokenizing never stalls other
requests, and keys no client could send are refused at start with one `error:` line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import test_serve
from test_robustness import one_error
from test_serve import MESSAGES, N_CTX, PROMPT, ROOT, Server, expected_chat, expected_completion, free_port

tiny = test_serve.tiny  # its fixtures: the tiny llama, and a LoopedLlama per plan to compare answers with
reference = test_serve.reference

LONG = "w1 w2 " * 400  # far more tokens than N_CTX
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
CAP_TOKENS, CAP_CHARS = 12, 5000
SLOW_PLAN = "1:5x127"  # 510 virtual layers: tens of milliseconds a token on the tiny model
TIMEOUT = 1.0
WORDS_ONLY = {str(i): -100.0 for i in range(259)}  # no control or byte tokens: one word, one chunk


@pytest.fixture(scope="module")
def server(tiny):
    srv = Server(tiny, "-c", str(N_CTX))
    yield srv
    srv.close()


def call(srv: Server, path: str, body: dict, base: str = "", timeout: float = 30) -> tuple[int, str]:
    """(status, body text) of a POST to /v1<path>, or to <path> at the root with base='/'."""
    url = (f"http://127.0.0.1:{srv.port}" if base == "/" else srv.url) + path
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {srv.key}"}
    req = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def refused(srv: Server, path: str, body: dict, field: str, base: str = "") -> dict:
    """The error of a request that must be a 400 naming field (in param and in the message)."""
    status, text = call(srv, path, body, base)
    assert status == 400, (status, text)
    error = json.loads(text)["error"]
    assert field in (error["param"] or "") and field.split("[")[0] in error["message"], error
    assert "Traceback" not in text and "internal server error" not in text
    return error


def events(text: str) -> list[dict | str]:
    """The data of a server-sent event stream, [DONE] as a string."""
    out: list[dict | str] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def greedy(llm, max_tokens: int, min_tokens: int = 0, stream: bool = False, prompt: str = PROMPT):
    """LoopedLlama's greedy completion under the server's min_tokens (EOS held back until then):
    its text, or with stream its chunks' texts as they come."""
    import llama_cpp

    processors = llama_cpp.LogitsProcessorList([llama_cpp.MinTokensLogitsProcessor(min_tokens, llm.token_eos())])
    out = llm.create_completion(prompt, max_tokens=max_tokens, logits_processor=processors, stream=stream, **GREEDY)
    return (c["choices"][0]["text"] for c in out) if stream else out["choices"][0]["text"]


def still_answers(srv: Server, reference) -> None:
    """The server is up and answers a completion and a chat as LoopedLlama does."""
    assert srv.alive()
    llm = reference("none")
    status, text = call(srv, "/completions", {"prompt": PROMPT, "max_tokens": 8, **GREEDY})
    assert status == 200, text
    assert json.loads(text)["choices"][0]["text"] == expected_completion(llm)
    status, text = call(srv, "/chat/completions", {"messages": MESSAGES, "max_tokens": 8, **GREEDY})
    assert status == 200, text
    assert json.loads(text)["choices"][0]["message"]["content"] == expected_chat(llm)


# -- F6: client mistakes are 400s naming the field ------------------------------------------------


@pytest.mark.parametrize(
    "path, body, field",
    [
        # completions answer logprobs, except streamed (tests/test_lm_eval.py has the rest)
        ("/completions", {"prompt": PROMPT, "logprobs": 2, "stream": True}, "logprobs"),
        ("/chat/completions", {"messages": MESSAGES, "logprobs": True}, "logprobs"),
        ("/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 3}, "logprobs"),
        ("/chat/completions", {"messages": MESSAGES, "top_logprobs": 3}, "top_logprobs"),
    ],
)
def test_logprobs_is_a_400_naming_it(server, reference, path, body, field):
    error = refused(server, path, {**body, "max_tokens": 4}, field)
    assert "not supported" in error["message"]
    still_answers(server, reference)


def test_logprobs_false_is_no_request_for_logprobs(server, reference):
    status, text = call(
        server, "/chat/completions", {"messages": MESSAGES, "logprobs": False, "max_tokens": 8, **GREEDY}
    )
    assert status == 200, text
    assert json.loads(text)["choices"][0]["message"]["content"] == expected_chat(reference("none"))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/completions", {"prompt": LONG}, "prompt"),
        ("/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, "messages"),
    ],
)
def test_a_prompt_longer_than_the_context_is_a_400_with_both_counts(server, reference, path, body, field, stream):
    error = refused(server, path, {**body, "max_tokens": 4, "stream": stream}, field)
    assert error["n_ctx"] == N_CTX and error["prompt_tokens"] > N_CTX, error
    assert f"{error['prompt_tokens']} tokens" in error["message"] and str(N_CTX) in error["message"], error
    still_answers(server, reference)


@pytest.mark.parametrize(
    "path, body, field, base",
    [
        ("/completions", {"prompt": "\ud800abc"}, "prompt", ""),
        ("/completions", {"prompt": ["\udfff"]}, "prompt", ""),
        ("/completions", {"prompt": PROMPT, "stop": ["\ud800"]}, "stop", ""),
        ("/completions", {"prompt": PROMPT, "stream": True, "suffix": "x\udc00"}, "suffix", ""),
        ("/chat/completions", {"messages": [{"role": "user", "content": "\udfff"}]}, "messages[0].content", ""),
        ("/chat/completions", {"messages": MESSAGES, "stream": True, "stop": "\ud800"}, "stop", ""),
        ("/extras/tokenize", {"input": "\ud800"}, "input", "/"),
        ("/extras/tokenize/count", {"input": "ab\ud800"}, "input", "/"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(server, reference, path, body, field, base):
    if "tokenize" not in path:
        body = {**body, "max_tokens": 4}
    error = refused(server, path, body, field, base)
    assert "surrogate" in error["message"], error
    still_answers(server, reference)


def test_tokenizing_a_long_input_stalls_no_other_request(server, reference):
    """A long /extras/tokenize/count runs in a worker thread: /v1/models answers meanwhile, at once."""
    text = "w1 w2 " * 60_000  # 360 000 characters (under the 1e6 cap): seconds for the tiny model's tokenizer
    done: dict[str, float] = {}

    def count() -> None:
        status, body = call(server, "/extras/tokenize/count", {"input": text}, base="/", timeout=120)
        done["count"] = json.loads(body)["count"] if status == 200 else -status
        done["at"] = time.monotonic()

    started = time.monotonic()
    worker = threading.Thread(target=count)
    worker.start()
    time.sleep(0.2)
    answered: list[float] = []  # when each /v1/models answered
    while "at" not in done and time.monotonic() - started < 120:
        server.get("/models")
        answered.append(time.monotonic())
        time.sleep(0.05)
    worker.join(timeout=120)
    assert done["count"] > 2 * 60_000, done
    took = done["at"] - started
    assert took > 1.0, f"the count took only {took:.2f} s: too short to show a stall"
    during = [t for t in answered if t < done["at"] - 0.3]
    assert len(during) >= 3, f"/v1/models answered {len(during)} times during a {took:.1f} s tokenize"
    still_answers(server, reference)


# -- limits: --max-tokens, --max-input-chars --------------------------------------------------------


@pytest.fixture(scope="module")
def capped(tiny):
    srv = Server(tiny, "-c", str(N_CTX), "--max-tokens", str(CAP_TOKENS), "--max-input-chars", str(CAP_CHARS))
    yield srv
    srv.close()


@pytest.mark.parametrize(
    "path, body",
    [
        ("/completions", {"prompt": PROMPT, "max_tokens": 2**70}),
        ("/completions", {"prompt": PROMPT, "max_tokens": 0}),
        ("/completions", {"prompt": PROMPT, "max_tokens": 100, "stream": True}),
        ("/chat/completions", {"messages": MESSAGES}),
        ("/chat/completions", {"messages": MESSAGES, "max_tokens": -1}),
        ("/chat/completions", {"messages": MESSAGES, "max_tokens": 10**12}),
    ],
)
def test_max_tokens_is_capped_by_the_server(capped, reference, path, body):
    status, text = call(capped, path, {**body, "min_tokens": 100, **GREEDY})  # min_tokens: no early end
    assert status == 200, text
    if body.get("stream"):
        chunks = [e for e in events(text) if isinstance(e, dict)]
        assert events(text)[-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
        got = "".join(c["choices"][0]["text"] for c in chunks)
        assert got == "".join(greedy(reference("none"), CAP_TOKENS, 100, stream=True))
        return
    answer = json.loads(text)
    # llama-cpp-python finishes a UTF-8 character cut by max_tokens (up to 3 more byte tokens)
    assert CAP_TOKENS <= answer["usage"]["completion_tokens"] <= CAP_TOKENS + 3, answer["usage"]
    assert answer["choices"][0]["finish_reason"] == "length"
    if path == "/completions":
        assert answer["choices"][0]["text"] == greedy(reference("none"), CAP_TOKENS, 100)


def test_a_request_under_the_cap_is_untouched(capped, reference):
    status, text = call(capped, "/completions", {"prompt": PROMPT, "max_tokens": 8, **GREEDY})
    assert status == 200 and json.loads(text)["choices"][0]["text"] == expected_completion(reference("none"))


@pytest.mark.parametrize(
    "path, body, field, base",
    [
        ("/extras/tokenize", {"input": "x" * (CAP_CHARS + 1)}, "input", "/"),
        ("/extras/tokenize/count", {"input": "x" * (CAP_CHARS + 1)}, "input", "/"),
        ("/extras/detokenize", {"tokens": [259] * (CAP_CHARS + 1)}, "tokens", "/"),
        ("/completions", {"prompt": "x" * (CAP_CHARS + 1), "max_tokens": 2}, "prompt", ""),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x" * 3000}] * 2}, "messages", ""),
    ],
)
def test_input_over_the_cap_is_a_400(capped, path, body, field, base):
    error = refused(capped, path, body, field, base)
    assert str(CAP_CHARS) in error["message"] and "--max-input-chars" in error["message"], error
    assert capped.alive()
    status, text = call(capped, "/extras/tokenize/count", {"input": "w1 " * (CAP_CHARS // 3)}, base="/")
    assert status == 200 and json.loads(text)["count"] > 0, text


# -- limits: --request-timeout ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def timed(tiny):
    srv = Server(tiny, "-c", str(N_CTX), "--loop", SLOW_PLAN, "--request-timeout", str(TIMEOUT), "-t", "1")
    yield srv
    srv.close()


@pytest.mark.parametrize("stream", [False, True])
def test_the_time_limit_ends_a_generation_with_the_text_so_far(timed, tiny, stream):
    from ggufloop import LoopedLlama

    body = {"prompt": PROMPT, "max_tokens": 200, "stream": stream, "logit_bias": WORDS_ONLY, **GREEDY}
    started = time.monotonic()
    status, text = call(timed, "/completions", body, timeout=120)
    took = time.monotonic() - started
    assert status == 200, text
    if stream:
        assert events(text)[-1] == "[DONE]"
        chunks = [e for e in events(text) if isinstance(e, dict)]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        got = "".join(c["choices"][0]["text"] for c in chunks)
    else:
        answer = json.loads(text)
        assert answer["choices"][0]["finish_reason"] == "length"
        assert 0 < answer["usage"]["completion_tokens"] < 200, answer["usage"]
        got = answer["choices"][0]["text"]
    assert got and took < TIMEOUT + 10, took  # the limit, and a token, the prompt and the machine's load
    llm = LoopedLlama(str(tiny), loop=SLOW_PLAN, n_ctx=N_CTX, n_threads=1, n_threads_batch=1)
    try:  # the text so far is what the plan generates, token for token: read as far as it goes
        want = ""
        for chunk in llm.create_completion(PROMPT, max_tokens=200, logit_bias=WORDS_ONLY, stream=True, **GREEDY):
            want += chunk["choices"][0]["text"]
            if len(want) > len(got):
                break
    finally:
        llm.close()
    assert want.startswith(got) and len(want) > len(got), (got, want)


def test_the_time_limit_ends_a_chat_too(timed):
    body = {"messages": MESSAGES, "logit_bias": WORDS_ONLY, **GREEDY}  # no max_tokens: up to the context
    status, text = call(timed, "/chat/completions", body, timeout=120)
    assert status == 200, text
    answer = json.loads(text)
    assert answer["choices"][0]["finish_reason"] == "length" and answer["choices"][0]["message"]["content"]
    assert 0 < answer["usage"]["completion_tokens"] < N_CTX - answer["usage"]["prompt_tokens"], answer["usage"]
    status, text = call(timed, "/extras/tokenize/count", {"input": PROMPT}, base="/")
    assert status == 200 and json.loads(text)["count"] > 0  # and the server goes on


# -- F8: keys no client can send are refused at start ------------------------------------------------


def start(tiny_path, env_key: str | None, *args: str, wait: float = 30) -> subprocess.CompletedProcess:
    """`ggufloop serve` until it exits or says it serves (then it is stopped: the key was accepted)."""
    env = {k: v for k, v in os.environ.items() if k != "GGUFLOOP_API_KEY"}
    if env_key is not None:
        env["GGUFLOOP_API_KEY"] = env_key
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ggufloop",
            "serve",
            str(tiny_path),
            "-c",
            str(N_CTX),
            "--port",
            str(free_port()),
            *args,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lines: list[bytes] = []
    deadline = time.monotonic() + wait
    try:
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith(b"serving "):
                pytest.fail(f"the server started with that key: {b''.join(lines).decode('utf-8', 'replace')}")
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = proc.stdout.read().decode("utf-8", "replace")
    err = (b"".join(lines) + proc.stderr.read()).decode("utf-8", "replace")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize(
    "key", [" pad ", "pad ", " pad", "k\u00e9y", "\u043a\u043b\u044e\u0447", "tab\tkey", "nl\nkey"]
)
@pytest.mark.parametrize("how", ["option", "env"])
def test_a_key_no_client_can_send_is_refused_at_start(tiny, key, how):
    proc = start(tiny, key, "--api-key", key) if how == "option" else start(tiny, key)
    one_error(proc, "--api-key")
    assert key.strip() not in proc.stderr  # the key itself is not printed


def test_a_printable_ascii_key_with_inner_spaces_works(tiny):
    srv = Server(tiny, "-c", str(N_CTX), key="two words!")
    try:
        assert srv.get("/models")["data"][0]["id"] == "llama"
        with pytest.raises(urllib.error.HTTPError) as caught:
            srv.get("/models", key="two")
        assert caught.value.code == 401
    finally:
        srv.close()


def test_the_limits_are_in_the_help():
    out = subprocess.run(
        [sys.executable, "-m", "ggufloop", "serve", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60
    ).stdout
    for option in ("--max-tokens", "--request-timeout", "--max-input-chars"):
        assert option in out, out
