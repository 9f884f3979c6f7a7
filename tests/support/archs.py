"""Random GGUF models of every llama.cpp architecture, built once and cached like the wheel.

llama.cpp's tests/test-llama-archs.cpp (vendored in the pinned sdist) builds a random model per
architecture through llama_model_init_from_user and saves it with llama-model-saver. tests/support/archgen.cpp
wraps it; this module compiles it against the installed (patched) library and the patched sources,
and saves every model it can build into ~/.cache/ggufloop/archs-<key>/ARCH-dense|moe.gguf. The key
covers what decides the files' contents: the sdist, the generator, its depth and seed; the patch
series does not change them (it only has to be applied for the headers to match the library).

    python tests/support/archs.py          # build (or find) the cache and print its folder and status
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "patches"))

from ggufloop import paths  # noqa: E402

import build  # noqa: E402  (patches/build.py: the pinned sdist and the patch series)

GENERATOR = Path(__file__).resolve().parent / "archgen.cpp"
N_LAYER = 4  # the fixture's default depth is 2; llama4 keeps its 4, gemma4 its 5, gemma3n its 22
SEED = 1234
FIXTURE_DEPTH = "uint32_t n_layer = 2;"


def cache_dir() -> Path:
    """The folder of the models of this sdist, generator, depth and seed."""
    h = hashlib.sha256()
    for part in (build.SDIST_SHA256, GENERATOR.read_text(), FIXTURE_DEPTH, str(N_LAYER), str(SEED)):
        h.update(part.encode() + b"\0")
    return paths.cache_dir() / f"archs-{h.hexdigest()[:16]}"


def _libdirs() -> list[Path]:
    import llama_cpp

    pkg = Path(llama_cpp.__file__).resolve().parent
    return [pkg / "lib", pkg.parent / "lib"]  # libllama, libggml*; libllama-common (the wheel's data dir)


def _compile(work: Path) -> Path:
    """archgen, compiled against the patched vendored tree (GGUFLOOP_LLAMA_SRC's, else the sdist's patched
    here) and the installed library."""
    tree = os.environ.get("GGUFLOOP_LLAMA_SRC")
    if tree:  # a patched tree already (the GPU check's, which has no sdist): copy what the generator needs
        src = work / "llama.cpp"
        for d in ("include", "ggml/include", "src", "common", "tests"):
            shutil.copytree(Path(tree) / d, src / d)
    else:
        with tarfile.open(build.fetch_sdist(paths.cache_dir())) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
            tar.extractall(work, members=members, filter="data")
        src = work / f"llama_cpp_python-{build.VERSION}" / "vendor" / "llama.cpp"
        for patch in build.series():
            cmd = ["patch", "-p1", "--batch", "--forward", "-s", "-d", str(src)]
            subprocess.run(cmd, input=patch.read_bytes(), check=True)
    test = (src / "tests" / "test-llama-archs.cpp").read_text()
    if test.count(FIXTURE_DEPTH) != 1:
        raise RuntimeError(f"error: tests/test-llama-archs.cpp no longer sets the depth as '{FIXTURE_DEPTH}'")
    (src / "tests" / "test-llama-archs.cpp").write_text(test.replace(FIXTURE_DEPTH, f"uint32_t n_layer = {N_LAYER};"))
    exe = work / "archgen"
    libs = _libdirs()
    cmd = ["g++", "-std=c++17", "-O1", "-w", str(GENERATOR), "-o", str(exe)]
    cmd += [f"-I{src / d}" for d in ("include", "ggml/include", "src", "common", "tests")]
    cmd += [f"-L{d}" for d in libs] + [f"-Wl,-rpath,{d}" for d in libs]
    cmd += ["-lllama-common", "-lllama", "-lggml", "-lggml-base"]
    subprocess.run(cmd, check=True)
    return exe


def generate(out: Path) -> dict[str, str]:
    """Build every model into out; returns name -> "ok" or the generator's error."""
    with tempfile.TemporaryDirectory(prefix="ggufloop-archgen-") as tmp:
        exe = _compile(Path(tmp))
        listing = subprocess.run([str(exe), "--list"], check=True, capture_output=True, text=True).stdout.split()
        jobs = list(zip(listing[::2], listing[1::2]))
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)

        def one(job: tuple[str, str]) -> tuple[str, str]:
            arch, variant = job
            name = f"{arch}-{variant}"
            proc = subprocess.run(
                [str(exe), arch, variant, str(SEED), str(staging / f"{name}.gguf")],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if proc.returncode == 0:
                return name, "ok"
            (staging / f"{name}.gguf").unlink(missing_ok=True)
            lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
            return name, (lines[-1] if lines else f"exit status {proc.returncode}")[:300]

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            status = dict(pool.map(one, jobs))
        (staging / "status.json").write_text(json.dumps(status, indent=1, sort_keys=True))
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return status


def models() -> tuple[Path, dict[str, str]]:
    """The cached models' folder and their status, built on first use."""
    out = cache_dir()
    status_file = out / "status.json"
    if not status_file.exists():
        generate(out)
    return out, json.loads(status_file.read_text())


if __name__ == "__main__":
    folder, status = models()
    print(folder)
    for name, st in sorted(status.items()):
        print(f"{name:32s} {st}")
