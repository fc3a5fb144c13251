"""The leader lease in the database and the fence on writes (coordinator/state/lease.py).

On PostgreSQL, two stores on one database stand for two coordinators: one
takes the lease, the other cannot until it expires; then the other takes it
with the next token and the first one's next write is refused. Time passing
on the database's clock is played by moving ``expires_at`` back (no sleeping).
SQLite's one coordinator always wins its own lease.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from coordinator_support import open_state
from rainbowd.coordinator.state import FencedError, StateError
from rainbowd.coordinator.state.lease import acquire, read_leader, release, renew
from rainbowd.coordinator.state.postgres import IDLE_IN_TRANSACTION_MS, PostgresStore
from rainbowd.coordinator.state.sql import SqlStore
from waiting import wait_until_sync

postgresql_only = pytest.mark.backends("postgresql")
LEASE = 3.0
#: milliseconds an acquire may wait on a lock before the test fails: far over the idle bound
HANG_MS = 4 * IDLE_IN_TRANSACTION_MS


def expire(store: SqlStore) -> None:
    """The lease's time runs out on the database's clock (from a third connection's view)."""
    store.execute_unfenced("UPDATE leader SET expires_at = now() - interval '1 second'")


@postgresql_only
def test_one_store_takes_the_lease_and_the_other_cannot_until_it_expires(tmp_path: Path) -> None:
    a, b = open_state(tmp_path), open_state(tmp_path)  # two coordinators, one database
    try:
        assert read_leader(b).live is False
        assert acquire(a, "a", "http://a:7700", LEASE) == 1
        assert acquire(b, "b", "http://b:7700", LEASE) is None
        row = read_leader(b)
        assert (row.holder, row.url, row.token, row.live) == ("a", "http://a:7700", 1, True)
        assert renew(a, 1, LEASE)
        assert acquire(b, "b", "http://b:7700", LEASE) is None  # renewed: still a's

        expire(a)  # a stopped renewing (dead, cut off, paused)
        assert acquire(b, "b", "http://b:7700", LEASE) == 2
        assert acquire(a, "a", "http://a:7700", LEASE) is None
        row = read_leader(a)
        assert (row.holder, row.url, row.token, row.live) == ("b", "http://b:7700", 2, True)
        assert not renew(a, 1, LEASE)  # a's renew updates no row: deposed
        assert renew(b, 2, LEASE)
    finally:
        a.close()
        b.close()


@postgresql_only
def test_a_deposed_leaders_writes_are_refused_and_the_new_leaders_land(tmp_path: Path) -> None:
    a, b = open_state(tmp_path), open_state(tmp_path)
    assert isinstance(a, PostgresStore) and isinstance(b, PostgresStore)
    fenced: list[str] = []
    a.on_fenced = lambda: fenced.append("a")
    try:
        token = acquire(a, "a", "http://a:7700", LEASE)
        assert token == 1
        a.fence_token = token
        a.set_meta("by", "a")  # an autocommit write, fenced in a transaction of its own
        with a.transaction():
            a.set_meta("in-tx", "a")
        assert b.get_meta("by") == "a" and b.get_meta("in-tx") == "a"

        expire(b)
        b.fence_token = acquire(b, "b", "http://b:7700", LEASE)
        assert b.fence_token == 2

        with pytest.raises(FencedError, match="lease token 1 is stale"):
            a.set_meta("by", "a again")
        with pytest.raises(FencedError):
            with a.transaction():
                a.set_meta("in-tx", "a again")
        with pytest.raises(FencedError):
            a.add_security_event("a", "", "late", "a write of the old leader")
        assert fenced == ["a", "a", "a"]
        assert not a.in_transaction
        assert a.get_meta("by") == "a"  # reads still work; nothing of a's landed
        assert a.security_event_count() == 0
        b.set_meta("by", "b")
        assert a.get_meta("by") == "b"
    finally:
        a.close()
        b.close()


@postgresql_only
def test_a_takeover_waits_for_the_old_leaders_open_transaction(tmp_path: Path) -> None:
    """The fence's share lock: an acquire blocks until the transaction commits, then wins."""
    a, b, watch = open_state(tmp_path), open_state(tmp_path), open_state(tmp_path)
    assert isinstance(a, PostgresStore)
    try:
        a.fence_token = acquire(a, "a", "http://a:7700", LEASE)
        expire(b)
        (b_pid,) = b.execute("SELECT pg_backend_pid()").fetchone()
        taken: list[int | None] = []
        with a.transaction():
            a.set_meta("last", "a")
            thread = threading.Thread(target=lambda: taken.append(acquire(b, "b", "", LEASE)))
            thread.start()
            wait_until_sync(
                lambda: watch.execute(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = ?",
                    (b_pid,),
                ).fetchone()[0],
                timeout=10,
                what="the acquire waiting on the leader's share lock",
            )
            assert taken == []
        thread.join()
        assert taken == [2]
        assert b.get_meta("last") == "a"  # committed before the takeover, never after
        with pytest.raises(FencedError):
            a.set_meta("last", "a again")
    finally:
        for store in (a, b, watch):
            store.close()


@postgresql_only
def test_a_paused_leaders_open_transaction_holds_a_takeover_up_for_one_lease_at_most(
    tmp_path: Path,
) -> None:
    """A leader stopped mid-transaction keeps its share lock only until the server ends it.

    The server ends a session idle in a transaction for longer than the lease
    (``idle_in_transaction_session_timeout``, set on every connection of the
    store): the takeover's acquire then gets the row, and the woken leader's
    transaction fails, so nothing of it lands. (Without the setting the acquire
    waits for as long as the leader sleeps: here, until ``statement_timeout``
    fails the test.)
    """
    a, b = open_state(tmp_path), open_state(tmp_path)
    assert isinstance(a, PostgresStore)
    try:
        (setting,) = a.execute("SHOW idle_in_transaction_session_timeout").fetchone()
        assert setting == f"{IDLE_IN_TRANSACTION_MS // 1000}s"
        a.fence_token = acquire(a, "a", "http://a:7700", LEASE)
        expire(a)  # the lease runs out while a sleeps, its transaction open:
        a.execute("BEGIN")  # the fence's share lock on the lease row, taken
        a.set_meta("last", "a")
        b.execute_unfenced(f"SET statement_timeout = {HANG_MS}")
        assert acquire(b, "b", "http://b:7700", LEASE) == 2  # waited, then won
        with pytest.raises(StateError):
            a.set_meta("last", "a, woken")  # its session is gone with its transaction
        assert b.get_meta("last") == ""  # never written
    finally:
        a.close()
        b.close()


@postgresql_only
def test_release_frees_the_lease_at_once(tmp_path: Path) -> None:
    a, b = open_state(tmp_path), open_state(tmp_path)
    try:
        token = acquire(a, "a", "http://a:7700", LEASE)
        assert token is not None
        release(b, token + 5)  # not the holder's token: nothing happens
        assert acquire(b, "b", "", LEASE) is None
        release(a, token)
        assert acquire(b, "b", "", LEASE) == token + 1
    finally:
        a.close()
        b.close()


@pytest.mark.backends("sqlite")
def test_sqlites_one_coordinator_always_wins_its_lease(tmp_path: Path) -> None:
    store = open_state(tmp_path)
    try:
        assert acquire(store, "run-1", "http://127.0.0.1:7700", LEASE) == 1
        # the same file opened again (a restart) wins at once, live lease or not
        assert acquire(store, "run-2", "http://127.0.0.1:7700", LEASE) == 2
        row = read_leader(store)
        assert (row.holder, row.token, row.live) == ("run-2", 2, True)
        store.set_meta("k", "v")  # no fence on SQLite
        assert store.get_meta("k") == "v"
    finally:
        store.close()
