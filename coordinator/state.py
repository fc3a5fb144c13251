"""Durable coordinator state in SQLite (WAL mode).

One row per node, image and job, each a JSON document of a msgspec struct, so
adding a field (with a default) needs no migration. While a job runs, a change
of one of its nodes is written as that node's own row (``job_nodes``), applied
over the job's row on load: rewriting the whole job per report costs O(nodes)
each time, O(nodes^2) per job. Writes are small and rare
(state transitions, not progress ticks), so the stdlib driver called from the
event loop is fast enough and keeps the code obvious.

Transfers in flight are stored too (one row written when it is assigned, one
delete when its report arrives): agents keep pulling while the coordinator is
away, so a restarted coordinator must know them -- to lock their seeder and
demander again (no second transfer of a layer a node is still pulling) and to
understand their late done/failed reports. Rows whose transfer the
coordinator gave up on (``aborted``) are kept, bounded, for late reports.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Literal, TypeVar

import msgspec

from rainbowd.chunks import ChunkManifest
from rainbowd.messages import Compression, ImageRecord, ImageSource, JobView, NodeJobState, OpView

T = TypeVar("T")

SCHEMA_VERSION = 1


class StoredNode(msgspec.Struct, kw_only=True):
    """A node as persisted: identity, keys, the credential's hash, what it holds."""

    node_id: str
    address: str
    ssh_port: int
    host_key: str
    client_key: str
    credential_hash: str
    labels: dict[str, str] = {}
    roles: list[str] = []
    docker: bool = False
    speed_hint_bps: float = 0.0
    holdings: list[str] = []
    quarantined: bool = False
    quarantine_reason: str = ""
    registered_at: float = 0.0
    last_seen: float = 0.0
    seeder_faults: int = 0  # transfers it spoiled (bad chunks); quarantined at the limit
    max_upload_bps: float = 0.0  # the agent's configured caps (0 = none)
    max_download_bps: float = 0.0


class StoredTransfer(msgspec.Struct, kw_only=True):
    """A transfer handed to a demander and not yet reported on (or given up on)."""

    transfer_id: str
    layer: str
    seeder: str
    demander: str
    job_id: str
    started_at: float
    reason: str
    seeder_speed_bps: float
    seq: int = 0  # its place in the demander's mailbox: delivered once the cursor passes it
    state: Literal["active", "aborted"] = "active"
    #: the piece it moves, chunks [first_chunk, end_chunk); end_chunk 0 = the whole layer
    #: (rows written before pieces existed decode to the whole layer, as they meant)
    first_chunk: int = 0
    end_chunk: int = 0


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
CREATE TABLE IF NOT EXISTS transfers (transfer_id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS security_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, reporter TEXT NOT NULL,
    peer TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ops (op_id TEXT PRIMARY KEY, created_at REAL, body TEXT NOT NULL);
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
        self._db.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
        )

    def close(self) -> None:
        self._db.close()

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
        rows = self._db.execute("SELECT body, seq FROM nodes ORDER BY node_id").fetchall()
        return [(_load(body, StoredNode), int(seq)) for body, seq in rows]

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
        rows = self._db.execute("SELECT body FROM images ORDER BY ref").fetchall()
        return [_load(body, StoredImage) for (body,) in rows]

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
        rows = self._db.execute("SELECT body FROM jobs ORDER BY created_at, job_id").fetchall()
        views = [_load(body, JobView) for (body,) in rows]
        newer: dict[str, dict[str, NodeJobState]] = {}
        for job_id, body in self._db.execute("SELECT job_id, body FROM job_nodes"):
            ns = _load(body, NodeJobState)
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
        rows = self._db.execute("SELECT body FROM ops ORDER BY created_at, op_id").fetchall()
        return [_load(body, OpView) for (body,) in rows]

    def prune_ops(self, keep: int) -> None:
        """Forget all but the newest ``keep`` operations."""
        self._db.execute(
            "DELETE FROM ops WHERE op_id IN (SELECT op_id FROM ops "
            "ORDER BY created_at DESC, op_id DESC LIMIT -1 OFFSET ?)",
            (keep,),
        )

    # -- transfers in flight ----------------------------------------------
    def save_transfer(self, t: StoredTransfer) -> None:
        self._db.execute(
            "INSERT INTO transfers(transfer_id, body) VALUES (?, ?) "
            "ON CONFLICT(transfer_id) DO UPDATE SET body = excluded.body",
            (t.transfer_id, _dump(t)),
        )

    def delete_transfer(self, transfer_id: str) -> None:
        self._db.execute("DELETE FROM transfers WHERE transfer_id = ?", (transfer_id,))

    def load_transfers(self) -> list[StoredTransfer]:
        rows = self._db.execute("SELECT body FROM transfers ORDER BY rowid").fetchall()
        return [_load(body, StoredTransfer) for (body,) in rows]

    def prune_transfers(self, keep: int) -> None:
        """Forget all but the newest ``keep`` aborted transfers (active ones stay)."""
        self._db.execute(
            "DELETE FROM transfers WHERE rowid IN (SELECT rowid FROM transfers "
            "WHERE json_extract(body, '$.state') = 'aborted' "
            "ORDER BY rowid DESC LIMIT -1 OFFSET ?)",
            (keep,),
        )

    # -- security events -------------------------------------------------
    def add_security_event(self, reporter: str, peer: str, kind: str, detail: str) -> None:
        self._db.execute(
            "INSERT INTO security_events(at, reporter, peer, kind, detail) VALUES (?, ?, ?, ?, ?)",
            (time.time(), reporter, peer, kind, detail),
        )

    def security_events(self) -> list[tuple[float, str, str, str, str]]:
        rows = self._db.execute(
            "SELECT at, reporter, peer, kind, detail FROM security_events ORDER BY id"
        ).fetchall()
        return [(float(a), str(r), str(p), str(k), str(d)) for a, r, p, k, d in rows]


def _dump(obj: msgspec.Struct) -> str:
    return msgspec.json.encode(obj).decode()


def _load(body: str, kind: type[T]) -> T:
    return msgspec.json.decode(body, type=kind)
