"""``POST /v1/reports`` (coordinator/http/report_batch.py) on a real coordinator on loopback.

* each item is judged on its own: a malformed one (bad id, negative bytes) is
  a 400 for it alone, a report about another node's transfer a 403, the
  others are applied;
* a done item is applied once: its id, retried in a batch or on the single
  route, and also after a restart, is answered as already applied (208/204);
* one scheduler pass per batch, one transaction per batch (the state and the
  ids it guards land together); a report handler may not await inside it;
* a demander's heartbeat showing bytes arrive keeps a busy seeder up (what
  progress reports every half second did).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

from coordinator_support import ADMIN, Running, enroll, fake_image, ingest, open_state, start
from rainbowd.coordinator.http.app import REPORT_LEDGER
from rainbowd.coordinator.http.report_batch import apply_batch
from rainbowd.coordinator.http.report_ids import ReportLedger, no_wait
from rainbowd.coordinator.state import StateError
from rainbowd.core import messages as m
from rainbowd.lib.client import AdminClient, AgentClient
from waiting import FakeClock, settle


@pytest.fixture
async def coord(tmp_path: Path) -> AsyncIterator[Running]:
    r = await start(tmp_path)
    try:
        yield r
    finally:
        await r.stop()


async def job_transfers(
    r: Running, targets: list[str]
) -> tuple[dict[str, AgentClient], dict[str, m.TransferAssignment]]:
    """An origin and ``targets`` enrolled, an image ingested and distributed; the transfers.

    (``paper``: the origin serves one demander at a time, the first target.)
    """
    clients = {"origin": await enroll(r.url, "origin", roles=["origin"], speed=100e6)}
    for t in targets:
        clients[t] = await enroll(r.url, t, speed=100e6)
    image = fake_image(sizes=(150_000,))
    async with AdminClient(r.url, ADMIN) as admin:
        await ingest(admin, clients["origin"], image)
        for t in targets:
            await clients[t].heartbeat(m.Heartbeat())
        await admin.create_job(m.CreateJob(image=image.record.ref, targets=targets))
    transfers = {}
    for t in targets:
        got = (await clients[t].assignments(0, 10**9, 0)).assignments
        transfers.update((t, a) for a in got if isinstance(a, m.TransferAssignment))
    return clients, transfers


def done(t: m.TransferAssignment, rid: str) -> m.DoneItem:
    return m.DoneItem(
        transfer_id=t.transfer_id,
        report_id=rid,
        done=m.TransferDone(bytes_moved=t.layer.size, seconds=0.2),
    )


async def post_raw(url: str, node: AgentClient, node_id: str, items: list[Any]) -> Any:
    """A batch built by hand (items the client's types would not let through)."""
    headers = {
        "Authorization": f"Bearer {node_id}:{node.credential}",
        "Content-Type": m.MSGPACK,
        "Accept": m.JSON,
    }
    body = msgpack.packb({"v": m.PROTOCOL_VERSION, "items": items}, use_bin_type=True)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/reports", data=body, headers=headers) as resp:
            return resp.status, (await resp.json() if resp.status != 204 else None)


async def test_each_item_is_judged_on_its_own(coord: Running) -> None:
    clients, transfers = await job_transfers(coord, ["n1", "n2"])
    n1, n2, t1 = clients["n1"], clients["n2"], transfers["n1"]
    try:
        good = m.to_wire(done(t1, "rid-n1-done-01"))
        progress = m.to_wire(
            m.ProgressItem(
                transfer_id=t1.transfer_id,
                progress=m.TransferProgress(bytes_done=10, bytes_total=100, rate_bps=1e6),
            )
        )
        bad_id = {**good, "report_id": "no spaces allowed"}
        negative = {
            **good,
            "report_id": "rid-n1-neg-001",
            "done": {"bytes_moved": -1, "seconds": 1},
        }
        unknown_kind = {"kind": "teleported", "transfer_id": t1.transfer_id}
        items = [progress, good, bad_id, negative, unknown_kind, "not an object"]
        status, reply = await post_raw(coord.url, n1, "n1", items)
        assert status == 200
        assert [r["status"] for r in reply["results"]] == [200, 200, 400, 400, 400, 400]
        errors = [r.get("error", "") for r in reply["results"]]
        assert "report_id" in errors[2] and "bytes_moved" in errors[3]
        assert t1.transfer_id not in {t.transfer_id for t in coord.coordinator.scheduler.active()}
        # a node reports only about its own transfers
        not_mine = m.to_wire(done(t1, "rid-n2-steal-1"))
        status, reply = await post_raw(coord.url, n2, "n2", [not_mine])
        assert status == 200 and reply["results"][0]["status"] == 403
        assert "belongs to n1" in reply["results"][0]["error"]
        # a batch that is no batch at all is refused whole
        status, reply = await post_raw(coord.url, n1, "n1", "x")  # type: ignore[arg-type]
        assert status == 400
    finally:
        for c in clients.values():
            await c.close()


async def test_a_done_item_is_applied_once_however_it_is_retried(tmp_path: Path) -> None:
    r = await start(tmp_path)
    clients, transfers = await job_transfers(r, ["n1"])
    n1, t1 = clients["n1"], transfers["n1"]
    ledger = r.server.app[REPORT_LEDGER]
    try:
        batch = m.ReportBatch(items=[done(t1, "rid-once-00001")])
        assert await n1.reports(batch) is None  # 204: every item applied
        assert await n1.reports(batch) is None  # a retry: taken (208), not applied again
        assert ledger.duplicates == 1
        # the single route knows the id too (the same key)
        await n1.transfer_done(t1.transfer_id, batch.items[0].done, "rid-once-00001")  # type: ignore[union-attr]
        assert ledger.duplicates == 2
        credential = n1.credential
    finally:
        for c in clients.values():
            await c.close()
        await r.stop()
    r = await start(tmp_path)  # a restarted coordinator still knows it
    try:
        n1 = AgentClient(r.url, node_id="n1", credential=credential)
        # with a malformed item along, the reply lists each item's result
        status, reply = await post_raw(r.url, n1, "n1", [m.to_wire(batch.items[0]), {}])
        assert status == 200 and [x["status"] for x in reply["results"]] == [208, 400]
        assert r.server.app[REPORT_LEDGER].duplicates == 1
        await n1.close()
    finally:
        await r.stop()


async def test_a_batch_is_one_scheduler_pass(coord: Running) -> None:
    clients, transfers = await job_transfers(coord, ["n1"])
    n1, t1 = clients["n1"], transfers["n1"]
    scheduler = coord.coordinator.scheduler
    passes: list[float] = []
    inner = scheduler.schedule

    def counted(now: float) -> Any:
        passes.append(now)
        return inner(now)

    scheduler.schedule = counted  # type: ignore[method-assign]
    try:
        # the second done is of a transfer this coordinator does not know: it schedules too
        unknown = m.DoneItem(
            transfer_id="t-unknown-1",
            report_id="rid-unknown-01",
            done=m.TransferDone(bytes_moved=1, seconds=0.1),
        )
        assert await n1.reports(m.ReportBatch(items=[done(t1, "rid-pass-00001"), unknown])) is None
        assert len(passes) == 1
    finally:
        for c in clients.values():
            await c.close()


def test_a_transaction_commits_once_at_its_end(tmp_path: Path) -> None:
    store = open_state(tmp_path)
    other = open_state(tmp_path)  # a second connection: it sees only what was committed
    try:

        def seen() -> int:
            return other.count_report_ids("n1")

        with store.transaction():
            store.add_report_id("n1", "/r", "rid-0000001")
            with store.transaction():  # joins the open one
                store.add_report_id("n1", "/r", "rid-0000002")
            assert seen() == 0  # nothing committed yet
        assert seen() == 2
        # a refusal raised after a write: what was written (mirroring memory) is kept
        with pytest.raises(KeyError), store.transaction():
            store.add_report_id("n1", "/r", "rid-0000003")
            raise KeyError("refused")
        assert seen() == 3
    finally:
        other.close()
        store.close()


async def test_a_report_handler_may_not_await_inside_its_transaction() -> None:
    async def quick() -> int:
        return 7

    async def suspends() -> int:
        await asyncio.get_running_loop().create_future()
        return 8

    assert no_wait(quick()) == 7
    with pytest.raises(RuntimeError, match="awaited inside its transaction"):
        no_wait(suspends())


async def test_a_demanders_heartbeat_shows_its_busy_seeder_alive(tmp_path: Path) -> None:
    """Progress no longer comes every half second: the heartbeat's bytes do its job.

    A seeder too busy to heartbeat stays up while its demander's heartbeats show
    bytes of its transfer arriving, and goes down once they stop.
    """
    clock = FakeClock()
    r = await start(tmp_path, heartbeat_interval=1.0, clock=clock)
    clients, transfers = await job_transfers(r, ["n1"])
    c, t1 = r.coordinator, transfers["n1"]
    n1, origin = c.cluster.nodes["n1"], c.cluster.nodes["origin"]

    def beat(bytes_done: int) -> None:
        active = m.ActiveTransfer(
            transfer_id=t1.transfer_id,
            layer=t1.layer.digest,
            seeder="origin",
            bytes_done=bytes_done,
            bytes_total=t1.layer.size,
            rate_bps=1e6,
        )
        c.heartbeat(n1, m.Heartbeat(active=[active]))

    try:
        for second in range(1, 7):  # the origin is silent all along
            clock.advance(1.0)
            beat(1000 * second)
            c.check_liveness()
        assert origin.up
        for _ in range(4):  # the bytes stop: nothing shows the origin alive any more
            clock.advance(1.0)
            beat(6000)
            c.check_liveness()
        assert not origin.up and n1.up
    finally:
        for client in clients.values():
            await client.close()
        await r.stop()


def test_a_report_applied_whose_commit_failed_is_not_applied_again(tmp_path: Path) -> None:
    """Memory has the report, the disk has neither it nor its id: a retry is a duplicate here."""
    store = open_state(tmp_path)
    ledger = ReportLedger(store)
    # a deferred foreign key: the database refuses the COMMIT, as a full disk would
    if store.backend == "sqlite":
        store.execute("PRAGMA foreign_keys = ON")
    store.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    store.execute(
        "CREATE TABLE child (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)"
    )
    key = ("n1", "/v1/transfers/t1/done", "rid-commit-fails")
    refused = ("n1", "/v1/transfers/t2/done", "rid-refused-0001")
    try:
        with pytest.raises(StateError), ledger.transaction():
            with ledger.applying(*key):
                store.execute("INSERT INTO child VALUES (7)")  # the report's own write
            with pytest.raises(KeyError), ledger.applying(*refused):
                raise KeyError("refused")
        assert ledger.applied(*key) and not store.has_report_id(*key)
        assert not ledger.applied(*refused)  # judged afresh
        with ledger.transaction():  # a later transaction that commits
            with ledger.applying("n1", "/v1/transfers/t3/done", "rid-later-00001"):
                pass
        assert store.has_report_id("n1", "/v1/transfers/t3/done", "rid-later-00001")
        assert ledger.applied(*key)
    finally:
        store.close()


async def test_batches_handled_in_one_turn_of_the_loop_share_one_scheduler_pass(
    coord: Running,
) -> None:
    clients, transfers = await job_transfers(coord, ["n1", "n2"])
    c, t1 = coord.coordinator, transfers["n1"]
    ledger = coord.server.app[REPORT_LEDGER]
    passes: list[float] = []
    inner = c.scheduler.schedule

    def counted(now: float) -> Any:
        passes.append(now)
        return inner(now)

    c.scheduler.schedule = counted  # type: ignore[method-assign]
    unknown = m.DoneItem(
        transfer_id="t-unknown-2",
        report_id="rid-unknown-02",
        done=m.TransferDone(bytes_moved=1, seconds=0.1),
    )
    try:
        # two agents' batches, handled one after the other in the same turn
        r1 = apply_batch(c, ledger, c.cluster.nodes["n1"], [m.to_wire(done(t1, "rid-turn-00001"))])
        r2 = apply_batch(c, ledger, c.cluster.nodes["n2"], [m.to_wire(unknown)])
        assert [x.status for x in r1 + r2] == [200, 200]
        assert passes == []  # not yet: on the loop's next turn
        await settle()
        assert len(passes) == 1
        # the pass handed out what the completion made possible, and saved it
        assert c.store.load_transfers()
    finally:
        for client in clients.values():
            await client.close()
