"""The results store: every scored item, written to SQLite as it is scored.

A run that stops (Ctrl-C, crash, power loss) loses at most the batch in flight and resumes where
it stopped; a configuration (model, task, shots, prompt format, plan with its mix) is never
scored twice. The prompt format is part of the key, so an edited prompt template or another
few-shot pool never reuses old rows. Generative tasks (gsm8k) keep each item's generated text with
both filters' answers and scores in ``generations``, under the same key plus the token limit, so a
scoring can be recomputed without generating again.

The store refuses, with one line, a file that is not SQLite, is damaged, or holds other tables
than ggufloop's, and never writes into such a file. A read-only database can still be read;
``check_writable`` says so before any scoring starts.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import re
import sqlite3
import stat
import tempfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..errors import StoreError
from ..models import sha256_file

DEFAULT_DB = Path(os.environ.get("GGUFLOOP_RESULTS", "results/ggufloop.sqlite"))

SCHEMA_VERSION = 3  # PRAGMA user_version of a ggufloop database
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
CREATE TABLE imported (       -- the keys of rows that came from an export file, not scored here
    model TEXT NOT NULL, task TEXT NOT NULL, shots INTEGER NOT NULL, prompt TEXT NOT NULL, plan TEXT NOT NULL,
    item TEXT NOT NULL,
    PRIMARY KEY (model, task, shots, prompt, plan, item)
);
CREATE TABLE generations (    -- generative tasks (gsm8k): one greedy answer per item, kept with its scores
    model TEXT NOT NULL, task TEXT NOT NULL, shots INTEGER NOT NULL, prompt TEXT NOT NULL, plan TEXT NOT NULL,
    max_new_tokens INTEGER NOT NULL,
    item TEXT NOT NULL,
    text TEXT NOT NULL,       -- the generated text, cut before the stop sequence that ended it
    n_tokens INTEGER NOT NULL,  -- tokens generated, the one that ended the answer included
    hit_limit INTEGER NOT NULL,  -- 1: it ran out of max_new_tokens (scored as it stands)
    strict TEXT NOT NULL,     -- the strict-match filter's answer ([invalid]: none)
    flexible TEXT NOT NULL,   -- the flexible-extract filter's answer
    gold TEXT NOT NULL,       -- the reference answer as the data writes it
    correct_strict INTEGER NOT NULL,
    correct_flexible INTEGER NOT NULL,
    PRIMARY KEY (model, task, shots, prompt, plan, max_new_tokens, item)
);
"""
TABLES = {"results", "models", "imported", "generations"}
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
class GenerationRow:
    """One item's stored generation: the text, how it ended, both filters' answers and scores."""

    item: str
    text: str
    n_tokens: int
    hit_limit: bool
    strict: str
    flexible: str
    gold: str
    correct_strict: bool
    correct_flexible: bool


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
        elif tables == TABLES and version == SCHEMA_VERSION:
            self._expect_columns("results", RESULTS_COLUMNS)
        elif tables == {"results", "models"} and version == 2:
            self._expect_columns("results", RESULTS_COLUMNS)
            self._upgrade("CREATE TABLE imported" + SCHEMA.split("CREATE TABLE imported")[1])
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
        self._upgrade(
            "ALTER TABLE results RENAME TO results_v1;"
            + SCHEMA.split("CREATE TABLE models")[0]
            + "INSERT INTO results SELECT model, task, shots, 'v1', plan, item, lls, gold, correct, "
            "correct_norm FROM results_v1; DROP TABLE results_v1;"
            + "CREATE TABLE imported"
            + SCHEMA.split("CREATE TABLE imported")[1]
        )

    def _upgrade(self, script: str) -> None:
        """Bring a database of an older schema to this one, its rows kept (schema 2 lacked 'imported' and
        'generations')."""
        if not self.writable:
            raise StoreError(f"{self.path} is from an older ggufloop and must be upgraded, but it is read-only")
        with self.db:
            self.db.executescript(f"BEGIN; {script} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")

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

    # -- generations (generative tasks) --------------------------------------------------------

    def generated(self, unit: Unit, max_new_tokens: int) -> set[str]:
        """The items of a generative unit that have a stored generation under this token limit."""
        return {
            r[0]
            for r in self.db.execute(
                "SELECT item FROM generations WHERE model=? AND task=? AND shots=? AND prompt=? AND plan=?"
                " AND max_new_tokens=?",
                (*unit.key(), max_new_tokens),
            )
        }

    def add_generations(self, unit: Unit, max_new_tokens: int, rows: list[GenerationRow]) -> None:
        """Commit generated items (an item stored already keeps its first row)."""
        try:
            with self.db:
                self.db.executemany(
                    "INSERT OR IGNORE INTO generations VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    [
                        (
                            *unit.key(),
                            max_new_tokens,
                            r.item,
                            r.text,
                            r.n_tokens,
                            int(r.hit_limit),
                            r.strict,
                            r.flexible,
                            r.gold,
                            int(r.correct_strict),
                            int(r.correct_flexible),
                        )
                        for r in rows
                    ],
                )
        except sqlite3.OperationalError as err:
            raise StoreError(f"cannot write to the results database {self.path}: {err}") from None

    def generations(self, unit: Unit, max_new_tokens: int) -> dict[str, GenerationRow]:
        """item -> its stored generation."""
        return {
            r[0]: GenerationRow(r[0], r[1], r[2], bool(r[3]), r[4], r[5], r[6], bool(r[7]), bool(r[8]))
            for r in self.db.execute(
                "SELECT item, text, n_tokens, hit_limit, strict, flexible, gold, correct_strict, correct_flexible"
                " FROM generations WHERE model=? AND task=? AND shots=? AND prompt=? AND plan=? AND max_new_tokens=?",
                (*unit.key(), max_new_tokens),
            )
        }

    def summary(self) -> list[tuple]:
        """(model name, task, shots, prompt, plan, n, acc, acc_norm, imported) for every configuration;
        imported: how many of its n rows came from an export file rather than being scored here."""
        return self.db.execute(
            "SELECT COALESCE((SELECT name FROM models m WHERE m.sha256 = r.model LIMIT 1), substr(r.model, 1, 12)),"
            " task, shots, prompt, plan, COUNT(*), AVG(correct), AVG(correct_norm),"
            " SUM(EXISTS (SELECT 1 FROM imported i WHERE i.model = r.model AND i.task = r.task AND i.shots = r.shots"
            " AND i.prompt = r.prompt AND i.plan = r.plan AND i.item = r.item)) FROM results r"
            " GROUP BY model, task, shots, prompt, plan ORDER BY 1, 2, 3, 4, 5"
        ).fetchall()

    def imported(self, unit: Unit, items: Iterable[str]) -> int:
        """How many of these items' rows of the unit came from an export file rather than being scored here."""
        have = {
            r[0]
            for r in self.db.execute(
                "SELECT item FROM imported WHERE model=? AND task=? AND shots=? AND prompt=? AND plan=?", unit.key()
            )
        }
        return len(have.intersection(items))

    def export_rows(self, path: str | Path) -> int:
        """Write every result row (and the models' names) to a CSV file, gzip-compressed when the name
        ends in .gz: results that travel (git, another machine) and come back with ``import_rows``.

        The file is written beside the target and renamed into place, so a failed export leaves the
        target as it was; a target that is this database (or its -wal/-shm/-journal file), by path,
        symlink or hard link, or that exists and is not a regular file, is refused before anything is
        written."""
        target = Path(path)
        self.check_export_target(target)
        rows = self.db.execute(f"SELECT {', '.join(RESULTS_COLUMNS)} FROM results ORDER BY 1, 2, 3, 4, 5, 6")
        names = dict(self.db.execute("SELECT sha256, name FROM models").fetchall())
        n = 0
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        except OSError as err:
            raise StoreError(f"cannot write the export {target}: {err.strerror}") from None
        try:
            os.close(fd)
            with _open_text(tmp, "w", gz=target.name.endswith(".gz")) as f:
                w = csv.writer(f)
                w.writerow([*RESULTS_COLUMNS, "model_name"])
                for r in rows:
                    w.writerow([*r, names.get(r[0], "")])
                    n += 1
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except OSError as err:
            Path(tmp).unlink(missing_ok=True)
            raise StoreError(f"cannot write the export {target}: {err.strerror or err}") from None
        return n

    def check_export_target(self, target: Path) -> None:
        """Raise StoreError unless ``export_rows`` may write to target (see there)."""
        own = [Path(f"{self.path}{suffix}") for suffix in ("", "-wal", "-shm", "-journal")]
        try:
            st = target.stat() if target.exists() else None
        except OSError as err:
            raise StoreError(f"cannot write the export {target}: {err.strerror}") from None
        for f in own:
            same_path = target.resolve() == f.resolve()
            same_file = st is not None and f.exists() and os.path.samefile(target, f)
            if same_path or same_file:
                raise StoreError(
                    f"{target} is the results database {self.path}{' (' + f.name + ')' if f != self.path else ''}: "
                    "exporting onto it would destroy it; give another file"
                )
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise StoreError(f"cannot export to {target}: it is not a regular file")
        if not target.parent.is_dir():
            raise StoreError(f"cannot write the export {target}: the folder {target.parent} does not exist")

    def import_rows(self, path: str | Path) -> int:
        """Add the rows of an ``export_rows`` file that the store lacks; returns how many were new.

        Every row is checked before any is added (see ``check_row``); the first bad row refuses the
        whole file with its line number. Added rows are marked as imported (``imported``)."""
        self.check_writable()
        checker = RowChecker(self)
        rows, names = [], {}
        line = 1
        try:
            with _open_text(path, "r") as f:
                reader = csv.reader(f)
                if next(reader, None) != [*RESULTS_COLUMNS, "model_name"]:
                    raise StoreError(f"{path} is not a ggufloop results export")
                for r in reader:
                    line = reader.line_num
                    rows.append(checker.check(r))
                    names[r[0]] = r[10]
        except RowError as err:
            raise StoreError(f"{path}, line {line}: {err}; nothing was imported") from None
        except (OSError, EOFError, zlib.error, gzip.BadGzipFile, UnicodeDecodeError, csv.Error) as err:
            reason = "the file ends early (truncated)" if isinstance(err, EOFError) else str(err)
            raise StoreError(f"cannot read the results export {path}: {reason}; nothing was imported") from None
        before = self.db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        with self.db:
            new = [r for r in rows if not self._has(r[:6])]
            self.db.executemany("INSERT OR IGNORE INTO results VALUES (?,?,?,?,?,?,?,?,?,?)", new)
            self.db.executemany("INSERT OR IGNORE INTO imported VALUES (?,?,?,?,?,?)", [r[:6] for r in new])
            self.db.executemany(
                "INSERT OR IGNORE INTO models VALUES (?, 0, 0, ?, ?)",
                [(f"imported:{sha}", sha, name) for sha, name in names.items() if name],
            )
        return self.db.execute("SELECT COUNT(*) FROM results").fetchone()[0] - before

    def _has(self, key: tuple) -> bool:
        return (
            self.db.execute(
                "SELECT 1 FROM results WHERE model=? AND task=? AND shots=? AND prompt=? AND plan=? AND item=?", key
            ).fetchone()
            is not None
        )

    def local_model(self, sha: str) -> Path | None:
        """A file on this machine whose sha256 the store has recorded, if any is still there."""
        for (p,) in self.db.execute("SELECT path FROM models WHERE sha256=? AND path NOT LIKE 'imported:%'", (sha,)):
            if Path(p).is_file():
                return Path(p)
        return None

    def close(self) -> None:
        self.db.close()


def _open_text(path: str | Path, mode: str, gz: bool | None = None) -> IO[str]:
    if str(path).endswith(".gz") if gz is None else gz:
        return gzip.open(path, mode + "t", newline="", encoding="utf-8")  # type: ignore[return-value]
    return open(path, mode, newline="", encoding="utf-8")


class RowError(ValueError):
    """One row of an export file that cannot be a row ggufloop scored."""


_SQLITE_INT = range(-(2**63), 2**63)
_SHA256 = re.compile(r"[0-9a-f]{64}")


class RowChecker:
    """Checks an export file's row against what ggufloop would have stored: the model a sha256, the
    task one ggufloop has and the item one of its items, the plan valid (for the model, where the
    store knows its file), ``lls`` one finite log-likelihood per choice with ``gold`` an index into
    them, and ``correct``/``correct_norm`` what ``lls`` and ``gold`` give (raw and per character of
    each choice, as the scorer computes them). Forging a result then takes more than editing a column."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._choices: dict[str, dict[str, tuple[str, ...]]] = {}  # task -> item -> continuations
        self._layers: dict[str, int | None] = {}  # model sha -> n_layer of a local file

    def check(self, r: list[str]) -> tuple:
        if len(r) != len(RESULTS_COLUMNS) + 1:
            raise RowError(f"expected {len(RESULTS_COLUMNS) + 1} fields, found {len(r)}")
        model, task, shots, prompt, plan, item, lls_text, gold, correct, correct_norm, _ = r
        if not _SHA256.fullmatch(model):
            raise RowError(f"model {model[:80]!r} is not a sha256")
        shots_n, gold_n, c, cn = (self._int(n, v) for n, v in zip(_INT_FIELDS, (shots, gold, correct, correct_norm)))
        if shots_n < 0:
            raise RowError(f"shots {shots_n} is negative")
        if not prompt:
            raise RowError("the prompt format is empty")
        if c not in (0, 1) or cn not in (0, 1):
            raise RowError(f"correct and correct_norm are 0 or 1, not {c} and {cn}")
        self._check_plan(model, plan)
        choices = self._item_choices(task, item)
        try:
            lls = json.loads(lls_text)
        except (ValueError, RecursionError):
            raise RowError("lls is not JSON") from None
        if (
            not isinstance(lls, list)
            or len(lls) != len(choices)
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in lls)
        ):
            raise RowError(f"lls must be a list of {len(choices)} finite numbers, one per choice of item {item}")
        if not 0 <= gold_n < len(lls):
            raise RowError(f"gold {gold_n} is not the index of one of the {len(lls)} choices")
        norm = [ll / max(1, len(ch)) for ll, ch in zip(lls, choices)]
        want = (int(_argmax(lls) == gold_n), int(_argmax(norm) == gold_n))
        if (c, cn) != want:
            raise RowError(f"correct, correct_norm = {c}, {cn} but lls and gold give {want[0]}, {want[1]}")
        return (model, task, shots_n, prompt, plan, item, lls_text, gold_n, c, cn)

    @staticmethod
    def _int(name: str, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise RowError(f"{name} {text[:40]!r} is not an integer") from None
        if value not in _SQLITE_INT:
            raise RowError(f"{name} {text[:40]} does not fit SQLite's integers")
        return value

    def _check_plan(self, model: str, text: str) -> None:
        from ..errors import PlanError
        from ..plan import LoopPlan

        try:
            plan = LoopPlan.parse(text)
        except (PlanError, ValueError, RecursionError) as err:
            raise RowError(f"plan {text[:80]!r} is not a plan: {err}") from None
        if str(plan) != text:
            raise RowError(f"plan {text[:80]!r} is not written as ggufloop writes it ({plan})")
        if model not in self._layers:
            local = self.store.local_model(model)
            self._layers[model] = None
            if local is not None:
                from ..gguf_io import model_info

                self._layers[model] = model_info(local).n_layer
        if self._layers[model] is not None:
            try:
                plan.validate(self._layers[model])
            except PlanError as err:
                raise RowError(f"plan {text} does not fit the model: {err}") from None

    def _item_choices(self, task: str, item: str) -> tuple[str, ...]:
        from .tasks import TASKS

        if task not in TASKS:
            raise RowError(f"unknown task {task[:80]!r}")
        if task not in self._choices:
            self._choices[task] = {it.id: it.continuations for it in TASKS[task].items(0)}
        if item not in self._choices[task]:
            raise RowError(f"{task} has no item {item[:80]!r}")
        return self._choices[task][item]


_INT_FIELDS = ("shots", "gold", "correct", "correct_norm")


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first maximum, as numpy's argmax
