"""The PostgreSQL state backend (psycopg 3): the state off the coordinator's disk.

For clusters that keep their state in a database server they already run
and back up, and the ground a standby coordinator will stand on (issue 16).
One connection in autocommit mode, used synchronously like SQLite's (see the
package docstring for why): a statement is one round trip to a server that
should be near the coordinator.

What differs from SQLite, and how it is handled:

* A statement that fails inside a transaction aborts it (SQLite keeps the
  writes before it). The COMMIT of such a transaction is refused here with
  StateError, as SQLite's failed COMMIT is: the caller learns that nothing
  was written (report_ids.py keeps the report's id in memory).
* The connection can break (the server restarted, a network cut). The next
  statement outside a transaction opens a new one; a statement inside one
  fails, since its transaction is gone.
* Two coordinators may start against one database: the schema is created and
  migrated under a transaction-scoped advisory lock, so it happens once.
* Fencing (issue 16): once the coordinator leads, :attr:`PostgresStore.fence_token`
  is its lease token, and every write transaction first runs ``SELECT 1 FROM
  leader WHERE id = 1 AND token = $token FOR SHARE``; a write outside a
  transaction (``INSERT``/``UPDATE``/``DELETE`` in autocommit) becomes a
  transaction for that. A stale token refuses the write (:class:`FencedError`,
  nothing written) and calls :attr:`PostgresStore.on_fenced`. The share lock
  makes a takeover's acquire wait for the commit, so no write of the old leader
  lands after another took the lease, even on a connection that never broke.
  The lease statements themselves are unfenced (state/lease.py).
* A transaction idle for longer than the lease ends the session
  (``idle_in_transaction_session_timeout``, :data:`IDLE_IN_TRANSACTION_MS`): the
  store never holds one open across an await, so only a paused process's can
  linger, and its share lock on the lease row must not hold a takeover up for
  longer than the lease. A URL that sets it itself keeps its own.
* A network that drops packets fails a statement within about a lease
  (:data:`NETWORK_CUT_SETTINGS`: libpq's ``tcp_user_timeout`` and keepalives)
  instead of freezing the event loop until TCP gives up.
* A commit does not wait for the server's disk (``synchronous_commit = off``
  for this session): the store is called from the event loop, and a WAL flush
  per commit stalled every request behind it (bench/coordinator_load.py, 100
  agents, swarm, a busy 2-core machine: the job took 26-31 s with a flush per
  commit, 12-16 s without, 12-13 s on SQLite; heartbeat p50 during it 0.8-0.9 s
  against 20-250 ms). It is the durability of SQLite's
  ``synchronous=NORMAL``: a crash of the database server (not of the
  coordinator) may lose the last fraction of a second of commits, whole ones,
  never half of one. A URL that sets ``synchronous_commit`` itself (``options=-c
  synchronous_commit=on``) keeps its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
import structlog
from psycopg import pq

from rainbowd.core.lease import LEASE_S

from . import FencedError, StateError, redact
from .sql import Cursor, Dialect, Migration, SqlStore, add_image_manifests_table, add_leader_table

log = structlog.get_logger(__name__)

DIALECT = Dialect(
    name="postgresql",
    serial_key="BIGSERIAL PRIMARY KEY",
    real="DOUBLE PRECISION",
    integer="BIGINT",
    order="n",
    order_column=", n BIGSERIAL",
    no_limit=None,
    placeholder="%s",
    timestamp="TIMESTAMPTZ",
    now="now()",
    plus_seconds="now() + make_interval(secs => ?)",
    epoch="'epoch'::timestamptz",
)
#: seconds to wait for the server when connecting (libpq's own default waits for ever);
#: a URL's own ``connect_timeout`` wins
CONNECT_TIMEOUT_S = 10
#: milliseconds a transaction of ours may sit idle before the server ends the session: the
#: lease. A leader paused mid-transaction (SIGSTOP, a frozen VM) holds the fence's share
#: lock on the lease row, and a takeover's acquire waits on that lock: without a bound it
#: waits until the paused process wakes, however long. With it, the lock goes at most one
#: lease after the pause, and the woken leader's transaction fails (nothing of it lands)
IDLE_IN_TRANSACTION_MS = int(LEASE_S * 1000)
#: libpq settings that bound how long a statement can wait on a network that drops the
#: packets (a cut link, not a refused one): the store is called from the event loop, so a
#: statement that waits for TCP's own give-up (~15 min) would freeze the coordinator -- its
#: health silent, its standby role unsaid -- long after its lease ended. Data unacknowledged
#: for a lease, or a connection whose keepalives go unanswered for about a lease, fails the
#: statement (StateError); the lease logic then steps down as for any unreachable database.
#: A URL that sets one of them itself keeps its own.
NETWORK_CUT_SETTINGS: dict[str, int] = {
    "tcp_user_timeout": int(LEASE_S * 1000),  # ms data may go unacknowledged
    "keepalives": 1,
    "keepalives_idle": 1,  # s of silence before the first probe
    "keepalives_interval": 1,  # s between probes
    "keepalives_count": max(1, int(LEASE_S) - 1),  # probes lost before the link is dead
}
#: the advisory lock key held while the schema is created or migrated ("rbd" + "schema")
SCHEMA_LOCK_KEY = 0x7262_6473_6368
#: the statements that write (a write outside a transaction is fenced in one of its own)
WRITES = ("INSERT", "UPDATE", "DELETE")
#: steps bringing a PostgreSQL database to each schema (it starts at schema 3, the first
#: with a PostgreSQL backend; 4 adds the leader lease)
MIGRATIONS: tuple[Migration, ...] = (
    Migration(4, add_leader_table),
    Migration(5, add_image_manifests_table),
)


class PostgresStore(SqlStore):
    """The coordinator's state in a PostgreSQL database named by a libpq URL."""

    backend = "postgresql"

    def __init__(self, url: str, *, work_dir: Path) -> None:
        super().__init__(DIALECT, work_dir, redact(url))
        self.url = url
        #: the lease token writes are fenced with (None: not fenced; a standby writes nothing)
        self.fence_token: int | None = None
        #: called when the fence refuses a write (the coordinator steps down at once)
        self.on_fenced: Callable[[], None] | None = None
        self._conn = self._connect()
        try:
            self.migrate(MIGRATIONS, before=self._lock_schema)
        except BaseException:
            self._conn.close()
            raise

    def _connect(self) -> psycopg.Connection[Any]:
        kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in self.url:
            kwargs["connect_timeout"] = CONNECT_TIMEOUT_S
        for key, value in NETWORK_CUT_SETTINGS.items():
            if key not in self.url:
                kwargs[key] = value
        try:
            conn = psycopg.connect(self.url, **kwargs)
            if "synchronous_commit" not in self.url:
                conn.execute("SET synchronous_commit = off")
            if "idle_in_transaction_session_timeout" not in self.url:
                conn.execute(f"SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_MS}")
            return conn
        except psycopg.Error as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise StateError(f"cannot connect to PostgreSQL at {self.describe}: {reason}") from e

    def _lock_schema(self) -> None:
        self.execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK_KEY,))

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """Run ``sql``; while fenced, a transaction starts with the token check (see above)."""
        if self.fence_token is None:
            return super().execute(sql, params)
        if sql == "BEGIN":
            cursor = super().execute(sql, params)
            self._check_fence(self.fence_token)
            return cursor
        if not self.in_transaction and sql.lstrip()[:6].upper() in WRITES:
            with self.transaction():
                return super().execute(sql, params)
        return super().execute(sql, params)

    def _check_fence(self, token: int) -> None:
        """In the transaction just begun: lock the lease row if ``token`` still holds it.

        Otherwise roll back and raise FencedError; the transaction never writes.
        """
        try:
            row = (
                super()
                .execute("SELECT 1 FROM leader WHERE id = 1 AND token = ? FOR SHARE", (token,))
                .fetchone()
            )
        except BaseException:
            if self.in_transaction:
                super().execute("ROLLBACK")
            raise
        if row is None:
            super().execute("ROLLBACK")
            log.error("write refused: this coordinator's lease was taken", token=token)
            if self.on_fenced is not None:
                self.on_fenced()
            raise FencedError(
                f"state database {self.describe}: write refused, lease token {token} is "
                "stale (another coordinator leads)"
            )

    def _execute(self, sql: str, params: Sequence[Any]) -> Cursor:
        if self._conn.closed:
            log.warning("state database connection lost; connecting again", state=self.describe)
            self._conn = self._connect()
        return self._conn.execute(sql, params or None)

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        return (psycopg.Error,)

    def _has_meta(self) -> bool:
        row = self.execute("SELECT to_regclass('meta')").fetchone()
        return row is not None and row[0] is not None

    @property
    def in_transaction(self) -> bool:
        if self._conn.closed:
            return False
        return self._conn.info.transaction_status != pq.TransactionStatus.IDLE

    def _commit(self) -> None:
        if self._conn.info.transaction_status == pq.TransactionStatus.INERROR:
            self.execute("ROLLBACK")
            raise StateError(
                f"state database {self.describe}: a statement failed, so the transaction "
                "was rolled back"
            )
        self.execute("COMMIT")

    def close(self) -> None:
        self._conn.close()
