"""The results database under a hostile or careless user (adversarial round 2, issue 23 items 1, 2, 9):
an export never destroys the database, an import file is checked row by row before anything is added,
rows used but not scored here are counted, and the review's bugs B1-B3."""

from __future__ import annotations

import csv
import gzip
import os
import resource
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from test_robustness import ROOT, ggufloop, one_error

from ggufloop.eval.store import RESULTS_COLUMNS, Store

pytestmark = pytest.mark.data  # real task items: rows are checked against them


def count(db: Path) -> int:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT COUNT(*) FROM results").fetchone()[0]


@pytest.fixture(scope="module")
def scored(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    """A database with 6 piqa items scored unlooped and under a plan by a tiny model, and its export."""
    tmp = tmp_path_factory.mktemp("scored")
    db = tmp / "ref.sqlite"
    model = tiny_models["llama"][2]
    args = ["eval", str(model), "--tasks", "piqa", "--loop", "1:3x2", "--limit", "6", "-t", "1", "--db", str(db)]
    proc = ggufloop(*args, "--json", str(tmp / "r.json"))
    assert proc.returncode == 0, proc.stderr
    proc = ggufloop("report", "--db", str(db), "--export", str(tmp / "rows.csv"))
    assert proc.returncode == 0, proc.stderr
    return db, tmp / "rows.csv"


def copy_db(src: Path, dst: Path) -> Path:
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    return dst


# -- 1. an export never replaces the database -------------------------------------------------------


@pytest.mark.parametrize("how", ["path", "relative", "symlink", "hardlink", "wal", "shm"])
def test_an_export_onto_the_database_is_refused_and_the_database_kept(scored, tmp_path, how):
    db = copy_db(scored[0], tmp_path / "self.sqlite")
    Store(db).close()  # WAL mode: the -wal/-shm files exist while a connection is open
    target = {
        "path": db,
        "relative": Path(os.path.relpath(db.parent, ROOT)) / "." / db.name,  # the CLI runs in ROOT
        "symlink": tmp_path / "link.csv",
        "hardlink": tmp_path / "hard.csv",
        "wal": Path(f"{db}-wal"),
        "shm": Path(f"{db}-shm"),
    }[how]
    if how == "symlink":
        target.symlink_to(db)
    if how == "hardlink":
        os.link(db, target)
    before = db.read_bytes()
    proc = ggufloop("report", "--db", str(db), "--export", str(target))
    one_error(proc, "is the results database")
    assert db.read_bytes() == before and count(db) == 12


def test_an_export_to_a_device_or_a_failing_write_is_one_line(scored, tmp_path):
    db = copy_db(scored[0], tmp_path / "r.sqlite")
    one_error(ggufloop("report", "--db", str(db), "--export", "/dev/full"), "not a regular file")
    one_error(ggufloop("report", "--db", str(db), "--export", str(tmp_path / "no" / "x.csv")), "does not exist")
    assert count(db) == 12


def test_an_export_is_written_beside_and_renamed_into_place(scored, tmp_path):
    db = copy_db(scored[0], tmp_path / "r.sqlite")
    target = tmp_path / "rows.csv.gz"
    target.write_text("old contents\n")
    proc = ggufloop("report", "--db", str(db), "--export", str(target))
    assert proc.returncode == 0, proc.stderr
    with gzip.open(target, "rt") as f:
        assert len(list(csv.reader(f))) == 13
    assert {p.name for p in tmp_path.iterdir() if not p.name.startswith("r.sqlite")} == {"rows.csv.gz"}


@pytest.mark.system
def test_an_export_that_fails_midway_leaves_the_old_file(scored, tmp_path):
    """A write error (here: a file-size limit of 40 kB on the child) is one line, and the target keeps its
    old contents, because the export is written beside it and only renamed into place when complete."""
    db = copy_db(scored[0], tmp_path / "r.sqlite")
    with sqlite3.connect(db) as con:  # 1212 rows, about 150 kB of CSV
        for k in range(3, 203):
            con.execute(
                f"INSERT INTO results SELECT model, task, shots, prompt, '1:3x{k}', item, lls, gold, correct, "
                "correct_norm FROM results WHERE plan = 'none'"
            )
    Store(db).close()
    target = tmp_path / "rows.csv"
    target.write_text("old contents\n")

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    proc = subprocess.run(
        [sys.executable, "-m", "ggufloop", "report", "--db", str(db), "--export", str(target)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        preexec_fn=small_files,
    )
    one_error(proc, f"cannot write the export {target}")
    assert target.read_text() == "old contents\n" and count(db) == 12 + 6 * 200
    assert {p.name for p in tmp_path.iterdir() if not p.name.startswith("r.sqlite")} == {"rows.csv"}


# -- 2. forged or broken imports ---------------------------------------------------------------------


def tampered(scored, tmp_path: Path, column: str, value: str, row: int | None = 3) -> Path:
    """The export with one field of one row (every row: None) replaced."""
    with open(scored[1], newline="") as f:
        rows = list(csv.reader(f))
    for r in rows[1:] if row is None else [rows[row]]:
        r[[*RESULTS_COLUMNS, "model_name"].index(column)] = value
    out = tmp_path / "bad.csv"
    with open(out, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return out


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("correct", "5", "correct and correct_norm are 0 or 1"),
        ("correct_norm", "-3", "correct and correct_norm are 0 or 1"),
        ("lls", "not json", "lls is not JSON"),
        ("lls", "[" * 100000, "lls is not JSON"),
        ("lls", "[-1.0, NaN]", "finite numbers"),
        ("lls", "[-1.0]", "a list of 2 finite numbers"),
        ("lls", '["a", "b"]', "finite numbers"),
        ("gold", "99", "gold 99 is not the index"),
        ("plan", "9:9x9", "is not a plan"),
        ("plan", "1:99x2", "does not fit the model"),
        ("plan", "1:3x2/uniform | 9 |", "is not a plan"),
        ("shots", "99999999999999999999", "does not fit SQLite's integers"),
        ("item", "FAKEITEM1", "piqa has no item 'FAKEITEM1'"),
        ("task", "nosuchtask", "unknown task"),
        ("model", "sha", "is not a sha256"),
    ],
)
def test_a_bad_row_refuses_the_whole_file_with_its_line(scored, tmp_path, column, value, message):
    db = copy_db(scored[0], tmp_path / "r.sqlite")
    with sqlite3.connect(db) as con:  # make room: the file's rows are new here, so all would be added
        con.execute("DELETE FROM results")
    proc = ggufloop("report", "--db", str(db), "--import", str(tampered(scored, tmp_path, column, value)))
    one_error(proc, "line 4: ")
    one_error(proc, message)
    assert "nothing was imported" in proc.stderr and count(db) == 0


def test_a_flipped_answer_is_refused_unless_the_log_likelihoods_agree(scored, tmp_path):
    with open(scored[1], newline="") as f:
        row = list(csv.reader(f))[1]
    flipped = "0" if row[RESULTS_COLUMNS.index("correct")] == "1" else "1"
    db = copy_db(scored[0], tmp_path / "r.sqlite")
    one_error(
        ggufloop("report", "--db", str(db), "--import", str(tampered(scored, tmp_path, "correct", flipped, 1))),
        "but lls and gold give",
    )


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_a_damaged_gzip_is_one_line(scored, tmp_path, damage):
    data = bytearray(gzip.compress(scored[1].read_bytes()))
    if damage == "corrupt":
        data[len(data) // 2 : len(data) // 2 + 8] = b"\xff" * 8
    else:
        data = data[: len(data) // 2]
    (tmp_path / "x.csv.gz").write_bytes(bytes(data))
    db = copy_db(scored[0], tmp_path / "r.sqlite")
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM results")
    # a damaged stream is refused when it stops decompressing, or at the first row it garbled
    one_error(ggufloop("report", "--db", str(db), "--import", str(tmp_path / "x.csv.gz")), "nothing was imported")
    assert count(db) == 0


def test_rows_used_but_not_scored_here_are_counted(scored, tiny_models, tmp_path):
    """The adversary's case: rows of items this database never scored come in by import; eval then
    uses them, and says so; report counts them per configuration."""
    db = copy_db(scored[0], tmp_path / "r.sqlite")
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM results WHERE item IN (SELECT DISTINCT item FROM results ORDER BY item DESC LIMIT 2)")
    assert count(db) == 8
    proc = ggufloop("report", "--db", str(db), "--import", str(scored[1]))
    assert "imported 4 new rows" in proc.stderr
    table = [line for line in proc.stdout.splitlines() if "piqa" in line]
    assert len(table) == 2 and all(line.endswith("| 2 |") for line in table), proc.stdout
    args = ["--tasks", "piqa", "--loop", "1:3x2", "--limit", "6", "-t", "1", "--db", str(db)]
    proc = ggufloop("eval", str(tiny_models["llama"][2]), *args, "--json", str(tmp_path / "e.json"))
    assert proc.returncode == 0, proc.stderr
    assert "piqa: 4 of the 12 rows used were imported" in proc.stderr


def test_names_in_the_report_cannot_forge_a_table_line(scored, tmp_path):
    forged = tampered(scored, tmp_path, "model_name", "x | 9.9999 |\n| fake | 1 | 1.0000 |", None)
    db = tmp_path / "new.sqlite"
    proc = ggufloop("report", "--db", str(db), "--import", str(forged))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4 and not any(line.startswith("| fake") for line in lines), proc.stdout
    assert all(line.count(" | ") == 8 for line in lines[2:]), proc.stdout  # 9 cells, the name's '|' escaped


def test_the_committed_study_rows_pass_the_checks(tmp_path):
    """Every row the reproduction study committed is one ggufloop scored: the checks refuse none."""
    rows = ROOT / "docs" / "reproduction" / "data" / "rows.csv.gz"
    with gzip.open(rows, "rt") as f:
        lines = sum(1 for _ in csv.reader(f)) - 1
    store = Store(tmp_path / "study.sqlite")
    assert store.import_rows(rows) == lines > 200_000
    assert sum(r[-1] for r in store.summary()) == lines  # all of them marked as imported
    store.close()


# -- 9. the review's bugs -----------------------------------------------------------------------------


def test_the_mmlu_summary_row_names_the_shots_used():
    """B3: the macro row printed 5 shots whatever --shots was."""
    from ggufloop.eval.evaluate import comparison_table

    acc = {"n": 10, "base_acc": 0.5, "plan_acc": 0.6, "diff": 0.1, "ci_low": 0.0, "ci_high": 0.2, "p_value": 0.5}
    results = [{"task": f"mmlu:{s}", "shots": 0, "acc": acc, "acc_norm": acc} for s in ("anatomy", "virology")]
    assert "| mmlu (macro, 2 subjects) | 0 | 20 |" in comparison_table(results)


def test_threads_reach_prompt_processing(tiny_models):
    """B2: -t N reached generation but not prompt processing (llama-cpp-python's default: every core)."""
    from ggufloop.cli.options import load

    llm = load(str(tiny_models["llama"][2]), None, None, 1, 64, None, 0, False)
    try:
        assert (llm.context_params.n_threads, llm.context_params.n_threads_batch) == (1, 1)
    finally:
        llm.close()


# -- generations travel too, checked as strictly ------------------------------------------------------


@pytest.fixture(scope="module")
def generated(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    """A database with 2 GSM8K answers by a tiny model (unlooped and under a plan), and its generations' export."""
    tmp = tmp_path_factory.mktemp("generated")
    db = tmp / "g.sqlite"
    args = ["eval", str(tiny_models["llama"][2]), "--tasks", "gsm8k", "--loop", "1:3x2", "--limit", "2"]
    proc = ggufloop(
        *args, "--shots", "0", "--max-new-tokens", "6", "-t", "1", "--db", str(db), "--json", str(tmp / "g.json")
    )
    assert proc.returncode == 0, proc.stderr
    proc = ggufloop("report", "--db", str(db), "--export-generations", str(tmp / "gen.csv.gz"))
    assert proc.returncode == 0, proc.stderr
    return db, tmp / "gen.csv.gz"


def test_generations_round_trip_and_count_as_imported(generated, tmp_path):
    proc = ggufloop("report", "--db", str(tmp_path / "new.sqlite"), "--import-generations", str(generated[1]))
    assert proc.returncode == 0 and "imported 4 new generations" in proc.stderr, proc.stderr
    table = [line for line in proc.stdout.splitlines() if "| gsm8k |" in line]
    assert len(table) == 2 and all(line.endswith("| 2 |") for line in table), proc.stdout
    with sqlite3.connect(generated[0]) as a, sqlite3.connect(tmp_path / "new.sqlite") as b:
        query = "SELECT * FROM generations ORDER BY plan, item"
        assert a.execute(query).fetchall() == b.execute(query).fetchall()


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("text", "So the answer is 42.", "not what the text gives"),
        ("correct_flexible", "7", "are 0 or 1"),
        ("gold", "99999", "not what the text gives"),
        ("item", "5000", "gsm8k has no item"),
        ("prompt", "chat-v9", "is not one of gsm8k's"),
        ("n_tokens", "9", "out of range"),
        ("task", "winogrande", "unknown generative task"),
    ],
)
def test_a_forged_generation_refuses_the_file(generated, tmp_path, column, value, message):
    from ggufloop.eval.store import GENERATION_COLUMNS

    with gzip.open(generated[1], "rt", newline="") as f:
        rows = list(csv.reader(f))
    rows[2][[*GENERATION_COLUMNS, "model_name"].index(column)] = value
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    proc = ggufloop("report", "--db", str(tmp_path / "new.sqlite"), "--import-generations", str(bad))
    one_error(proc, "line 3: ")
    one_error(proc, message)
    with sqlite3.connect(tmp_path / "new.sqlite") as con:
        assert con.execute("SELECT COUNT(*) FROM generations").fetchone()[0] == 0


@pytest.mark.parametrize("n_tokens, hit_limit, imports", [("6", "0", True), ("6", "1", True), ("5", "1", False)])
def test_an_answer_that_ends_on_its_last_allowed_token_imports(generated, tmp_path, n_tokens, hit_limit, imports):
    """An answer whose stop token is its max_new_tokens-th token used every token without hitting the
    limit (the study's committed file has one: item 111, 256 tokens); only hit_limit without n_tokens
    at the limit is forged."""
    from ggufloop.eval.store import GENERATION_COLUMNS

    with gzip.open(generated[1], "rt", newline="") as f:
        rows = list(csv.reader(f))
    columns = [*GENERATION_COLUMNS, "model_name"]
    rows[2][columns.index("n_tokens")], rows[2][columns.index("hit_limit")] = n_tokens, hit_limit
    path = tmp_path / "rows.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    proc = ggufloop("report", "--db", str(tmp_path / "new.sqlite"), "--import-generations", str(path))
    if imports:
        assert proc.returncode == 0 and "imported 4 new generations" in proc.stderr, proc.stderr
    else:
        one_error(proc, "line 3: ")
        one_error(proc, "hit_limit")


def test_generations_of_an_earlier_decoding_version_import(generated, tmp_path):
    """Rows of GSM8K v1 (one sequence per decode; the same prompts and scoring) are records that import
    under their own key, which never stands in for v2's (the study's committed file holds such rows)."""
    from ggufloop.eval.store import GENERATION_COLUMNS

    with gzip.open(generated[1], "rt", newline="") as f:
        rows = list(csv.reader(f))
    at = [*GENERATION_COLUMNS, "model_name"].index("prompt")
    assert {r[at] for r in rows[1:]} == {"plain-v2"}
    for r in rows[1:]:
        r[at] = "plain-v1"
    old = tmp_path / "v1.csv"
    with open(old, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    proc = ggufloop("report", "--db", str(tmp_path / "new.sqlite"), "--import-generations", str(old))
    assert proc.returncode == 0 and "imported 4 new generations" in proc.stderr, proc.stderr
    with sqlite3.connect(tmp_path / "new.sqlite") as con:
        assert con.execute("SELECT DISTINCT prompt FROM generations").fetchall() == [("plain-v1",)]
