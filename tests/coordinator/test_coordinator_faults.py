"""Fault rules of the coordinator (quarantine policy, suspects, restarts, dropped polls).

Real app on loopback with fake agents playing the protocol, as in
test_coordinator_flow; each test pins one rule of the "Fault handling" issue.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from test_coordinator_flow import QUIET_INTERVAL, Agent, agent

from coordinator_support import ADMIN, FakeImage, Running, fake_image, ingest, start
from rainbowd.core.messages import (
    ActiveTransfer,
    CreateJob,
    Heartbeat,
    TransferDone,
    TransferFailed,
    TransferProgress,
)
from rainbowd.lib.client import AdminClient, AgentClient
from waiting import FakeClock, wait_until


async def origin_with_one_layer(r: Running, admin: AdminClient) -> tuple[Agent, FakeImage]:
    """An origin agent that ingested a one-layer (70 kB) image: the start of most cases."""
    origin = await agent(r.url, "origin", roles=["origin"])
    img = fake_image(sizes=(70_000,))
    await ingest(admin, origin.c, img)
    return origin, img


async def test_bad_chunks_penalize_then_quarantine_at_the_limit(
    coord: Running, admin: AdminClient
) -> None:
    origin = await agent(coord.url, "origin", roles=["origin"], speed=1e6)
    img = fake_image(sizes=(70_000,))
    await ingest(admin, origin.c, img)
    bad = await agent(coord.url, "bad", speed=500e6, holdings=img.digests)
    verify = TransferFailed(reason="chunk 0 digest mismatch", kind="verify", seeder_fault=True)
    sched = coord.coordinator.scheduler
    ds = []
    for i in range(3):  # one demander after the other; "bad" stays the fastest holder
        # demanders are slow (1 kB/s): once d0 holds the layer it must not outrank the
        # origin, whose speed is measured from a 70 kB transfer's wall-clock time
        d = await agent(coord.url, f"d{i}", speed=1e3)
        ds.append(d)
        await admin.create_job(CreateJob(image=img.record.ref, targets=[f"d{i}"]))
        t = await d.transfer()
        assert t.seeder.node_id == "bad", (i, t.seeder.node_id)
        await d.c.transfer_failed(t.transfer_id, verify)
        nodes = {n.node_id: n for n in (await admin.nodes()).nodes}
        # one demander's word only keeps the pair apart (evidence.py); from the second
        # demander on bad is penalized (speed halved); the third quarantines it
        if i < 2:
            assert not nodes["bad"].quarantined
            assert sched.speed("bad") == 500e6 / 2**i
        else:
            assert nodes["bad"].quarantined
            reason = coord.coordinator.cluster.nodes["bad"].info.quarantine_reason
            assert "3 demanders reported bad chunks" in reason
        t2 = await d.transfer()
        assert t2.seeder.node_id == "origin"
        await d.done(t2)
    assert [e[2] for e in coord.store.security_events()] == ["bad"] * 3
    for x in (origin, bad, *ds):
        await x.c.close()


async def test_unreachable_seeder_is_suspect_until_it_reports(
    coord: Running, admin: AdminClient
) -> None:
    origin = await agent(coord.url, "origin", roles=["origin"], speed=1e6)
    img = fake_image(sizes=(70_000,))
    await ingest(admin, origin.c, img)
    fast = await agent(coord.url, "fast", speed=500e6, holdings=img.digests)
    d = await agent(coord.url, "d")
    e = await agent(coord.url, "e")
    await admin.create_job(CreateJob(image=img.record.ref, targets=["d"]))
    t = await d.transfer()
    assert t.seeder.node_id == "fast"
    await d.c.transfer_failed(t.transfer_id, TransferFailed(reason="reset", kind="io"))
    # re-planned at once to another seeder; the suspect is shown down, gets no work
    t2 = await d.transfer()
    assert t2.seeder.node_id == "origin"
    nodes = {n.node_id: n.state for n in (await admin.nodes()).nodes}
    assert nodes["fast"] == "down" and not coord.coordinator.cluster.nodes["fast"].quarantined
    await admin.create_job(CreateJob(image=img.record.ref, targets=["e"]))
    assert await e.take() == []  # fast is the only idle holder, but suspect
    await fast.c.heartbeat(Heartbeat(holdings=img.digests))  # it reports: usable again
    te = await e.transfer()
    assert te.seeder.node_id == "fast"
    for x in (origin, fast, d, e):
        await x.c.close()


async def test_restart_adopts_running_transfers_and_accepts_their_reports(
    tmp_path: Path,
) -> None:
    r = await start(tmp_path)
    async with AdminClient(r.url, ADMIN) as admin:
        origin = await agent(r.url, "origin", roles=["origin"])
        img = fake_image(sizes=(70_000, 65_536))
        await ingest(admin, origin.c, img)
        d = await agent(r.url, "d")
        job = await admin.create_job(CreateJob(image=img.record.ref, targets=["d"]))
        t = await d.transfer()
        creds = {"origin": origin.c.credential, "d": d.c.credential}
        cursor = d.cursor
    for x in (origin, d):
        await x.c.close()
    await r.stop()

    r2 = await start(tmp_path)
    try:
        async with AdminClient(r2.url, ADMIN) as admin:
            assert r2.coordinator.scheduler.is_active(t.transfer_id)
            o2 = Agent(AgentClient(r2.url, node_id="origin", credential=creds["origin"]))
            d2 = Agent(AgentClient(r2.url, node_id="d", credential=creds["d"]))
            d2.cursor = cursor
            await o2.c.heartbeat(Heartbeat(holdings=img.digests))
            running = ActiveTransfer(
                transfer_id=t.transfer_id,
                layer=t.layer.digest,
                seeder="origin",
                bytes_done=1000,
                bytes_total=t.layer.size,
                rate_bps=1e6,
            )
            await d2.c.heartbeat(Heartbeat(active=[running]))
            # d still pulls layer 0: nothing new for it, certainly not layer 0 again
            assert await d2.take() == []
            await d2.c.transfer_done(t.transfer_id, TransferDone(bytes_moved=70_000, seconds=1))
            t2 = await d2.transfer()
            assert t2.layer.digest == img.digests[1]
            await d2.done(t2)
            final = await admin.job(job.job_id)
            assert final.state == "done"
            assert [u.layer for u in final.nodes[0].transfers] == img.digests
            # a repeated report (its reply was lost) and one for an unknown id are harmless
            await d2.c.transfer_done(t.transfer_id, TransferDone(bytes_moved=1, seconds=1))
            await d2.c.transfer_failed("t-unknown", TransferFailed(reason="x", kind="io"))
            assert len((await admin.job(job.job_id)).nodes[0].transfers) == 2
            await o2.c.close()
            await d2.c.close()
    finally:
        await r2.stop()


async def test_restart_releases_an_assignment_that_never_reached_the_agent(
    tmp_path: Path,
) -> None:
    r = await start(tmp_path)
    async with AdminClient(r.url, ADMIN) as admin:
        origin, img = await origin_with_one_layer(r, admin)
        d = await agent(r.url, "d")
        job = await admin.create_job(CreateJob(image=img.record.ref, targets=["d"]))
        creds = {"origin": origin.c.credential, "d": d.c.credential}
    for x in (origin, d):
        await x.c.close()
    await r.stop()  # d never polled: its assignment died with the mailbox

    r2 = await start(tmp_path)
    try:
        async with AdminClient(r2.url, ADMIN) as admin:
            o2 = Agent(AgentClient(r2.url, node_id="origin", credential=creds["origin"]))
            d2 = Agent(AgentClient(r2.url, node_id="d", credential=creds["d"]))
            await o2.c.heartbeat(Heartbeat(holdings=img.digests))
            await d2.c.heartbeat(Heartbeat())
            t = await d2.transfer()  # its old cursor shows it never got it: planned again
            await d2.done(t)
            assert (await admin.job(job.job_id)).state == "done"
            await o2.c.close()
            await d2.c.close()
    finally:
        await r2.stop()


async def test_dropped_poll_marks_the_node_down_and_frees_its_seeder(tmp_path: Path) -> None:
    r = await start(tmp_path)
    try:
        async with AdminClient(r.url, ADMIN) as admin:
            origin, img = await origin_with_one_layer(r, admin)
            d = await agent(r.url, "d")
            e = await agent(r.url, "e")
            job = await admin.create_job(CreateJob(image=img.record.ref, targets=["d", "e"]))
            t = await d.transfer()
            assert await e.take() == []
            # a normal long-poll timing out does not mark anything down
            assert await d.take(wait=0.2) == []
            nodes = r.coordinator.cluster.nodes
            assert nodes["d"].up
            # d's connection drops mid-wait (its agent was killed)
            waiter = asyncio.create_task(d.take(wait=20.0))
            await wait_until(lambda: nodes["d"].polls > 0, timeout=5, what="d's poll to park")
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
            await d.c.close()
            te = await e.transfer(wait=5.0)  # the origin is released at once
            assert te.seeder.node_id == "origin" and te.layer == t.layer
            view = {n.node_id: n for n in (await admin.job(job.job_id)).nodes}
            assert view["d"].state == "down" and "node d down since" in view["d"].error
            # it comes back: the note goes, it is served and the job ends done
            await e.done(te)
            d2 = Agent(AgentClient(r.url, node_id="d", credential=d.c.credential))
            await d2.c.heartbeat(Heartbeat())
            t2 = await d2.transfer()
            await d2.done(t2)
            final = await admin.job(job.job_id)
            assert final.state == "done" and all(not n.error for n in final.nodes)
            for x in (origin, e, d2):
                await x.c.close()
    finally:
        await r.stop()


async def test_transfer_reports_keep_a_node_up_while_its_heartbeats_are_late(
    tmp_path: Path,
) -> None:
    """A busy host's heartbeat can be late while its transfer reports keep coming (the
    lab saw it): the node stays up and its transfer runs; so does its seeder, whose
    bytes the reports show moving. Silence still marks them down."""
    clock = FakeClock(1_800_000_000.0)
    r = await start(tmp_path, heartbeat_interval=QUIET_INTERVAL, clock=clock)
    try:
        async with AdminClient(r.url, ADMIN) as admin:
            origin, img = await origin_with_one_layer(r, admin)
            d = await agent(r.url, "d")
            await admin.create_job(CreateJob(image=img.record.ref, targets=["d"]))
            t = await d.transfer(wait=5.0)
            nodes = r.coordinator.cluster.nodes
            for i in range(10):  # ten heartbeat intervals without one from d or origin
                await d.c.transfer_progress(
                    t.transfer_id,
                    TransferProgress(bytes_done=1000 * i, bytes_total=t.layer.size, rate_bps=1e4),
                )
                clock.advance(QUIET_INTERVAL)
                assert r.coordinator.check_liveness() == []
            assert nodes["d"].up and nodes["origin"].up
            assert r.coordinator.scheduler.is_active(t.transfer_id)
            down: list[str] = []
            for _ in range(12):  # now silence: six intervals, a pass every half interval
                clock.advance(QUIET_INTERVAL / 2)
                down += r.coordinator.check_liveness()
            assert sorted(down) == ["d", "origin"]
            assert not nodes["d"].up and not nodes["origin"].up
            assert not r.coordinator.scheduler.is_active(t.transfer_id)
            for x in (origin, d):
                await x.c.close()
    finally:
        await r.stop()


async def test_node_down_longer_than_the_timeout_fails_in_its_job(tmp_path: Path) -> None:
    clock = FakeClock(1_800_000_000.0)
    r = await start(tmp_path, heartbeat_interval=QUIET_INTERVAL, clock=clock)
    r.coordinator.node_down_timeout = 5 * QUIET_INTERVAL
    try:
        async with AdminClient(r.url, ADMIN) as admin:
            origin, img = await origin_with_one_layer(r, admin)
            d = await agent(r.url, "d")
            job = await admin.create_job(CreateJob(image=img.record.ref, targets=["d"]))
            # d goes silent: down after three intervals, still in its job (it may come back)
            clock.advance(3.5 * QUIET_INTERVAL)
            await origin.c.heartbeat(Heartbeat(holdings=img.digests))
            assert r.coordinator.check_liveness() == ["d"]
            assert (await admin.job(job.job_id)).state == "running"
            # ... and failed in it once down longer than the timeout
            clock.advance(5 * QUIET_INTERVAL)
            await origin.c.heartbeat(Heartbeat(holdings=img.digests))
            r.coordinator.check_liveness()
            view = await admin.wait_job(job.job_id, timeout=10)
            assert view.state == "failed"
            assert "node d down for" in view.nodes[0].error
            for x in (origin, d):
                await x.c.close()
    finally:
        await r.stop()


async def test_a_relay_failure_blames_nobody_and_does_not_use_up_the_failure_budget(
    coord: Running, admin: AdminClient
) -> None:
    origin = await agent(coord.url, "origin", roles=["origin"], speed=1e6)
    img = fake_image(sizes=(70_000,))
    await ingest(admin, origin.c, img)
    relay = await agent(coord.url, "relay", speed=500e6, holdings=img.digests)
    d = await agent(coord.url, "d")
    sched = coord.coordinator.scheduler
    job = await admin.create_job(CreateJob(image=img.record.ref, targets=["d"]))
    unavailable = TransferFailed(
        reason="seeder says unavailable: chunk 3 is not here and the relay's pull ended",
        kind="relay",
    )
    seeders = []
    for _ in range(7):  # more than the per-layer failure budget (jobdriver.MAX_LAYER_FAILURES)
        t = await d.transfer()
        seeders.append(t.seeder.node_id)
        await d.c.transfer_failed(t.transfer_id, unavailable)
        nodes = {n.node_id: n for n in (await admin.nodes()).nodes}
        # neither suspected, nor penalized, nor quarantined
        assert {nodes[n].state for n in ("origin", "relay")} == {"up"}
        assert not nodes["relay"].quarantined and sched.speed("relay") == 500e6
        assert not sched.is_suspect("relay")
        if len(seeders) >= 2:
            # both pairs rest a heartbeat (5 s here): end the rest instead of waiting it out
            sched.inner._avoid.clear()
            await d.c.heartbeat(Heartbeat(holdings=[]))  # an event: the coordinator re-plans
    # the pair rests a heartbeat, so the re-plan tries another seeder first
    assert seeders[:2] == ["relay", "origin"]
    view = await admin.job(job.job_id)
    (n,) = view.nodes
    assert n.state != "failed", n.error
    assert coord.store.security_events() == []
    t = await d.transfer()
    await d.done(t)
    assert (await admin.wait_job(job.job_id)).state == "done"
    for x in (origin, relay, d):
        await x.c.close()
