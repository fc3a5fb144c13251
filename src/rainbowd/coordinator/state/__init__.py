"""Durable coordinator state: one interface, two backends, one schema.

The services reach state only through :class:`StateStore` (their
``ServiceContext.store``), so which database holds it is decided once, at
start-up, by ``open_store`` (state/backends.py):

* SQLite (``state/sqlite.py``), the embedded default: a file in the state
  directory, nothing to install or run (``make demo``). Back it up online with
  ``rbd-coordinator backup``.
* PostgreSQL (``state/postgres.py``, psycopg 3), for clusters that want the
  state off the coordinator's disk and, later, a standby coordinator sharing it
  (issue 16).

Both run the same statements over the same tables (``state/sql.py``), each a
row per node, image and job holding a JSON document of a msgspec struct, so
adding a field (with a default) needs no migration; a change of tables is a
numbered step in each backend's migration list, applied when the store opens.

Why the interface is synchronous: an agent's report is applied in one
transaction that must not await (coordinator/http/report_ids.py: another
request's writes would join it). Writes are small and rare (state transitions,
not progress ticks), so a blocking call from the event loop -- a local file, or
one round trip to a nearby PostgreSQL -- is fast enough and keeps the code obvious.

A stored value can never stop the coordinator from starting: every row is
decoded and validated on its own; one that fails is logged and moved to the
``set_aside`` table for an operator to look at (``state/sql.py``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import urlsplit

import msgspec

from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.messages import (
    Compression,
    ImageRecord,
    ImageSource,
    JobView,
    NodeJobState,
    OpView,
)
from rainbowd.core.sched.records import Transfer
from rainbowd.core.wirebounds import (
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

#: 2: a transfer row is the scheduler's ``Transfer`` as it is (body) plus the coordinator's
#: own columns ``seq`` and ``state``; version 1 kept a field-by-field copy holding both.
#: 3: a transfer's reason (in a transfer row, and in each finished transfer of a job's
#: rows) is a record, rainbowd.core.sched.reasons.TransferReason; version 2 kept text.
#: 4: the ``leader`` table, the lease coordinators sharing one database compete for
#: (coordinator/state/lease.py; SQLite has it too and its one coordinator always holds it).
#: 5: the ``image_manifests`` table, each image's upstream manifest bytes verbatim
#: (issue 17; state/sql.py ``image_manifests_table``): the image row keeps their digests.
#: (SQLite's migration list moves an older database on when it is opened; PostgreSQL
#: starts at 3, the first schema it had.)
SCHEMA_VERSION = 5

#: security events kept (older ones are pruned on insert); see coordinator/limits.py
MAX_STORED_EVENTS = 10_000

#: the file name of the SQLite database inside the state directory
SQLITE_FILE = "coordinator.sqlite"
#: URL schemes of the PostgreSQL backend (libpq accepts both)
POSTGRES_SCHEMES = ("postgresql", "postgres")


class StateError(Exception):
    """The database refused or failed (either backend): the driver's error, named once.

    Callers that must tell "the disk refused" from a bug (report_ids.py keeps a
    report's id in memory when its transaction did not commit) catch this.
    """


class FencedError(StateError):
    """A write of a coordinator whose lease token is no longer the leader's: refused.

    Raised by the PostgreSQL backend's fence (state/postgres.py) before the
    write runs; the coordinator that sees it has been deposed and must stop.
    """


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
    mirror: bool = False  # runs a registry front door: sent catalog-only loads (issue 17)
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
    #: origins that take over, in order, when ``origin`` goes down (coordinator/origin_standby.py);
    #: the one it replaced goes to the end of the list
    standby_origins: list[str] = []


class StateStore(Protocol):
    """What the coordinator keeps durably; both backends implement it (state/sql.py).

    Each write commits on its own unless it runs inside :meth:`transaction`.
    """

    #: "sqlite" or "postgresql" (logs, metrics, the backup command)
    backend: str
    #: a local directory for files kept beside the state (build contexts of ``rbd build``)
    work_dir: Path
    #: where the state is, for logs and errors (a path, or a URL without its password)
    describe: str

    def close(self) -> None: ...
    @property
    def in_transaction(self) -> bool: ...
    def transaction(self) -> AbstractContextManager[None]: ...

    # report ids (coordinator/http/report_ids.py)
    def add_report_id(self, node_id: str, route: str, report_id: str) -> None: ...
    def delete_report_id(self, node_id: str, route: str, report_id: str) -> None: ...
    def has_report_id(self, node_id: str, route: str, report_id: str) -> bool: ...
    def count_report_ids(self, node_id: str) -> int: ...
    def prune_report_ids(self, node_id: str, keep: int) -> None: ...

    # meta (schema version, trust list version)
    def get_meta(self, key: str, default: str = "") -> str: ...
    def set_meta(self, key: str, value: str) -> None: ...

    # nodes, images, jobs, operations
    def save_node(self, node: StoredNode, seq: int) -> None: ...
    def save_seq(self, node_id: str, seq: int) -> None: ...
    def delete_node(self, node_id: str) -> None: ...
    def load_nodes(self) -> list[tuple[StoredNode, int]]: ...
    def save_image(self, image: StoredImage) -> None: ...
    def delete_image(self, ref: str) -> None: ...
    def load_images(self) -> list[StoredImage]: ...
    def save_job(self, job: JobView) -> None: ...
    def save_job_node(self, job_id: str, node: NodeJobState) -> None: ...
    def load_jobs(self) -> list[JobView]: ...
    def save_op(self, op: OpView) -> None: ...
    def load_ops(self) -> list[OpView]: ...
    def prune_ops(self, keep: int) -> None: ...

    # transfers in flight
    def save_transfer(self, t: Transfer, seq: int, state: TransferState = "active") -> None: ...
    def delete_transfer(self, transfer_id: str) -> None: ...
    def load_transfers(self) -> list[tuple[Transfer, int, TransferState]]: ...
    def prune_transfers(self, keep: int) -> None: ...

    # security events
    def add_security_event(
        self, reporter: str, peer: str, kind: str, detail: str, keep: int = MAX_STORED_EVENTS
    ) -> None: ...
    def security_events(self) -> list[tuple[float, str, str, str, str]]: ...
    def security_event_page(
        self, *, after: int | None = None, limit: int = -1
    ) -> list[tuple[int, float, str, str, str, str]]: ...
    def security_event_count(self) -> int: ...

    # rows that failed validation at load
    def set_aside(self) -> list[tuple[str, str, str]]: ...


def check_url(url: str) -> str:
    """``url`` if it names a backend this rbd has, else ValueError saying what would.

    ``sqlite:///ABSOLUTE/PATH`` and ``postgresql://...`` (libpq's URL; a
    password is better kept in a pgpass file or ``PGPASSWORD``).
    """
    scheme = urlsplit(url).scheme
    if scheme in POSTGRES_SCHEMES:
        if "://" not in url:
            raise ValueError(f"state URL {redact(url)!r}: write postgresql://HOST[:PORT]/DBNAME")
        return url
    if scheme == "sqlite":
        if not url.startswith("sqlite:///") or len(url) <= len("sqlite:///"):
            raise ValueError(f"state URL {url!r}: write sqlite:///ABSOLUTE/PATH")
        return url
    if scheme:
        raise ValueError(
            f"state URL {redact(url)!r}: unknown scheme {scheme!r} "
            "(use postgresql://HOST/DB or sqlite:///PATH)"
        )
    raise ValueError(f"state URL {url!r}: use postgresql://HOST/DB or sqlite:///PATH")


def sqlite_file(url: str | None, state_dir: Path) -> Path | None:
    """The SQLite file of a state ``url`` (None: the default one in ``state_dir``), or None.

    None when the URL names PostgreSQL: there is no file to back up.
    """
    if not url:
        return state_dir / SQLITE_FILE
    if check_url(url).startswith("sqlite:"):
        return Path(url.removeprefix("sqlite://"))
    return None


def redact(url: str) -> str:
    """``url`` without its password (it goes to logs and error messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
