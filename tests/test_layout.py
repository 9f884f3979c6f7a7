"""The package's shape: no import cycle between ggufloop's modules (lazy imports inside functions count too),
and Ray imported by one module only."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "ggufloop"


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under ``if TYPE_CHECKING:`` (annotations only, never imported at run time)."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def _imports() -> dict[str, set[str]]:
    """module -> the ggufloop modules it imports anywhere in its body (at run time)."""
    modules = {_module(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    found.add(target if target in modules else base)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name and not name.startswith(m + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    lazy = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\ndef f():\n    import y\n")
    names = {a.name for n in _runtime_nodes(lazy) if isinstance(n, ast.Import) for a in n.names}
    assert names == {"y"}


def test_no_import_cycle_between_the_packages_modules():
    graph = _imports()
    assert graph["ggufloop.eval.evaluate"] >= {"ggufloop.eval.executors", "ggufloop.eval.units"}
    assert _cycles(graph) == []


def test_ray_is_imported_by_one_module():
    users = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n == "ray" or n.startswith("ray.") for n in names):
                users.append(_module(path))
    assert sorted(set(users)) == ["ggufloop.eval.ray_executor"]


def test_folders_hold_what_they_say():
    """patches/ holds the series and its build only; measurement scripts live in bench/, developer scripts in
    tools/, test helpers in tests/support/ (on pytest's pythonpath, not inserted into sys.path by the tests)."""
    root = PKG.parent
    allowed = {"build.py", "README.md", "tools.cmake"}
    assert sorted(p.name for p in (root / "patches").iterdir() if p.suffix != ".patch" and p.name not in allowed) == []
    assert (root / "bench" / "measure_rpc.py").exists() and (root / "tools" / "quietly").exists()
    needle = "sys.path" + ".insert("  # spelled apart, or this file would find itself
    inserts = [p.name for p in (root / "tests").glob("test_*.py") if needle in p.read_text()]
    assert inserts == ["test_gpu_check.py"]  # patches/build.py is a script, not a package: imported by path


def test_an_unexpected_skip_fails_a_strict_run(tmp_path):
    """Under GGUFLOOP_STRICT_SKIPS=1 (make test) a skip, in a test or of a whole module (importorskip), fails
    the run; an expected one (strict_skips.EXPECTED) does not; without the variable all three skip."""
    import os
    import subprocess
    import sys

    (tmp_path / "test_a.py").write_text("import pytest\n\ndef test_a():\n    pytest.skip('the models are missing')\n")
    (tmp_path / "test_b.py").write_text("import pytest\n\npytest.importorskip('no_such_module_here')\n")
    (tmp_path / "test_c.py").write_text(
        "import pytest\n\ndef test_c():\n    pytest.skip('root writes through file permissions')\n"
    )
    support = str(PKG.parent / "tests" / "support")

    def run(strict: bool, *files: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": support, "GGUFLOOP_STRICT_SKIPS": "1" if strict else "0"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "strict_skips", "-p", "no:cacheprovider", *files]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)

    loose = run(False, "test_a.py", "test_b.py", "test_c.py")
    assert loose.returncode == 0 and "3 skipped" in loose.stdout, loose.stdout
    for name in ("test_a.py", "test_b.py"):
        strict = run(True, name)
        assert strict.returncode != 0 and "unexpected skip" in strict.stdout, strict.stdout
    assert run(True, "test_c.py").returncode == 0


def test_only_compat_touches_llama_cpp_pythons_private_code():
    """llama-cpp-python's private attributes and modules (Llama._ctx, ._model, ._stack, llama_cpp._internals),
    reassignments of its classes and matches on its exception wording live in ggufloop/_compat.py only."""
    private = {"_ctx", "_model", "_stack", "_internals"}
    wording = ("llama_decode returned", "exceed context window")
    found = []
    for path in PKG.rglob("*.py"):
        if path.name == "_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private:
                found.append(f"{_module(path)}:{node.lineno} .{node.attr}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llama_cpp"):
                found += [f"{_module(path)}:{node.lineno} {a.name}" for a in node.names if a.name in private]
            elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id.startswith("llama_")
                for t in node.targets
            ):
                found.append(f"{_module(path)}:{node.lineno} reassigns a llama-cpp-python name")
            elif (
                isinstance(node, ast.Constant) and isinstance(node.value, str) and any(w in node.value for w in wording)
            ):
                found.append(f"{_module(path)}:{node.lineno} matches llama-cpp-python's wording")
    assert found == []


def test_the_library_finds_its_folders_through_paths_only(monkeypatch, tmp_path):
    """Review P5: the library found models/ and the stock build relative to its source checkout. No module
    derives a folder from where ggufloop's source lies; ggufloop.paths reads the environment (XDG)."""
    assert [_module(p) for p in PKG.rglob("*.py") if "Path(__file__)" in p.read_text()] == []
    from ggufloop import paths

    for var in ("GGUFLOOP_MODELS", "GGUFLOOP_CACHE", "GGUFLOOP_STOCK_PYTHON", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.models_dir() == tmp_path / ".local" / "share" / "ggufloop" / "models"
    assert paths.cache_dir() == tmp_path / ".cache" / "ggufloop"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")  # the XDG spec: only absolute paths count
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert paths.models_dir() == tmp_path / ".local" / "share" / "ggufloop" / "models"
    assert paths.cache_dir() == tmp_path / "c" / "ggufloop"
    monkeypatch.setenv("GGUFLOOP_MODELS", str(tmp_path / "m"))
    monkeypatch.setenv("GGUFLOOP_CACHE", str(tmp_path / "k"))
    monkeypatch.setenv("GGUFLOOP_STOCK_PYTHON", "/opt/stock/bin/python")
    assert (paths.models_dir(), paths.cache_dir()) == (tmp_path / "m", tmp_path / "k")
    assert str(paths.stock_python()) == "/opt/stock/bin/python"
