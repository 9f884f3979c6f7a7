"""Hostile model stores (issue 23, findings F3, F5 and F9 of the second adversarial round): a Hugging Face
cache or ollama store laid out to hang, to walk the whole file system or to crash ``info`` and
``models list``, and a Hub that accepts connections and never answers. Each case is run as a user runs it,
in a child process with a time bound: it ends in a result, or in exactly one ``error:`` line, and one bad
entry of a listing costs one line of it while the rest is listed."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_stores import COMMIT, add_hf_files, add_ollama

ROOT = Path(__file__).resolve().parent.parent
BOUND = 30  # seconds: every command below ends within this, or it hangs


@pytest.fixture
def stores_env(tmp_path) -> dict[str, str]:
    """An environment whose Hugging Face cache and ollama store are empty folders under tmp_path."""
    cache, store = tmp_path / "hf" / "hub", tmp_path / "ollama" / "models"
    cache.mkdir(parents=True)
    (store / "blobs").mkdir(parents=True)
    return {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OLLAMA_MODELS": str(store)}


def cache_of(env: dict[str, str]) -> Path:
    return Path(env["HF_HUB_CACHE"])


def store_of(env: dict[str, str]) -> Path:
    return Path(env["OLLAMA_MODELS"])


@pytest.fixture
def gguf(tiny_models) -> bytes:
    return tiny_models["llama"][2].read_bytes()


def ggufloop(*args: str, env: dict[str, str], timeout: float = BOUND) -> subprocess.CompletedProcess:
    """The command line as a user runs it; a command still running after timeout fails the test."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "ggufloop", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            cwd=ROOT,
            env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`ggufloop {' '.join(args)[:200]}` did not end within {timeout} s")
    proc.stdout, proc.stderr = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    return proc


def one_error(proc: subprocess.CompletedProcess, message: str) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    return errors[0]


def first_word(row: str) -> str:
    """The name a listing row starts with, as printed: up to the first space outside quotes."""
    quote, i = None, 0
    while i < len(row) and (quote or row[i] != " "):
        if quote == "$'" and row[i] == "\\":
            i += 1
        elif quote and row[i] == "'":
            quote = None
        elif not quote and row[i] == "'":
            quote = "$'" if row[i - 1 : i] == "$" else "'"
        i += 1
    return row[:i]


def listing(proc: subprocess.CompletedProcess) -> dict[str, str]:
    """`models list`'s store rows, by the name each starts with (as printed)."""
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    rows = [line[2:] for line in proc.stdout.splitlines() if line.startswith("  ") and not line.startswith("  name")]
    return {first_word(row): row for row in rows}


def good_models(env: dict[str, str], gguf: bytes) -> tuple[str, str]:
    """One sound model in each store, to be listed beside the hostile ones."""
    add_hf_files(cache_of(env), "org/Good", {"good-Q4_0.gguf": gguf})
    add_ollama(store_of(env), "registry.ollama.ai/library/good", "latest", gguf)
    return "hf:org/Good:Q4_0", "ollama:good:latest"


# -- F3: hangs and file-system walks ---------------------------------------------------------


def test_a_fifo_refs_main_blocks_neither_info_nor_the_listing(stores_env, gguf):
    good_hf, good_ollama = good_models(stores_env, gguf)
    snap = add_hf_files(cache_of(stores_env), "evil/fiforef", {"m-Q8_0.gguf": gguf}, main=False)
    refs = snap.parent.parent / "refs"
    refs.mkdir()
    os.mkfifo(refs / "main")

    proc = ggufloop("info", "hf:evil/fiforef", env=stores_env)
    assert proc.returncode == 0 and "architecture: llama" in proc.stdout, proc.stderr
    rows = listing(ggufloop("models", "list", env=stores_env))
    assert {good_hf, good_ollama, "hf:evil/fiforef:Q8_0"} <= set(rows)
    assert "llama" in rows["hf:evil/fiforef:Q8_0"].split()


def test_a_snapshot_linked_to_root_is_not_walked(stores_env, gguf):
    good_hf, good_ollama = good_models(stores_env, gguf)
    repo = cache_of(stores_env) / "models--evil--rootlink"
    (repo / "snapshots").mkdir(parents=True)
    (repo / "snapshots" / COMMIT).symlink_to("/")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    inside = add_hf_files(cache_of(stores_env), "evil/innerlink", {"m-Q8_0.gguf": gguf})
    (inside / "up").symlink_to("/")  # a folder link inside a snapshot is not followed either

    start = time.monotonic()
    rows = listing(ggufloop("models", "list", env=stores_env))
    assert time.monotonic() - start < BOUND
    assert {good_hf, good_ollama, "hf:evil/innerlink:Q8_0"} <= set(rows)
    assert not any(name.startswith("hf:evil/rootlink") for name in rows)
    one_error(ggufloop("info", "hf:evil/rootlink", env=stores_env), "no GGUF file")


@pytest.fixture
def silent_hub() -> Iterator[str]:
    """A Hub on 127.0.0.1 that accepts every connection and never answers: its endpoint."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()
        for conn in held:
            conn.close()


def test_fetch_from_a_hub_that_never_answers_ends_with_one_line(stores_env, silent_hub):
    env = {**stores_env, "HF_ENDPOINT": silent_hub, "GGUFLOOP_HUB_TIMEOUT": "2"}
    del env["HF_HUB_OFFLINE"]
    start = time.monotonic()
    line = one_error(ggufloop("models", "fetch", "hf:org/stalled-GGUF:Q4_K_M", env=env), "org/stalled-GGUF")
    assert time.monotonic() - start < BOUND
    assert silent_hub in line and "2 s" in line and "GGUFLOOP_HUB_TIMEOUT" in line  # what was tried, and the knob


@pytest.fixture
def slow_hub(gguf) -> Iterator[str]:
    """A Hub on 127.0.0.1 that answers every request after a second, holding one repository with one GGUF file
    (the listing, then HEAD and GET of the file, as huggingface_hub asks for them): its endpoint."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    etag = hashlib.sha256(gguf).hexdigest()

    class Hub(BaseHTTPRequestHandler):
        def answer(self, body: bytes) -> None:
            time.sleep(1)
            if self.path.startswith("/api/models/org/slow-GGUF/tree/main"):
                tree = [{"type": "file", "path": "tiny-Q4_K_M.gguf", "size": len(gguf), "oid": etag}]
                data, kind = json.dumps(tree).encode(), "json"
            elif self.path == "/org/slow-GGUF/resolve/main/tiny-Q4_K_M.gguf":
                data, kind = gguf, "octet-stream"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", f"application/{kind}")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_GET(self) -> None:
            self.answer(b"body")

        def do_HEAD(self) -> None:
            self.answer(b"")

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_slow_hub_that_answers_within_the_limit_is_fetched_from(stores_env, slow_hub, gguf):
    env = {**stores_env, "HF_ENDPOINT": slow_hub, "GGUFLOOP_HUB_TIMEOUT": "4"}
    del env["HF_HUB_OFFLINE"]
    proc = ggufloop("models", "fetch", "hf:org/slow-GGUF:Q4_K_M", env=env)
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip().rsplit(": ", 1)[1])
    assert path.name == "tiny-Q4_K_M.gguf" and path.read_bytes() == gguf
    assert path.is_relative_to(cache_of(stores_env))
    env = {**env, "HF_HUB_OFFLINE": "1"}
    proc = ggufloop("info", "hf:org/slow-GGUF", env=env)
    assert proc.returncode == 0 and "architecture: llama" in proc.stdout, proc.stderr


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("value", ["0", "soon", "inf"])
def test_a_bad_hub_timeout_is_one_line(stores_env, value):
    env = {**stores_env, "GGUFLOOP_HUB_TIMEOUT": value, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    del env["HF_HUB_OFFLINE"]
    one_error(ggufloop("models", "fetch", "hf:org/any-GGUF", env=env), "GGUFLOOP_HUB_TIMEOUT")


# -- F5: one bad entry, one line -------------------------------------------------------------


def test_manifests_with_an_int_for_layers_or_deep_nesting_cost_one_line(stores_env, gguf):
    good_hf, good_ollama = good_models(stores_env, gguf)
    store = store_of(stores_env)
    add_ollama(store, "registry.ollama.ai/library/layersint", "latest", None, manifest={"layers": 5})
    add_ollama(store, "registry.ollama.ai/library/deep", "latest", None, manifest="[" * 100_000)
    add_ollama(store, "registry.ollama.ai/library/deepobj", "latest", None, manifest='{"a":' * 100_000)

    rows = listing(ggufloop("models", "list", env=stores_env))
    assert "llama" in rows[good_ollama].split() and "llama" in rows[good_hf].split()
    assert "unusable" in rows["ollama:layersint:latest"] and "no model layer" in rows["ollama:layersint:latest"]
    assert "unusable" in rows["ollama:deep:latest"] and "nests too deeply" in rows["ollama:deep:latest"]
    assert "nests too deeply" in rows["ollama:deepobj:latest"]
    one_error(ggufloop("info", "ollama:layersint", env=stores_env), "has no model layer")
    one_error(ggufloop("info", "ollama:deep", env=stores_env), "nests too deeply")


@pytest.mark.parametrize(
    "name, message",
    [
        ("hf:" + "a" * 5000 + "/b", "is not a Hugging Face model name"),
        ("hf:org/" + "b" * 300, "is not a Hugging Face model name"),
        ("ollama:" + "a" * 300, "is not an ollama model name"),
        ("ollama:name:" + "t" * 300, "is not an ollama model name"),
        ("ollama:" + "h" * 300 + "/ns/name", "is not in the ollama store"),  # a host may be 350 long
        ("a" * 300 + ".gguf", "longer than the file system allows"),
        ("dir/" + "a" * 5000 + "/m.gguf", "longer than the file system allows"),
    ],
)
def test_names_longer_than_the_file_system_allows(stores_env, name, message):
    one_error(ggufloop("info", name, env=stores_env), message)


# -- F9: messages that mislead, listings that break ------------------------------------------


def test_a_blob_that_is_no_regular_file_is_named_so(stores_env, gguf):
    store = store_of(stores_env)
    blobs = {}
    for name in ("fifo", "folder", "zero"):
        blob = f"GGUF {name}".encode()
        add_ollama(store, f"registry.ollama.ai/library/{name}", "latest", blob)
        blobs[name] = store / "blobs" / f"sha256-{hashlib.sha256(blob).hexdigest()}"
        blobs[name].unlink()
    os.mkfifo(blobs["fifo"])
    blobs["folder"].mkdir()
    blobs["zero"].symlink_to("/dev/zero")
    good_hf, good_ollama = good_models(stores_env, gguf)

    one_error(ggufloop("info", "ollama:fifo", env=stores_env), "is a FIFO, not a regular file")
    one_error(ggufloop("info", "ollama:folder", env=stores_env), "is a folder, not a regular file")
    one_error(ggufloop("info", "ollama:zero", env=stores_env), "is a character device, not a regular file")

    snap = add_hf_files(cache_of(stores_env), "evil/blobs", {"m-Q4_0.gguf": b"x", "m-Q8_0.gguf": b"y"})
    os.unlink((snap / "m-Q4_0.gguf").resolve())
    os.mkfifo((snap / "m-Q4_0.gguf").resolve())
    os.unlink((snap / "m-Q8_0.gguf").resolve())
    os.symlink("/dev/zero", (snap / "m-Q8_0.gguf").resolve())
    one_error(ggufloop("info", "hf:evil/blobs:Q4_0", env=stores_env), "is a FIFO, not a regular file")
    one_error(ggufloop("info", "hf:evil/blobs:Q8_0", env=stores_env), "is a character device, not a regular file")

    rows = listing(ggufloop("models", "list", env=stores_env))
    assert "is a FIFO, not a regular file" in rows["ollama:fifo:latest"]
    assert "is a folder, not a regular file" in rows["ollama:folder:latest"]
    assert "is a FIFO, not a regular file" in rows["hf:evil/blobs:Q4_0"]
    assert "llama" in rows[good_hf].split() and "llama" in rows[good_ollama].split()


def test_a_fifo_or_folder_manifest_costs_one_line(stores_env, gguf):
    good_hf, good_ollama = good_models(stores_env, gguf)
    tags = store_of(stores_env) / "manifests" / "registry.ollama.ai" / "library" / "odd"
    tags.mkdir(parents=True)
    os.mkfifo(tags / "fifo")
    (tags / "folder").mkdir()
    rows = listing(ggufloop("models", "list", env=stores_env))
    assert "is a FIFO, not a regular file" in rows["ollama:odd:fifo"]
    assert "is a folder, not a regular file" in rows["ollama:odd:folder"]
    assert "llama" in rows[good_ollama].split()
    one_error(ggufloop("info", "ollama:odd:fifo", env=stores_env), "is a FIFO, not a regular file")


def test_a_split_index_above_its_count_is_named(stores_env, gguf):
    add_hf_files(cache_of(stores_env), "evil/split", {"m-00001-of-00001.gguf": gguf, "m-00002-of-00001.gguf": gguf})
    line = one_error(ggufloop("info", "hf:evil/split", env=stores_env), "m-00002-of-00001.gguf")
    assert "part 2 of 1" in line and "only 2 of the 1" not in line
    one_error(ggufloop("info", "hf:evil/split:m-00002-of-00001.gguf", env=stores_env), "part 2 of 1")
    rows = listing(ggufloop("models", "list", env=stores_env))
    assert "m-00002-of-00001.gguf is numbered part 2 of 1" in rows["hf:evil/split"]


def as_bash_reads(word: str) -> str:
    """What bash makes of a word typed on its command line."""
    out = subprocess.run(["bash", "-c", f"printf %s {word}"], capture_output=True, timeout=10, check=True)
    return out.stdout.decode("utf-8")


def test_listing_quotes_names_as_they_are_typed(stores_env, gguf):
    store = store_of(stores_env)
    add_ollama(store, "registry.ollama.ai/library/nl\nname", "latest", gguf)
    add_ollama(store, "registry.ollama.ai/library/sp ace", "latest", gguf)
    add_hf_files(cache_of(stores_env), "org/Spaced", {"my model.gguf": gguf, "other.gguf": gguf})
    good_hf, good_ollama = good_models(stores_env, gguf)

    proc = ggufloop("models", "list", env=stores_env)
    rows = listing(proc)
    assert "nl\nname" not in proc.stdout  # one line a model
    printed = {as_bash_reads(name): name for name in rows}  # each printed name, pasted into a shell
    assert {"ollama:nl\nname:latest", "ollama:sp ace:latest", "hf:org/Spaced:my model.gguf"} <= set(printed)
    assert printed["ollama:nl\nname:latest"] == "$'ollama:nl\\nname:latest'"
    assert printed["ollama:sp ace:latest"] == "'ollama:sp ace:latest'"
    for bad in ("$'ollama:nl\\nname:latest'", "'ollama:sp ace:latest'"):  # ollama: takes neither: said so
        assert "unusable: ollama: takes no such name" in rows[bad]
    spaced = rows["'hf:org/Spaced:my model.gguf'"]
    assert "llama" in spaced.split() and "llama" in rows[good_hf].split() and "llama" in rows[good_ollama].split()
    proc = ggufloop("info", "hf:org/Spaced:my model.gguf", env=stores_env)  # the printed name works
    assert proc.returncode == 0 and "my model.gguf" in proc.stdout, proc.stderr
