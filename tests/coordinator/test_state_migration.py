"""A state database written by an older rbd loads (coordinator/state/, each backend's MIGRATIONS).

Schema 1 stored a transfer as a field-by-field copy of the scheduler's record
with the coordinator's ``seq`` and ``state`` inside the JSON body; schema 2
stores the scheduler's ``Transfer`` as it is with ``seq`` and ``state`` as
columns. A coordinator upgraded in place must open the old file, adopt the
transfers its agents are still pulling, and understand their reports.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from test_coordinator_flow import Agent, agent

from coordinator_support import ADMIN, fake_image, ingest, open_state, start
from rainbowd.coordinator.state import SCHEMA_VERSION, StateError
from rainbowd.coordinator.state.sqlite import SqliteStore
from rainbowd.core.messages import CreateJob, Heartbeat, TransferDone
from rainbowd.lib.client import AdminClient, AgentClient

#: the transfers table as schema 1 created it
V1_TRANSFERS = "CREATE TABLE transfers (transfer_id TEXT PRIMARY KEY, body TEXT NOT NULL)"
#: the fields of schema 1's StoredTransfer, in its order (msgspec wrote them all)
V1_FIELDS = (
    "transfer_id",
    "layer",
    "seeder",
    "demander",
    "job_id",
    "started_at",
    "reason",
    "seeder_speed_bps",
    "seq",
    "state",
    "first_chunk",
    "end_chunk",
)
LAYER = "sha256:" + "ab" * 32


def v1_body(transfer_id: str, seq: int, state: str, first: int = 0, end: int = 0) -> str:
    doc = {
        "transfer_id": transfer_id,
        "layer": LAYER,
        "seeder": "origin",
        "demander": "d",
        "job_id": "job-1",
        "started_at": 12.5,
        "reason": "swarm: piece 1",
        "seeder_speed_bps": 1e8,
        "seq": seq,
        "state": state,
        "first_chunk": first,
        "end_chunk": end,
    }
    assert tuple(doc) == V1_FIELDS
    return json.dumps(doc)


def write_v1(db: Path, rows: list[tuple[str, str]]) -> None:
    """A database file as schema 1 left it: its transfers table and ``schema`` 1."""
    con = sqlite3.connect(db)
    try:
        with con:
            con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            con.execute("INSERT INTO meta(key, value) VALUES ('schema', '1')")
            con.execute(V1_TRANSFERS)
            con.executemany("INSERT INTO transfers(transfer_id, body) VALUES (?, ?)", rows)
    finally:
        con.close()


def downgrade_to_v1(db: Path) -> None:
    """Rewrite the transfers of a schema-2 file as schema 1 stored them."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT transfer_id, body, seq, state FROM transfers").fetchall()
        old = []
        for tid, body, seq, state in rows:
            doc = json.loads(body)
            doc.update(seq=seq, state=state)
            old.append((tid, json.dumps({k: doc[k] for k in V1_FIELDS})))
        with con:
            con.execute("DROP TABLE transfers")
            con.execute(V1_TRANSFERS)
            con.executemany("INSERT INTO transfers(transfer_id, body) VALUES (?, ?)", old)
            con.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    finally:
        con.close()


#: schema 1 existed only as a SQLite file: PostgreSQL starts at schema 2
sqlite_only = pytest.mark.backends("sqlite")


@sqlite_only
def test_schema_1_transfers_load_with_their_seq_and_state(tmp_path: Path) -> None:
    db = tmp_path / "coordinator.sqlite"
    write_v1(
        db,
        [
            ("t-active", v1_body("t-active", 3, "active", 0, 2)),
            ("t-aborted", v1_body("t-aborted", 5, "aborted")),
            ("t-bad", v1_body("t-bad", -1, "active")),  # refused by schema 1 too
        ],
    )
    store = SqliteStore(db)
    try:
        assert store.get_meta("schema") == str(SCHEMA_VERSION) == "2"
        loaded = {t.transfer_id: (t, seq, state) for t, seq, state in store.load_transfers()}
        assert set(loaded) == {"t-active", "t-aborted"}
        t, seq, state = loaded["t-active"]
        assert (seq, state) == (3, "active")
        assert (t.layer, t.seeder, t.demander, t.job_id) == (LAYER, "origin", "d", "job-1")
        assert (t.started_at, t.reason, t.seeder_speed_bps) == (12.5, "swarm: piece 1", 1e8)
        assert (t.first_chunk, t.end_chunk, t.expected_bps) == (0, 2, 0.0)
        assert loaded["t-aborted"][1:] == (5, "aborted")
        [(table, key, error)] = store.set_aside()
        assert (table, key) == ("transfers", "t-bad") and "seq" in error
        # the state is a column now: pruning aborted rows keeps the active one
        store.prune_transfers(0)
        assert [t.transfer_id for t, _, _ in store.load_transfers()] == ["t-active"]
    finally:
        store.close()
    # opening it again migrates nothing twice
    again = SqliteStore(db)
    try:
        [(t, seq, state)] = again.load_transfers()
        assert (t.transfer_id, seq, state) == ("t-active", 3, "active")
    finally:
        again.close()


def test_a_transfer_row_is_the_schedulers_record_with_two_columns(tmp_path: Path) -> None:
    from rainbowd.core.sched.scheduler import Transfer

    store = open_state(tmp_path)
    try:
        t = Transfer("t1", LAYER, "s", "d", "j", 1.0, "why", 2e6, 1e6, 4, 8)
        store.save_transfer(t, 7)
        store.save_transfer(t, 9, "aborted")  # the same row, updated
        assert store.load_transfers() == [(t, 9, "aborted")]
    finally:
        store.close()


@sqlite_only
async def test_a_coordinator_restarted_on_a_schema_1_file_adopts_its_transfer(
    tmp_path: Path,
) -> None:
    r = await start(tmp_path)
    async with AdminClient(r.url, ADMIN) as admin:
        origin = await agent(r.url, "origin", roles=["origin"])
        img = fake_image(sizes=(70_000,))
        await ingest(admin, origin.c, img)
        d = await agent(r.url, "d")
        job = await admin.create_job(CreateJob(image=img.record.ref, targets=["d"]))
        t = await d.transfer()
        creds = {"origin": origin.c.credential, "d": d.c.credential}
        cursor = d.cursor
    for x in (origin, d):
        await x.c.close()
    await r.stop()
    downgrade_to_v1(tmp_path / "coordinator.sqlite")

    r2 = await start(tmp_path)
    try:
        async with AdminClient(r2.url, ADMIN) as admin:
            [adopted] = r2.coordinator.scheduler.active()
            assert (adopted.transfer_id, adopted.demander) == (t.transfer_id, "d")
            o2 = Agent(AgentClient(r2.url, node_id="origin", credential=creds["origin"]))
            d2 = Agent(AgentClient(r2.url, node_id="d", credential=creds["d"]))
            d2.cursor = cursor  # it had received the assignment: the adopted one stands
            await o2.c.heartbeat(Heartbeat(holdings=img.digests))
            await d2.take()
            assert r2.coordinator.scheduler.is_active(t.transfer_id)
            await d2.c.transfer_done(t.transfer_id, TransferDone(bytes_moved=70_000, seconds=1))
            assert (await admin.job(job.job_id)).state == "done"
            await o2.c.close()
            await d2.c.close()
    finally:
        await r2.stop()


def test_a_new_database_gets_the_current_schema_and_reopens_unchanged(tmp_path: Path) -> None:
    store = open_state(tmp_path)
    try:
        assert store.get_meta("schema") == str(SCHEMA_VERSION)
        store.set_meta("trust_version", "7")
    finally:
        store.close()
    again = open_state(tmp_path)
    try:
        assert (again.get_meta("schema"), again.get_meta("trust_version")) == ("2", "7")
    finally:
        again.close()


def test_a_database_from_a_newer_rbd_is_refused_with_its_schema_named(tmp_path: Path) -> None:
    store = open_state(tmp_path)
    try:
        store.set_meta("schema", str(SCHEMA_VERSION + 1))
    finally:
        store.close()
    with pytest.raises(StateError, match=f"schema {SCHEMA_VERSION + 1}, newer than"):
        open_state(tmp_path)
