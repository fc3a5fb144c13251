"""Peer death: kill -9 a seeder, or a demander, in the middle of a transfer.

Real processes (LocalCluster). PAPER.md, "Fault handling": a failed seeder is
marked and loses its role; a failed demander releases its seeder and is
marked. Here:

* seeder death -- the demander's pull fails, it is re-planned to another
  seeder within a bounded time and resumes from its partial (only the missing
  chunks move); the dead seeder is shown down and given no work;
* demander death -- noticed through its dropped long-poll (no waiting for
  three missed heartbeats): its seeder is released for others at once, the
  job shows the node down with a reason, and when the agent is started again
  it re-registers, resumes and the job ends "done".
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from faultkit import WHOLE_LAYERS, add_image, log_events
from invariants import InvariantMonitor

from rainbowd.core import messages as m
from rainbowd.devcluster.imagebuild import BUSYBOX, build_demo_image
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from testdeps import missing_dependency
from waiting import wait_until

pytestmark = pytest.mark.integration

REF = "rbd-peers:latest"
CHUNK = 256 * 1024
#: a single transfer of this payload lasts ~0.5-1 s on loopback: long enough to kill into
PAYLOAD_MIB = 64


@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not BUSYBOX.is_file():
        missing_dependency(f"{BUSYBOX} missing: apt-get install busybox-static")
    return build_demo_image(tmp_path_factory.mktemp("img") / "big.tar", payload_mib=PAYLOAD_MIB)


#: n2's download cap in the seeder-death test: 64 MiB then take ~3.4 s, so the kill lands
#: mid-transfer however fast loopback is (uncapped, a quiet host moved it all in ~0.5 s and
#: the kill could come after the last chunk)
N2_DOWNLOAD_MBPS = 160.0


async def start_cluster(
    root: Path, nodes: list[str], interval: float, capped: dict[str, float] | None = None
) -> LocalCluster:
    """Origin + ``nodes``; ``capped`` maps a node to its agent's ``max_download_mbps``."""
    capped = capped or {}
    specs = [NodeSpec("origin", roles=["origin"], speed_hint_mbps=1000)]
    specs += [
        NodeSpec(
            n, speed_hint_mbps=500, config={"max_download_mbps": capped[n]} if n in capped else {}
        )
        for n in nodes
    ]
    c = LocalCluster(
        root, specs, chunk_size=CHUNK, heartbeat_interval=interval, policy=WHOLE_LAYERS
    )
    await c.start()
    return c


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    c = await start_cluster(
        tmp_path / "cluster", ["n1", "n2", "n3"], 0.5, capped={"n2": N2_DOWNLOAD_MBPS}
    )
    try:
        yield c
    finally:
        await c.stop()


async def job_until_final(cluster: LocalCluster, job_id: str) -> m.JobView:
    async with cluster.admin() as admin:
        return await admin.wait_job(job_id)


async def pulling(cluster: LocalCluster, node: str, layer: str, min_bytes: int) -> str:
    """Wait until ``node`` pulls ``layer`` and has ``min_bytes`` of it; return the seeder."""

    async def seeder() -> str:
        status = await cluster.agent_status(node)
        for a in status["active"]:
            if a["layer"] == layer and a["bytes_done"] >= min_bytes:
                return str(a["seeder"])
        return ""

    return await wait_until(seeder, timeout=50, what=f"{node} to have {min_bytes} B of {layer}")


async def node_state(cluster: LocalCluster, node: str) -> str:
    async with cluster.admin() as admin:
        return next(v.state for v in (await admin.nodes()).nodes if v.node_id == node)


async def test_seeder_killed_mid_transfer_demander_moves_on_and_resumes(
    cluster: LocalCluster, big_image: Path
) -> None:
    t0 = time.monotonic()
    image = await add_image(cluster, big_image, REF)
    big = max(image.layers, key=lambda layer: layer.size)
    async with InvariantMonitor(cluster) as inv:
        async with asyncio.timeout(50):
            async with cluster.admin() as admin:
                first = await admin.create_job(m.CreateJob(image=REF, targets=["n1"]))
            assert (await job_until_final(cluster, first.job_id)).state == "done"
            # origin and n1 both seed now; n2 pulls from one of them: kill that one
            async with cluster.admin() as admin:
                job = await admin.create_job(m.CreateJob(image=REF, targets=["n2"]))
            seeder = await pulling(cluster, "n2", big.digest, min_bytes=4 * CHUNK)
            cluster.kill(seeder, signal.SIGKILL)
            killed_at = time.monotonic()
            final = await job_until_final(cluster, job.job_id)
            recovered_in = time.monotonic() - killed_at
            # the dead seeder is marked down and stays so: it gets no new work
            assert await node_state(cluster, seeder) == "down"
            async with cluster.admin() as admin:
                third = await admin.create_job(m.CreateJob(image=REF, targets=["n3"]))
            after = await job_until_final(cluster, third.job_id)
            jobs = await inv.check_jobs(timeout=20)
    assert final.state == "done", final.error
    assert after.state == "done", after.error
    (n2,) = final.nodes
    (use,) = [u for u in n2.transfers if u.layer == big.digest]
    other = "n1" if seeder == "origin" else "origin"
    assert use.seeder == other
    # it resumed from its partial: the second seeder sent only what was missing
    assert 0 < use.bytes < big.size, (use.bytes, big.size)
    assert all(u.seeder != seeder for n in after.nodes for u in n.transfers)
    # the failure was reported against the dead seeder, which then got no assignment
    failed = [
        e for e in log_events(cluster, "coordinator", "transfer failed") if e["seeder"] == seeder
    ]
    assert failed and failed[0]["kind"] in ("io", "unreachable")
    assigned = log_events(cluster, "coordinator", "transfer assigned")
    i_fail = max(i for i, e in enumerate(assigned) if e["demander"] == "n2")
    assert all(e["seeder"] != seeder for e in assigned[i_fail:])
    assert len(jobs) == 3
    print(
        f"\nseeder death: killed {seeder} at {big.size - use.bytes} of {big.size} bytes; "
        f"n2 done {recovered_in:.2f}s later from {use.seeder}; "
        f"whole test {time.monotonic() - t0:.1f}s"
    )


async def test_demander_killed_mid_transfer_releases_seeder_and_finishes_on_return(
    tmp_path: Path, big_image: Path
) -> None:
    t0 = time.monotonic()
    # heartbeat 1 s: three missed heartbeats take 3 s; the coordinator's log says which
    # one marked n1 down (the dropped long-poll, not the missed heartbeats)
    cluster = await start_cluster(tmp_path / "cluster", ["n1", "n2"], 1.0)
    try:
        image = await add_image(cluster, big_image, REF)
        big = max(image.layers, key=lambda layer: layer.size)
        async with InvariantMonitor(cluster) as inv:
            async with asyncio.timeout(50):
                async with cluster.admin() as admin:
                    job = await admin.create_job(m.CreateJob(image=REF, targets=["n1", "n2"]))
                # only the origin holds the big layer; n1 asked first and pulls it
                seeder = await pulling(cluster, "n1", big.digest, min_bytes=4 * CHUNK)
                assert seeder == "origin"
                cluster.kill("n1", signal.SIGKILL)
                killed_at = time.monotonic()

                async def n1_down() -> bool:
                    return await node_state(cluster, "n1") == "down"

                await wait_until(n1_down, timeout=50, what="n1 to be marked down")
                down_in = time.monotonic() - killed_at
                # the origin is free at once: n2 gets the big layer from it
                await pulling(cluster, "n2", big.digest, min_bytes=0)
                released_in = time.monotonic() - killed_at
                async with cluster.admin() as admin:
                    view = await admin.job(job.job_id)
                n1 = next(n for n in view.nodes if n.node_id == "n1")
                assert view.state == "running"
                assert n1.state == "down", n1  # visible, and not final
                assert "node n1 down since" in n1.error, n1.error

                cluster.start_agent("n1")  # it comes back: re-registers and resumes
                final = await job_until_final(cluster, job.job_id)
                jobs = await inv.check_jobs(timeout=20)
        assert final.state == "done", final.error
        assert all(n.state == "done" and not n.error for n in final.nodes)
        # marked down for its dropped long-poll, not for missed heartbeats
        assert log_events(
            cluster, "coordinator", "agent connection dropped mid-poll; node marked down"
        )
        missed = log_events(cluster, "coordinator", "node missed heartbeats; marked down")
        assert not [e for e in missed if e.get("node") == "n1"], missed
        assert len(jobs) == 1
        print(
            f"\ndemander death: n1 down {down_in:.2f}s after kill -9, origin serving n2 "
            f"{released_in:.2f}s after; whole test {time.monotonic() - t0:.1f}s"
        )
    finally:
        await cluster.stop()
