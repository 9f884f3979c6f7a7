"""Models by the names users know: hf: from a Hugging Face cache and ollama: from an ollama store, each
laid out in a temporary folder exactly as huggingface_hub and ollama write them, with real GGUF files."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ggufloop import models, stores
from ggufloop.cli import main
from ggufloop.errors import ModelFetchError, ModelFileError, UserError
from ggufloop.stores import AmbiguousModelError, ModelNotFoundError

ROOT = Path(__file__).resolve().parent.parent
REPO = "org/Tiny-GGUF"
COMMIT = "a" * 40
OLD_COMMIT = "b" * 40


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing here may reach the network: every connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def ollama(tmp_path, monkeypatch) -> Path:
    store = tmp_path / "ollama" / "models"
    (store / "blobs").mkdir(parents=True)
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    return store


@pytest.fixture
def gguf(tiny_models) -> bytes:
    return tiny_models["llama"][2].read_bytes()


@pytest.fixture
def gguf_qwen(tiny_models) -> bytes:
    return tiny_models["qwen2"][2].read_bytes()


def add_hf_files(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT, main: bool = True) -> Path:
    """Files into the cache as huggingface_hub stores them: content in blobs/<sha256>, a relative symlink per
    file in snapshots/<commit>/, the commit in refs/main. The snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    for rel, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        up = "../" * (len(Path(rel).parts) + 1)
        link.symlink_to(f"{up}blobs/{digest}")
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return snap


def add_ollama(store: Path, path: str, tag: str, blob: bytes | None, manifest: dict | str | None = None) -> Path:
    """A model as `ollama pull` leaves it: manifests/<host>/<namespace>/<name>/<tag> and blobs/sha256-<hex>."""
    digest = hashlib.sha256(blob or b"").hexdigest()
    if blob is not None:
        (store / "blobs" / f"sha256-{digest}").write_bytes(blob)
    if manifest is None:
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "c" * 64},
            "layers": [
                {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": len(blob)},
                {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "d" * 64, "size": 10},
            ],
        }
    target = store / "manifests" / path / tag
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    return target


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and isinstance(err.value, UserError)
    return text


# -- Hugging Face cache ----------------------------------------------------------------------


def test_cache_folder_follows_the_environment_as_huggingface_hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    assert stores.hf_cache_dir() == Path(constants.HF_HUB_CACHE)  # the environment it was imported under
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert stores.hf_cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert stores.hf_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert stores.hf_cache_dir() == tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "yes")
    assert stores.hf_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not stores.hf_offline()


def test_one_file_resolves_offline_by_repo_alone(hf_cache, gguf):
    snap = add_hf_files(hf_cache, REPO, {"tiny-Q4_K_M.gguf": gguf})
    path = models.resolve(f"hf:{REPO}")
    assert path == snap / "tiny-Q4_K_M.gguf" and path.is_symlink()
    assert path.read_bytes() == gguf
    assert models.resolve(f"hf:{REPO}:q4_k_m") == path

    from huggingface_hub import scan_cache_dir, try_to_load_from_cache  # the layout is huggingface_hub's own

    assert try_to_load_from_cache(REPO, "tiny-Q4_K_M.gguf", cache_dir=hf_cache) == str(path)
    scan = scan_cache_dir(hf_cache)
    assert not scan.warnings and [r.repo_id for r in scan.repos] == [REPO]


def test_quant_and_file_pick_among_several(hf_cache, gguf, gguf_qwen):
    snap = add_hf_files(
        hf_cache,
        REPO,
        {
            "Tiny-Q4_K_M.gguf": gguf,
            "Tiny-Q4_K_S.gguf": gguf_qwen,
            "Tiny-IQ4_XS.gguf": gguf,
            "Tiny-Q8_0.gguf": gguf_qwen,
            "mmproj-Tiny-F16.gguf": gguf,
            "README.md": b"# tiny",
        },
    )
    assert models.resolve(f"hf:{REPO}:Q4_K_M") == snap / "Tiny-Q4_K_M.gguf"
    assert models.resolve(f"hf:{REPO}:q8_0") == snap / "Tiny-Q8_0.gguf"
    assert models.resolve(f"hf:{REPO}:iq4_xs") == snap / "Tiny-IQ4_XS.gguf"
    assert models.resolve(f"hf:{REPO}:Tiny-Q4_K_S.gguf") == snap / "Tiny-Q4_K_S.gguf"
    assert models.resolve(f"hf:{REPO}:mmproj-Tiny-F16.gguf") == snap / "mmproj-Tiny-F16.gguf"

    with pytest.raises(AmbiguousModelError) as err:
        models.resolve(f"hf:{REPO}")
    msg = one_line(err)
    for name in ("Q4_K_M", "Q4_K_S", "IQ4_XS", "Q8_0"):
        assert f"hf:{REPO}:{name}" in msg
    assert "mmproj" not in msg  # a projector is not a model

    with pytest.raises(ModelNotFoundError) as err:  # a tag is matched whole: Q4_K is neither Q4_K_M nor Q4_K_S
        models.resolve(f"hf:{REPO}:Q4_K")
    msg = one_line(err)
    assert f"hf:{REPO}:Q8_0" in msg and f"`ggufloop models fetch hf:{REPO}:Q4_K`" in msg


def test_two_files_with_one_tag_are_ambiguous(hf_cache, gguf):
    add_hf_files(hf_cache, REPO, {"a/Tiny-Q4_0.gguf": gguf, "b/Tiny-Q4_0.gguf": gguf})
    with pytest.raises(AmbiguousModelError) as err:
        models.resolve(f"hf:{REPO}:Q4_0")
    msg = one_line(err)
    assert f"hf:{REPO}:a/Tiny-Q4_0.gguf" in msg and f"hf:{REPO}:b/Tiny-Q4_0.gguf" in msg
    assert models.resolve(f"hf:{REPO}:b/Tiny-Q4_0.gguf").parent.name == "b"


def test_split_files_resolve_to_their_first_part(hf_cache, gguf):
    parts = {f"Q4_K_M/Tiny-Q4_K_M-{i:05d}-of-00003.gguf": gguf if i == 1 else b"part %d" % i for i in (1, 2, 3)}
    snap = add_hf_files(hf_cache, REPO, {**parts, "Tiny-Q8_0.gguf": gguf})
    first = snap / "Q4_K_M" / "Tiny-Q4_K_M-00001-of-00003.gguf"
    assert models.resolve(f"hf:{REPO}:Q4_K_M") == first
    assert models.resolve(f"hf:{REPO}:Tiny-Q4_K_M-00002-of-00003.gguf") == first

    (snap / "Q4_K_M" / "Tiny-Q4_K_M-00003-of-00003.gguf").unlink()
    with pytest.raises(ModelNotFoundError) as err:
        models.resolve(f"hf:{REPO}:Q4_K_M")
    assert "2 of the 3 parts" in one_line(err)


def test_a_file_only_an_older_snapshot_holds_is_found(hf_cache, gguf, gguf_qwen):
    old = add_hf_files(hf_cache, REPO, {"Tiny-Q4_K_M.gguf": gguf}, commit=OLD_COMMIT)
    new = add_hf_files(hf_cache, REPO, {"Tiny-Q8_0.gguf": gguf_qwen}, commit=COMMIT)  # main moved on
    assert models.resolve(f"hf:{REPO}:Q4_K_M") == old / "Tiny-Q4_K_M.gguf"
    assert models.resolve(f"hf:{REPO}:Q8_0") == new / "Tiny-Q8_0.gguf"


def test_absent_model_says_the_command_that_gets_it(hf_cache):
    with pytest.raises(ModelNotFoundError) as err:
        models.resolve("hf:org/absent-GGUF:Q4_K_M")
    msg = one_line(err)
    assert str(hf_cache) in msg and "`ggufloop models fetch hf:org/absent-GGUF:Q4_K_M`" in msg

    add_hf_files(hf_cache, REPO, {"config.json": b"{}"})
    with pytest.raises(ModelNotFoundError, match="no GGUF file"):
        models.resolve(f"hf:{REPO}")


@pytest.mark.parametrize("spec", ["hf:", "hf:noslash", "hf:org/repo:", "hf:a/b/c", "hf:org/re po"])
def test_malformed_hf_names(hf_cache, spec):
    with pytest.raises(ModelFileError) as err:
        models.resolve(spec)
    assert "hf:ORG/REPO[:FILE or QUANT]" in one_line(err)


def test_broken_symlink_and_non_gguf_blob(hf_cache, gguf):
    snap = add_hf_files(hf_cache, REPO, {"Tiny-Q4_K_M.gguf": gguf, "Tiny-Q8_0.gguf": b"<html>not a model</html>"})
    (snap / "Tiny-Q4_K_M.gguf").resolve().unlink()
    with pytest.raises(ModelFileError) as err:
        models.resolve(f"hf:{REPO}:Q4_K_M")
    msg = one_line(err)
    assert "broken symlink" in msg and f"`ggufloop models fetch hf:{REPO}:Q4_K_M`" in msg
    with pytest.raises(ModelFileError) as err:
        models.resolve(f"hf:{REPO}:Q8_0")
    assert "is not a GGUF file" in one_line(err)


def test_an_existing_file_wins_over_a_store_name(tmp_path, monkeypatch, gguf):
    monkeypatch.chdir(tmp_path)
    Path("hf:odd.gguf").write_bytes(gguf)
    assert models.resolve("hf:odd.gguf") == Path("hf:odd.gguf")


# -- fetching: only on request, never when offline -------------------------------------------


def fake_hub(monkeypatch, cache: Path, remote: dict[str, bytes]) -> list[str]:
    """The Hub replaced by a dict: listing returns its names, downloading writes the cache layout."""
    downloaded: list[str] = []

    def download(repo_id: str, filename: str, cache_dir: Path) -> Path:
        assert cache_dir == cache
        downloaded.append(filename)
        return add_hf_files(cache, repo_id, {filename: remote[filename]}) / filename

    monkeypatch.setattr(stores, "_hub_list_files", lambda repo_id: list(remote))
    monkeypatch.setattr(stores, "_hub_download", download)
    return downloaded


def test_fetch_downloads_the_chosen_quant_with_every_part(hf_cache, monkeypatch, gguf):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    remote = {f"Tiny-Q4_K_M-{i:05d}-of-00002.gguf": gguf for i in (1, 2)}
    remote |= {"Tiny-Q8_0.gguf": gguf, "README.md": b"#"}
    downloaded = fake_hub(monkeypatch, hf_cache, remote)
    with pytest.raises(ModelNotFoundError):
        models.resolve(f"hf:{REPO}:Q4_K_M")  # resolving never downloads
    assert downloaded == []

    with pytest.raises(AmbiguousModelError) as err:
        models.fetch(f"hf:{REPO}", quiet=True)
    assert f"hf:{REPO}:Q4_K_M" in one_line(err) and f"hf:{REPO}:Q8_0" in str(err.value)

    path = models.fetch(f"hf:{REPO}:q4_k_m", quiet=True)
    assert downloaded == ["Tiny-Q4_K_M-00001-of-00002.gguf", "Tiny-Q4_K_M-00002-of-00002.gguf"]
    assert path.name == "Tiny-Q4_K_M-00001-of-00002.gguf"
    assert models.resolve(f"hf:{REPO}:Q4_K_M") == path

    monkeypatch.setattr(stores, "_hub_list_files", lambda repo_id: pytest.fail("a cached model was fetched again"))
    assert models.fetch(f"hf:{REPO}:Q4_K_M", quiet=True) == path


def test_fetch_refuses_when_offline(hf_cache, monkeypatch):
    fake_hub(monkeypatch, hf_cache, {})
    monkeypatch.setattr(stores, "_hub_list_files", lambda repo_id: pytest.fail("listed the Hub while offline"))
    with pytest.raises(ModelFetchError) as err:
        models.fetch(f"hf:{REPO}:Q4_K_M")
    assert "HF_HUB_OFFLINE" in one_line(err)


def test_fetch_reports_hub_errors_in_one_line(hf_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def unreachable(repo_id):
        raise ConnectionError("Name or service not known\nmore detail")

    monkeypatch.setattr(stores, "_hub_list_files", unreachable)
    with pytest.raises(ModelFetchError) as err:
        models.fetch(f"hf:{REPO}:Q4_K_M")
    assert "ConnectionError: Name or service not known" in one_line(err)


def test_ollama_models_are_pulled_by_ollama(ollama):
    with pytest.raises(ModelFetchError) as err:
        models.fetch("ollama:llama3.2:1b")
    assert "`ollama pull llama3.2:1b`" in one_line(err)


# -- ollama ----------------------------------------------------------------------------------


def test_ollama_names_resolve_through_manifests(ollama, gguf, gguf_qwen):
    add_ollama(ollama, "registry.ollama.ai/library/tiny", "latest", gguf)
    add_ollama(ollama, "registry.ollama.ai/library/tiny", "q8", gguf_qwen)
    add_ollama(ollama, "registry.ollama.ai/someone/tiny", "latest", gguf_qwen)
    add_ollama(ollama, "hf.co/org/Tiny-GGUF", "Q4_K_M", gguf)
    blob = ollama / "blobs" / f"sha256-{hashlib.sha256(gguf).hexdigest()}"
    blob_q = ollama / "blobs" / f"sha256-{hashlib.sha256(gguf_qwen).hexdigest()}"
    assert models.resolve("ollama:tiny") == blob
    assert models.resolve("ollama:tiny:latest") == blob
    assert models.resolve("ollama:tiny:q8") == blob_q
    assert models.resolve("ollama:someone/tiny") == blob_q
    assert models.resolve("ollama:hf.co/org/Tiny-GGUF:Q4_K_M") == blob


def test_ollama_missing_and_damaged_entries(ollama, gguf):
    with pytest.raises(ModelNotFoundError) as err:
        models.resolve("ollama:absent:7b")
    assert "`ollama pull absent:7b`" in one_line(err) and str(ollama) in str(err.value)

    add_ollama(ollama, "registry.ollama.ai/library/nomodel", "latest", gguf, manifest={"layers": []})
    with pytest.raises(ModelFileError, match="no model layer"):
        models.resolve("ollama:nomodel")
    add_ollama(ollama, "registry.ollama.ai/library/broken", "latest", None, manifest='{"layers": [')
    with pytest.raises(ModelFileError) as err:
        models.resolve("ollama:broken")
    assert "not valid JSON" in one_line(err)
    add_ollama(ollama, "registry.ollama.ai/library/html", "latest", b"<html>rate limited</html>")
    with pytest.raises(ModelFileError) as err:
        models.resolve("ollama:html")
    assert "is not a GGUF file" in one_line(err)
    manifest = add_ollama(ollama, "registry.ollama.ai/library/gone", "latest", b"GGUF and more")
    digest = json.loads(manifest.read_text())["layers"][0]["digest"]
    (ollama / "blobs" / digest.replace(":", "-")).unlink()
    with pytest.raises(ModelFileError) as err:
        models.resolve("ollama:gone")
    assert "is missing" in one_line(err) and "`ollama pull gone:latest`" in str(err.value)
    with pytest.raises(ModelFileError, match="not an ollama model name"):
        models.resolve("ollama:a/b/c/d")


# -- the command line ------------------------------------------------------------------------


def test_list_shows_both_stores_and_what_is_wrong(hf_cache, ollama, gguf, gguf_qwen, monkeypatch):
    import ggufloop._lib as lib
    from ggufloop.errors import BackendError

    snap = add_hf_files(hf_cache, REPO, {"Tiny-Q4_K_M.gguf": gguf, "Tiny-Q8_0.gguf": gguf_qwen})
    add_hf_files(hf_cache, "org/Other", {"other.gguf": gguf})
    add_ollama(ollama, "registry.ollama.ai/library/tiny", "latest", gguf)
    add_ollama(ollama, "registry.ollama.ai/library/broken", "latest", None, manifest="{")
    (snap / "Tiny-Q8_0.gguf").resolve().unlink()

    entries = {e.name: e for e in stores.hf_entries() + stores.ollama_entries()}
    assert set(entries) == {f"hf:{REPO}:Q4_K_M", f"hf:{REPO}:Q8_0", "hf:org/Other", "ollama:tiny:latest"} | {
        "ollama:broken:latest"
    }
    assert entries[f"hf:{REPO}:Q4_K_M"].arch == "llama" and entries[f"hf:{REPO}:Q4_K_M"].size_bytes == len(gguf)
    assert "broken symlink" in entries[f"hf:{REPO}:Q8_0"].problem
    assert "not valid JSON" in entries["ollama:broken:latest"].problem

    def predates():
        raise BackendError("the installed backend predates this ggufloop")

    monkeypatch.setattr(lib, "supported_archs", predates)
    res = CliRunner().invoke(main, ["models", "list"])
    assert res.exit_code == 0, res.output
    lines = {line.split()[0]: line for line in res.output.splitlines() if line.startswith("  ")}
    assert lines[f"hf:{REPO}:Q4_K_M"].split()[1:] == ["llama", f"{len(gguf) / 1e6:.1f}", "MB", "unknown"]
    assert lines["ollama:tiny:latest"].split()[-1] == "unknown"
    assert "unusable" in lines[f"hf:{REPO}:Q8_0"]
    assert f"Hugging Face cache ({hf_cache})" in res.output and f"ollama store ({ollama})" in res.output


@pytest.mark.system
def test_info_and_list_end_to_end(hf_cache, ollama, gguf, gguf_qwen):
    add_hf_files(hf_cache, REPO, {"Tiny-Q4_K_M.gguf": gguf, "Tiny-Q8_0.gguf": gguf_qwen})
    add_ollama(ollama, "registry.ollama.ai/library/tiny", "latest", gguf_qwen)
    env = {**os.environ, "HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1", "OLLAMA_MODELS": str(ollama)}
    code = (
        "import sys\nfrom ggufloop.cli import main\n"
        "for args in sys.argv[1:]:\n"
        "    print('$', args, flush=True)\n"
        "    try:\n        main(args.split(), standalone_mode=False)\n    except SystemExit as e:\n"
        "        print('exit', e.code, flush=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, f"info hf:{REPO}:Q8_0", "models list", f"info hf:{REPO}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    info, listing, ambiguous = proc.stdout.split("$ ")[1:]
    assert "architecture: qwen2" in info and "Tiny-Q8_0.gguf" in info
    assert "looping supported: yes" in info
    rows = {line.split()[0]: line.split() for line in listing.splitlines() if line.startswith("  ")}
    assert rows[f"hf:{REPO}:Q4_K_M"][1] == "llama" and rows[f"hf:{REPO}:Q4_K_M"][-1] == "yes"
    assert rows["ollama:tiny:latest"][1] == "qwen2" and rows["ollama:tiny:latest"][-1] == "yes"
    assert "exit 1" in ambiguous
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"hf:{REPO}:Q4_K_M" in errors[0] and "choose one" in errors[0]
