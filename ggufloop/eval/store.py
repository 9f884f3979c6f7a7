"""The results store: every scored item, written to SQLite as it is scored.

A run that stops (Ctrl-C, crash, power loss) loses at most the batch in flight and resumes where
it stopped; a configuration (model, task, shots, prompt format, plan with its mix) is never
scored twice. The prompt format is part of the key, so an edited prompt template or another
few-shot pool never reuses old rows.

The store refuses, with one line, a file that is not SQLite, is damaged, or holds other tables
than ggufloop's, and never writes into such a file. A read-only database can still be read;
``check_writable`` says so before any scoring starts.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..errors import StoreError
from ..models import sha256_file

DEFAULT_DB = Path(os.environ.get("GGUFLOOP_RESULTS", "results/ggufloop.sqlite"))

SCHEMA_VERSION = 2  # PRAGMA user_version of a ggufloop database
RESULTS_COLUMNS = ["model", "task", "shots", "prompt", "plan", "item", "lls", "gold", "correct", "correct_norm"]
SCHEMA = """
CREATE TABLE results (
    model TEXT NOT NULL,      -- sha256 of the GGUF file
    task TEXT NOT NULL,
    shots INTEGER NOT NULL,
    prompt TEXT NOT NULL,     -- the prompt format: template version and few-shot pool
    plan TEXT NOT NULL,       -- LoopPlan notation, mix and parameters included
    item TEXT NOT NULL,
    lls TEXT NOT NULL,        -- JSON list of log-likelihoods, one per choice
    gold INTEGER NOT NULL,
    correct INTEGER NOT NULL,
    correct_norm INTEGER NOT NULL,
    PRIMARY KEY (model, task, shots, prompt, plan, item)
);
CREATE TABLE models (path TEXT, size INTEGER, mtime REAL, sha256 TEXT, name TEXT, PRIMARY KEY (path, size, mtime));
"""
# the first schema (no prompt column): its rows are kept, as prompt format "v1"
V1_RESULTS_COLUMNS = ["model", "task", "shots", "plan", "item", "lls", "gold", "correct", "correct_norm"]


@dataclass(frozen=True)
class Row:
    item: str
    lls: list[float]
    gold: int
    correct: bool
    correct_norm: bool


@dataclass(frozen=True)
class Unit:
    """One configuration whose items are scored: a model file (sha256), a task with its shots and
    prompt format, and a plan."""

    model: str
    task: str
    shots: int
    prompt: str
    plan: str

    def key(self) -> tuple:
        return (self.model, self.task, self.shots, self.prompt, self.plan)


class Store:
    def __init__(self, path: str | Path = DEFAULT_DB) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a folder, not a results database")
        if not self.path.exists():
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise StoreError(f"cannot create {self.path.parent}: {err.strerror}") from None
        try:
            self.db = sqlite3.connect(str(self.path), timeout=60)
            self._open()
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{self.path} is not a usable results database ({err})") from None

    def _open(self) -> None:
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if not tables:
            if not os.access(self.path, os.W_OK) or not os.access(self.path.parent, os.W_OK):
                raise StoreError(f"cannot create a results database at {self.path}: it is not writable")
            with self.db:
                self.db.executescript(SCHEMA)
                self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif tables == {"results", "models"} and version == SCHEMA_VERSION:
            self._expect_columns("results", RESULTS_COLUMNS)
        elif tables == {"results", "models"} and version == 0 and self._columns("results") == V1_RESULTS_COLUMNS:
            self._migrate_v1()
        else:
            raise StoreError(
                f"{self.path} is not a ggufloop results database (it holds tables "
                f"{', '.join(sorted(tables))}); give another --db"
            )
        if self.writable:
            self.db.execute("PRAGMA journal_mode=WAL")  # several worker processes write at once
        self.db.execute("SELECT COUNT(*) FROM results").fetchone()  # a damaged file fails here, not mid-run

    def _columns(self, table: str) -> list[str]:
        return [r[1] for r in self.db.execute(f"PRAGMA table_info({table})")]

    def _expect_columns(self, table: str, columns: list[str]) -> None:
        if self._columns(table) != columns:
            raise StoreError(f"{self.path} has a '{table}' table of another schema; give another --db")

    def _migrate_v1(self) -> None:
        """Rows of the first schema get prompt format 'v1' (the templates they were scored with)."""
        if not self.writable:
            raise StoreError(f"{self.path} is from an older ggufloop and must be upgraded, but it is read-only")
        with self.db:
            self.db.execute("ALTER TABLE results RENAME TO results_v1")
            self.db.executescript(SCHEMA.split("CREATE TABLE models")[0])
            self.db.execute(
                "INSERT INTO results SELECT model, task, shots, 'v1', plan, item, lls, gold, correct, "
                "correct_norm FROM results_v1"
            )
            self.db.execute("DROP TABLE results_v1")
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @property
    def writable(self) -> bool:
        return os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)

    def check_writable(self) -> None:
        """Raise StoreError unless new rows can be written (call before scoring anything)."""
        if not self.writable:
            raise StoreError(f"the results database {self.path} is read-only: new results could not be saved")
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("ROLLBACK")
        except sqlite3.OperationalError as err:
            raise StoreError(f"cannot write to the results database {self.path}: {err}") from None

    def model_sha(self, path: str | Path) -> str:
        """sha256 of a model file, remembered by path, size and mtime."""
        p = Path(path).resolve()
        st = p.stat()
        row = self.db.execute(
            "SELECT sha256 FROM models WHERE path=? AND size=? AND mtime=?", (str(p), st.st_size, st.st_mtime)
        ).fetchone()
        if row:
            return row[0]
        digest = sha256_file(p)
        if self.writable:
            with self.db:
                self.db.execute(
                    "INSERT OR REPLACE INTO models VALUES (?,?,?,?,?)",
                    (str(p), st.st_size, st.st_mtime, digest, p.stem),
                )
        return digest

    def done(self, unit: Unit) -> set[str]:
        return {
            r[0]
            for r in self.db.execute(
                "SELECT item FROM results WHERE model=? AND task=? AND shots=? AND prompt=? AND plan=?", unit.key()
            )
        }

    def add(self, unit: Unit, rows: list[Row]) -> None:
        """Commit one batch of scored items."""
        try:
            with self.db:
                self.db.executemany(
                    "INSERT OR IGNORE INTO results VALUES (?,?,?,?,?,?,?,?,?,?)",
                    [
                        (*unit.key(), r.item, json.dumps(r.lls), r.gold, int(r.correct), int(r.correct_norm))
                        for r in rows
                    ],
                )
        except sqlite3.OperationalError as err:
            raise StoreError(f"cannot write to the results database {self.path}: {err}") from None

    def rows(self, unit: Unit) -> dict[str, tuple[int, int]]:
        """item -> (correct, correct_norm)."""
        return {
            r[0]: (r[1], r[2])
            for r in self.db.execute(
                "SELECT item, correct, correct_norm FROM results"
                " WHERE model=? AND task=? AND shots=? AND prompt=? AND plan=?",
                unit.key(),
            )
        }

    def summary(self) -> list[tuple]:
        """(model name, task, shots, prompt, plan, n, acc, acc_norm) for every configuration."""
        return self.db.execute(
            "SELECT COALESCE((SELECT name FROM models m WHERE m.sha256 = r.model LIMIT 1), substr(r.model, 1, 12)),"
            " task, shots, prompt, plan, COUNT(*), AVG(correct), AVG(correct_norm) FROM results r"
            " GROUP BY model, task, shots, prompt, plan ORDER BY 1, 2, 3, 4, 5"
        ).fetchall()

    def export_rows(self, path: str | Path) -> int:
        """Write every result row (and the models' names) to a CSV file, gzip-compressed when the name
        ends in .gz: results that travel (git, another machine) and come back with ``import_rows``."""
        rows = self.db.execute(f"SELECT {', '.join(RESULTS_COLUMNS)} FROM results ORDER BY 1, 2, 3, 4, 5, 6")
        names = dict(self.db.execute("SELECT sha256, name FROM models").fetchall())
        n = 0
        with _open_text(path, "w") as f:
            w = csv.writer(f)
            w.writerow([*RESULTS_COLUMNS, "model_name"])
            for r in rows:
                w.writerow([*r, names.get(r[0], "")])
                n += 1
        return n

    def import_rows(self, path: str | Path) -> int:
        """Add the rows of an ``export_rows`` file that the store lacks; returns how many were new."""
        self.check_writable()
        try:
            with _open_text(path, "r") as f:
                reader = csv.reader(f)
                if next(reader, None) != [*RESULTS_COLUMNS, "model_name"]:
                    raise StoreError(f"{path} is not a ggufloop results export")
                rows, names = [], {}
                for r in reader:
                    rows.append((r[0], r[1], int(r[2]), r[3], r[4], r[5], r[6], int(r[7]), int(r[8]), int(r[9])))
                    names[r[0]] = r[10]
        except (OSError, ValueError, IndexError, csv.Error) as err:
            raise StoreError(f"cannot read the results export {path}: {err}") from None
        before = self.db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        with self.db:
            self.db.executemany("INSERT OR IGNORE INTO results VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
            self.db.executemany(
                "INSERT OR IGNORE INTO models VALUES (?, 0, 0, ?, ?)",
                [(f"imported:{sha}", sha, name) for sha, name in names.items() if name],
            )
        return self.db.execute("SELECT COUNT(*) FROM results").fetchone()[0] - before

    def close(self) -> None:
        self.db.close()


def _open_text(path: str | Path, mode: str) -> IO[str]:
    if str(path).endswith(".gz"):
        return gzip.open(path, mode + "t", newline="", encoding="utf-8")  # type: ignore[return-value]
    return open(path, mode, newline="", encoding="utf-8")
