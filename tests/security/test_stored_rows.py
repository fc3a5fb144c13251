"""A value already stored never stops the coordinator from starting (issue 14, item 3).

Each table gets a row that today's validation would refuse (what older
versions stored from a NaN speed hint, a hand-edited row, a cut write): the
coordinator starts, logs the row naming its table and key, moves it to the
``set_aside`` table, and loads every other row.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from door_support import ADMIN, Door, FakeClock, open_door
from structlog.testing import capture_logs

from coordinator_support import fake_image, ingest
from rainbowd.core.messages import CreateJob
from rainbowd.lib.client import AdminClient, AgentClient


def _edit(db: Path, sql: str, *args: object) -> None:
    con = sqlite3.connect(db)
    try:
        with con:
            con.execute(sql, args)
    finally:
        con.close()


def _body(db: Path, table: str, column: str, key: str) -> dict[str, object]:
    con = sqlite3.connect(db)
    try:
        (body,) = con.execute(f"SELECT body FROM {table} WHERE {column} = ?", (key,)).fetchone()
    finally:
        con.close()
    doc: dict[str, object] = json.loads(body)
    return doc


async def test_a_node_stored_with_a_null_speed_is_set_aside_and_the_rest_load(
    door: Door, clock: FakeClock
) -> None:
    await door.enroll("good", speed=1e8)
    await door.enroll("bad", speed=1e8)
    await door.stop()
    db = door.state_dir / "coordinator.sqlite"
    # what main stored for speed_hint_bps=NaN: JSON null, and then refused to start
    doc = _body(db, "nodes", "node_id", "bad")
    doc["speed_hint_bps"] = None
    _edit(db, "UPDATE nodes SET body = ? WHERE node_id = 'bad'", json.dumps(doc))

    with capture_logs() as logs:
        again = await open_door(door.state_dir, clock)
    try:
        nodes = await again.admin_get("/v1/nodes")
        assert [n["node_id"] for n in nodes["nodes"]] == ["good"]
        (entry,) = [e for e in logs if e.get("table") == "nodes"]
        assert entry["log_level"] == "error" and entry["key"] == "bad"
        assert "speed_hint_bps" in entry["error"]
        assert again.store.set_aside() == [("nodes", "bad", entry["error"])]
    finally:
        await again.stop()
    # moved, not left behind: the next start is clean
    with capture_logs() as logs:
        third = await open_door(door.state_dir, clock)
    await third.stop()
    assert not [e for e in logs if "table" in e]


async def test_bad_rows_of_every_table_are_set_aside(door: Door, clock: FakeClock) -> None:
    origin = AgentClient(door.url)
    await origin.open()
    try:
        from coordinator_support import register_request

        await origin.register(register_request("origin", roles=["origin"], speed=1e8))
        img = fake_image(sizes=(60_000,))  # one chunk: one piece, one transfer
        async with AdminClient(door.url, ADMIN) as admin:
            await ingest(admin, origin, img)
            await door.enroll("n1", speed=1e8)
            job = await admin.create_job(CreateJob(image=img.record.ref, targets=["n1"]))
    finally:
        await origin.close()
    await door.stop()
    db = door.state_dir / "coordinator.sqlite"
    (transfer_id,) = [
        r[0] for r in sqlite3.connect(db).execute("SELECT transfer_id FROM transfers").fetchall()
    ]
    # a second, broken image and job beside the good ones; the transfer's speed is inf
    # (stored as null), the job_nodes row is not JSON, an op row has a wrong type
    _edit(db, "INSERT INTO images(ref, body) VALUES ('broken:1', ?)", '{"ref": 5}')
    _edit(
        db,
        "INSERT INTO jobs(job_id, created_at, body) VALUES ('j-broken', 1, ?)",
        '{"job_id": "j-broken"}',
    )
    _edit(db, "INSERT INTO job_nodes(job_id, node_id, body) VALUES (?, 'n1', '{cut')", job.job_id)
    doc = _body(db, "transfers", "transfer_id", transfer_id)
    doc["seeder_speed_bps"] = None
    _edit(db, "UPDATE transfers SET body = ? WHERE transfer_id = ?", json.dumps(doc), transfer_id)
    _edit(db, "INSERT INTO ops(op_id, created_at, body) VALUES ('o-1', 1, ?)", '{"op_id": []}')

    with capture_logs() as logs:
        again = await open_door(door.state_dir, clock)
    try:
        aside = {(t, k) for t, k, _ in again.store.set_aside()}
        assert aside == {
            ("images", "broken:1"),
            ("jobs", "j-broken"),
            ("job_nodes", f"{job.job_id}:n1"),
            ("transfers", transfer_id),
            ("ops", "o-1"),
        }
        logged = {(e["table"], e["key"]) for e in logs if "table" in e}
        assert logged == aside
        images = await again.admin_get("/v1/images")
        assert [i["ref"] for i in images["images"]] == [img.record.ref]
        jobs = await again.admin_get("/v1/jobs")
        assert [j["job_id"] for j in jobs["jobs"]] == [job.job_id]
        assert (await again.admin_get("/v1/ops"))["ops"] == []
    finally:
        await again.stop()
