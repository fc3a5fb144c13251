"""What the standby-pair fault tests share: start, ask, and watch coordinators on PostgreSQL.

tests/faults/test_coordinator_takeover.py (kill -9 of the leader) and
tests/faults/test_coordinator_database_faults.py (the database restarted, a
leader cut off from it, a leader paused) run ``rbd-coordinator`` processes
(rainbowd.devcluster.coordprocs) on one database and look at them from
outside: ``GET /v1/health`` (role, leader), ``rbd events`` (the
``leader_takeover`` events), their JSON logs, and -- with :class:`WriteAudit`
-- which database role wrote which row.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

from rainbowd.core.lease import LEASE_S, STANDBY_POLL_S
from rainbowd.devcluster.coordprocs import CoordinatorProcess, start_coordinator

#: the takeover after a kill: lease + poll + restore, with room for a loaded machine
TAKEOVER_TIMEOUT_S = 3 * (LEASE_S + STANDBY_POLL_S) + 10
#: seconds between two rounds of :class:`SplitBrainWatch` (a round is two requests): often
#: enough to see a moment of two leaders, rarely enough to leave the processes some CPU
WATCH_PAUSE_S = 0.01
#: seconds one health request may take before the process counts as not answering
HEALTH_TIMEOUT_S = 2.0


def start(
    tmp_path: Path,
    name: str,
    state_url: str,
    tokens: Path,
    listen: str = "127.0.0.1:0",
    extra: tuple[str, ...] = (),
) -> CoordinatorProcess:
    """``rbd-coordinator`` ``name`` on a port of its own; returns once it listens."""
    return start_coordinator(
        tmp_path / name, state_url=state_url, tokens=tokens, listen=listen, extra=extra
    )


def url_of(p: CoordinatorProcess | str) -> str:
    """A coordinator's URL: a process's, or the URL itself (a LocalCluster's coordinator)."""
    return p if isinstance(p, str) else p.url


async def health(http: aiohttp.ClientSession, p: CoordinatorProcess | str) -> dict[str, Any]:
    async with http.get(
        f"{url_of(p)}/v1/health",
        headers={"Accept": "application/json"},
        timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S),
    ) as r:
        assert r.status == 200
        doc: dict[str, Any] = await r.json()
        return doc


async def role_now(
    http: aiohttp.ClientSession, p: CoordinatorProcess | str
) -> tuple[str, str] | None:
    """``(role, leader)`` as ``p`` says now; None while it does not answer (paused, swapping)."""
    try:
        doc = await health(http, p)
    except (aiohttp.ClientError, TimeoutError):
        return None
    return str(doc["role"]), str(doc["leader"])


async def role_of(
    http: aiohttp.ClientSession, p: CoordinatorProcess | str, role: str, leader: str
) -> bool:
    """Whether ``p`` says it has ``role`` under ``leader`` (not while it swaps its listener)."""
    return await role_now(http, p) == (role, leader)


async def takeover_events(
    http: aiohttp.ClientSession, p: CoordinatorProcess, admin: str, by: str
) -> list[Any]:
    """The ``leader_takeover`` events in ``rbd events`` (asked of ``p``) of the leader ``by``."""
    headers = {"Authorization": f"Bearer {admin}", "Accept": "application/json"}
    try:
        async with http.get(f"{p.url}/v1/security-events", headers=headers) as r:
            if r.status != 200:
                return []  # a standby still
            doc = await r.json()
    except aiohttp.ClientConnectionError:
        return []  # swapping the standby's listener for the leader's
    return [e for e in doc["events"] if e["kind"] == "leader_takeover" and e["peer"] == by]


def log_time(record: dict[str, Any]) -> float:
    """A JSON log record's ``timestamp`` (ISO, UTC) as seconds since the epoch."""
    return datetime.fromisoformat(str(record["timestamp"])).timestamp()


class SplitBrainWatch:
    """Asks a pair, over and over, who leads; :attr:`violations` lists every split brain seen.

    Each round asks ``new`` first, then ``old``: once ``new`` has said it leads,
    ``old`` must not say so afterwards (it stops by its own clock before its
    lease can end, and ``new`` leads only after it ended), so a round where both
    say "leader" is two leaders at once, whatever the machine's load. Use as
    ``async with SplitBrainWatch(http, new=b, old=a) as watch:``.
    """

    def __init__(
        self, http: aiohttp.ClientSession, *, new: CoordinatorProcess, old: CoordinatorProcess
    ) -> None:
        self.http, self.new, self.old = http, new, old
        self.rounds = 0
        self.violations: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SplitBrainWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            new = await role_now(self.http, self.new)
            old = await role_now(self.http, self.old)
            self.rounds += 1
            if new is not None and old is not None and new[0] == old[0] == "leader":
                self.violations.append(f"round {self.rounds}: both lead ({new}, {old})")
            await asyncio.sleep(WATCH_PAUSE_S)


#: the audit table and trigger function :class:`WriteAudit` installs (rows, not statements:
#: an UPDATE matching nothing -- a standby's acquire -- writes nothing and is not recorded)
AUDIT_SQL = """
CREATE TABLE IF NOT EXISTS audit_writes (
    n BIGSERIAL PRIMARY KEY, who TEXT NOT NULL, tbl TEXT NOT NULL, op TEXT NOT NULL
);
CREATE OR REPLACE FUNCTION audit_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit_writes (who, tbl, op) VALUES (current_user, TG_TABLE_NAME, TG_OP);
    RETURN NULL;
END $$;
"""


class WriteAudit:
    """Which database role wrote which row of the coordinators' tables (a row trigger each).

    Give each coordinator its own login role (:func:`create_login_role`) and
    this tells their writes apart: a write that committed left a row here; a
    refused or rolled-back one did not. Install it once the coordinators have
    created their tables.
    """

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute(AUDIT_SQL)
        tables = self.conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
            "AND tablename <> 'audit_writes'"
        ).fetchall()
        for (table,) in tables:
            self.conn.execute(
                f'CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON "{table}" '
                "FOR EACH ROW EXECUTE FUNCTION audit_write()"
            )

    def mark(self) -> int:
        """The last write recorded so far: :meth:`writes_by` counts only those after it."""
        (n,) = self.conn.execute("SELECT coalesce(max(n), 0) FROM audit_writes").fetchone() or (0,)
        return int(n)

    def writes_by(self, role: str, after: int = 0) -> list[tuple[str, str]]:
        """``(table, operation)`` of each row ``role`` wrote after the mark ``after``."""
        rows = self.conn.execute(
            "SELECT tbl, op FROM audit_writes WHERE who = %s AND n > %s ORDER BY n",
            (role, after),
        ).fetchall()
        return [(str(t), str(o)) for t, o in rows]

    def close(self) -> None:
        self.conn.close()


def create_login_role(admin_url: str, role: str) -> None:
    """A superuser login role ``role`` (trust authentication): one coordinator's own."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN SUPERUSER')


#: most seconds a terminated backend may take to exit (it is signalled, then exits)
CUT_OFF_TIMEOUT_S = 10.0


def cut_off(admin_url: str, role: str) -> int:
    """Refuse ``role`` new connections and end its open ones; how many were ended.

    The database's side of a leader cut off from it: its renews fail, and every
    reconnect is refused (``role ... is not permitted to log in``).
    """
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'ALTER ROLE "{role}" NOLOGIN')
        ended = conn.execute(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE usename = %s) AS t",
            (role,),
        ).fetchone()
        # pg_terminate_backend only signals: wait until each backend is gone, so nothing
        # the role had under way can still commit once this returns
        deadline = time.monotonic() + CUT_OFF_TIMEOUT_S
        while conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (role,)
        ).fetchone() != (0,):
            if time.monotonic() > deadline:
                raise AssertionError(f"{role}'s backends still run {CUT_OFF_TIMEOUT_S} s after")
            time.sleep(0.01)
    return int(ended[0]) if ended else 0


def reconnect(admin_url: str, role: str) -> None:
    """Let ``role`` log in again (the cut-off coordinator's connection comes back)."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'ALTER ROLE "{role}" LOGIN')
