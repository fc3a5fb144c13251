"""Issue 14, item 4: the coordinator's view of holdings follows what each node says.

Pure tests drive the real Coordinator with a fake clock
(fake_clock_coordinator.py); the last two run real processes: a node whose
store was wiped gets the image again (it used to end "done" with 0 bytes on
disk), and an origin whose only copy rotted stops advertising it and the job
fails naming the layer (it used to run on, demanders failing on the origin).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fake_clock_coordinator import Sim
from rainbowd.coordinator.holdings import HOLDING_GRACE_INTERVALS, ORPHAN_GRACE_INTERVALS
from rainbowd.core import messages as m
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from waiting import wait_until

HB = 1.0  # the Sim's heartbeat interval
GRACE = HOLDING_GRACE_INTERVALS * HB


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    s = Sim(tmp_path, heartbeat_interval=HB)
    yield s
    s.close()


def test_a_layer_no_longer_listed_stops_being_seeded_and_is_pulled_again(sim: Sim) -> None:
    sim.enroll("origin", roles=["origin"], speed=1e6)
    img = sim.add_image("origin", sizes=(70_000, 60_000))
    l0, l1 = img.layers
    sim.enroll("fast", speed=500e6, holdings=[l0])
    sim.enroll("a", speed=1e3, holdings=[l0])
    sim.job(img, ["a"])  # a holds l0 already: counted done for it, demands l1
    t = sim.transfer("a")
    assert t.layer.digest == l1
    sim.clock.advance(GRACE + 0.1)
    sim.heartbeat("a", [])  # a's store lost l0 (wiped, or a lie: either way, its word)
    sim.heartbeat("fast", [])  # and fast no longer has it either
    assert l0 not in sim.node("a").holdings and l0 not in sim.node("fast").holdings
    assert sim.c.scheduler.holders(l0) == ["origin"]
    [job] = sim.c.jobs.values()
    assert l0 in job.nodes["a"].missing()
    sim.done("a", t)
    t2 = sim.transfer("a")  # demanded again, from the one node still holding it
    assert (t2.layer.digest, t2.seeder.node_id) == (l0, "origin")
    sim.done("a", t2)
    sim.heartbeat("a", [l0, l1])
    assert job.state == "done" and job.nodes["a"].done == {l0, l1}


def test_a_heartbeat_older_than_a_done_report_does_not_undo_it(sim: Sim) -> None:
    sim.enroll("origin", roles=["origin"])
    img = sim.add_image("origin")
    sim.enroll("a")
    sim.job(img, ["a"])
    sim.done("a", sim.transfer("a"))
    sim.heartbeat("a", [])  # built before the layer landed, delivered after the report
    assert img.layers[0] in sim.node("a").holdings
    sim.clock.advance(GRACE + 0.1)
    sim.heartbeat("a", [])  # still not listed long after: dropped
    assert img.layers[0] not in sim.node("a").holdings


def test_a_heartbeat_carried_across_a_restart_does_not_undo_what_the_last_leader_recorded(
    sim: Sim,
) -> None:
    """A heartbeat built before the leader died reaches the next one (a takeover, issue 16).

    The done report reached the old leader, which recorded the layer; the new
    leader restores it from the state and must keep it against that older
    snapshot (coordinator/restore.py), and drop it only when heartbeats keep
    leaving it out past the grace.
    """
    sim.enroll("origin", roles=["origin"])
    img = sim.add_image("origin")
    sim.enroll("a")
    sim.job(img, ["a"])
    sim.done("a", sim.transfer("a"))
    sim.clock.advance(10 * GRACE)  # long recorded: the old leader's grace is long over
    sim.restart()
    sim.heartbeat("a", [])  # built before the pull ended, retried across the takeover
    assert img.layers[0] in sim.node("a").holdings
    [job] = sim.c.jobs.values()
    assert job.state == "done"
    sim.clock.advance(GRACE + 0.1)
    sim.heartbeat("a", [])  # still not listed long after the new leader led: dropped
    assert img.layers[0] not in sim.node("a").holdings


def test_registration_states_the_holdings_too(sim: Sim) -> None:
    sim.enroll("origin", roles=["origin"])
    img = sim.add_image("origin")
    sim.enroll("a", holdings=img.layers)
    sim.clock.advance(GRACE + 0.1)
    a = sim.node("a")
    # its agent restarted with a wiped store and registers again, listing nothing
    sim.c.register(
        m.RegisterRequest(
            node_id="a",
            credential=sim.credentials["a"],
            address=a.info.address,
            ssh_port=a.info.ssh_port,
            host_key=a.info.host_key,
            client_key=a.info.client_key,
        )
    )
    assert sim.node("a").holdings == set()
    view = sim.job(img, ["a"])
    assert view.nodes[0].state == "transferring"  # it pulls; it is not "done" on an old belief


def test_a_seeder_answering_not_held_loses_the_holding_at_once(sim: Sim) -> None:
    sim.enroll("origin", roles=["origin"], speed=1e6)
    img = sim.add_image("origin")
    sim.enroll("liar", speed=500e6, holdings=img.layers)
    d = sim.enroll("d")
    sim.job(img, ["d"])
    t = sim.transfer("d")
    assert t.seeder.node_id == "liar"
    not_held = m.TransferFailed(
        reason="seeder liar says not_held: node liar does not hold layer", kind="io", not_held=True
    )
    sim.c.transfer_failed(d, t.transfer_id, not_held)
    assert sim.c.scheduler.holders(img.layers[0]) == ["origin"]
    assert not sim.c.scheduler.is_suspect("liar")  # alive and answering: not suspect
    assert sim.transfer("d").seeder.node_id == "origin"
    # a wrong claim is undone by the seeder's own next heartbeat
    sim.heartbeat("liar", img.layers)
    assert "liar" in sim.c.scheduler.holders(img.layers[0])


def test_a_node_counted_done_is_checked_when_the_job_ends(sim: Sim) -> None:
    sim.enroll("origin", roles=["origin"], speed=500e6)
    img = sim.add_image("origin")
    layer = img.layers[0]
    sim.enroll("a", speed=1e3)
    sim.enroll("b", speed=1e3)
    sim.job(img, ["a", "b"])
    sim.done("a", sim.transfer("a"))  # a is done; b waits for the origin
    tb = sim.transfer("b")
    [job] = sim.c.jobs.values()
    assert job.nodes["a"].state == "done"
    sim.clock.advance(GRACE + 0.1)
    sim.heartbeat("a", [])  # a lost the layer after it was counted done
    sim.done("b", tb)
    # the job does not end "done" with a node that lacks the layer: a pulls it again
    assert job.state == "running" and job.nodes["a"].state != "done"
    ta = sim.transfer("a")
    assert ta.layer.digest == layer
    sim.done("a", ta)
    assert job.state == "done"


def test_a_layer_nobody_holds_fails_the_job_naming_it(sim: Sim) -> None:
    sim.enroll("origin", roles=["origin"])
    img = sim.add_image("origin")
    layer = img.layers[0]
    sim.enroll("a")
    sim.enroll("b")
    sim.clock.advance(GRACE + 0.1)
    sim.heartbeat("origin", [])  # the origin found its only copy corrupt and deleted it
    sim.job(img, ["a", "b"])
    [job] = sim.c.jobs.values()
    sim.c.check_liveness()
    assert job.state == "running"  # a holder dropped by mistake gets time to list it again
    for node in ("origin", "a", "b"):
        sim.heartbeat(node, [])
    sim.clock.advance(ORPHAN_GRACE_INTERVALS * HB + 0.1)
    for node in ("origin", "a", "b"):
        sim.heartbeat(node, [])
    sim.c.check_liveness()
    assert job.state == "failed"
    assert f"layer {layer} is held by no node" in job.nodes["a"].error


# --------------------------------------------------------------------------
# real processes
# --------------------------------------------------------------------------
REF = "rbd-demo:latest"


def blobs(c: LocalCluster, node: str) -> Path:
    return c.agent_dir(node) / "store" / "blobs" / "sha256"


def digest_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def flip_byte(path: Path, offset: int) -> None:
    os.chmod(path, 0o640)  # stored blobs are read-only
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


async def add_demo(c: LocalCluster, archive: Path) -> m.ImageView:
    async with c.admin() as admin:
        view = await admin.ingest(m.CreateImage(ref=REF, source=m.ArchiveSource(path=str(archive))))
    assert view.state == "ready", view.error
    return view


async def wait_holdings(c: LocalCluster, node: str, count: int, timeout: float = 20) -> None:
    """Until the coordinator's view of ``node`` lists ``count`` layers (it heartbeats)."""
    async with c.admin() as admin:

        async def listed() -> bool:
            view = next(n for n in (await admin.nodes()).nodes if n.node_id == node)
            return view.holdings == count

        await wait_until(listed, timeout=timeout, what=f"{node} to list {count} layers")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    c = LocalCluster(
        tmp_path / "cluster",
        [NodeSpec("origin", roles=["origin"]), NodeSpec("n1")],
        chunk_size=256 * 1024,
        heartbeat_interval=0.5,
    )
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


@pytest.mark.integration
@pytest.mark.parametrize("restart", [False, True], ids=["while-running", "agent-restarted"])
async def test_a_wiped_store_gets_the_image_again(
    cluster: LocalCluster, demo_image: Path, restart: bool
) -> None:
    async with cluster.admin() as admin:
        image = await admin.ingest(
            m.CreateImage(ref=REF, source=m.ArchiveSource(path=str(demo_image)))
        )
        assert image.state == "ready", image.error
        first = await admin.distribute(m.CreateJob(image=REF, targets=["n1"]), timeout=60)
        assert first.state == "done", first.error
    layers = {lr.digest for lr in image.layers}
    if restart:
        cluster.kill("n1")
    shutil.rmtree(blobs(cluster, "n1"))
    os.makedirs(blobs(cluster, "n1"))
    if restart:
        cluster.start_agent("n1")
        await cluster.wait_nodes_up(["n1"])
    await wait_holdings(cluster, "n1", 0)
    async with cluster.admin() as admin:
        job = await admin.distribute(m.CreateJob(image=REF, targets=["n1"]), timeout=60)
    assert job.state == "done", job.error
    on_disk = {digest_of(p) for p in blobs(cluster, "n1").iterdir() if "." not in p.name}
    assert layers <= on_disk, "done, but the layers are not on n1's disk"
    assert job.nodes[0].wire_bytes > 0


@pytest.mark.integration
async def test_an_origin_with_a_rotten_only_copy_says_so_and_the_job_fails_naming_it(
    cluster: LocalCluster, demo_image: Path
) -> None:
    async with cluster.admin() as admin:
        image = await admin.ingest(
            m.CreateImage(ref=REF, source=m.ArchiveSource(path=str(demo_image)))
        )
        assert image.state == "ready", image.error
    big = max(image.layers, key=lambda lr: lr.size)
    path = blobs(cluster, "origin") / big.digest.split(":")[1]
    flip_byte(path, big.size // 2)  # disk rot in the middle of the layer
    async with cluster.admin() as admin:
        job = await admin.distribute(m.CreateJob(image=REF, targets=["n1"]), timeout=60)
    assert job.state == "failed"
    assert big.digest in job.error and "held by no node" in job.error, job.error
    status = await cluster.agent_status("origin")
    assert big.digest not in {h["digest"] for h in status["holdings"]}  # no longer advertised
    assert any(big.digest in e and "corrupt" in e for e in status["security_events"]), status
