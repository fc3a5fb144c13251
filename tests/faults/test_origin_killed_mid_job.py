"""The registry standby with real processes: kill -9 an image's origin mid-job (issue 16).

Two origin agents that read the same archive (one machine: the same path), the
image added with ``o1`` as its origin and ``o2`` as its standby origin. The
origin's upload is capped so the job is still running when it dies; then
coordinator/origin_standby.py must hand the image to ``o2``, which reads it
again, and the job must end "done" with no layer sent twice to a node and no
transfer from the dead origin after the kill.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from faultkit import WHOLE_LAYERS, log_events
from invariants import InvariantMonitor

from rainbowd.core import messages as m
from rainbowd.devcluster.imagebuild import BUSYBOX, build_demo_image
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from testdeps import missing_dependency
from waiting import wait_until

pytestmark = pytest.mark.integration

REF = "rbd-standby:latest"
CHUNK = 256 * 1024
PAYLOAD_MIB = 32
#: o1's upload cap: the 32 MiB layer takes ~2 s per copy, so the kill lands mid-job
ORIGIN_UPLOAD_MBPS = 120.0
HEARTBEAT_S = 0.5


@pytest.fixture(scope="module")
def image_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not BUSYBOX.is_file():
        missing_dependency(f"{BUSYBOX} missing: apt-get install busybox-static")
    return build_demo_image(tmp_path_factory.mktemp("img") / "app.tar", payload_mib=PAYLOAD_MIB)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    specs = [
        NodeSpec(
            "o1",
            roles=["origin"],
            speed_hint_mbps=1000,
            config={"max_upload_mbps": ORIGIN_UPLOAD_MBPS},
        ),
        NodeSpec("o2", roles=["origin"], speed_hint_mbps=1000),
        NodeSpec("n1", speed_hint_mbps=500),
        NodeSpec("n2", speed_hint_mbps=500),
    ]
    c = LocalCluster(
        tmp_path / "cluster",
        specs,
        chunk_size=CHUNK,
        heartbeat_interval=HEARTBEAT_S,
        policy=WHOLE_LAYERS,
    )
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


async def test_a_standby_origin_finishes_the_job_when_the_origin_is_killed(
    cluster: LocalCluster, image_archive: Path
) -> None:
    req = m.CreateImage(
        ref=REF,
        source=m.ArchiveSource(path=str(image_archive)),
        origin="o1",
        standby_origins=["o2"],
    )
    async with cluster.admin() as admin:
        view = await admin.ingest(req)
    assert (view.state, view.origin, view.standby_origins) == ("ready", "o1", ["o2"]), view.error
    big = max(view.layers, key=lambda layer: layer.size)

    async def o1_sending_big() -> str:
        """The node receiving the big layer from o1 (past its first chunk), or ""."""
        for n in ("n1", "n2"):
            for a in (await cluster.agent_status(n))["active"]:
                if a["layer"] == big.digest and a["seeder"] == "o1" and a["bytes_done"] > CHUNK:
                    return n
        return ""

    async with InvariantMonitor(cluster) as inv:
        async with asyncio.timeout(90):
            async with cluster.admin() as admin:
                job = await admin.create_job(m.CreateJob(image=REF, targets=["n1", "n2"]))
            cut = await wait_until(o1_sending_big, timeout=40, what="o1 to send the big layer")
            cluster.kill("o1", signal.SIGKILL)
            async with cluster.admin() as admin:
                final = await admin.wait_job(job.job_id)
                after = await admin.image(REF)
            await inv.check_jobs(timeout=20)
    assert final.state == "done", final.error
    # the node cut off mid-layer got it from the standby origin (or a peer fed by it)
    [cut_node] = [n for n in final.nodes if n.node_id == cut]
    [use] = [u for u in cut_node.transfers if u.layer == big.digest]
    assert use.seeder != "o1"
    assert (after.origin, after.standby_origins) == ("o2", ["o1"])
    assert "o2" in after.nodes  # it read the image again and holds all of it
    [takeover] = log_events(cluster, "coordinator", "standby origin takes over")
    assert (takeover["origin"], takeover["replaced"]) == ("o2", "o1")
    # after the takeover no transfer is handed out from the dead origin
    assigned = log_events(cluster, "coordinator", "transfer assigned")
    taken_at = str(takeover["timestamp"])
    assert all(e["seeder"] != "o1" for e in assigned if str(e["timestamp"]) > taken_at)
    async with cluster.admin() as admin:
        events = (await admin.security_events()).events
    assert any(e.kind == "origin_takeover" and e.peer == "o2" for e in events)
