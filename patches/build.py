"""Build llama-cpp-python with ggufloop's patch to its vendored llama.cpp, and install it.

Downloads the pinned sdist from the package registry with pip, checks its sha256, applies the
patch series patches/0*.patch in order (or nothing, with --stock), builds a wheel for the chosen
backend and caches it under a key of the patches' content (in order), backend, CMake flags and
platform; a second run with nothing changed only reinstalls the cached wheel. The sources are
built from the same paths every time, so that ccache, when installed, recompiles only what a
changed patch touches. Standard library only: it runs before the project's dependencies exist.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PATCHES = Path(__file__).resolve().parent
ROOT = PATCHES.parent

BACKEND_FLAGS = {
    "cpu": [],
    "metal": ["-DGGML_METAL=on"],
    "cuda": ["-DGGML_CUDA=on"],
}
# the RPC backend (a model split over machines, `--rpc`), without the RDMA transport: it would link
# libibverbs whenever the build machine has it, and the wheel would not load where it does not
COMMON_FLAGS = [
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DGGML_RPC=ON",
    "-DGGML_RPC_RDMA=OFF",
    # llama.cpp's programs (tools.cmake picks those it installs), the server without its web UI: nothing downloaded
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
]
# builds rpc-server and some of llama.cpp's programs (llama-perplexity, ...) in the same CMake build, into the
# wheel (see the file); passed by content in the cache key, by path to CMake
TOOLS_HOOK = PATCHES / "tools.cmake"
# CUDA: the GPU architectures compiled for (GGUFLOOP_CUDA_ARCHS, CMake's list): Hopper (the H200),
# Ada and Ampere consumer cards by default; "native" where the build machine has a GPU
CUDA_ARCHS = "90;89;86"
# CUDA 13.0's cuBLAS (headers and libraries, under nvidia/cu13/), for a toolkit installed without it
CUBLAS_WHEEL = "nvidia-cublas==13.0.2.14"
# ggml's AMX kernels (picked by -march=native on Sapphire Rapids and later) die with SIGILL where the
# OS or hypervisor does not enable AMX tiles, as on the machines this project is tested on
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
X86_FLAGS = [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]


# what a build needs of the patched tree, for a machine that cannot download the sdist (`make gpu-check-prep`):
# llama-cpp-python's package and CMake project, and of llama.cpp its library, ggml with the backends below,
# `common`, its tools/ (LLAMA_BUILD_TOOLS configures every folder tools/CMakeLists.txt adds; the web UI's app is
# not built: of tools/ui only what generates its empty asset table) and the generator of tests/support/archs.py
KEEP_TOP = ("CMakeLists.txt", "pyproject.toml", "README.md", "LICENSE.md", "PKG-INFO", "llama_cpp", "vendor")
KEEP_LLAMA_DIRS = ("cmake", "common", "ggml", "include", "licenses", "scripts", "src", "vendor", "tools", "tests")
KEEP_SCRIPTS = ("ui-assets.cmake",)
KEEP_UI = ("CMakeLists.txt", "sources.cmake", "ui.cpp.in", "ui.h.in")
KEEP_TESTS = ("test-llama-archs.cpp", "test-loop.cpp")
KEEP_BACKENDS = ("ggml-cpu", "ggml-cuda", "ggml-rpc", "ggml-blas")


def cuda_flags(cache: Path) -> list[str]:
    """The CMake flags of a CUDA build: the architectures, and cuBLAS from the toolkit that nvcc belongs to,
    else from an installed nvidia-cublas wheel, else from CUBLAS_WHEEL installed into the cache."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        fail(
            "the cuda backend needs nvcc, the CUDA toolkit's compiler, on the PATH: install the toolkit "
            "(NVIDIA's, or your distribution's nvidia-cuda-toolkit) and add its bin/ to PATH, e.g. /usr/local/cuda/bin"
        )
    flags = [f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('GGUFLOOP_CUDA_ARCHS', CUDA_ARCHS)}"]
    toolkit = Path(nvcc).resolve().parent.parent
    places = [toolkit / "lib64" / "stubs", *toolkit.glob("targets/*/lib/stubs"), Path("/usr/lib/x86_64-linux-gnu")]
    places += [Path("/usr/lib64"), Path("/usr/lib"), Path("/usr/local/nvidia/lib64")]
    if not any(next(p.glob("libcuda.so*"), None) for p in places):
        # no driver library and no stub to link ggml's virtual-memory pool against (a machine without a GPU):
        # build without it, as ggml allows; a GPU machine's build keeps it
        print("build: no libcuda.so (driver or stub): building with GGML_CUDA_NO_VMM", flush=True)
        flags.append("-DGGML_CUDA_NO_VMM=ON")
    if any(toolkit.glob("lib*/libcublas.so*")) or any(toolkit.glob("targets/*/lib/libcublas.so*")):
        return flags
    root = cache / "cublas" / CUBLAS_WHEEL.replace("==", "-")
    installed = [Path(p) for p in sys.path if (Path(p) / "nvidia" / "cu13" / "lib" / "libcublas.so.13").exists()]
    if installed and not (root / "nvidia" / "cu13" / "lib" / "libcublas.so.13").exists():
        root = installed[0]  # e.g. a GPU machine's PyTorch brought it
    lib, include = root / "nvidia" / "cu13" / "lib", root / "nvidia" / "cu13" / "include"
    if not (lib / "libcublas.so.13").exists():
        print(f"build: the CUDA toolkit in {toolkit} has no cuBLAS; installing {CUBLAS_WHEEL} into {root}", flush=True)
        run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(root), CUBLAS_WHEEL])
    return flags + [
        f"-DCUDA_cublas_LIBRARY={lib / 'libcublas.so.13'}",
        f"-DCUDA_cublasLt_LIBRARY={lib / 'libcublasLt.so.13'}",
        f"-DCMAKE_CUDA_FLAGS=-I{include}",
        f"-DCMAKE_BUILD_RPATH={lib}",
    ]


def default_cache() -> Path:
    """ggufloop's cache: GGUFLOOP_CACHE, else ggufloop/ in the XDG cache folder (as ggufloop.paths.cache_dir,
    which this script cannot import: it runs before ggufloop's dependencies exist)."""
    if os.environ.get("GGUFLOOP_CACHE"):
        return Path(os.environ["GGUFLOOP_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "ggufloop"  # a relative one is ignored


def fail(msg: str) -> None:
    print(f"build: error: {msg}", file=sys.stderr)
    sys.exit(1)


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    if subprocess.call(cmd, **kw) != 0:
        fail(f"command failed: {' '.join(cmd)}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist(cache: Path) -> Path:
    """The pinned sdist, downloaded once and checked every time."""
    path = cache / "sdist" / SDIST
    if not path.exists():
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--no-build-isolation",
                f"llama-cpp-python=={VERSION}",
                "-d",
                str(path.parent),
            ]
        )
    digest = sha256(path)
    if digest != SDIST_SHA256:
        fail(f"{path} has sha256 {digest}, expected {SDIST_SHA256}; delete it and retry")
    return path


def series() -> list[Path]:
    """The patch series, in the order it applies."""
    return sorted(PATCHES.glob("[0-9][0-9][0-9][0-9]-*.patch"))


def cache_key(patches: list[tuple[str, bytes]], backend: str, flags: list[str]) -> str:
    h = hashlib.sha256()
    parts = [SDIST_SHA256] + [f"{name}:{data.hex()}" for name, data in patches]
    parts.append(f"{TOOLS_HOOK.name}:{TOOLS_HOOK.read_bytes().hex()}")
    for part in parts + [
        backend,
        " ".join(flags),
        sysconfig.get_platform(),
        f"cp{sys.version_info.major}{sys.version_info.minor}",
    ]:
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def patched_source(sdist: Path, patches: list[tuple[str, bytes]], work: Path) -> Path:
    """The sdist extracted into work (emptied first) with the patches applied; returns its root."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    src = work / f"llama_cpp_python-{VERSION}"
    for name, data in patches:
        proc = subprocess.run(
            ["patch", "-p1", "--batch", "--forward", "-d", str(src / "vendor" / "llama.cpp")],
            input=data,
            capture_output=True,
        )
        if proc.returncode != 0:
            fail(
                f"patch {name} does not apply to llama-cpp-python {VERSION} "
                f"(after {', '.join(n for n, _ in patches[: patches.index((name, data))]) or 'no other patch'}):\n"
                f"{proc.stdout.decode()}{proc.stderr.decode()}"
            )
    return src


def trim(src: Path) -> None:
    """Remove from a patched tree what no build of the KEEP_* lists needs (models, docs, other backends...)."""

    def keep_only(folder: Path, names: tuple[str, ...], files_too: bool = True) -> None:
        for entry in folder.iterdir():
            if entry.name not in names and (files_too or entry.is_dir()):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    llama = src / "vendor" / "llama.cpp"
    keep_only(src, KEEP_TOP)
    keep_only(src / "vendor", ("llama.cpp",))
    keep_only(llama, KEEP_LLAMA_DIRS, files_too=False)  # its top-level files stay: CMake installs some
    keep_only(llama / "scripts", KEEP_SCRIPTS)
    keep_only(llama / "tools" / "ui", KEEP_UI)
    keep_only(llama / "tests", KEEP_TESTS)
    for entry in (llama / "ggml" / "src").iterdir():
        if entry.is_dir() and entry.name.startswith("ggml-") and entry.name not in KEEP_BACKENDS:
            shutil.rmtree(entry)


def source_archive(sdist: Path, patches: list[tuple[str, bytes]], out: Path, work: Path) -> None:
    """The patched, trimmed tree as a .tar.gz whose one top folder is llama_cpp_python-VERSION."""
    src = patched_source(sdist, patches, work)
    trim(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    partial.rename(out)
    shutil.rmtree(work)


def build_wheel(src: Path, flags: list[str], out: Path, build_dir: Path) -> Path:
    """Build the wheel of a patched tree into out; returns it."""
    flags = flags + [f"-DCMAKE_PROJECT_llama_cpp_INCLUDE={TOOLS_HOOK.as_posix()}"]
    env = dict(os.environ, CMAKE_ARGS=shlex.join(flags))
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    out.mkdir(parents=True, exist_ok=True)
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            f"--config-settings=build-dir={build_dir}",
            str(src),
        ],
        env=env,
    )
    return next(out.glob("llama_cpp_python-*.whl"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=sorted(BACKEND_FLAGS), default=os.environ.get("GGUFLOOP_BACKEND", "cpu"))
    ap.add_argument("--stock", action="store_true", help="build without the patch (for side-by-side comparison)")
    ap.add_argument("--cache", type=Path, default=default_cache())
    ap.add_argument("--no-install", action="store_true", help="only build (or find) the wheel")
    ap.add_argument(
        "--source-archive",
        type=Path,
        metavar="FILE",
        help="write the patched tree, trimmed to what a build needs, as FILE (.tar.gz), and build nothing",
    )
    ap.add_argument(
        "--source",
        type=Path,
        metavar="DIR",
        help="build from this patched tree (a --source-archive extracted) instead of the sdist",
    )
    args = ap.parse_args()

    if not series():
        fail(f"no patches (NNNN-name.patch) in {PATCHES}")
    patches = [] if args.stock else [(p.name, p.read_bytes()) for p in series()]
    work = ROOT / "build" / f"src-{'stock' if args.stock else 'ggufloop'}-{args.backend}"
    if args.source_archive:
        source_archive(fetch_sdist(args.cache), patches, args.source_archive, ROOT / "build" / "src-archive")
        print(f"build: wrote {args.source_archive}")
        return
    flags = COMMON_FLAGS + BACKEND_FLAGS[args.backend]
    if args.backend == "cuda":
        flags += cuda_flags(args.cache)
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags += X86_FLAGS
    key = cache_key(patches, args.backend, flags)
    wheels = args.cache / "wheels" / f"{'stock' if args.stock else 'ggufloop'}-{args.backend}-{key}"
    wheel = next(wheels.glob("*.whl"), None)
    if wheel is None and args.source:
        if not (args.source / "vendor" / "llama.cpp").is_dir():
            fail(f"{args.source} is not a llama-cpp-python tree (no vendor/llama.cpp): extract a --source-archive")
        print(f"build: building llama-cpp-python {VERSION} from {args.source} ({args.backend})", flush=True)
        wheel = build_wheel(args.source, flags, wheels, work / "cmake")
    elif wheel is None:
        print(
            f"build: building llama-cpp-python {VERSION} ({'stock' if args.stock else 'patched'}, "
            f"{args.backend}); this takes several minutes",
            flush=True,
        )
        src = patched_source(fetch_sdist(args.cache), patches, work)
        wheel = build_wheel(src, flags, wheels, work / "cmake")
        shutil.rmtree(work)
    else:
        print(f"build: using cached wheel {wheel}")
    if args.no_install:
        print(f"build: the wheel is {wheel}")  # tools/gpu-check installs it from this line
        return
    stamp = Path(sys.prefix) / "ggufloop-backend.stamp"
    if stamp.exists() and stamp.read_text() == str(wheel):
        print(f"build: {wheel.name} is installed already")
        return
    run([sys.executable, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", str(wheel)])
    stamp.write_text(str(wheel))


if __name__ == "__main__":
    main()
