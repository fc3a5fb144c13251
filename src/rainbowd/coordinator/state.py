"""Durable coordinator state in SQLite (WAL mode).

One row per node, image and job, each a JSON document of a msgspec struct, so
adding a field (with a default) needs no migration. While a job runs, a change
of one of its nodes is written as that node's own row (``job_nodes``), applied
over the job's row on load: rewriting the whole job per report costs O(nodes)
each time, O(nodes^2) per job. Writes are small and rare
(state transitions, not progress ticks), so the stdlib driver called from the
event loop is fast enough and keeps the code obvious. Each statement commits
on its own unless it runs inside :meth:`StateStore.transaction`: an agent's
report (or batch of reports) is one transaction, so its writes -- and the
report id that guards them (coordinator/http/report_ids.py) -- land together or not
at all, for one WAL commit instead of one per statement.

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
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import msgspec
import structlog

from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.messages import (
    Compression,
    ImageRecord,
    ImageSource,
    JobView,
    NodeJobState,
    OpView,
)
from rainbowd.core.sched.reasons import TransferReason
from rainbowd.core.sched.records import Transfer
from rainbowd.core.wirebounds import (
    MAX_COUNT,
    MAX_TEXT,
    Count,
    Digest,
    Finite,
    Labels,
    Name,
    Port,
    Rate,
    Roles,
    SshKey,
)

log = structlog.get_logger(__name__)

#: security events kept (older ones are pruned on insert); see coordinator/limits.py
MAX_STORED_EVENTS = 10_000

T = TypeVar("T")

#: 2: a transfer row is the scheduler's ``Transfer`` as it is (body) plus the coordinator's
#: own columns ``seq`` and ``state``; version 1 kept a field-by-field copy holding both.
#: 3: a transfer's reason (in a transfer row, and in each finished transfer of a job's
#: rows) is a record, rainbowd.core.sched.reasons.TransferReason; version 2 kept text.
#: (``_migrate`` moves an older database on when it is opened.)
SCHEMA_VERSION = 3
#: tables whose JSON bodies hold transfer reasons, and where (schema 3: ``_reasons_to_v3``)
_REASON_TABLES = ("transfers", "jobs", "job_nodes")


class StoredNode(msgspec.Struct, kw_only=True):
    """A node as persisted: identity, keys, the credential's hash, what it holds."""

    node_id: Name
    address: Name
    ssh_port: Port
    host_key: SshKey
    client_key: SshKey
    credential_hash: Name
    labels: Labels = {}
    roles: Roles = []
    docker: bool = False
    containerd: bool = False  # a load target beside Docker (absent in older rows: False)
    speed_hint_bps: Rate = 0.0
    download_hint_bps: Rate = 0.0
    holdings: list[Digest] = []  # only layers of known images (bounded by them)
    quarantined: bool = False
    quarantine_reason: str = ""
    registered_at: Finite = 0.0
    last_seen: Finite = 0.0
    seeder_faults: Count = 0  # transfers it spoiled (bad chunks); quarantined at the limit
    max_upload_bps: Rate = 0.0  # the agent's configured caps (0 = none)
    max_download_bps: Rate = 0.0


#: a stored transfer's own column: ``active`` (handed to its demander, not reported on) or
#: ``aborted`` (given up on; kept, bounded, so its late report is understood)
TransferState = Literal["active", "aborted"]
_TRANSFER_STATES: tuple[TransferState, ...] = ("active", "aborted")


class StoredImage(msgspec.Struct, kw_only=True):
    """An image entry: where it came from, its ingest state and, once ready, its layers."""

    ref: str
    state: Literal["ingesting", "ready", "failed"]
    source: ImageSource
    origin: str
    ingest_id: str
    created_at: float
    record: ImageRecord | None = None
    manifests: list[ChunkManifest] = []
    error: str = ""
    compression: Compression = "off"  # asked of the origin for uncompressed layers


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY, body TEXT NOT NULL, seq INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS images (ref TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, created_at REAL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS job_nodes (
    job_id TEXT NOT NULL, node_id TEXT NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (job_id, node_id));
CREATE TABLE IF NOT EXISTS transfers (
    transfer_id TEXT PRIMARY KEY, body TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL DEFAULT 'active');
CREATE TABLE IF NOT EXISTS security_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, reporter TEXT NOT NULL,
    peer TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ops (op_id TEXT PRIMARY KEY, created_at REAL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS applied_reports (
    node_id TEXT NOT NULL, route TEXT NOT NULL, report_id TEXT NOT NULL,
    PRIMARY KEY (node_id, route, report_id));
CREATE TABLE IF NOT EXISTS set_aside (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, tbl TEXT NOT NULL,
    key TEXT NOT NULL, body TEXT NOT NULL, error TEXT NOT NULL);
"""


class StateStore:
    """The coordinator's SQLite database (``coordinator.sqlite`` in the state dir)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit; WAL makes it cheap
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._migrate()
        self._db.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
        )

    def _migrate(self) -> None:
        """Bring a database written by an older rbd to ``SCHEMA_VERSION``, a step at a time.

        Version 1 -> 2: its transfer rows kept ``seq`` and ``state`` inside the JSON
        body; they become columns (the body's other fields are the ``Transfer``'s, and
        the two extra keys left in old bodies are ignored when decoding). A body that
        is not JSON keeps the defaults here and is set aside when loaded, as before.

        Version 2 -> 3: :meth:`_reasons_to_v3`. Each step is one transaction.
        """
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(transfers)")}
        if "seq" not in columns:
            self._to_v2()
        stored = self.get_meta("schema")  # "" in a new file: nothing in it to migrate
        if stored and stored.isdigit() and int(stored) < 3:
            self._reasons_to_v3()

    def _to_v2(self) -> None:
        with self.transaction():
            self._db.execute("ALTER TABLE transfers ADD COLUMN seq INTEGER NOT NULL DEFAULT 0")
            self._db.execute(
                "ALTER TABLE transfers ADD COLUMN state TEXT NOT NULL DEFAULT 'active'"
            )
            self._db.execute(
                "UPDATE transfers SET "
                "seq = coalesce(json_extract(body, '$.seq'), 0), "
                "state = coalesce(json_extract(body, '$.state'), 'active') "
                "WHERE json_valid(body)"
            )
            self.set_meta("schema", "2")
        log.info("state database migrated", path=str(self.path), schema=2)

    def _reasons_to_v3(self) -> None:
        """Version 2 -> 3: every transfer reason stored as text becomes a legacy record.

        The text is kept as it was (``TransferReason.legacy``: rule ``legacy``, the
        text), in transfer rows (``$.reason``), jobs (``$.nodes[*].transfers[*].reason``)
        and job nodes (``$.transfers[*].reason``). A body that is not JSON, or not the
        shape expected, is left as it is; loading sets it aside, as for any bad row.
        """
        with self.transaction():
            for table in _REASON_TABLES:
                rows = self._db.execute(f"SELECT rowid, body FROM {table}").fetchall()
                for rowid, body in rows:
                    new = _reasons_as_records(table, body)
                    if new is not None:
                        self._db.execute(
                            f"UPDATE {table} SET body = ? WHERE rowid = ?", (new, rowid)
                        )
            self.set_meta("schema", "3")
        log.info("state database migrated", path=str(self.path), schema=3)

    def close(self) -> None:
        self._db.close()

    @property
    def in_transaction(self) -> bool:
        return self._db.in_transaction

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Every write inside commits once, at the end (a write outside commits on its own).

        Inside one already open, it joins it. What was written is committed also
        when the body raises (a refusal after some writes): the changes in memory
        that those writes mirror have happened, as with statements that commit
        one by one. Only a failed COMMIT rolls back, and raises. The body must
        not await: another request's writes would join, and be answered before
        they are committed.
        """
        if self._db.in_transaction:
            yield
            return
        self._db.execute("BEGIN")
        try:
            yield
        finally:
            if self._db.in_transaction:  # (SQLite ends it itself on some errors)
                try:
                    self._db.execute("COMMIT")
                except sqlite3.Error:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                    raise

    # -- report ids (coordinator/http/report_ids.py) ----------------------------
    def add_report_id(self, node_id: str, route: str, report_id: str) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO applied_reports(node_id, route, report_id) VALUES (?, ?, ?)",
            (node_id, route, report_id),
        )

    def delete_report_id(self, node_id: str, route: str, report_id: str) -> None:
        self._db.execute(
            "DELETE FROM applied_reports WHERE node_id = ? AND route = ? AND report_id = ?",
            (node_id, route, report_id),
        )

    def has_report_id(self, node_id: str, route: str, report_id: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM applied_reports WHERE node_id = ? AND route = ? AND report_id = ?",
            (node_id, route, report_id),
        ).fetchone()
        return row is not None

    def count_report_ids(self, node_id: str) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM applied_reports WHERE node_id = ?", (node_id,)
        ).fetchone()
        return int(row[0])

    def prune_report_ids(self, node_id: str, keep: int) -> None:
        """Forget all but the newest ``keep`` report ids of ``node_id``."""
        self._db.execute(
            "DELETE FROM applied_reports WHERE node_id = ? AND rowid NOT IN "
            "(SELECT rowid FROM applied_reports WHERE node_id = ? ORDER BY rowid DESC LIMIT ?)",
            (node_id, node_id, keep),
        )

    # -- meta ------------------------------------------------------------
    def get_meta(self, key: str, default: str = "") -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else default

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # -- nodes -----------------------------------------------------------
    def save_node(self, node: StoredNode, seq: int) -> None:
        self._db.execute(
            "INSERT INTO nodes(node_id, body, seq) VALUES (?, ?, ?) "
            "ON CONFLICT(node_id) DO UPDATE SET body = excluded.body, seq = excluded.seq",
            (node.node_id, _dump(node), seq),
        )

    def save_seq(self, node_id: str, seq: int) -> None:
        self._db.execute("UPDATE nodes SET seq = ? WHERE node_id = ?", (seq, node_id))

    def delete_node(self, node_id: str) -> None:
        self._db.execute("DELETE FROM nodes WHERE node_id = ?", (node_id,))

    def load_nodes(self) -> list[tuple[StoredNode, int]]:
        rows = self._db.execute("SELECT node_id, body, seq FROM nodes ORDER BY node_id")
        out: list[tuple[StoredNode, int]] = []
        for key, body, seq in rows.fetchall():
            node = self._valid("nodes", "node_id = ?", key, body, StoredNode)
            if node is not None:
                out.append((node, int(seq)))
        return out

    # -- images ----------------------------------------------------------
    def save_image(self, image: StoredImage) -> None:
        self._db.execute(
            "INSERT INTO images(ref, body) VALUES (?, ?) "
            "ON CONFLICT(ref) DO UPDATE SET body = excluded.body",
            (image.ref, _dump(image)),
        )

    def delete_image(self, ref: str) -> None:
        self._db.execute("DELETE FROM images WHERE ref = ?", (ref,))

    def load_images(self) -> list[StoredImage]:
        rows = self._db.execute("SELECT ref, body FROM images ORDER BY ref").fetchall()
        return self._valid_rows("images", "ref", rows, StoredImage)

    # -- jobs ------------------------------------------------------------
    def save_job(self, job: JobView) -> None:
        """The whole job; it supersedes the per-node rows written since."""
        self._db.execute(
            "INSERT INTO jobs(job_id, created_at, body) VALUES (?, ?, ?) "
            "ON CONFLICT(job_id) DO UPDATE SET body = excluded.body",
            (job.job_id, job.created_at, _dump(job)),
        )
        self._db.execute("DELETE FROM job_nodes WHERE job_id = ?", (job.job_id,))

    def save_job_node(self, job_id: str, node: NodeJobState) -> None:
        """One node's part of a running job (a small row instead of rewriting the job)."""
        self._db.execute(
            "INSERT INTO job_nodes(job_id, node_id, body) VALUES (?, ?, ?) "
            "ON CONFLICT(job_id, node_id) DO UPDATE SET body = excluded.body",
            (job_id, node.node_id, _dump(node)),
        )

    def load_jobs(self) -> list[JobView]:
        """Every job, with the per-node rows saved after its last whole write applied."""
        rows = self._db.execute("SELECT job_id, body FROM jobs ORDER BY created_at, job_id")
        views = self._valid_rows("jobs", "job_id", rows.fetchall(), JobView)
        newer: dict[str, dict[str, NodeJobState]] = {}
        part_rows = self._db.execute("SELECT job_id, node_id, body FROM job_nodes").fetchall()
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
        self._db.execute(
            "INSERT INTO ops(op_id, created_at, body) VALUES (?, ?, ?) "
            "ON CONFLICT(op_id) DO UPDATE SET body = excluded.body",
            (op.op_id, op.created_at, _dump(op)),
        )

    def load_ops(self) -> list[OpView]:
        rows = self._db.execute("SELECT op_id, body FROM ops ORDER BY created_at, op_id")
        return self._valid_rows("ops", "op_id", rows.fetchall(), OpView)

    def prune_ops(self, keep: int) -> None:
        """Forget all but the newest ``keep`` operations."""
        self._db.execute(
            "DELETE FROM ops WHERE op_id IN (SELECT op_id FROM ops "
            "ORDER BY created_at DESC, op_id DESC LIMIT -1 OFFSET ?)",
            (keep,),
        )

    # -- transfers in flight ----------------------------------------------
    def save_transfer(self, t: Transfer, seq: int, state: TransferState = "active") -> None:
        """Persist ``t`` as it is, with the coordinator's own ``seq`` and ``state`` beside it.

        ``seq``: its assignment's place in the demander's mailbox (delivered once the
        agent's cursor passes it).
        """
        self._db.execute(
            "INSERT INTO transfers(transfer_id, body, seq, state) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(transfer_id) DO UPDATE SET "
            "body = excluded.body, seq = excluded.seq, state = excluded.state",
            (t.transfer_id, _dump(t), seq, state),
        )

    def delete_transfer(self, transfer_id: str) -> None:
        self._db.execute("DELETE FROM transfers WHERE transfer_id = ?", (transfer_id,))

    def load_transfers(self) -> list[tuple[Transfer, int, TransferState]]:
        """Every stored transfer as (transfer, seq, state), oldest first; bad rows set aside."""
        rows = self._db.execute(
            "SELECT transfer_id, body, seq, state FROM transfers ORDER BY rowid"
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
        self._db.execute(
            "DELETE FROM transfers WHERE rowid IN (SELECT rowid FROM transfers "
            "WHERE state = 'aborted' "
            "ORDER BY rowid DESC LIMIT -1 OFFSET ?)",
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
        cur = self._db.execute(
            "INSERT INTO security_events(at, reporter, peer, kind, detail) VALUES (?, ?, ?, ?, ?)",
            (time.time(), reporter, peer, kind, detail),
        )
        if cur.lastrowid is not None and cur.lastrowid > keep:
            self._db.execute("DELETE FROM security_events WHERE id <= ?", (cur.lastrowid - keep,))

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
        if after is not None:
            rows = self._db.execute(
                f"SELECT {cols} FROM security_events WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit),
            ).fetchall()
        else:
            rows = self._db.execute(
                f"SELECT * FROM (SELECT {cols} FROM security_events ORDER BY id DESC LIMIT ?) "
                "ORDER BY id",
                (limit,),
            ).fetchall()
        return [(int(i), float(a), str(r), str(p), str(k), str(d)) for i, a, r, p, k, d in rows]

    def security_event_count(self) -> int:
        row = self._db.execute("SELECT count(*) FROM security_events").fetchone()
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
        self._db.execute("BEGIN")
        try:
            self._db.execute(
                "INSERT INTO set_aside(at, tbl, key, body, error) VALUES (?, ?, ?, ?, ?)",
                (time.time(), table, ":".join(str(k) for k in keys), str(body), error),
            )
            self._db.execute(f"DELETE FROM {table} WHERE {where}", keys)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def set_aside(self) -> list[tuple[str, str, str]]:
        """Rows set aside at load, oldest first: (table, key, error)."""
        rows = self._db.execute("SELECT tbl, key, error FROM set_aside ORDER BY id").fetchall()
        return [(str(t), str(k), str(e)) for t, k, e in rows]


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


def _dump(obj: msgspec.Struct) -> str:
    return msgspec.json.encode(obj).decode()


def _load(body: str, kind: type[T]) -> T:
    return msgspec.json.decode(body, type=kind)
