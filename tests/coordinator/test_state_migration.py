"""A state database written by an older rbd loads (coordinator/state/, each backend's MIGRATIONS).

Schema 1 stored a transfer as a field-by-field copy of the scheduler's record
with the coordinator's ``seq`` and ``state`` inside the JSON body; schema 2
stores the scheduler's ``Transfer`` as it is with ``seq`` and ``state`` as
columns; schema 3 stores a transfer's reason as a record (``TransferReason``)
where schema 2 kept text, in transfer rows and in jobs' finished transfers;
schema 4 adds the ``leader`` lease table (both backends: PostgreSQL's first
migration step). A
coordinator upgraded in place must open the old file, adopt the transfers its
agents are still pulling, understand their reports, and show the old reasons.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import msgspec
import pytest
from test_coordinator_flow import Agent, agent

from coordinator_support import ADMIN, fake_image, ingest, open_state, start
from rainbowd.coordinator.state import SCHEMA_VERSION, StateError
from rainbowd.coordinator.state.sqlite import SqliteStore
from rainbowd.core.messages import (
    CreateJob,
    Heartbeat,
    JobView,
    NodeJobState,
    SeederUse,
    TransferDone,
)
from rainbowd.core.sched.reasons import BEST_FIT, LEGACY, PLANNED_BPS, TransferReason
from rainbowd.core.sched.records import Transfer
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
#: schemas 1 and 2 existed only as SQLite files: PostgreSQL starts at schema 3
sqlite_only = pytest.mark.backends("sqlite")
#: a reason where the test is not about it
R = TransferReason(rule=BEST_FIT, policy="swarm", numbers={PLANNED_BPS: 1e6})


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


#: tables whose bodies hold transfer reasons (schema 3)
REASON_TABLES = ("transfers", "jobs", "job_nodes")


def reason_holders(table: str, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The dicts of a stored body that carry a ``reason``: the transfer, or its SeederUses."""
    if table == "transfers":
        return [doc]
    nodes = doc["nodes"] if table == "jobs" else [doc]
    return [use for node in nodes for use in node["transfers"]]


def as_text(holder: dict[str, Any]) -> str:
    """A stored reason record as schema 2 kept it: the line it renders."""
    reason = msgspec.convert(holder["reason"], TransferReason)
    return reason.render(holder["seeder"])


def downgrade_to_v2(db: Path) -> None:
    """Rewrite every reason of a schema-3 file as schema 2 stored it (text)."""
    con = sqlite3.connect(db)
    try:
        with con:
            for table in REASON_TABLES:
                for rowid, body in con.execute(f"SELECT rowid, body FROM {table}").fetchall():
                    doc = json.loads(body)
                    for holder in reason_holders(table, doc):
                        holder["reason"] = as_text(holder)
                    con.execute(
                        f"UPDATE {table} SET body = ? WHERE rowid = ?", (json.dumps(doc), rowid)
                    )
            con.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
    finally:
        con.close()


def downgrade_to_v1(db: Path) -> None:
    """Rewrite the transfers of a schema-3 file as schema 1 stored them."""
    downgrade_to_v2(db)
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
        assert store.get_meta("schema") == str(SCHEMA_VERSION) == "5"
        loaded = {t.transfer_id: (t, seq, state) for t, seq, state in store.load_transfers()}
        assert set(loaded) == {"t-active", "t-aborted"}
        t, seq, state = loaded["t-active"]
        assert (seq, state) == (3, "active")
        assert (t.layer, t.seeder, t.demander, t.job_id) == (LAYER, "origin", "d", "job-1")
        assert (t.started_at, t.seeder_speed_bps) == (12.5, 1e8)
        assert t.reason == TransferReason.legacy("swarm: piece 1")  # schema 3: kept as legacy
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
    store = open_state(tmp_path)
    try:
        t = Transfer("t1", LAYER, "s", "d", "j", 1.0, R, 2e6, 1e6, 4, 8)
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


@sqlite_only
def test_schema_2_reasons_load_as_legacy_records(tmp_path: Path) -> None:
    """Text reasons in transfer, job and job-node rows become rule ``legacy`` with the text."""
    db = tmp_path / "coordinator.sqlite"
    SqliteStore(db).close()  # a schema-3 file, emptied of rows; written below as schema 2
    use = SeederUse(layer=LAYER, seeder="origin", reason=R, bytes=10, seconds=1.0)
    node = NodeJobState(
        node_id="d",
        state="done",
        layers_done=1,
        layers_total=1,
        bytes_done=10,
        bytes_total=10,
        rate_bps=0.0,
        transfers=[use],
        started_at=1.0,
    )
    job = JobView(job_id="job-1", image="img", state="done", created_at=1.0, nodes=[node])
    t = Transfer("t1", LAYER, "origin", "d", "job-1", 1.0, R, 2e6)

    def old(obj: msgspec.Struct, table: str) -> str:
        doc = json.loads(msgspec.json.encode(obj))
        for holder in reason_holders(table, doc):
            holder["reason"] = "swarm: best-fit seeder, as schema 2 wrote it"
        return json.dumps(doc)

    con = sqlite3.connect(db)
    with con:
        con.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
        con.execute(
            "INSERT INTO transfers(transfer_id, body) VALUES ('t1', ?)", (old(t, "transfers"),)
        )
        con.execute("INSERT INTO transfers(transfer_id, body) VALUES ('t-bad', 'not json')")
        con.execute("INSERT INTO jobs VALUES ('job-1', 1.0, ?)", (old(job, "jobs"),))
        con.execute("INSERT INTO job_nodes VALUES ('job-1', 'd', ?)", (old(node, "job_nodes"),))
    con.close()

    legacy = TransferReason.legacy("swarm: best-fit seeder, as schema 2 wrote it")
    store = SqliteStore(db)
    try:
        assert store.get_meta("schema") == str(SCHEMA_VERSION) == "5"
        [(loaded, seq, state)] = store.load_transfers()
        assert (loaded.transfer_id, seq, state) == ("t1", 0, "active")
        assert loaded.reason == legacy and loaded.reason.rule == LEGACY
        assert loaded.reason.render() == "swarm: best-fit seeder, as schema 2 wrote it"
        [view] = store.load_jobs()  # the job_nodes row applied over the job's
        assert [u.reason for n in view.nodes for u in n.transfers] == [legacy]
        raw = store.execute("SELECT body FROM jobs").fetchone()[0]
        assert json.loads(raw)["nodes"][0]["transfers"][0]["reason"]["rule"] == LEGACY
        [(table, key, _)] = store.set_aside()  # a body that is not JSON: as before
        assert (table, key) == ("transfers", "t-bad")
    finally:
        store.close()
    again = SqliteStore(db)  # migrated once: the records stay as they are
    try:
        assert [t.reason for t, _, _ in again.load_transfers()] == [legacy]
    finally:
        again.close()


@sqlite_only
async def test_a_coordinator_restarted_on_a_schema_2_file_shows_its_old_reasons(
    tmp_path: Path,
) -> None:
    r = await start(tmp_path)
    async with AdminClient(r.url, ADMIN) as admin:
        origin = await agent(r.url, "origin", roles=["origin"])
        img = fake_image(sizes=(70_000, 30_000))
        await ingest(admin, origin.c, img)
        d = await agent(r.url, "d")
        job = await admin.create_job(CreateJob(image=img.record.ref, targets=["d"]))
        first = await d.transfer()
        await d.done(first)
        second = await d.transfer()
        [before] = [n.transfers for n in (await admin.job(job.job_id)).nodes if n.node_id == "d"]
        creds = {"origin": origin.c.credential, "d": d.c.credential}
        cursor = d.cursor
    for x in (origin, d):
        await x.c.close()
    await r.stop()
    downgrade_to_v2(tmp_path / "coordinator.sqlite")

    r2 = await start(tmp_path)
    try:
        async with AdminClient(r2.url, ADMIN) as admin:
            [adopted] = r2.coordinator.scheduler.active()
            assert adopted.transfer_id == second.transfer_id
            assert adopted.reason == TransferReason.legacy(second.reason)
            [uses] = [n.transfers for n in (await admin.job(job.job_id)).nodes if n.node_id == "d"]
            # the finished transfer's reason: the same line, now a legacy record
            assert [u.reason for u in uses] == [
                TransferReason.legacy(u.reason.render(u.seeder)) for u in before
            ]
            assert uses[0].reason.render() == first.reason
            o2 = Agent(AgentClient(r2.url, node_id="origin", credential=creds["origin"]))
            d2 = Agent(AgentClient(r2.url, node_id="d", credential=creds["d"]))
            d2.cursor = cursor
            await o2.c.heartbeat(Heartbeat(holdings=img.digests))
            await d2.take()
            await d2.done(second)
            view = await admin.job(job.job_id)
            assert view.state == "done"
            [uses] = [n.transfers for n in view.nodes if n.node_id == "d"]
            assert [u.reason.rule for u in uses] == [LEGACY, LEGACY]
            assert uses[1].reason.render() == second.reason
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
        assert (again.get_meta("schema"), again.get_meta("trust_version")) == (
            str(SCHEMA_VERSION),
            "7",
        )
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


def test_a_schema_3_database_gets_the_leader_table_with_its_row_held_by_nobody(
    tmp_path: Path,
) -> None:
    """3 -> 4 on either backend: the lease row appears, token 0, expired, its data kept."""
    store = open_state(tmp_path)
    try:
        store.set_meta("trust_version", "5")
        store.execute("DROP TABLE leader")  # the database as schema 3 left it
        store.set_meta("schema", "3")
    finally:
        store.close()
    again = open_state(tmp_path)
    try:
        assert again.get_meta("schema") == str(SCHEMA_VERSION) == "5"
        assert again.get_meta("trust_version") == "5"
        now = again.dialect.now
        row = again.execute(
            f"SELECT id, holder, url, token, expires_at < {now} FROM leader"
        ).fetchall()
        assert [tuple(r) for r in row] == [(1, "", "", 0, True)]
    finally:
        again.close()
    third = open_state(tmp_path)  # migrated once: still one row
    try:
        assert third.execute("SELECT count(*) FROM leader").fetchone()[0] == 1
    finally:
        third.close()
