"""What each state backend does when its database misbehaves (coordinator/state/).

Both: a transaction whose COMMIT the database refuses raises StateError and
keeps none of its writes. PostgreSQL alone: a statement that fails inside a
transaction aborts it, so its COMMIT is refused too (the caller must not think
the earlier writes landed); a connection the server dropped (a restart, a
network cut) fails one statement and the next one connects again; its
commits do not wait for the server's disk unless the URL asks them to.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import psycopg
import pytest

from coordinator_support import open_state
from rainbowd.coordinator.state import StateError
from rainbowd.coordinator.state.postgres import NETWORK_CUT_SETTINGS, PostgresStore
from rainbowd.core.lease import LEASE_S
from rainbowd.devcluster.pgserver import PostgresServer


def test_a_refused_commit_keeps_nothing_and_raises_state_error(tmp_path: Path) -> None:
    store = open_state(tmp_path)
    try:
        if store.backend == "sqlite":
            store.execute("PRAGMA foreign_keys = ON")
        store.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        store.execute(
            "CREATE TABLE child (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)"
        )
        with pytest.raises(StateError, match=r"(?i)foreign key"):
            with store.transaction():
                store.set_meta("written-before", "1")
                store.execute("INSERT INTO child VALUES (7)")
        assert not store.in_transaction
        assert store.get_meta("written-before") == ""
    finally:
        store.close()


@pytest.mark.backends("postgresql")
def test_a_failed_statement_aborts_the_postgresql_transaction_and_its_commit_says_so(
    tmp_path: Path,
) -> None:
    store = open_state(tmp_path)
    try:
        with pytest.raises(StateError, match="rolled back"):
            with store.transaction():
                store.set_meta("written-before", "1")
                with pytest.raises(StateError, match="no_such_table"):
                    store.execute("SELECT * FROM no_such_table")
        assert not store.in_transaction
        assert store.get_meta("written-before") == ""
        store.set_meta("after", "2")  # the connection is usable again
        assert store.get_meta("after") == "2"
    finally:
        store.close()


@pytest.mark.backends("postgresql")
def test_a_dropped_postgresql_connection_fails_one_statement_then_reconnects(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    store = open_state(tmp_path)
    try:
        store.set_meta("k", "v")
        (pid,) = store.execute("SELECT pg_backend_pid()").fetchone()
        with psycopg.connect(postgres.url(), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(StateError):
            store.get_meta("k")
        assert store.get_meta("k") == "v"  # a new connection, the same data
        (new_pid,) = store.execute("SELECT pg_backend_pid()").fetchone()
        assert new_pid != pid
    finally:
        store.close()


@pytest.mark.backends("postgresql")
def test_postgresql_commits_do_not_wait_for_the_disk_unless_the_url_says_so(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    store = open_state(tmp_path)
    try:
        assert store.execute("SHOW synchronous_commit").fetchone()[0] == "off"
        url = cast(PostgresStore, store).url
    finally:
        store.close()
    own = PostgresStore(f"{url}?options=-c%20synchronous_commit%3Don", work_dir=tmp_path)
    try:
        assert own.execute("SHOW synchronous_commit").fetchone()[0] == "on"
    finally:
        own.close()


@pytest.mark.backends("postgresql")
def test_postgresql_connections_give_up_on_a_silent_network_within_a_lease(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    """libpq's tcp_user_timeout and keepalives are set (state/postgres.py NETWORK_CUT_SETTINGS).

    A network that drops packets must fail a statement, not freeze the coordinator's
    event loop until TCP gives up; a URL that sets one itself keeps its own.
    """
    store = cast(PostgresStore, open_state(tmp_path))
    try:
        params = store._conn.info.get_parameters()
        for key, value in NETWORK_CUT_SETTINGS.items():
            assert params.get(key) == str(value), (key, params)
        assert NETWORK_CUT_SETTINGS["tcp_user_timeout"] <= LEASE_S * 1000
        url = store.url
    finally:
        store.close()
    sep = "&" if "?" in url else "?"
    own = PostgresStore(f"{url}{sep}tcp_user_timeout=60000", work_dir=tmp_path)
    try:
        assert own._conn.info.get_parameters().get("tcp_user_timeout") == "60000"
    finally:
        own.close()
