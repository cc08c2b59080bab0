"""The store: one directory per run plus an embedded SQLite index.

Layout of a store root::

    ROOT/store.sqlite          the index (WAL mode: readers never block the writer)
    ROOT/runs/<stage>-<id>/    run directories (checkpoint + sidecar, analysis/ results)
    ROOT/report/               what ``wrapperlab report ROOT`` writes

The run directories are the truth; the index is a cache of them that ``index_run`` refreshes from a sidecar
(``sync`` rebuilds it from the directories). Tables:
- ``runs``: run_id, stage, status, run_dir, parent_id, label, config (JSON), final metrics (JSON), wall_s, updated,
  pid and host of the process that marked it running. Statuses: running (a live process owns it), done,
  partial (checkpointed, not finished), interrupted (its owner died: ``reap_stale``), failed, diverged.
- ``results``: (run_id, tool, key) -> path of an analysis result and its summary (JSON)
- ``experiments``: name -> the spec (JSON) and the node keys it planned

Every write is one short ``BEGIN IMMEDIATE`` transaction with a busy timeout, so several processes writing the
same store serialise instead of losing rows.

An index that SQLite cannot read (garbage bytes, a truncated file) raises ``StoreCorrupt``, whose one line names
the command that rebuilds it; ``Store.rebuild`` moves the damaged file aside (``store.sqlite.corrupt-<time>``,
never deleted) and re-indexes the run directories.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from wrapperlab.training import checkpoint as ck
from wrapperlab.training.config import SHORTCUTS, ConfigError, parse_overrides_as_values

DB_NAME = "store.sqlite"
RUNS_DIR = "runs"
COLUMNS = ("run_id", "stage", "status", "run_dir", "parent_id", "label", "wall_s", "updated", "pid", "host")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, stage TEXT NOT NULL, status TEXT NOT NULL, run_dir TEXT NOT NULL,
    parent_id TEXT, label TEXT, config TEXT NOT NULL, metrics TEXT, wall_s REAL, updated REAL NOT NULL,
    pid INTEGER, host TEXT);
CREATE TABLE IF NOT EXISTS results (
    run_id TEXT NOT NULL, tool TEXT NOT NULL, key TEXT NOT NULL, path TEXT NOT NULL, summary TEXT,
    updated REAL NOT NULL, PRIMARY KEY (run_id, tool, key));
CREATE TABLE IF NOT EXISTS experiments (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, nodes TEXT NOT NULL, updated REAL NOT NULL);
"""


class StoreError(ValueError):
    """A problem with a store, reported as one line."""


class StoreCorrupt(StoreError):
    """The index is not a readable SQLite database; the run directories are intact and can rebuild it."""


# SQLite's primary result codes for a file that is not (or no longer) a database
_CORRUPT_CODES = {11: "SQLITE_CORRUPT", 26: "SQLITE_NOTADB"}


def _is_corruption(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _CORRUPT_CODES
    msg = str(e).lower()
    return "not a database" in msg or "malformed" in msg


class Store:
    def __init__(self, root: str | Path, create: bool = True):
        self.root = Path(root)
        self.db = self.root / DB_NAME
        if not create and not self.db.is_file():
            if self.runs_dir.is_dir() and any(self.runs_dir.glob(f"*/{ck.SIDECAR}")):
                raise StoreError(f"store: {self.root} has run directories but no {DB_NAME}; rebuild the index from "
                                 f"them with: wrapperlab runs list {shlex.quote(str(self.root))} --sync")
            raise StoreError(f"store: {self.root} has no {DB_NAME} (not a wrapperlab store; run "
                             f"`wrapperlab run SPEC --out {self.root}` first)")
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.executescript(_SCHEMA)

    @classmethod
    def rebuild(cls, root: str | Path) -> tuple[Store, Path | None]:
        """Open the store at ``root`` for re-indexing: an index that is corrupt is moved aside (returned, with its
        ``-wal``/``-shm`` files beside it) and a fresh one is created; a missing one is created when ``root``
        holds run directories. The caller then runs ``sync()``. A healthy index is opened as it is."""
        root = Path(root)
        db = root / DB_NAME
        if not db.is_file() and not (root / RUNS_DIR).is_dir():
            return cls(root, create=False), None  # raises: not a store
        if db.is_file():
            try:
                store = cls(root, create=False)
                store._check_integrity()
                return store, None
            except StoreCorrupt:
                pass
        else:
            return cls(root), None
        aside = db.with_name(f"{DB_NAME}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            n += 1
            aside = aside.with_name(f"{DB_NAME}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        for suffix in ("-wal", "-shm"):  # a stale WAL must never be replayed into the new index
            side = db.with_name(DB_NAME + suffix)
            if side.exists():
                os.replace(side, aside.with_name(aside.name + suffix))
        os.replace(db, aside)
        return cls(root), aside

    def _check_integrity(self) -> None:
        with self._connect() as con:
            bad = [r[0] for r in con.execute("PRAGMA quick_check").fetchall() if r[0] != "ok"]
        if bad:
            raise StoreCorrupt(self._corrupt_message(bad[0]))

    def _corrupt_message(self, why: object) -> str:
        return (f"store: {self.db} is corrupt ({why}); rebuild the index from the run directories with: "
                f"wrapperlab runs list {shlex.quote(str(self.root))} --sync")

    @property
    def runs_dir(self) -> Path:
        return self.root / RUNS_DIR

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            con = sqlite3.connect(self.db, timeout=60, isolation_level=None)
        except sqlite3.Error as e:
            raise StoreError(f"store: cannot open {self.db}: {e}") from None
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.row_factory = sqlite3.Row
            yield con
        except sqlite3.DatabaseError as e:
            if _is_corruption(e):
                raise StoreCorrupt(self._corrupt_message(e)) from None
            raise StoreError(f"store: {self.db}: {e}") from None
        finally:
            con.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------ writing
    def index_run(self, run_dir: str | Path, label: str | None = None) -> dict | None:
        """Refresh one run's row from its sidecar (None if the directory holds no readable run yet)."""
        run_dir = Path(run_dir)
        try:
            side = ck.read_sidecar(run_dir)
        except ck.CheckpointError:
            return None
        final = [r for r in side.get("metrics", []) if r.get("step") == side.get("step")]
        status = side.get("status")
        if status == "running":  # a sidecar's "running" only means "checkpointed, not finished"
            status = "partial"
        row = {"run_id": side["run_id"], "stage": side.get("stage"), "status": status,
               "run_dir": str(run_dir.resolve()), "parent_id": side.get("parent_id"),
               "config": json.dumps(side.get("config", {}), sort_keys=True), "metrics": json.dumps(final),
               "wall_s": side.get("wall_s"), "updated": time.time(), "pid": None, "host": None}
        with self._write() as con:
            old = con.execute("SELECT label FROM runs WHERE run_id = ?", (row["run_id"],)).fetchone()
            row["label"] = label or (old["label"] if old else None)
            con.execute(f"INSERT OR REPLACE INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                        tuple(row.values()))
        return row

    def set_status(self, run_id: str, status: str, *, run_dir: str | Path | None = None, stage: str = "",
                   label: str | None = None, config: dict | None = None, parent_id: str | None = None) -> None:
        """Mark a run (possibly not started yet) with a status such as queued / running / failed. "running"
        records this process and host, so a run whose owner died can be told from one still going."""
        pid, host = (os.getpid(), socket.gethostname()) if status == "running" else (None, None)
        with self._write() as con:
            cur = con.execute("UPDATE runs SET status = ?, updated = ?, pid = ?, host = ? WHERE run_id = ?",
                              (status, time.time(), pid, host, run_id))
            if cur.rowcount == 0:
                con.execute("INSERT INTO runs (run_id, stage, status, run_dir, parent_id, label, config, metrics, "
                            "wall_s, updated, pid, host) VALUES (?, ?, ?, ?, ?, ?, ?, '[]', NULL, ?, ?, ?)",
                            (run_id, stage, status, str(Path(run_dir).resolve()) if run_dir else "", parent_id,
                             label, json.dumps(config or {}, sort_keys=True), time.time(), pid, host))

    def reap_stale(self) -> list[str]:
        """Runs marked "running" by a process of this host that no longer exists become "interrupted" (their
        last checkpoint, if any, is intact and the next run of the grid resumes them). Returns their ids."""
        host = socket.gethostname()
        with self._connect() as con:
            rows = con.execute("SELECT run_id, pid FROM runs WHERE status = 'running' AND host = ?",
                               (host,)).fetchall()
        dead = [r["run_id"] for r in rows if r["pid"] is None or not _alive(r["pid"])]
        if dead:
            with self._write() as con:
                con.executemany("UPDATE runs SET status = 'interrupted', pid = NULL, updated = ? "
                                "WHERE run_id = ? AND status = 'running'", [(time.time(), d) for d in dead])
        return dead

    def add_result(self, run_id: str, tool: str, key: str, path: str | Path, summary: Any = None) -> None:
        with self._write() as con:
            con.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?)",
                        (run_id, tool, key, str(Path(path).resolve()), json.dumps(summary), time.time()))

    def add_experiment(self, name: str, spec: dict, nodes: list[str]) -> None:
        with self._write() as con:
            con.execute("INSERT OR REPLACE INTO experiments VALUES (?, ?, ?, ?)",
                        (name, json.dumps(spec, sort_keys=True), json.dumps(nodes), time.time()))

    def sync(self) -> int:
        """Re-index every run directory under ``runs/`` (the directories are the truth)."""
        n = 0
        for d in sorted(self.runs_dir.iterdir()) if self.runs_dir.is_dir() else []:
            if (d / ck.SIDECAR).is_file() and self.index_run(d) is not None:
                n += 1
        return n

    # ------------------------------------------------------------------ reading
    def runs(self, where: dict[str, Any] | None = None) -> list[dict]:
        """Runs whose fields equal every filter value. A filter key is a column (stage, status, label, run_id,
        parent_id) or any config field as a dotted path or short name (``train.lr``, ``lr``, ``task.prior``)."""
        clauses, args = [], []
        for key, value in (where or {}).items():
            if key in COLUMNS:
                clauses.append(f"{key} = ?")
                args.append(value)
                continue
            path = SHORTCUTS.get(key, key)
            if not all(part.replace("_", "").replace("-", "").isalnum() for part in path.split(".")):
                raise StoreError(f"where: {key!r} is not a field name")
            clauses.append(f"json_extract(config, '$.{path}') = ?")
            args.append(value if not isinstance(value, bool) else int(value))
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY updated"
        with self._connect() as con:
            return [_row(r) for r in con.execute(sql, args).fetchall()]

    def run(self, run_id: str) -> dict:
        """One run by id or unique id prefix."""
        with self._connect() as con:
            rows = con.execute("SELECT * FROM runs WHERE run_id LIKE ?", (run_id.replace("%", "") + "%",)).fetchall()
        if not rows:
            raise StoreError(f"run: no run {run_id!r} in {self.root}")
        if len(rows) > 1:
            raise StoreError(f"run: {run_id!r} matches {len(rows)} runs; give more of the id")
        return _row(rows[0])

    def results(self, run_id: str | None = None, tool: str | None = None) -> list[dict]:
        sql, args = "SELECT * FROM results WHERE 1 = 1", []
        if run_id:
            sql += " AND run_id = ?"
            args.append(run_id)
        if tool:
            sql += " AND tool = ?"
            args.append(tool)
        with self._connect() as con:
            out = []
            for r in con.execute(sql + " ORDER BY updated", args).fetchall():
                d = dict(r)
                d["summary"] = json.loads(d["summary"]) if d["summary"] else None
                out.append(d)
            return out

    def experiments(self) -> list[dict]:
        with self._connect() as con:
            return [{"name": r["name"], "spec": json.loads(r["spec"]), "nodes": json.loads(r["nodes"])}
                    for r in con.execute("SELECT * FROM experiments ORDER BY updated").fetchall()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _row(r: sqlite3.Row) -> dict:
    d = dict(r)
    d["config"] = json.loads(d["config"]) if d.get("config") else {}
    d["metrics"] = json.loads(d["metrics"]) if d.get("metrics") else []
    return d


def parse_where(items: list[str]) -> dict[str, Any]:
    """``key=value`` filters from the command line (values read like overrides: 2e-4 is a number)."""
    try:
        return parse_overrides_as_values(items)
    except ConfigError:
        bad = next(i for i in items if "=" not in i or not i.partition("=")[0].strip())
        raise StoreError(f"--where: expected key=value (e.g. stage=finetune, lr=0.0002), got {bad!r}") from None


def is_store(path: str | Path) -> bool:
    return (Path(path) / DB_NAME).is_file()
