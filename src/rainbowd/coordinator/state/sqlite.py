"""The embedded state backend: one SQLite file (WAL mode), and its online backup.

The default (nothing to install or run). The stdlib driver in autocommit mode:
WAL makes a commit cheap, and ``synchronous=NORMAL`` loses at most the last
commits on a power cut, never the file. :func:`backup` copies the live file
with SQLite's online backup API while the coordinator runs; :func:`restore`
puts such a copy in place of a state directory's database (INSTALL.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import structlog

from rainbowd.core.sched.reasons import TransferReason

from . import SCHEMA_VERSION, StateError
from .sql import Cursor, Dialect, Migration, SqlStore, add_image_manifests_table, add_leader_table

log = structlog.get_logger(__name__)

DIALECT = Dialect(
    name="sqlite",
    serial_key="INTEGER PRIMARY KEY AUTOINCREMENT",
    real="REAL",
    integer="INTEGER",
    order="rowid",
    order_column="",
    no_limit=-1,
    placeholder="?",
    # unix seconds: SQLite has no timestamp type, and its one coordinator never waits on it
    timestamp="REAL",
    now="((julianday('now') - 2440587.5) * 86400.0)",
    plus_seconds="((julianday('now') - 2440587.5) * 86400.0 + ?)",
    epoch="0.0",
)
#: pages copied per step of an online backup: small steps let the coordinator's writes
#: go on between them (a step holds a read lock only); 1024 pages = 4 MiB
BACKUP_PAGES_PER_STEP = 1024
#: what a database being written by someone else makes a backup wait for, in seconds
BUSY_TIMEOUT_S = 10.0


def _transfers_seq_and_state_as_columns(store: SqlStore) -> None:
    """1 -> 2: a transfer's ``seq`` and ``state`` move from its JSON body to columns.

    The body's other fields are the ``Transfer``'s (the two extra keys left in old
    bodies are ignored when decoding). A body that is not JSON keeps the defaults
    here and is set aside when loaded. Skipped if the columns are there already.
    """
    columns = {row[1] for row in store.execute("PRAGMA table_info(transfers)").fetchall()}
    if "seq" in columns:
        return
    store.execute("ALTER TABLE transfers ADD COLUMN seq INTEGER NOT NULL DEFAULT 0")
    store.execute("ALTER TABLE transfers ADD COLUMN state TEXT NOT NULL DEFAULT 'active'")
    store.execute(
        "UPDATE transfers SET "
        "seq = coalesce(json_extract(body, '$.seq'), 0), "
        "state = coalesce(json_extract(body, '$.state'), 'active') "
        "WHERE json_valid(body)"
    )


#: tables whose JSON bodies hold transfer reasons (schema 3: ``_reasons_as_records``)
_REASON_TABLES = ("transfers", "jobs", "job_nodes")


def _reasons_to_records(store: SqlStore) -> None:
    """2 -> 3: every transfer reason stored as text becomes a legacy record.

    The text is kept as it was (``TransferReason.legacy``: rule ``legacy``, the
    text), in transfer rows (``$.reason``), jobs (``$.nodes[*].transfers[*].reason``)
    and job nodes (``$.transfers[*].reason``). A body that is not JSON, or not the
    shape expected, is left as it is; loading sets it aside, as for any bad row.
    """
    for table in _REASON_TABLES:
        rows = store.execute(f"SELECT rowid, body FROM {table}").fetchall()
        for rowid, body in rows:
            new = _reasons_as_records(table, body)
            if new is not None:
                store.execute(f"UPDATE {table} SET body = ? WHERE rowid = ?", (new, rowid))


def _reasons_as_records(table: str, body: Any) -> str | None:
    """``body`` with each text reason a legacy record (schema 3); None if nothing changed."""
    try:
        doc = json.loads(body) if isinstance(body, str) else None
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    holders: list[Any] = []  # the dicts with a "reason": a transfer, or a job's SeederUses
    if table == "transfers":
        holders.append(doc)
    else:
        nodes = doc.get("nodes") if table == "jobs" else [doc]
        for node in nodes if isinstance(nodes, list) else []:
            uses = node.get("transfers") if isinstance(node, dict) else None
            holders.extend(uses if isinstance(uses, list) else [])
    changed = False
    for holder in holders:
        if isinstance(holder, dict) and isinstance(holder.get("reason"), str):
            holder["reason"] = msgspec.to_builtins(TransferReason.legacy(holder["reason"]))
            changed = True
    return json.dumps(doc) if changed else None


#: each step brings the schema to ``to`` (state/sql.py runs those above the stored one)
MIGRATIONS: tuple[Migration, ...] = (
    Migration(2, _transfers_seq_and_state_as_columns),
    Migration(3, _reasons_to_records),
    Migration(4, add_leader_table),
    Migration(5, add_image_manifests_table),
)


class SqliteStore(SqlStore):
    """The coordinator's SQLite database (``coordinator.sqlite`` in the state dir)."""

    backend = "sqlite"

    def __init__(self, path: Path, *, work_dir: Path | None = None) -> None:
        super().__init__(DIALECT, work_dir or path.parent, str(path))
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None)  # autocommit; WAL: cheap
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        except (OSError, sqlite3.Error) as e:
            raise StateError(f"cannot open the state database {path}: {e}") from e
        try:
            self.migrate(MIGRATIONS, before=lambda: None)
        except BaseException:
            self._db.close()
            raise

    def _execute(self, sql: str, params: Sequence[Any]) -> Cursor:
        return self._db.execute(sql, params)

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)

    def _has_meta(self) -> bool:
        row = self.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'")
        return row.fetchone() is not None

    @property
    def in_transaction(self) -> bool:
        return self._db.in_transaction

    def _commit(self) -> None:
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise StateError(f"state database {self.path}: commit failed: {e}") from e

    def close(self) -> None:
        self._db.close()


def backup(db: Path, dest: Path) -> int:
    """Copy the database ``db`` to ``dest`` while it may be in use; returns its pages.

    SQLite's online backup API takes a consistent snapshot (a step that sees the
    source change starts over), so the coordinator keeps running. The copy is
    written beside ``dest``, checked (``integrity_check``) and then renamed over
    it: ``dest`` is either the old backup or a whole new one, never half of one.
    """
    if not db.is_file():
        raise StateError(f"no state database at {db} (is --state-dir right?)")
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        src = sqlite3.connect(db, timeout=BUSY_TIMEOUT_S)  # reads only
        try:
            out = sqlite3.connect(partial)
            try:
                src.backup(out, pages=BACKUP_PAGES_PER_STEP)
                out.execute("PRAGMA journal_mode=DELETE")  # a single file, no -wal beside it
                pages = int(out.execute("PRAGMA page_count").fetchone()[0])
                _check(out, str(db))
            finally:
                out.close()
        finally:
            src.close()
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, dest)
    except (OSError, sqlite3.Error) as e:
        partial.unlink(missing_ok=True)
        raise StateError(f"backup of {db} to {dest} failed: {e}") from e
    return pages


def restore(copy: Path, db: Path, *, force: bool = False) -> None:
    """Put the backup ``copy`` in place of the database ``db`` (the coordinator stopped).

    Refuses a file that is not an intact rbd state database, and an existing
    ``db`` unless ``force`` (then its ``-wal``/``-shm`` go too: SQLite would
    replay an old write-ahead log over the restored file).
    """
    if not copy.is_file():
        raise StateError(f"no backup at {copy}")
    try:
        con = sqlite3.connect(copy)  # reads only
        try:
            _check(con, str(copy))
        finally:
            con.close()
    except sqlite3.Error as e:
        raise StateError(f"{copy} is not a state database backup: {e}") from e
    if db.exists() and not force:
        raise StateError(
            f"{db} exists: stop the coordinator and pass --force to replace it, "
            "or restore into a fresh state directory"
        )
    db.parent.mkdir(parents=True, exist_ok=True)
    partial = db.with_name(db.name + ".restoring")
    try:
        partial.write_bytes(copy.read_bytes())
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        for stale in (Path(f"{db}-wal"), Path(f"{db}-shm")):
            stale.unlink(missing_ok=True)
        os.replace(partial, db)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise StateError(f"restore of {copy} to {db} failed: {e}") from e


def _check(con: sqlite3.Connection, what: str) -> None:
    """StateError unless ``con`` is an intact rbd state database this version can open."""
    (ok,) = con.execute("PRAGMA integrity_check").fetchone()
    if ok != "ok":
        raise StateError(f"{what}: integrity check failed: {ok}")
    row = con.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    if row is None:
        raise StateError(f"{what}: no schema version in it; not an rbd state database")
    if int(row[0]) > SCHEMA_VERSION:
        raise StateError(f"{what}: schema {row[0]} is newer than this rbd's {SCHEMA_VERSION}")
