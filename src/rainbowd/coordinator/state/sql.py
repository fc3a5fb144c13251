"""The statements both state backends run: one schema, written once.

A backend (state/sqlite.py, state/postgres.py) supplies its connection and a
:class:`Dialect` -- the few words the two SQL dialects spell differently -- and
its list of :class:`Migration` steps; everything else is here. Statements are
written with ``?`` placeholders (PostgreSQL's become ``%s``), and each one's
driver error is raised as :class:`StateError`.

While a job runs, a change of one of its nodes is written as that node's own
row (``job_nodes``), applied over the job's row on load: rewriting the whole
job per report costs O(nodes) each time, O(nodes^2) per job. Each statement
commits on its own unless it runs inside :meth:`SqlStore.transaction`: an
agent's report (or batch of reports) is one transaction, so its writes -- and
the report id that guards them (coordinator/http/report_ids.py) -- land
together or not at all.

Transfers in flight are stored too (one row written when it is assigned, one
delete when its report arrives): agents keep pulling while the coordinator is
away, so a restarted coordinator must know them -- to lock their seeder and
demander again (no second transfer of a layer a node is still pulling) and to
understand their late done/failed reports. Rows whose transfer the
coordinator gave up on (``aborted``) are kept, bounded, for late reports. A
transfer row is the scheduler's own record (``rainbowd.core.sched.records.Transfer``,
the body) plus the two columns only the coordinator has (its mailbox ``seq``
and its ``state``): no mirror type to keep in step with it.

A stored value can never stop the coordinator from starting: every row is
decoded and validated on its own (the structs' fields carry the same bounds
as the messages, rainbowd.core.wirebounds). A row that fails is logged, naming its
table and key, and moved to the ``set_aside`` table (with the error) for an
operator to look at; the other rows load. A node set aside must enroll again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import msgspec
import structlog

from rainbowd.core.messages import JobView, NodeJobState, OpView
from rainbowd.core.sched.records import Transfer
from rainbowd.core.wirebounds import MAX_COUNT, MAX_TEXT

from . import (
    MAX_STORED_EVENTS,
    SCHEMA_VERSION,
    StateError,
    StoredImage,
    StoredNode,
    TransferState,
    image_rows,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

_TRANSFER_STATES: tuple[TransferState, ...] = ("active", "aborted")


@dataclass(frozen=True)
class Dialect:
    """The words the backends spell differently; the tables are the same.

    ``order``: the column that keeps insertion order in ``transfers`` and
    ``applied_reports`` (SQLite's implicit ``rowid``; PostgreSQL's ``n``, a
    serial column of its own, as it has no rowid).
    """

    name: str
    serial_key: str  # an auto-numbered integer primary key
    real: str  # an 8-byte float (PostgreSQL's REAL is 4 bytes)
    integer: str  # wide enough for a count up to MAX_COUNT (2**32)
    order: str
    order_column: str  # the extra column that holds ``order`` ("" if implicit)
    no_limit: int | None  # the LIMIT value meaning "all rows"
    placeholder: str  # what ``?`` is written as
    timestamp: str  # the type of the lease's ``expires_at`` (the database's own clock)
    now: str  # the database's clock now, as a ``timestamp``
    plus_seconds: str  # ``now`` plus ``?`` seconds (a float parameter)
    epoch: str  # a ``timestamp`` long past: a lease row nobody holds


def schema(d: Dialect) -> list[str]:
    """The current schema's tables, created if missing (so a new table needs no step)."""
    return [
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS nodes (node_id TEXT PRIMARY KEY, body TEXT NOT NULL, "
        f"seq {d.integer} NOT NULL DEFAULT 0)",
        "CREATE TABLE IF NOT EXISTS images (ref TEXT PRIMARY KEY, body TEXT NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, created_at {d.real}, "
        "body TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS job_nodes (job_id TEXT NOT NULL, node_id TEXT NOT NULL, "
        "body TEXT NOT NULL, PRIMARY KEY (job_id, node_id))",
        f"CREATE TABLE IF NOT EXISTS transfers (transfer_id TEXT PRIMARY KEY, body TEXT NOT NULL, "
        f"seq {d.integer} NOT NULL DEFAULT 0, state TEXT NOT NULL DEFAULT 'active'"
        f"{d.order_column})",
        f"CREATE TABLE IF NOT EXISTS security_events (id {d.serial_key}, at {d.real} NOT NULL, "
        "reporter TEXT NOT NULL, peer TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS ops (op_id TEXT PRIMARY KEY, created_at {d.real}, "
        "body TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS applied_reports (node_id TEXT NOT NULL, route TEXT NOT NULL, "
        f"report_id TEXT NOT NULL{d.order_column}, PRIMARY KEY (node_id, route, report_id))",
        f"CREATE TABLE IF NOT EXISTS set_aside (id {d.serial_key}, at {d.real} NOT NULL, "
        "tbl TEXT NOT NULL, key TEXT NOT NULL, body TEXT NOT NULL, error TEXT NOT NULL)",
        *leader_table(d),
        *image_manifests_table(),
    ]


def image_manifests_table() -> list[str]:
    """Schema 5: the upstream's own manifest bytes of each image, verbatim (issue 17).

    One row per document (the manifest, and the index when the tag named
    one) of an image's ``record.upstream``: ``body`` is exactly the text whose
    sha256 is ``digest``, checked again on load. The image row keeps the
    documents' digests and media types only, so the JSON body of an image
    stays small and a manifest is never escaped inside it.
    """
    return [
        "CREATE TABLE IF NOT EXISTS image_manifests (ref TEXT NOT NULL, digest TEXT NOT NULL, "
        "media_type TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (ref, digest))",
    ]


def add_image_manifests_table(store: SqlStore) -> None:
    """4 -> 5: the ``image_manifests`` table (:func:`image_manifests_table`).

    Images stored before it have no upstream manifest (origins did not keep
    one): nothing to move, and they are served under rbd's built manifest.
    """
    for statement in image_manifests_table():
        store.execute(statement)


def leader_table(d: Dialect) -> list[str]:
    """Schema 4: the leader lease, one row (``id = 1``) every coordinator competes for.

    ``holder`` names the coordinator process holding it, ``url`` is where it
    serves (what a standby's 503 names), ``token`` grows by one with each
    acquire (the fencing token, coordinator/state/lease.py), ``expires_at`` is
    on the database's clock. The row starts held by nobody and long expired.
    Both statements are idempotent: :func:`schema` runs them on every open,
    and the step to schema 4 runs them on a database from before it.
    """
    return [
        f"CREATE TABLE IF NOT EXISTS leader (id {d.integer} PRIMARY KEY CHECK (id = 1), "
        f"holder TEXT NOT NULL, url TEXT NOT NULL, token {d.integer} NOT NULL, "
        f"expires_at {d.timestamp} NOT NULL)",
        "INSERT INTO leader(id, holder, url, token, expires_at) "
        f"VALUES (1, '', '', 0, {d.epoch}) ON CONFLICT DO NOTHING",
    ]


def add_leader_table(store: SqlStore) -> None:
    """3 -> 4: the leader lease table and its one row (:func:`leader_table`)."""
    for statement in leader_table(store.dialect):
        store.execute(statement)


@dataclass(frozen=True)
class Migration:
    """The step that brings a database at schema ``to - 1`` to schema ``to``.

    ``run`` gets the store and issues its statements through ``store.execute``;
    all of a start-up's steps run in one transaction, so a failed step leaves
    the database as it was.
    """

    to: int
    run: Callable[[SqlStore], None]


class Cursor(Protocol):
    """What both drivers' cursors give back (sqlite3.Cursor, psycopg.Cursor)."""

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class SqlStore:
    """The coordinator's state over a DB-API connection; a backend subclass opens it."""

    backend = "sql"

    def __init__(self, dialect: Dialect, work_dir: Path, describe: str) -> None:
        self.dialect = dialect
        self.work_dir = work_dir
        #: where the state is, for logs and errors (a path, or a URL without its password)
        self.describe = describe
        self._sql: dict[str, str] = {}

    # -- what a backend provides -------------------------------------------
    def _execute(self, sql: str, params: Sequence[Any]) -> Cursor:
        """Run one statement on the connection (the driver's own errors may escape)."""
        raise NotImplementedError

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        raise NotImplementedError

    @property
    def in_transaction(self) -> bool:
        raise NotImplementedError

    def _commit(self) -> None:
        """COMMIT the open transaction; StateError (after a ROLLBACK) if it did not."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- statements ------------------------------------------------------
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """Run ``sql`` (``?`` placeholders); the driver's error is raised as StateError."""
        text = self._sql.get(sql)
        if text is None:
            text = self._sql[sql] = sql.replace("?", self.dialect.placeholder)
        try:
            return self._execute(text, params)
        except self._driver_errors() as e:
            raise StateError(f"state database {self.describe}: {e}") from e

    def execute_unfenced(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """:meth:`execute` without the fencing a backend may add (the lease's own statements).

        Only PostgreSQL fences (state/postgres.py); elsewhere this is ``execute``.
        """
        return SqlStore.execute(self, sql, params)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Every write inside commits once, at the end (a write outside commits on its own).

        Inside one already open, it joins it. What was written is committed also
        when the body raises (a refusal after some writes): the changes in memory
        that those writes mirror have happened, as with statements that commit
        one by one. Only a failed COMMIT rolls back, and raises StateError. The
        body must not await: another request's writes would join, and be
        answered before they are committed.
        """
        if self.in_transaction:
            yield
            return
        self.execute("BEGIN")
        try:
            yield
        finally:
            if self.in_transaction:  # (SQLite ends it itself on some errors)
                self._commit()

    def migrate(self, migrations: Sequence[Migration], before: Callable[[], None]) -> None:
        """Create missing tables, then run each step above the stored schema, in one transaction.

        ``before`` runs first inside the transaction (PostgreSQL takes a lock
        there, so two coordinators starting together migrate once). A database
        written by a newer rbd (a larger schema number) is refused: its rows may
        mean what this version cannot know.
        """
        with self.transaction():
            before()
            fresh = not self._has_meta()
            for statement in schema(self.dialect):
                self.execute(statement)
            version = SCHEMA_VERSION if fresh else int(self.get_meta("schema", "0") or 0)
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"state database {self.describe} has schema {version}, newer than this "
                    f"rbd's {SCHEMA_VERSION}: run the newer rbd-coordinator, or restore a backup"
                )
            for step in migrations:
                if version < step.to <= SCHEMA_VERSION:
                    step.run(self)
                    log.info("state database migrated", state=self.describe, schema=step.to)
            self.set_meta("schema", str(SCHEMA_VERSION))

    def _has_meta(self) -> bool:
        raise NotImplementedError

    # -- report ids (coordinator/http/report_ids.py) ----------------------------
    def add_report_id(self, node_id: str, route: str, report_id: str) -> None:
        self.execute(
            "INSERT INTO applied_reports(node_id, route, report_id) VALUES (?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            (node_id, route, report_id),
        )

    def delete_report_id(self, node_id: str, route: str, report_id: str) -> None:
        self.execute(
            "DELETE FROM applied_reports WHERE node_id = ? AND route = ? AND report_id = ?",
            (node_id, route, report_id),
        )

    def has_report_id(self, node_id: str, route: str, report_id: str) -> bool:
        row = self.execute(
            "SELECT 1 FROM applied_reports WHERE node_id = ? AND route = ? AND report_id = ?",
            (node_id, route, report_id),
        ).fetchone()
        return row is not None

    def count_report_ids(self, node_id: str) -> int:
        row = self.execute(
            "SELECT COUNT(*) FROM applied_reports WHERE node_id = ?", (node_id,)
        ).fetchone()
        return int(row[0])

    def prune_report_ids(self, node_id: str, keep: int) -> None:
        """Forget all but the newest ``keep`` report ids of ``node_id``."""
        o = self.dialect.order
        self.execute(
            f"DELETE FROM applied_reports WHERE node_id = ? AND {o} NOT IN "
            f"(SELECT {o} FROM applied_reports WHERE node_id = ? ORDER BY {o} DESC LIMIT ?)",
            (node_id, node_id, keep),
        )

    # -- meta ------------------------------------------------------------
    def get_meta(self, key: str, default: str = "") -> str:
        row = self.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else default

    def set_meta(self, key: str, value: str) -> None:
        self.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # -- nodes -----------------------------------------------------------
    def save_node(self, node: StoredNode, seq: int) -> None:
        self.execute(
            "INSERT INTO nodes(node_id, body, seq) VALUES (?, ?, ?) "
            "ON CONFLICT(node_id) DO UPDATE SET body = excluded.body, seq = excluded.seq",
            (node.node_id, _dump(node), seq),
        )

    def save_seq(self, node_id: str, seq: int) -> None:
        self.execute("UPDATE nodes SET seq = ? WHERE node_id = ?", (seq, node_id))

    def delete_node(self, node_id: str) -> None:
        self.execute("DELETE FROM nodes WHERE node_id = ?", (node_id,))

    def load_nodes(self) -> list[tuple[StoredNode, int]]:
        rows = self.execute("SELECT node_id, body, seq FROM nodes ORDER BY node_id").fetchall()
        out: list[tuple[StoredNode, int]] = []
        for key, body, seq in rows:
            node = self._valid("nodes", "node_id = ?", key, body, StoredNode)
            if node is not None:
                out.append((node, int(seq)))
        return out

    # -- images (state/image_rows.py: the row and its upstream manifests) -----
    def save_image(self, image: StoredImage) -> None:
        image_rows.save_image(self, image)

    def delete_image(self, ref: str) -> None:
        image_rows.delete_image(self, ref)

    def load_images(self) -> list[StoredImage]:
        return image_rows.load_images(self)

    # -- jobs ------------------------------------------------------------
    def save_job(self, job: JobView) -> None:
        """The whole job; it supersedes the per-node rows written since."""
        self.execute(
            "INSERT INTO jobs(job_id, created_at, body) VALUES (?, ?, ?) "
            "ON CONFLICT(job_id) DO UPDATE SET body = excluded.body",
            (job.job_id, job.created_at, _dump(job)),
        )
        self.execute("DELETE FROM job_nodes WHERE job_id = ?", (job.job_id,))

    def save_job_node(self, job_id: str, node: NodeJobState) -> None:
        """One node's part of a running job (a small row instead of rewriting the job)."""
        self.execute(
            "INSERT INTO job_nodes(job_id, node_id, body) VALUES (?, ?, ?) "
            "ON CONFLICT(job_id, node_id) DO UPDATE SET body = excluded.body",
            (job_id, node.node_id, _dump(node)),
        )

    def load_jobs(self) -> list[JobView]:
        """Every job, with the per-node rows saved after its last whole write applied."""
        rows = self.execute("SELECT job_id, body FROM jobs ORDER BY created_at, job_id")
        views = self._valid_rows("jobs", "job_id", rows.fetchall(), JobView)
        newer: dict[str, dict[str, NodeJobState]] = {}
        part_rows = self.execute("SELECT job_id, node_id, body FROM job_nodes").fetchall()
        for job_id, node_id, body in part_rows:
            where = "job_id = ? AND node_id = ?"
            ns = self._valid("job_nodes", where, (job_id, node_id), body, NodeJobState)
            if ns is not None:
                newer.setdefault(str(job_id), {})[ns.node_id] = ns
        for view in views:
            if view.job_id in newer:
                nodes = newer[view.job_id]
                view.nodes = [nodes.get(ns.node_id, ns) for ns in view.nodes]
        return views

    # -- cluster operations (rbd run/rm/build/...) --------------------------
    def save_op(self, op: OpView) -> None:
        self.execute(
            "INSERT INTO ops(op_id, created_at, body) VALUES (?, ?, ?) "
            "ON CONFLICT(op_id) DO UPDATE SET body = excluded.body",
            (op.op_id, op.created_at, _dump(op)),
        )

    def load_ops(self) -> list[OpView]:
        rows = self.execute("SELECT op_id, body FROM ops ORDER BY created_at, op_id")
        return self._valid_rows("ops", "op_id", rows.fetchall(), OpView)

    def prune_ops(self, keep: int) -> None:
        """Forget all but the newest ``keep`` operations."""
        self.execute(
            "DELETE FROM ops WHERE op_id NOT IN (SELECT op_id FROM ops "
            "ORDER BY created_at DESC, op_id DESC LIMIT ?)",
            (keep,),
        )

    # -- transfers in flight ----------------------------------------------
    def save_transfer(self, t: Transfer, seq: int, state: TransferState = "active") -> None:
        """Persist ``t`` as it is, with the coordinator's own ``seq`` and ``state`` beside it.

        ``seq``: its assignment's place in the demander's mailbox (delivered once the
        agent's cursor passes it).
        """
        self.execute(
            "INSERT INTO transfers(transfer_id, body, seq, state) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(transfer_id) DO UPDATE SET "
            "body = excluded.body, seq = excluded.seq, state = excluded.state",
            (t.transfer_id, _dump(t), seq, state),
        )

    def delete_transfer(self, transfer_id: str) -> None:
        self.execute("DELETE FROM transfers WHERE transfer_id = ?", (transfer_id,))

    def load_transfers(self) -> list[tuple[Transfer, int, TransferState]]:
        """Every stored transfer as (transfer, seq, state), oldest first; bad rows set aside."""
        rows = self.execute(
            f"SELECT transfer_id, body, seq, state FROM transfers ORDER BY {self.dialect.order}"
        ).fetchall()
        out: list[tuple[Transfer, int, TransferState]] = []
        for key, body, seq, state in rows:
            t = self._valid("transfers", "transfer_id = ?", key, body, Transfer)
            if t is None:
                continue
            if state in _TRANSFER_STATES and isinstance(seq, int) and 0 <= seq <= MAX_COUNT:
                out.append((t, seq, cast(TransferState, state)))
            else:
                error = f"seq {seq!r} is not a count or state {state!r} not in {_TRANSFER_STATES}"
                self._set_aside("transfers", "transfer_id = ?", (key,), body, error)
        return out

    def prune_transfers(self, keep: int) -> None:
        """Forget all but the newest ``keep`` aborted transfers (active ones stay)."""
        o = self.dialect.order
        self.execute(
            f"DELETE FROM transfers WHERE state = 'aborted' AND {o} NOT IN "
            f"(SELECT {o} FROM transfers WHERE state = 'aborted' ORDER BY {o} DESC LIMIT ?)",
            (keep,),
        )

    # -- security events -------------------------------------------------
    def add_security_event(
        self, reporter: str, peer: str, kind: str, detail: str, keep: int = MAX_STORED_EVENTS
    ) -> None:
        """Record an event; only the newest ``keep`` stay (the table cannot grow without bound).

        A detail longer than ``MAX_TEXT`` (a transfer's failure reason may be) is cut,
        so one page of the log stays small whatever the reports said.
        """
        if len(detail) > MAX_TEXT:
            detail = detail[: MAX_TEXT - 1] + "\u2026"
        row = self.execute(
            "INSERT INTO security_events(at, reporter, peer, kind, detail) "
            "VALUES (?, ?, ?, ?, ?) RETURNING id",
            (time.time(), reporter, peer, kind, detail),
        ).fetchone()
        last = int(row[0])
        if last > keep:
            self.execute("DELETE FROM security_events WHERE id <= ?", (last - keep,))

    def security_events(self) -> list[tuple[float, str, str, str, str]]:
        """Every event kept, as (at, reporter, peer, kind, detail), oldest first."""
        return [row[1:] for row in self.security_event_page()]

    def security_event_page(
        self, *, after: int | None = None, limit: int = -1
    ) -> list[tuple[int, float, str, str, str, str]]:
        """Events as (id, at, reporter, peer, kind, detail), oldest first.

        ``after``: those with a larger id (the next page); None: the newest
        ``limit`` (all when ``limit`` is -1).
        """
        cols = "id, at, reporter, peer, kind, detail"
        bound = self.dialect.no_limit if limit < 0 else limit
        if after is not None:
            rows = self.execute(
                f"SELECT {cols} FROM security_events WHERE id > ? ORDER BY id LIMIT ?",
                (after, bound),
            ).fetchall()
        else:
            rows = self.execute(
                f"SELECT * FROM (SELECT {cols} FROM security_events ORDER BY id DESC LIMIT ?) "
                "AS newest ORDER BY id",
                (bound,),
            ).fetchall()
        return [(int(i), float(a), str(r), str(p), str(k), str(d)) for i, a, r, p, k, d in rows]

    def security_event_count(self) -> int:
        row = self.execute("SELECT count(*) FROM security_events").fetchone()
        return int(row[0])

    # -- rows that fail validation ------------------------------------------
    def _valid_rows(
        self, table: str, column: str, rows: Iterable[tuple[Any, str]], kind: type[T]
    ) -> list[T]:
        out: list[T] = []
        for key, body in rows:
            value = self._valid(table, f"{column} = ?", (key,), body, kind)
            if value is not None:
                out.append(value)
        return out

    def _valid(
        self, table: str, where: str, key: tuple[Any, ...] | Any, body: Any, kind: type[T]
    ) -> T | None:
        """``body`` decoded as ``kind``, or None: then the row is logged and set aside.

        ``where`` selects the row in ``table`` by ``key`` (a tuple for two columns).
        """
        keys = key if isinstance(key, tuple) else (key,)
        try:
            if not isinstance(body, str):
                raise ValueError(f"body is {type(body).__name__}, not JSON text")
            return _load(body, kind)
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError, RecursionError) as e:
            error = str(e)
        self._set_aside(table, where, keys, body, error)
        return None

    def _set_aside(
        self, table: str, where: str, keys: tuple[Any, ...], body: Any, error: str
    ) -> None:
        """Log the row of ``table`` selected by ``where``/``keys`` and move it to ``set_aside``."""
        log.error(
            "stored row is not valid; set aside (see its set_aside row) and not loaded",
            table=table,
            key=":".join(str(k) for k in keys),
            error=error,
        )
        self.execute("BEGIN")
        try:
            self.execute(
                "INSERT INTO set_aside(at, tbl, key, body, error) VALUES (?, ?, ?, ?, ?)",
                (time.time(), table, ":".join(str(k) for k in keys), str(body), error),
            )
            self.execute(f"DELETE FROM {table} WHERE {where}", keys)
            self._commit()
        except BaseException:
            if self.in_transaction:
                self.execute("ROLLBACK")
            raise

    def set_aside(self) -> list[tuple[str, str, str]]:
        """Rows set aside at load, oldest first: (table, key, error)."""
        rows = self.execute("SELECT tbl, key, error FROM set_aside ORDER BY id").fetchall()
        return [(str(t), str(k), str(e)) for t, k, e in rows]


def _dump(obj: msgspec.Struct) -> str:
    return msgspec.json.encode(obj).decode()


def _load(body: str, kind: type[T]) -> T:
    return msgspec.json.decode(body, type=kind)
