"""End-to-end job flows through the real coordinator app, with fake agents on the real client.

The agents here do no SSH: they play the protocol (poll, report done/failed)
so the coordinator's decisions can be checked step by step.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from coordinator_support import (
    ADMIN,
    Running,
    enroll,
    fake_image,
    ingest,
    register_request,
    start,
)
from rainbowd.core.messages import (
    ActiveTransfer,
    Assignment,
    CreateJob,
    Heartbeat,
    JobView,
    LoadAssignment,
    LoadDone,
    TaskFailed,
    TransferAssignment,
    TransferDone,
    TransferFailed,
    TransferProgress,
)
from rainbowd.lib.client import AdminClient, AgentClient, ApiError
from waiting import FakeClock


class Agent:
    """A fake agent: an AgentClient plus its assignment cursor."""

    def __init__(self, client: AgentClient) -> None:
        self.c = client
        self.cursor = 0

    async def take(self, wait: float = 0.0) -> list[Assignment]:
        batch = await self.c.assignments(self.cursor, 10**9, wait)
        self.cursor = batch.cursor
        return batch.assignments

    async def transfer(self, wait: float = 0.0) -> TransferAssignment:
        items = await self.take(wait)
        transfers = [a for a in items if isinstance(a, TransferAssignment)]
        assert len(transfers) == 1, items
        return transfers[0]

    async def done(self, t: TransferAssignment, seconds: float = 0.01) -> None:
        await self.c.transfer_progress(
            t.transfer_id,
            TransferProgress(bytes_done=t.layer.size // 2, bytes_total=t.layer.size, rate_bps=1e6),
        )
        await self.c.transfer_done(
            t.transfer_id, TransferDone(bytes_moved=t.layer.size, seconds=seconds)
        )


async def agent(url: str, node_id: str, **kw: object) -> Agent:
    return Agent(await enroll(url, node_id, **kw))


async def test_full_flow_follows_algorithm_1(coord: Running, admin: AdminClient) -> None:
    origin = await agent(coord.url, "origin", roles=["origin"], speed=100e6)
    a = await agent(coord.url, "a", speed=50e6, docker=True)
    b = await agent(coord.url, "b", speed=10e6)
    img = fake_image(sizes=(150_000, 70_000))
    l0, l1 = img.digests
    await ingest(admin, origin.c, img)
    await origin.take()
    assert (await admin.image(img.record.ref)).nodes == ["origin"]

    job = await admin.create_job(CreateJob(image=img.record.ref, targets=["all"]))
    states = {n.node_id: n.state for n in job.nodes}
    # the origin already holds everything and has no docker: done at once
    assert states == {"origin": "done", "a": "transferring", "b": "pending"}

    # one seeder, one transfer: a (asked first) gets layer 0 from the origin; b waits
    ta = await a.transfer()
    assert (ta.seeder.node_id, ta.layer.digest) == ("origin", l0)
    assert ta.layer == img.manifests[0] and ta.job_id == job.job_id
    assert ta.seeder.host_key == "ssh-ed25519 HOSTKEYorigin"
    assert "fastest idle seeder" in ta.reason
    assert await b.take() == []
    nodes = {n.node_id: n for n in (await admin.nodes()).nodes}
    assert nodes["origin"].busy and nodes["a"].busy and not nodes["b"].busy

    # progress shows in the job
    await a.c.transfer_progress(
        ta.transfer_id, TransferProgress(bytes_done=1000, bytes_total=150_000, rate_bps=5e6)
    )
    view = {n.node_id: n for n in (await admin.job(job.job_id)).nodes}
    assert view["a"].bytes_done == 1000 and view["a"].rate_bps == 5e6
    assert view["a"].bytes_total == 220_000 and view["a"].layers_total == 2

    # a finishes layer 0 and becomes its seeder: b pulls layer 0 from a, while the
    # faster origin goes to a's older demand (layer 1)
    await a.done(ta)
    ta2 = await a.transfer()
    tb = await b.transfer()
    assert (ta2.seeder.node_id, ta2.layer.digest) == ("origin", l1)
    assert (tb.seeder.node_id, tb.layer.digest) == ("a", l0)

    # a completes: it has docker, so it loads the image
    await a.done(ta2)
    (load,) = [x for x in await a.take() if isinstance(x, LoadAssignment)]
    assert load.image.ref == img.record.ref and load.job_id == job.job_id
    view = {n.node_id: n for n in (await admin.job(job.job_id)).nodes}
    assert view["a"].state == "loading" and view["a"].layers_done == 2
    assert [(u.layer, u.seeder) for u in view["a"].transfers] == [(l0, "origin"), (l1, "origin")]
    # a poll's view: the same job without the finished-transfer lists (they grow with
    # every piece; progress polling reads none of them)
    full, brief = await admin.job(job.job_id), await admin.job(job.job_id, transfers=False)
    assert [n.transfers for n in brief.nodes] == [[], [], []]
    assert any(n.transfers for n in full.nodes)
    strip = [msgspec.structs.replace(n, transfers=[]) for n in full.nodes]
    assert msgspec.structs.replace(full, nodes=strip) == brief
    (listed,) = (await admin.jobs(transfers=False)).jobs
    assert listed == brief
    with pytest.raises(ApiError, match=r"transfers='no' must be 0 or 1") as bad:
        await admin.call("GET", f"jobs/{job.job_id}", JobView, params={"transfers": "no"})
    assert bad.value.status == 400
    await a.c.load_done(load.load_id, LoadDone(seconds=0.1, layers_sent=2))

    await b.done(tb)
    tb2 = await b.transfer()
    assert tb2.layer.digest == l1 and tb2.seeder.node_id in ("origin", "a")
    await b.done(tb2)
    final = await admin.job(job.job_id)
    assert final.state == "done" and final.finished_at >= final.created_at
    assert {n.node_id: n.state for n in final.nodes} == {"origin": "done", "a": "done", "b": "done"}
    assert all(n.bytes_done == n.bytes_total for n in final.nodes)
    assert (await admin.image(img.record.ref)).nodes == ["a", "b", "origin"]
    assert [j.job_id for j in (await admin.jobs()).jobs] == [job.job_id]
    # measured speed replaced the hint for the origin
    assert coord.coordinator.scheduler.speed("origin") != 100e6
    for x in (origin, a, b):
        await x.c.close()


async def test_fast_seeder_is_chosen_first(coord: Running, admin: AdminClient) -> None:
    origin = await agent(coord.url, "origin", roles=["origin"], speed=1e6)
    img = fake_image(sizes=(80_000,))
    await ingest(admin, origin.c, img)
    fast = await agent(coord.url, "fast", speed=90e6, holdings=img.digests)
    slow = await agent(coord.url, "slow", speed=2e6, holdings=img.digests)
    d1 = await agent(coord.url, "d1")
    d2 = await agent(coord.url, "d2")
    job = await admin.create_job(CreateJob(image=img.record.ref, targets=["d1", "d2"]))
    t1, t2 = await d1.transfer(), await d2.transfer()
    # demanders in arrival order get seeders in speed order
    assert t1.seeder.node_id == "fast" and t2.seeder.node_id == "slow"
    assert "90.0 MB/s" in t1.reason
    await d1.done(t1)
    await d2.done(t2)
    assert (await admin.job(job.job_id)).state == "done"
    for x in (origin, fast, slow, d1, d2):
        await x.c.close()


async def test_failure_is_reassigned_and_repeated_failure_fails_the_node(
    coord: Running, admin: AdminClient
) -> None:
    origin = await agent(coord.url, "origin", roles=["origin"])
    img = fake_image(sizes=(70_000,))
    await ingest(admin, origin.c, img)
    d = await agent(coord.url, "d")
    e = await agent(coord.url, "e")
    job = await admin.create_job(CreateJob(image=img.record.ref, targets=["d", "e"]))
    t = await d.transfer()
    assert await e.take() == []
    await d.c.transfer_failed(t.transfer_id, TransferFailed(reason="interrupted", kind="cancelled"))
    # the origin is free again (the failure was the demander's own); the
    # longest-waiting demand (d's) is served again
    t2 = await d.transfer()
    assert t2.transfer_id != t.transfer_id and t2.layer == t.layer
    # a second failure report for the old transfer is harmless
    await d.c.transfer_failed(t.transfer_id, TransferFailed(reason="again", kind="io"))
    for _ in range(4):
        await d.c.transfer_failed(
            t2.transfer_id, TransferFailed(reason="stopped", kind="cancelled")
        )
        items = [x for x in await d.take() if isinstance(x, TransferAssignment)]
        if not items:
            break
        t2 = items[0]
    view = {n.node_id: n for n in (await admin.job(job.job_id)).nodes}
    assert view["d"].state == "failed"
    assert "node d" in view["d"].error and "failed 5 times" in view["d"].error
    assert "stopped" in view["d"].error
    # e is served now that d gave up
    te = await e.transfer()
    await e.done(te)
    final = await admin.job(job.job_id)
    assert final.state == "failed" and "d:" in final.error and "1 of 2" in final.error
    for x in (origin, d, e):
        await x.c.close()


async def test_security_failure_quarantines_the_seeder(coord: Running, admin: AdminClient) -> None:
    origin = await agent(coord.url, "origin", roles=["origin"], speed=1e6)
    img = fake_image(sizes=(70_000,))
    await ingest(admin, origin.c, img)
    evil = await agent(coord.url, "evil", speed=500e6, holdings=img.digests)
    d = await agent(coord.url, "d")
    first = await d.c.assignments(0, 0, 0)
    d.cursor = first.cursor
    assert first.trust is not None and "evil" in [p.node_id for p in first.trust.peers]
    await admin.create_job(CreateJob(image=img.record.ref, targets=["d"]))
    t = await d.transfer()
    assert t.seeder.node_id == "evil"
    # the coordinator's own look at evil's host key sees another key than the pinned one
    probed = coord.probe_says("mismatch")
    await d.c.transfer_failed(
        t.transfer_id,
        TransferFailed(reason="host key mismatch for evil", kind="security", seeder_fault=True),
    )
    await coord.coordinator.host_key_checks.wait()
    assert probed == [f"{coord.coordinator.cluster.nodes['evil'].info.address}:2222"]
    batch = await d.c.assignments(d.cursor, first.trust.version, 0)
    assert batch.trust is not None and batch.trust.version > first.trust.version
    assert "evil" not in [p.node_id for p in batch.trust.peers]
    (t2,) = [x for x in batch.assignments if isinstance(x, TransferAssignment)]
    assert t2.seeder.node_id == "origin"
    nodes = {n.node_id: n for n in (await admin.nodes()).nodes}
    assert nodes["evil"].quarantined and nodes["evil"].state == "down"
    # heartbeats do not bring a quarantined node back
    await evil.c.heartbeat(Heartbeat(holdings=img.digests))
    assert (await admin.nodes()).nodes[1].quarantined
    assert coord.store.security_events()[0][2] == "evil"
    # jobs to "all" leave it out; the admin can clear it
    cleared = await admin.clear_quarantine("evil")
    assert not cleared.quarantined
    await evil.c.heartbeat(Heartbeat())
    assert "evil" in [p.node_id for p in coord.coordinator.cluster.trust().peers]
    for x in (origin, evil, d):
        await x.c.close()


async def test_host_key_mismatch_event_without_a_transfer_is_refused(
    coord: Running, admin: AdminClient
) -> None:
    """The rule changed on purpose (issue 14): a claim about a peer needs a transfer from it."""
    from rainbowd.core.messages import SecurityEvent

    a = await agent(coord.url, "a")
    b = await agent(coord.url, "b")
    probed = coord.probe_says("mismatch")
    with pytest.raises(ApiError) as ei:
        await a.c.security_event(SecurityEvent(kind="host_key_mismatch", peer="b", detail="X"))
    assert ei.value.status == 403 and "no transfer from b to a" in str(ei.value)
    nodes = {n.node_id: n for n in (await admin.nodes()).nodes}
    assert not nodes["b"].quarantined and not nodes["a"].quarantined
    assert probed == []
    [(_, reporter, peer, kind, _)] = coord.store.security_events()
    assert (reporter, peer, kind) == ("coordinator", "a", "unfounded_report")
    for x in (a, b):
        await x.c.close()


#: heartbeat interval (seconds) of the fake-clock liveness tests: the app's own liveness
#: loop wakes every half interval of real time, so in these tests it never runs and the
#: test calls check_liveness itself, after moving the clock
QUIET_INTERVAL = 60.0


async def test_node_that_stops_heartbeating_is_marked_down_and_work_moves(
    tmp_path: Path,
) -> None:
    clock = FakeClock(1_800_000_000.0)
    r = await start(tmp_path, heartbeat_interval=QUIET_INTERVAL, clock=clock)
    try:
        async with AdminClient(r.url, ADMIN) as admin:
            origin = await agent(r.url, "origin", roles=["origin"], speed=1e6)
            img = fake_image(sizes=(70_000,))
            await ingest(admin, origin.c, img)
            fast = await agent(r.url, "fast", speed=90e6, holdings=img.digests)
            d = await agent(r.url, "d")
            await admin.create_job(CreateJob(image=img.record.ref, targets=["d"]))
            t = await d.transfer()
            assert t.seeder.node_id == "fast"
            # "fast" never heartbeats: after 3 intervals it is down and d is re-planned
            clock.advance(3.5 * QUIET_INTERVAL)
            await origin.c.heartbeat(Heartbeat(holdings=img.digests))  # it lists what it holds
            running = ActiveTransfer(
                transfer_id=t.transfer_id,
                layer=t.layer.digest,
                seeder="fast",
                bytes_done=0,
                bytes_total=t.layer.size,
                rate_bps=0.0,
            )
            await d.c.heartbeat(Heartbeat(active=[running]))  # d still pulls from "fast"
            assert r.coordinator.check_liveness() == ["fast"]
            # d's pull from "fast" fails; its next poll acknowledges t, and its next
            # heartbeat, no longer listing t, releases the demand to be planned again
            assert await d.take() == []
            clock.advance(QUIET_INTERVAL)
            await d.c.heartbeat(Heartbeat())
            t2 = await d.transfer(wait=3.0)
            assert t2.seeder.node_id == "origin" and t2.layer == t.layer
            nodes = {n.node_id: n.state for n in (await admin.nodes()).nodes}
            assert nodes == {"origin": "up", "fast": "down", "d": "up"}
            # a late done report for the aborted transfer still counts: d holds the layer
            await d.done(t)
            for x in (origin, fast, d):
                await x.c.close()
    finally:
        await r.stop()


async def test_a_heartbeat_ends_only_the_transfers_it_answers_for(tmp_path: Path) -> None:
    """A heartbeat leaving a transfer out ends it only if the agent had it and is not reporting it.

    In a busy lab a heartbeat took ~1 s to land: one built before an assignment
    reached the agent, or overtaking the transfer's done report, ended transfers
    that were running fine (9 % of them), which were then planned and pulled again.
    """
    clock = FakeClock(1_800_000_000.0)
    r = await start(tmp_path, clock=clock)
    try:
        async with AdminClient(r.url, ADMIN) as admin:
            origin = await agent(r.url, "origin", roles=["origin"])
            img = fake_image(sizes=(70_000, 60_000))
            await ingest(admin, origin.c, img)
            d = await agent(r.url, "d")
            await admin.create_job(CreateJob(image=img.record.ref, targets=["d"]))
            t1 = await d.transfer()
            before = d.cursor  # what a heartbeat built now answers for
            await d.done(t1)
            t2 = await d.transfer()
            assert t2.layer.digest == img.digests[1]
            assert await d.take() == []  # this poll acknowledges t2: it was delivered
            clock.advance(5.0)  # long past the delivery grace

            # built before t2 arrived (its cursor is t1's): t2 is not its business
            await d.c.heartbeat(Heartbeat(holdings=[img.digests[0]], cursor=before))
            # built after t2's pull ended, its report still on the way
            await d.c.heartbeat(
                Heartbeat(holdings=[img.digests[0]], reporting=[t2.transfer_id], cursor=d.cursor)
            )
            assert r.coordinator.scheduler.is_active(t2.transfer_id)
            assert await d.take() == []

            # an agent that had t2 and neither runs nor reports it: over, planned again
            await d.c.heartbeat(Heartbeat(holdings=[img.digests[0]], cursor=d.cursor))
            assert not r.coordinator.scheduler.is_active(t2.transfer_id)
            t3 = await d.transfer(wait=3.0)
            assert t3.layer == t2.layer and t3.transfer_id != t2.transfer_id
            await d.c.close()
            await origin.c.close()
    finally:
        await r.stop()


async def test_a_done_report_after_the_job_ended_still_counts_and_ends_with_the_node(
    tmp_path: Path,
) -> None:
    """The heartbeat that shows the layer held can beat the transfer's done report.

    The node is done (no Docker: nothing to load) and the job with it; the report
    that comes next is still the layer's transfer, so the job lists it, ending no
    later than the node (kill -9 and the lab's loaded runs both saw this order).
    """
    clock = FakeClock(1_800_000_000.0)
    r = await start(tmp_path, clock=clock)
    try:
        async with AdminClient(r.url, ADMIN) as admin:
            origin = await agent(r.url, "origin", roles=["origin"])
            img = fake_image(sizes=(70_000,))
            await ingest(admin, origin.c, img)
            d = await agent(r.url, "d")
            job = await admin.create_job(CreateJob(image=img.record.ref, targets=["d"]))
            t = await d.transfer()
            clock.advance(2.0)
            await d.c.heartbeat(Heartbeat(holdings=img.digests))
            ended = await admin.job(job.job_id)
            assert ended.state == "done"
            (node,) = ended.nodes
            assert node.transfers == []  # the report is still to come
            clock.advance(0.5)
            await d.done(t)
            (node,) = (await admin.job(job.job_id)).nodes
            (use,) = node.transfers
            assert (use.layer, use.seeder, use.bytes) == (t.layer.digest, "origin", t.layer.size)
            assert use.finished_at == node.finished_at == clock() - 0.5
            await d.c.close()
            await origin.c.close()
        # and it was saved: the restarted coordinator lists it too
        await r.stop()
        r = await start(tmp_path, clock=clock)
        async with AdminClient(r.url, ADMIN) as admin:
            (node,) = (await admin.job(job.job_id)).nodes
            assert [u.layer for u in node.transfers] == [t.layer.digest]
    finally:
        await r.stop()


async def test_state_survives_a_restart(tmp_path: Path) -> None:
    r = await start(tmp_path)
    async with AdminClient(r.url, ADMIN) as admin:
        origin = await agent(r.url, "origin", roles=["origin"], docker=True)
        img = fake_image(sizes=(70_000, 65_536))
        await ingest(admin, origin.c, img)
        d = await agent(r.url, "d")
        job = await admin.create_job(CreateJob(image=img.record.ref, targets=["d"]))
        t = await d.transfer()
        await d.done(t)  # one of two layers
        creds = {"origin": origin.c.credential, "d": d.c.credential}
        trust_before = r.coordinator.cluster.trust_version
        seq_before = d.cursor
    for x in (origin, d):
        await x.c.close()
    await r.stop()

    r2 = await start(tmp_path)
    try:
        async with AdminClient(r2.url, ADMIN) as admin:
            nodes = {n.node_id: n for n in (await admin.nodes()).nodes}
            assert {k: v.state for k, v in nodes.items()} == {"origin": "down", "d": "down"}
            assert nodes["origin"].roles == ["origin"] and nodes["origin"].docker
            assert nodes["d"].holdings == 1
            image = await admin.image(img.record.ref)
            assert image.state == "ready" and image.layers == img.record.layers
            view = await admin.job(job.job_id)
            assert view.state == "running"
            assert {n.node_id: n.layers_done for n in view.nodes} == {"d": 1}
            assert r2.coordinator.cluster.trust_version == trust_before

            # credentials still work; a join token still cannot take over
            o2 = Agent(AgentClient(r2.url, node_id="origin", credential=creds["origin"]))
            d2 = Agent(AgentClient(r2.url, node_id="d", credential=creds["d"]))
            d2.cursor = seq_before
            async with AgentClient(r2.url) as intruder:
                with pytest.raises(ApiError) as e:
                    await intruder.register(register_request("d"))
                assert e.value.status == 409
            await o2.c.heartbeat(Heartbeat(holdings=img.digests))
            await d2.c.heartbeat(Heartbeat(holdings=[img.digests[0]]))
            # the job resumes: d gets the missing layer, cursor kept rising across the restart
            t2 = await d2.transfer()
            assert t2.layer.digest == img.digests[1] and t2.seeder.node_id == "origin"
            assert d2.cursor > seq_before
            await d2.done(t2)
            final = await admin.job(job.job_id)
            assert final.state == "done"
            # a failed load is reported by node
            await o2.c.close()
            await d2.c.close()
    finally:
        await r2.stop()


async def test_load_failure_fails_the_node(coord: Running, admin: AdminClient) -> None:
    origin = await agent(coord.url, "origin", roles=["origin"])
    img = fake_image(sizes=(70_000,))
    await ingest(admin, origin.c, img)
    d = await agent(coord.url, "d", docker=True, holdings=img.digests)
    job = await admin.create_job(CreateJob(image=img.record.ref, targets=["d"]))
    assert job.nodes[0].state == "loading"
    (load,) = await d.take()
    assert isinstance(load, LoadAssignment)
    with pytest.raises(ApiError) as e:
        await origin.c.load_failed(load.load_id, TaskFailed(reason="x"))
    assert e.value.status == 403
    await d.c.load_failed(load.load_id, TaskFailed(reason="engine said no"))
    final = await admin.job(job.job_id)
    assert final.state == "failed" and "engine said no" in final.error and "d" in final.error
    for x in (origin, d):
        await x.c.close()


# (not relay: its min share of 0.8 keeps a second download out while the first holds
# half of the demander's link; it takes layers more nearly one at a time, at full rate)
@pytest.mark.parametrize("policy", ["slots", "deadline"])
async def test_capacity_policies_send_several_layers_to_one_demander_at_once(
    tmp_path: Path, policy: str
) -> None:
    """Two seeders, each holding one layer, feed one fast demander at the same time."""
    coord = await start(tmp_path, policy=policy)
    async with AdminClient(coord.url, ADMIN) as admin:
        origin = await agent(coord.url, "origin", roles=["origin"], speed=10e6)
        img = fake_image(sizes=(3_000_000, 2_000_000))
        await ingest(admin, origin.c, img)
        a = await agent(coord.url, "a", speed=10e6, holdings=[img.digests[0]])
        b = await agent(coord.url, "b", speed=10e6, holdings=[img.digests[1]])
        d = await agent(coord.url, "d", speed=20e6)
        job = await admin.create_job(CreateJob(image=img.record.ref, targets=["d"]))
        items = await d.take()
        ts = [x for x in items if isinstance(x, TransferAssignment)]
        assert len(ts) == 2, items  # both layers in flight at once
        assert {t.layer.digest for t in ts} == set(img.digests)
        assert all(t.reason.startswith(f"{policy}: ") for t in ts)
        sched = coord.coordinator.scheduler
        assert all(sched.receiving("d", layer) is not None for layer in img.digests)
        assert {t.seeder.node_id for t in ts} <= {"origin", "a", "b"}
        for t in ts:
            await d.done(t)
        view = await admin.job(job.job_id)
        assert view.state == "done"
        (node,) = [n for n in view.nodes if n.node_id == "d"]
        assert sorted(u.layer for u in node.transfers) == sorted(img.digests)
        assert not sched.active() and not sched.pending()
        for x in (origin, a, b, d):
            await x.c.close()
    await coord.stop()
