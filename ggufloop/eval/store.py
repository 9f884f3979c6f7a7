"""The results store: every scored item, written to SQLite as it is scored.

A run that stops (Ctrl-C, crash, power loss) loses at most the batch in flight and resumes where
it stopped; a configuration (model, task, shots, plan with its mix) is never scored twice.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from ..models import sha256_file

DEFAULT_DB = Path(os.environ.get("GGUFLOOP_RESULTS", "results/ggufloop.sqlite"))

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    model TEXT NOT NULL,      -- sha256 of the GGUF file
    task TEXT NOT NULL,
    shots INTEGER NOT NULL,
    plan TEXT NOT NULL,       -- LoopPlan notation, mix and parameters included
    item TEXT NOT NULL,
    lls TEXT NOT NULL,        -- JSON list of log-likelihoods, one per choice
    gold INTEGER NOT NULL,
    correct INTEGER NOT NULL,
    correct_norm INTEGER NOT NULL,
    PRIMARY KEY (model, task, shots, plan, item)
);
CREATE TABLE IF NOT EXISTS models (path TEXT, size INTEGER, mtime REAL, sha256 TEXT, name TEXT,
                                   PRIMARY KEY (path, size, mtime));
"""


@dataclass(frozen=True)
class Row:
    item: str
    lls: list[float]
    gold: int
    correct: bool
    correct_norm: bool


class Store:
    def __init__(self, path: str | Path = DEFAULT_DB) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")  # several worker processes write at once
        self.db.executescript(SCHEMA)

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
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO models VALUES (?,?,?,?,?)", (str(p), st.st_size, st.st_mtime, digest, p.stem)
            )
        return digest

    def done(self, model: str, task: str, shots: int, plan: str) -> set[str]:
        return {
            r[0]
            for r in self.db.execute(
                "SELECT item FROM results WHERE model=? AND task=? AND shots=? AND plan=?", (model, task, shots, plan)
            )
        }

    def add(self, model: str, task: str, shots: int, plan: str, rows: list[Row]) -> None:
        """Commit one batch of scored items."""
        with self.db:
            self.db.executemany(
                "INSERT OR IGNORE INTO results VALUES (?,?,?,?,?,?,?,?,?)",
                [
                    (model, task, shots, plan, r.item, json.dumps(r.lls), r.gold, int(r.correct), int(r.correct_norm))
                    for r in rows
                ],
            )

    def rows(self, model: str, task: str, shots: int, plan: str) -> dict[str, tuple[int, int]]:
        """item -> (correct, correct_norm)."""
        return {
            r[0]: (r[1], r[2])
            for r in self.db.execute(
                "SELECT item, correct, correct_norm FROM results WHERE model=? AND task=? AND shots=? AND plan=?",
                (model, task, shots, plan),
            )
        }

    def summary(self) -> list[tuple]:
        """(model name, task, shots, plan, n, acc, acc_norm) for every configuration."""
        return self.db.execute(
            "SELECT COALESCE((SELECT name FROM models m WHERE m.sha256 = r.model LIMIT 1), substr(r.model, 1, 12)),"
            " task, shots, plan, COUNT(*), AVG(correct), AVG(correct_norm) FROM results r"
            " GROUP BY model, task, shots, plan ORDER BY 1, 2, 3, 4"
        ).fetchall()

    def close(self) -> None:
        self.db.close()
