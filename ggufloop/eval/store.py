"""The results store: every scored item, written to SQLite as it is scored.

A run that stops (Ctrl-C, crash, power loss) loses at most the batch in flight and resumes where
it stopped; a configuration (model, task, shots, prompt format, plan with its mix) is never
scored twice. The prompt format is part of the key, so an edited prompt template or another
few-shot pool never reuses old rows. Generative tasks (gsm8k) keep each item's generated text with
both filters' answers and scores in ``generations``, under the same key plus the token limit, so a
scoring can be recomputed without generating again. ``perplexity`` keeps each ``ggufloop perplexity``
result (a plan's PPL and KL divergence against the unlooped model on a text).

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from ..errors import StoreError
from ..models import sha256_file

if TYPE_CHECKING:
    from .perplexity import PerplexityResult

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
CREATE TABLE perplexity (     -- ggufloop perplexity: a plan against the unlooped model on a text
    model TEXT NOT NULL,      -- sha256 of the GGUF file
    text TEXT NOT NULL,       -- sha256 of the scored text (UTF-8)
    text_name TEXT NOT NULL,  -- a corpus name or the --text file's name
    n_ctx INTEGER NOT NULL,
    n_chunks INTEGER NOT NULL,
    kld_tokens INTEGER NOT NULL,  -- tokens of the KLD (0: every scored token)
    plan TEXT NOT NULL,
    n_tokens INTEGER NOT NULL,  -- scored tokens
    ppl REAL NOT NULL,
    ppl_base REAL NOT NULL,
    ln_ratio REAL NOT NULL,   -- mean ln(PPL(plan)/PPL(base)), with its paired standard error
    ln_ratio_se REAL NOT NULL,
    kld REAL NOT NULL,        -- mean KL(unlooped || plan), with its standard error
    kld_se REAL NOT NULL,
    kld_p99 REAL NOT NULL,
    rms_dp REAL NOT NULL,
    same_top REAL NOT NULL,
    stats TEXT NOT NULL,      -- JSON: every statistic (ggufloop.eval.perplexity.statistics)
    PRIMARY KEY (model, text, n_ctx, n_chunks, kld_tokens, plan)
);
"""
TABLES = {"results", "models", "imported", "generations", "perplexity"}
GENERATION_COLUMNS = [
    "model", "task", "shots", "prompt", "plan", "max_new_tokens", "item", "text", "n_tokens", "hit_limit",
    "strict", "flexible", "gold", "correct_strict", "correct_flexible",
]  # fmt: skip
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
        elif tables == TABLES - {"perplexity"} and version == SCHEMA_VERSION:  # schema 3 before it had the table
            self._expect_columns("results", RESULTS_COLUMNS)
            self._upgrade("CREATE TABLE perplexity" + SCHEMA.split("CREATE TABLE perplexity")[1])
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
        """Bring a database of an older schema to this one, its rows kept (schema 2 lacked 'imported',
        'generations' and 'perplexity')."""
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

    def margins(self, unit: Unit, items: Iterable[str]) -> dict[str, float]:
        """item -> the correct choice's log-likelihood minus the best wrong one's (positive exactly when
        the row is correct, as ``correct`` judges it), for the unit's stored rows among ``items``."""
        wanted, out = set(items), {}
        query = "SELECT item, lls, gold FROM results WHERE model=? AND task=? AND shots=? AND prompt=? AND plan=?"
        for item, lls, gold in self.db.execute(query, unit.key()):
            if item in wanted:
                values = json.loads(lls)
                out[item] = values[gold] - max(v for k, v in enumerate(values) if k != gold)
        return out

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

    # -- perplexity ----------------------------------------------------------------------------

    def add_perplexity(self, r: PerplexityResult) -> None:
        """Keep a perplexity result; a new run of the same key (model, text, context, chunks, KLD tokens,
        plan) replaces the old one (the same computation, so the same numbers)."""
        s = r.stats
        row = (
            r.model_sha256,
            r.text_sha256,
            r.text,
            r.n_ctx,
            r.n_chunk,
            r.kld_tokens,
            r.plan,
            s["n_tokens"],
            s["ppl"],
            s["ppl_base"],
            s["ln_ratio"],
            s["ln_ratio_se"],
            s["kld"]["mean"],
            s["kld"]["se"],
            s["kld"]["p99"],
            s["dp"]["rms"],
            s["same_top"],
            json.dumps(s),
        )
        try:
            with self.db:
                self.db.execute(f"INSERT OR REPLACE INTO perplexity VALUES ({','.join('?' * len(row))})", row)
        except sqlite3.OperationalError as err:
            raise StoreError(f"cannot write to the results database {self.path}: {err}") from None
        if Path(r.model).is_file():
            self.model_sha(r.model)  # the report names the model

    def perplexity_summary(self) -> list[tuple]:
        """(model name, text name, n_ctx, n_chunks, plan, n_tokens, ppl, ppl_base, ln_ratio, ln_ratio_se, kld,
        kld_se, kld_p99, rms_dp, same_top) of every perplexity result."""
        return self.db.execute(
            "SELECT COALESCE((SELECT name FROM models m WHERE m.sha256 = p.model LIMIT 1), substr(p.model, 1, 12)),"
            " text_name, n_ctx, n_chunks, plan, n_tokens, ppl, ppl_base, ln_ratio, ln_ratio_se, kld, kld_se,"
            " kld_p99, rms_dp, same_top FROM perplexity p ORDER BY 1, 2, 3, 4, 5"
        ).fetchall()

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

    def generation_summary(self) -> list[tuple]:
        """(model name, task, shots, prompt, plan, max_new_tokens, n, strict acc, flexible acc, answers that
        hit the limit, imported) for every generative configuration."""
        return self.db.execute(
            "SELECT COALESCE((SELECT name FROM models m WHERE m.sha256 = g.model LIMIT 1), substr(g.model, 1, 12)),"
            " task, shots, prompt, plan, max_new_tokens, COUNT(*), AVG(correct_strict), AVG(correct_flexible),"
            " SUM(hit_limit), SUM(EXISTS (SELECT 1 FROM imported i WHERE i.model = g.model AND i.task = g.task"
            " AND i.shots = g.shots AND i.prompt = g.prompt AND i.plan = g.plan AND i.item = g.item))"
            " FROM generations g GROUP BY model, task, shots, prompt, plan, max_new_tokens ORDER BY 1, 2, 3, 4, 5, 6"
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
        return self._export(path, "results", RESULTS_COLUMNS)

    def export_generations(self, path: str | Path) -> int:
        """The generations (generative tasks) as ``export_rows`` writes results; back with ``import_generations``."""
        return self._export(path, "generations", GENERATION_COLUMNS)

    def _export(self, path: str | Path, table: str, columns: list[str]) -> int:
        target = Path(path)
        self.check_export_target(target)
        rows = self.db.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {', '.join(columns[:7])}")
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
                w.writerow([*columns, "model_name"])
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

        Every row is checked before any is added (see ``RowChecker``); the first bad row refuses the
        whole file with its line number. Added rows are marked as imported (``imported``)."""
        return self._import(path, "results", RESULTS_COLUMNS, RowChecker(self).check)

    def import_generations(self, path: str | Path) -> int:
        """Add the generations of an ``export_generations`` file that the store lacks, each checked as
        ``GenerationChecker`` says (every answer and score recomputed from the text); as ``import_rows``."""
        return self._import(path, "generations", GENERATION_COLUMNS, GenerationChecker(self).check)

    def _import(self, path: str | Path, table: str, columns: list[str], check: Callable[[list[str]], tuple]) -> int:
        self.check_writable()
        rows, names = [], {}
        line = 1
        try:
            with _open_text(path, "r") as f:
                reader = csv.reader(f)
                if next(reader, None) != [*columns, "model_name"]:
                    raise StoreError(f"{path} is not a ggufloop {table} export")
                for r in reader:
                    line = reader.line_num
                    rows.append(check(r))
                    names[r[0]] = r[-1]
        except RowError as err:
            raise StoreError(f"{path}, line {line}: {err}; nothing was imported") from None
        except (OSError, EOFError, zlib.error, gzip.BadGzipFile, UnicodeDecodeError, csv.Error) as err:
            reason = "the file ends early (truncated)" if isinstance(err, EOFError) else str(err)
            raise StoreError(f"cannot read the results export {path}: {reason}; nothing was imported") from None
        keys = columns[: columns.index("item") + 1]
        where = " AND ".join(f"{k}=?" for k in keys)
        before = self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        with self.db:
            new = [
                r
                for r in rows
                if self.db.execute(f"SELECT 1 FROM {table} WHERE {where}", r[: len(keys)]).fetchone() is None
            ]
            marks = ",".join("?" * len(columns))
            self.db.executemany(f"INSERT OR IGNORE INTO {table} VALUES ({marks})", new)
            self.db.executemany(
                "INSERT OR IGNORE INTO imported VALUES (?,?,?,?,?,?)",
                [tuple(r[columns.index(k)] for k in ("model", "task", "shots", "prompt", "plan", "item")) for r in new],
            )
            self.db.executemany(
                "INSERT OR IGNORE INTO models VALUES (?, 0, 0, ?, ?)",
                [(f"imported:{sha}", sha, name) for sha, name in names.items() if name],
            )
        return self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] - before

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


class GenerationChecker(RowChecker):
    """Checks an export file's generation as ggufloop would have stored it: the key as ``RowChecker``
    checks it (task gsm8k, an item of its data, a known prompt format), the token counts in range,
    and both filters' answers, the reference answer and both scores exactly what the text gives."""

    def check(self, r: list[str]) -> tuple:
        from . import gsm8k

        if len(r) != len(GENERATION_COLUMNS) + 1:
            raise RowError(f"expected {len(GENERATION_COLUMNS) + 1} fields, found {len(r)}")
        model, task, shots, prompt, plan, limit, item, text, n_tokens, hit, strict, flexible, gold, cs, cf, _ = r
        if not _SHA256.fullmatch(model):
            raise RowError(f"model {model[:80]!r} is not a sha256")
        if task != "gsm8k":
            raise RowError(f"unknown generative task {task[:80]!r}")
        shots_n, limit_n, n, hit_n, cs_n, cf_n = (
            self._int(name, v)
            for name, v in zip(
                ("shots", "max_new_tokens", "n_tokens", "hit_limit", "correct_strict", "correct_flexible"),
                (shots, limit, n_tokens, hit, cs, cf),
            )
        )
        if not 0 <= shots_n <= gsm8k.N_EXEMPLARS or limit_n < 1 or not 0 <= n <= limit_n:
            raise RowError(f"shots {shots_n}, max_new_tokens {limit_n}, n_tokens {n} are out of range")
        # an answer may end on its last allowed token (its stop token the limit-th): n_tokens at the limit
        # without hit_limit is a record, hit_limit below the limit is not
        if hit_n not in (0, 1) or cs_n not in (0, 1) or cf_n not in (0, 1) or (hit_n and n != limit_n):
            raise RowError("hit_limit and the scores are 0 or 1, and hit_limit is 1 only where n_tokens is the limit")
        fmt = next((f for f in gsm8k.FORMATS.values() for v in gsm8k.KNOWN_VERSIONS if f.key(v) == prompt), None)
        if fmt is None:
            raise RowError(f"prompt format {prompt[:80]!r} is not one of gsm8k's")
        self._check_plan(model, plan)
        problem = self._problems().get(item)
        if problem is None:
            raise RowError(f"gsm8k has no item {item[:80]!r}")
        want = (gsm8k.strict_match(fmt, text), gsm8k.flexible_extract(text), problem.gold)
        if (strict, flexible, gold) != want:
            raise RowError(f"the answers {strict!r}, {flexible!r} (gold {gold!r}) are not what the text gives: {want}")
        if (cs_n, cf_n) != (int(gsm8k.is_correct(want[0], want[2])), int(gsm8k.is_correct(want[1], want[2]))):
            raise RowError("correct_strict and correct_flexible are not what the answers give")
        return (model, task, shots_n, prompt, plan, limit_n, item, text, n, hit_n, strict, flexible, gold, cs_n, cf_n)

    def _problems(self) -> dict:
        from . import gsm8k

        if "gsm8k" not in self._choices:
            self._choices["gsm8k"] = {pr.id: pr for pr in gsm8k.problems()}
        return self._choices["gsm8k"]
