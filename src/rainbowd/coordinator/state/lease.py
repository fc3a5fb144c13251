"""The leader lease's statements: acquire, renew, release, read (the table: schema 4).

Coordinators sharing one PostgreSQL compete for the one row of ``leader``; the
design is in docs/standby-coordinator.md ("Leader election"), the decisions of when to
run these in rainbowd.core.lease, and the process around them in
coordinator/http/leadership.py. Times are the database's own clock
(``now()``), so the hosts' clocks never meet.

* :func:`acquire` takes the row if its lease has expired, with the next token;
  the row lock makes it atomic, so of standbys trying at once one wins.
* :func:`renew` extends the lease of the token we hold; no row updated means
  another coordinator took it (deposed).
* :func:`release` ends our lease at once (a clean shutdown), so a standby
  takes over at its next poll instead of after the lease.

These run outside the fence (``execute_unfenced``): a standby has no token to
check, and a deposed leader must still be able to ask.

SQLite: one file has one coordinator, so its acquire always wins (it does not
wait for the lease of a previous run of itself to end) and the coordinator
never runs as a standby; the row is written all the same, so ``/v1/health``
and the tests read it the same way on both backends.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sql import SqlStore


@dataclass(frozen=True)
class LeaderRow:
    """Who holds the lease: ``live`` is False once it has expired on the database's clock."""

    holder: str
    url: str
    token: int
    live: bool


def acquire(store: SqlStore, holder: str, url: str, lease_s: float) -> int | None:
    """Take the lease for ``lease_s`` seconds if it is free; the new token, or None if held."""
    d = store.dialect
    free = "" if store.backend == "sqlite" else f" AND expires_at < {d.now}"
    row = store.execute_unfenced(
        f"UPDATE leader SET holder = ?, url = ?, token = token + 1, "
        f"expires_at = {d.plus_seconds} WHERE id = 1{free} RETURNING token",
        (holder, url, lease_s),
    ).fetchone()
    return None if row is None else int(row[0])


def renew(store: SqlStore, token: int, lease_s: float) -> bool:
    """Extend the lease of ``token`` by ``lease_s`` from now; False: another holds it (deposed)."""
    row = store.execute_unfenced(
        f"UPDATE leader SET expires_at = {store.dialect.plus_seconds} "
        "WHERE id = 1 AND token = ? RETURNING token",
        (lease_s, token),
    ).fetchone()
    return row is not None


def release(store: SqlStore, token: int) -> None:
    """End the lease of ``token`` now (nothing if it is no longer ours)."""
    store.execute_unfenced(
        f"UPDATE leader SET expires_at = {store.dialect.epoch} WHERE id = 1 AND token = ?",
        (token,),
    )


def read_leader(store: SqlStore) -> LeaderRow:
    """The lease row as it is now."""
    row = store.execute_unfenced(
        f"SELECT holder, url, token, expires_at > {store.dialect.now} FROM leader WHERE id = 1"
    ).fetchone()
    if row is None:  # (schema 4 writes the row; only a hand-edited database lacks it)
        return LeaderRow(holder="", url="", token=0, live=False)
    holder, url, token, live = row
    return LeaderRow(holder=str(holder), url=str(url), token=int(token), live=bool(live))
