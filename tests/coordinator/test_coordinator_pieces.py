"""The coordinator's side of pieces: a transfer's chunk range reaches the agent and the state file.

Real app on loopback with fake agents playing the protocol (as in
test_coordinator_flow). The coordinator's contract with a piece-splitting
scheduler: the range goes out in the assignment, survives a restart, and a
piece done does not count the layer until the scheduler says the node holds
all of it. Checked with rainbowd.core.sched.pieces.PieceScheduler (policy ``swarm``)
in the coordinator, and with :class:`FirstHalf`, a plain Scheduler whose
transfers carry a range and which holds a layer only when a test says so
(the case of a layer completed by the node's heartbeat).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_coordinator_flow import Agent, agent

from coordinator_support import ADMIN, ingest, start
from rainbowd.coordinator import core, jobs_service
from rainbowd.coordinator.piece_wire import assignment_for
from rainbowd.coordinator.state import StateStore
from rainbowd.core.messages import (
    ActiveTransfer,
    CreateJob,
    Heartbeat,
    PeerInfo,
    TransferAssignment,
    TransferDone,
)
from rainbowd.core.sched.records import Transfer
from rainbowd.core.sched.scheduler import Scheduler
from rainbowd.lib.client import AdminClient, AgentClient

CHUNK = 65_536
SIZE = 4 * CHUNK + 100  # 5 chunks


class FirstHalf(Scheduler):
    """Hands out chunks [0, 2) of each layer; holds a layer only once :attr:`rest_held`."""

    rest_held: set[tuple[str, str]] = set()

    def schedule(self, now: float) -> list[Transfer]:
        started = super().schedule(now)
        for t in started:
            t.first_chunk, t.end_chunk = 0, 2
        return started

    def holds(self, node_id: str, layer: str) -> bool:
        return (node_id, layer) in self.rest_held and super().holds(node_id, layer)


@pytest.fixture
def first_half(monkeypatch: pytest.MonkeyPatch) -> type[FirstHalf]:
    from rainbowd.core.sched.pieces import PieceScheduler

    def first_half_pieces(policy: str, **kw: Any) -> PieceScheduler:
        # whole layers for the piece layer (relay): FirstHalf sets the range itself
        return PieceScheduler.around(FirstHalf("relay", **kw))

    monkeypatch.setattr(core, "PieceScheduler", first_half_pieces)
    monkeypatch.setattr(FirstHalf, "rest_held", set())
    return FirstHalf


async def test_an_assignment_carries_its_range_and_keeps_it_across_a_restart(
    tmp_path: Path, first_half: type[FirstHalf]
) -> None:
    from coordinator_support import fake_image

    r = await start(tmp_path)
    async with AdminClient(r.url, ADMIN) as admin:
        origin = await agent(r.url, "origin", roles=["origin"])
        img = fake_image(sizes=(SIZE,))
        await ingest(admin, origin.c, img)
        d = await agent(r.url, "d")
        job = await admin.create_job(CreateJob(image=img.record.ref, targets=["d"]))
        t = await d.transfer()
        assert (t.first_chunk, t.end_chunk) == (0, 2) and t.chunk_range() == (0, 2)
        [(stored, _, _)] = r.store.load_transfers()
        assert (stored.first_chunk, stored.end_chunk) == (0, 2)
        creds = {"origin": origin.c.credential, "d": d.c.credential}
        cursor = d.cursor
    for x in (origin, d):
        await x.c.close()
    await r.stop()

    r2 = await start(tmp_path)
    try:
        async with AdminClient(r2.url, ADMIN) as admin:
            [adopted] = r2.coordinator.scheduler.active()
            assert adopted.transfer_id == t.transfer_id
            assert (adopted.first_chunk, adopted.end_chunk) == (0, 2)
            o2 = Agent(AgentClient(r2.url, node_id="origin", credential=creds["origin"]))
            d2 = Agent(AgentClient(r2.url, node_id="d", credential=creds["d"]))
            d2.cursor = cursor
            await o2.c.heartbeat(Heartbeat(holdings=img.digests))
            # the piece is done, but the scheduler does not have the whole layer on d:
            # the layer is not counted, the node is not offered as its seeder
            await d2.c.transfer_done(t.transfer_id, TransferDone(bytes_moved=2 * CHUNK, seconds=1))
            layer = img.digests[0]
            assert layer not in r2.coordinator.cluster.nodes["d"].holdings
            view = (await admin.job(job.job_id)).nodes[0]
            assert view.state != "done" and view.layers_done == 0
            assert "d" not in (await admin.image(img.record.ref)).nodes
            # the last piece lands (the agent committed the layer): its heartbeat lists it
            first_half.rest_held.add(("d", layer))
            await d2.c.heartbeat(Heartbeat(holdings=[layer]))
            assert layer in r2.coordinator.cluster.nodes["d"].holdings
            assert (await admin.job(job.job_id)).state == "done"
            await o2.c.close()
            await d2.c.close()
    finally:
        await r2.stop()


def test_a_range_the_layer_does_not_have_is_never_handed_out() -> None:
    import io
    import os

    from rainbowd.core.chunks import build_manifest
    from rainbowd.core.sched.reasons import TransferReason

    m = build_manifest(io.BytesIO(os.urandom(SIZE)), chunk_size=CHUNK)
    peer = PeerInfo(node_id="s", address="127.0.0.1", ssh_port=1, host_key="", client_key="")

    def transfer(first: int, end: int) -> Transfer:
        return Transfer(
            "t", m.digest, "s", "d", "j", 0.0, TransferReason.legacy("r"), 1.0, 0.0, first, end
        )

    assert assignment_for(transfer(2, 6), m, peer) is None  # 5 chunks only
    a = assignment_for(transfer(2, 5), m, peer)
    assert a is not None and a.chunk_range() == (2, 5)
    whole = assignment_for(transfer(0, 0), m, peer)
    assert whole is not None and whole.chunk_range() == (0, 5)


async def test_with_the_piece_scheduler_a_layer_counts_when_its_last_piece_is_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rainbowd.core.sched.pieces in the coordinator: pieces go out with their ranges, from two
    seeders, survive a restart, and the job counts the layer at the last piece only."""
    from coordinator_support import fake_image

    size = 4 * CHUNK  # swarm: pieces of one chunk, so 4 of them
    r = await start(tmp_path, policy="swarm")
    async with AdminClient(r.url, ADMIN) as admin:
        origin = await agent(r.url, "origin", roles=["origin"], speed=10e6)
        img = fake_image(sizes=(size,))
        layer = img.digests[0]
        await ingest(admin, origin.c, img)
        s = await agent(r.url, "s", speed=10e6, holdings=img.digests)
        d = await agent(r.url, "d", speed=100e6)
        job = await admin.create_job(CreateJob(image=img.record.ref, targets=["d"]))
        got = [a for a in await d.take() if isinstance(a, TransferAssignment)]
        assert len(got) >= 2, got  # several pieces at once ...
        assert {a.seeder.node_id for a in got} == {"origin", "s"}  # ... from both seeders
        ranges = sorted(a.chunk_range() for a in got)
        assert all(end - first == 1 for first, end in ranges), ranges
        assert len(set(ranges)) == len(ranges)
        stored = {
            st.transfer_id: (st.first_chunk, st.end_chunk) for st, _, _ in r.store.load_transfers()
        }
        assert stored == {a.transfer_id: a.chunk_range() for a in got}
        creds = {"origin": origin.c.credential, "s": s.c.credential, "d": d.c.credential}
        cursor = d.cursor
    for x in (origin, s, d):
        await x.c.close()
    await r.stop()

    r2 = await start(tmp_path, policy="swarm")
    try:
        async with AdminClient(r2.url, ADMIN) as admin:
            adopted = {
                t.transfer_id: (t.first_chunk, t.end_chunk)
                for t in r2.coordinator.scheduler.active()
            }
            assert adopted == {a.transfer_id: a.chunk_range() for a in got}
            agents = {
                n: Agent(AgentClient(r2.url, node_id=n, credential=c)) for n, c in creds.items()
            }
            d2 = agents["d"]
            d2.cursor = cursor
            await agents["origin"].c.heartbeat(Heartbeat(holdings=img.digests))
            await agents["s"].c.heartbeat(Heartbeat(holdings=img.digests))
            running = [
                ActiveTransfer(
                    transfer_id=a.transfer_id,
                    layer=layer,
                    seeder=a.seeder.node_id,
                    bytes_done=0,
                    bytes_total=CHUNK,
                    rate_bps=1e6,
                )
                for a in got
            ]
            await d2.c.heartbeat(Heartbeat(active=running))  # d is back, still pulling them
            done: set[tuple[int, int]] = set()
            pending = list(got)
            while len(done) < 4:
                assert pending, done
                a = pending.pop(0)
                await d2.c.transfer_done(
                    a.transfer_id, TransferDone(bytes_moved=CHUNK, seconds=0.1)
                )
                done.add(a.chunk_range())
                held = layer in r2.coordinator.cluster.nodes["d"].holdings
                assert held == (len(done) == 4), done
                pending += [x for x in await d2.take() if isinstance(x, TransferAssignment)]
            assert sorted(done) == [(0, 1), (1, 2), (2, 3), (3, 4)]
            assert (await admin.job(job.job_id)).state == "done"
            for x in agents.values():
                await x.c.close()
    finally:
        await r2.stop()


async def test_a_restart_adopts_pieces_sized_otherwise_than_it_would_size_them(
    tmp_path: Path,
) -> None:
    """Pieces are sized from the cluster (PieceScheduler._load_chunks), so the run before a
    restart may have split a layer otherwise: its pieces in flight are adopted as they are."""
    from coordinator_support import fake_image

    r = await start(tmp_path, policy="swarm")
    async with AdminClient(r.url, ADMIN) as admin:
        origin = await agent(r.url, "origin", roles=["origin"], speed=10e6)
        img = fake_image(sizes=(4 * CHUNK,))
        layer = img.digests[0]
        await ingest(admin, origin.c, img)
        # this run sized them at two chunks (a busier cluster, a slower coordinator)
        assert r.coordinator.scheduler.split_as(layer, 2)
        d = await agent(r.url, "d", speed=100e6)
        await admin.create_job(CreateJob(image=img.record.ref, targets=["d"]))
        got = [a for a in await d.take() if isinstance(a, TransferAssignment)]
        assert got and all(a.chunk_range()[1] - a.chunk_range()[0] == 2 for a in got), got
    for x in (origin, d):
        await x.c.close()
    await r.stop()

    r2 = await start(tmp_path, policy="swarm")  # sizes this layer at one chunk a piece
    try:
        adopted = {
            t.transfer_id: (t.first_chunk, t.end_chunk) for t in r2.coordinator.scheduler.active()
        }
        assert adopted == {a.transfer_id: a.chunk_range() for a in got}
        pieces = r2.coordinator.scheduler.pieces(layer)
        assert [(p.first, p.end) for p in pieces] == [(0, 2), (2, 4)]
    finally:
        await r2.stop()


async def test_pieces_grow_once_the_coordinator_measures_what_a_transfer_costs(
    tmp_path: Path,
) -> None:
    """Each transfer costs 1.5 s outside its 0.5 s pull (a fake clock moves 2 s from the
    assignment to the report): once the coordinator has measured that from the done
    reports (core/sched/transfer_cost.py), the pieces not yet handed out grow, and the
    assignments after carry longer chunk ranges."""
    from coordinator_support import fake_image

    now = [1_000.0]
    r = await start(tmp_path, policy="swarm", clock=lambda: now[0], heartbeat_interval=1e6)
    try:
        async with AdminClient(r.url, ADMIN) as admin:
            origin = await agent(r.url, "origin", roles=["origin"], speed=10e6)
            img = fake_image(sizes=(64 * CHUNK,))
            layer = img.digests[0]
            await ingest(admin, origin.c, img)
            d = await agent(r.url, "d", speed=100e6)
            scheduler = r.coordinator.scheduler
            assert {p.end - p.first for p in scheduler.pieces(layer)} == {1}
            await admin.create_job(CreateJob(image=img.record.ref, targets=["d"]))

            async def report_one(pending: list[TransferAssignment]) -> list[TransferAssignment]:
                """2 s after its assignment, one piece done in 0.5 s; what is assigned next."""
                now[0] += 2.0
                a = pending.pop(0)
                await d.c.transfer_done(a.transfer_id, TransferDone(bytes_moved=CHUNK, seconds=0.5))
                return [x for x in await d.take() if isinstance(x, TransferAssignment)]

            pending = [a for a in await d.take() if isinstance(a, TransferAssignment)]
            reports = 0
            while len(scheduler.pieces(layer)) == 64:
                assert pending and reports < 40, reports
                pending += await report_one(pending)
                reports += 1
            # 1.5 s x 128 KiB/s / 0.25 = 768 KiB: pieces of 12 chunks of 64 KiB
            assert reports == 16  # transfer_cost.MIN_SAMPLES
            assert max(p.end - p.first for p in scheduler.pieces(layer)) == 12
            later = [a for a in await d.take() if isinstance(a, TransferAssignment)]
            while not later:
                later = await report_one(pending)
            assert any(x.chunk_range()[1] - x.chunk_range()[0] == 12 for x in later), later
            await origin.c.close()
            await d.c.close()
    finally:
        await r.stop()


def stored_lines(store: StateStore, node_id: str = "d") -> list[tuple[str, int]]:
    """(seeder, bytes) of each line of ``node_id``'s row in the one job the store holds."""
    (view,) = store.load_jobs()
    (node,) = [n for n in view.nodes if n.node_id == node_id]
    return [(u.seeder, u.bytes) for u in node.transfers]


async def test_a_piece_that_completes_no_layer_is_written_with_the_next_batch_of_rows(
    tmp_path: Path,
) -> None:
    """A node's job row is rewritten for a layer's last piece at once, and for the pieces
    before it by ``save_piece_lines`` (the liveness loop's; jobs_service.py): the row grows
    with every seeder, and rewriting it at every piece cost a done report ~12 % more."""
    from coordinator_support import fake_image

    r = await start(tmp_path, policy="swarm", heartbeat_interval=1e6)  # no liveness turn
    try:
        async with AdminClient(r.url, ADMIN) as admin:
            origin = await agent(r.url, "origin", roles=["origin"], speed=10e6)
            img = fake_image(sizes=(4 * CHUNK,))  # swarm: 4 pieces of one chunk
            layer = img.digests[0]
            await ingest(admin, origin.c, img)
            d = await agent(r.url, "d", speed=100e6)
            job = await admin.create_job(CreateJob(image=img.record.ref, targets=["d"]))
            pending = [a for a in await d.take() if isinstance(a, TransferAssignment)]
            a = pending.pop(0)
            await d.c.transfer_done(a.transfer_id, TransferDone(bytes_moved=CHUNK, seconds=0.1))
            # in memory (the API) at once; in the store with the next batch
            (shown,) = [n for n in (await admin.job(job.job_id)).nodes if n.node_id == "d"]
            assert [(u.seeder, u.bytes) for u in shown.transfers] == [("origin", CHUNK)]
            assert stored_lines(r.store) == []
            assert r.coordinator.save_piece_lines(now=100.0) == 1
            assert stored_lines(r.store) == [("origin", CHUNK)]
            assert r.coordinator.save_piece_lines() == 0  # nothing left to write
            # the next piece waits PIECE_LINES_EVERY_S after that write (a time given)
            pending += [x for x in await d.take() if isinstance(x, TransferAssignment)]
            a = pending.pop(0)
            await d.c.transfer_done(a.transfer_id, TransferDone(bytes_moved=CHUNK, seconds=0.1))
            every = jobs_service.PIECE_LINES_EVERY_S
            assert r.coordinator.save_piece_lines(now=100.0 + every / 2) == 0
            assert stored_lines(r.store) == [("origin", CHUNK)]
            assert r.coordinator.save_piece_lines(now=100.0 + every) == 1
            assert stored_lines(r.store) == [("origin", 2 * CHUNK)]
            done = 2
            while layer not in r.coordinator.cluster.nodes["d"].holdings:
                pending += [x for x in await d.take() if isinstance(x, TransferAssignment)]
                a = pending.pop(0)
                await d.c.transfer_done(a.transfer_id, TransferDone(bytes_moved=CHUNK, seconds=0.1))
                done += 1
            assert done == 4
            # the last piece completed the layer: its row was written with it, every line in
            assert stored_lines(r.store) == [("origin", 4 * CHUNK)]
            await origin.c.close()
            await d.c.close()
    finally:
        await r.stop()


async def test_the_rows_left_for_later_are_written_when_the_coordinator_stops(
    tmp_path: Path,
) -> None:
    from coordinator_support import fake_image

    r = await start(tmp_path, policy="swarm", heartbeat_interval=1e6)  # no liveness turn
    async with AdminClient(r.url, ADMIN) as admin:
        origin = await agent(r.url, "origin", roles=["origin"], speed=10e6)
        img = fake_image(sizes=(4 * CHUNK,))
        await ingest(admin, origin.c, img)
        d = await agent(r.url, "d", speed=100e6)
        await admin.create_job(CreateJob(image=img.record.ref, targets=["d"]))
        a = next(x for x in await d.take() if isinstance(x, TransferAssignment))
        await d.c.transfer_done(a.transfer_id, TransferDone(bytes_moved=CHUNK, seconds=0.1))
        await origin.c.close()
        await d.c.close()
    await r.stop()  # a clean stop writes what was left for later
    r2 = await start(tmp_path, policy="swarm", heartbeat_interval=1e6)
    try:
        assert stored_lines(r2.store) == [("origin", CHUNK)]
    finally:
        await r2.stop()
