"""Choosing the state backend, and SQLite's backup and restore (issue 16, items 1 and 7).

``--state-url`` (or ``state_url`` in the config) names the database; one that
is malformed, of an unknown kind or unreachable stops the coordinator with a
message naming it (never its password) and a non-zero exit. ``backup`` copies
the SQLite state while the store is open and written to; ``restore`` puts the
copy in place of a lost state directory. The real-process version, agents
reconnecting with their credentials, is tests/faults/test_coordinator_restore.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coordinator_support import open_state, state_url_args
from rainbowd.coordinator import config
from rainbowd.coordinator.cli import main
from rainbowd.coordinator.state import SQLITE_FILE, StateError, StoredNode
from rainbowd.coordinator.state.sqlite import SqliteStore, backup, restore
from rainbowd.devcluster.localcluster import free_port

CLI = (sys.executable, "-m", "rainbowd.coordinator.cli")


def node(node_id: str) -> StoredNode:
    return StoredNode(
        node_id=node_id,
        address="10.0.0.1",
        ssh_port=2222,
        host_key="ssh-ed25519 HOSTKEY",
        client_key="ssh-ed25519 CLIENTKEY",
        credential_hash=f"hash-of-{node_id}",
    )


@pytest.mark.backends("sqlite")  # touches no state store of its run
@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://db/rbd", "unknown scheme 'mysql'"),
        ("postgresql:rbd", "postgresql://HOST"),
        ("sqlite:relative.db", "sqlite:///ABSOLUTE/PATH"),
        ("just-words", "use postgresql://HOST/DB or sqlite:///PATH"),
    ],
)
def test_a_malformed_state_url_is_refused_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, says: str
) -> None:
    assert main(["run", "--state-dir", str(tmp_path), "--state-url", url]) == 2
    assert says in capsys.readouterr().err
    with pytest.raises(config.ConfigError, match="state URL"):
        config.build({"state_dir": str(tmp_path), "state_url": url}, {})


@pytest.mark.backends("sqlite")  # touches no state store of its run
def test_an_unreachable_database_stops_the_coordinator_naming_it_not_its_password(
    tmp_path: Path,
) -> None:
    url = f"postgresql://rbd:s3cret-pw@127.0.0.1:{free_port()}/rbd?connect_timeout=3"
    run = subprocess.run(
        [*CLI, "run", "--state-dir", str(tmp_path), "--state-url", url, "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "cannot connect to PostgreSQL at postgresql://rbd:***@127.0.0.1" in out
    assert "s3cret-pw" not in out


@pytest.mark.backends("sqlite")  # touches no state store of its run
def test_help_names_the_state_url_and_the_backup_commands() -> None:
    run = subprocess.run([*CLI, "run", "--help"], capture_output=True, text=True, check=True)
    assert "--state-url" in run.stdout and "postgresql://" in run.stdout
    top = subprocess.run([*CLI, "--help"], capture_output=True, text=True, check=True)
    assert "backup" in top.stdout and "restore" in top.stdout


@pytest.mark.backends("sqlite")  # touches no state store of its run
def test_backup_copies_an_open_store_and_restore_brings_it_back(tmp_path: Path) -> None:
    live = SqliteStore(tmp_path / "live" / SQLITE_FILE)
    try:
        live.save_node(node("n1"), 3)
        with live.transaction():  # a write in progress is not in the copy, nor in its way
            live.save_node(node("n2"), 4)
            assert backup(live.path, tmp_path / "b.sqlite") > 0
        live.save_node(node("n3"), 5)
        assert backup(live.path, tmp_path / "b2.sqlite") > 0
    finally:
        live.close()
    fresh = tmp_path / "fresh" / SQLITE_FILE
    restore(tmp_path / "b.sqlite", fresh)
    back = SqliteStore(fresh)
    try:
        assert [(n.node_id, n.credential_hash, s) for n, s in back.load_nodes()] == [
            ("n1", "hash-of-n1", 3)
        ]
    finally:
        back.close()
    with pytest.raises(StateError, match="exists: stop the coordinator and pass --force"):
        restore(tmp_path / "b2.sqlite", fresh)
    Path(f"{fresh}-wal").write_bytes(b"an old log that must not be replayed")
    restore(tmp_path / "b2.sqlite", fresh, force=True)
    assert not Path(f"{fresh}-wal").exists()
    again = SqliteStore(fresh)
    try:
        assert [n.node_id for n, _ in again.load_nodes()] == ["n1", "n2", "n3"]
    finally:
        again.close()


@pytest.mark.backends("sqlite")  # touches no state store of its run
def test_restore_refuses_what_is_not_a_state_backup(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StateError, match="not a state database backup"):
        restore(junk, tmp_path / "s" / SQLITE_FILE)
    with pytest.raises(StateError, match="no backup at"):
        restore(tmp_path / "missing.sqlite", tmp_path / "s" / SQLITE_FILE)
    assert not (tmp_path / "s" / SQLITE_FILE).exists()


def test_the_backup_command_on_either_backend(
    state_backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SQLite: the file is copied and restored; PostgreSQL: pointed at pg_dump, exit 2."""
    state = tmp_path / "state"
    open_state(state).close()
    args = ["--state-dir", str(state), *state_url_args(state)]
    code = main(["backup", str(tmp_path / "b.sqlite"), *args])
    out = capsys.readouterr()
    if state_backend == "postgresql":
        assert code == 2 and "pg_dump" in out.err
        return
    assert code == 0 and "backed up" in out.out
    new = tmp_path / "new"
    assert main(["restore", str(tmp_path / "b.sqlite"), "--state-dir", str(new)]) == 0
    assert main(["restore", str(tmp_path / "b.sqlite"), "--state-dir", str(new)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (new / SQLITE_FILE).is_file()
