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

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import structlog
from psycopg import pq

from . import StateError, redact
from .sql import Cursor, Dialect, Migration, SqlStore, add_leader_table

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
#: the advisory lock key held while the schema is created or migrated ("rbd" + "schema")
SCHEMA_LOCK_KEY = 0x7262_6473_6368
#: steps bringing a PostgreSQL database to each schema (it starts at schema 3, the first
#: with a PostgreSQL backend; 4 adds the leader lease)
MIGRATIONS: tuple[Migration, ...] = (Migration(4, add_leader_table),)


class PostgresStore(SqlStore):
    """The coordinator's state in a PostgreSQL database named by a libpq URL."""

    backend = "postgresql"

    def __init__(self, url: str, *, work_dir: Path) -> None:
        super().__init__(DIALECT, work_dir, redact(url))
        self.url = url
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
        try:
            conn = psycopg.connect(self.url, **kwargs)
            if "synchronous_commit" not in self.url:
                conn.execute("SET synchronous_commit = off")
            return conn
        except psycopg.Error as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise StateError(f"cannot connect to PostgreSQL at {self.describe}: {reason}") from e

    def _lock_schema(self) -> None:
        self.execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK_KEY,))

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
