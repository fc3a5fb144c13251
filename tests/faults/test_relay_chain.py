"""Cut-through relay with real processes: origin -> a -> b, and a relay killed mid-way.

Real rbd-coordinator (policy ``relay``) and agents on loopback. Every agent's
upload is capped (``RBD_AGENT_MAX_UPLOAD_MBPS``) and the three nodes are
equally fast, so the origin's upload is taken by ``a``'s pull and the planner
can only reach ``b`` through ``a`` while ``a`` still receives: ``b``'s
transfer from ``a`` starts before ``a`` holds the layer, both end verified,
and the bytes ``b`` got came from ``a`` (``a``'s ChunkServer counts them, and
its status says how many chunks it served from a partial). Then ``a`` is
SIGKILLed while relaying: ``b``'s pull fails, it is re-planned to the origin
and finishes; ``a`` comes back, resumes, and the job ends ``done``. The fault
invariants (tests/faults/invariants.py) hold throughout.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from faultkit import add_image, log_events
from invariants import InvariantMonitor

from rainbowd.core import messages as m
from rainbowd.devcluster.imagebuild import BUSYBOX, build_demo_image
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from testdeps import missing_dependency
from waiting import wait_until

pytestmark = pytest.mark.integration

REF = "rbd-relay:latest"
CHUNK = 256 * 1024
PAYLOAD_MIB = 24
UPLOAD_MBPS = 64  # 8 MB/s per agent: the payload layer takes ~3 s per hop


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not BUSYBOX.is_file():
        missing_dependency(f"{BUSYBOX} missing: apt-get install busybox-static")
    out = tmp_path_factory.mktemp("relay") / "relay.tar"
    return build_demo_image(out, ref=REF, payload_mib=PAYLOAD_MIB, seed=11)


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LocalCluster]:
    monkeypatch.setenv("RBD_AGENT_MAX_UPLOAD_MBPS", str(UPLOAD_MBPS))
    specs = [
        NodeSpec("origin", roles=["origin"], speed_hint_mbps=UPLOAD_MBPS),
        NodeSpec("a", speed_hint_mbps=UPLOAD_MBPS),
        NodeSpec("b", speed_hint_mbps=UPLOAD_MBPS),
    ]
    c = LocalCluster(
        tmp_path / "cluster", specs, chunk_size=CHUNK, heartbeat_interval=0.5, policy="relay"
    )
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


def blob_digest(cluster: LocalCluster, node: str, digest: str) -> str:
    path = cluster.agent_dir(node) / "store" / "blobs" / "sha256" / digest.split(":", 1)[1]
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


async def relaying(cluster: LocalCluster, layer: str, min_bytes: int) -> None:
    """Wait until ``b`` pulls ``layer`` from ``a`` and has ``min_bytes`` of it."""

    async def fed() -> bool:
        return any(
            t["layer"] == layer and t["seeder"] == "a" and t["bytes_done"] >= min_bytes
            for t in (await cluster.agent_status("b"))["active"]
        )

    await wait_until(fed, timeout=60, what=f"b to get {min_bytes} B of {layer} from a")


async def test_b_pulls_from_relay_a_before_a_has_the_layer(
    cluster: LocalCluster, image: Path
) -> None:
    view = await add_image(cluster, image, REF)
    big = max(view.layers, key=lambda layer: layer.size)
    async with InvariantMonitor(cluster) as inv:
        async with asyncio.timeout(90):
            async with cluster.admin() as admin:
                job = await admin.create_job(m.CreateJob(image=REF, targets=["a", "b"]))
                final = await admin.wait_job(job.job_id)
            await inv.check_jobs(timeout=20)
    assert final.state == "done", final.error
    for node in ("a", "b"):
        assert blob_digest(cluster, node, big.digest) == big.digest
    (b,) = [n for n in final.nodes if n.node_id == "b"]
    (use,) = [u for u in b.transfers if u.layer == big.digest]
    assert use.seeder == "a" and use.reason.rule == "relay", use
    assert use.bytes == big.size
    # b's transfer from a was assigned before a's own pull of the layer was done
    short = big.digest.split(":", 1)[1][:12]
    lines = cluster.log_path("coordinator").read_text().splitlines()

    def first(event: str, seeder: str | None, demander: str) -> int:
        for i, line in enumerate(lines):
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if (
                isinstance(e, dict)
                and e.get("event") == event
                and e.get("demander") == demander
                and (seeder is None or e.get("seeder") == seeder)
                and short in str(e.get("layer"))
            ):
                return i
        raise AssertionError(f"no {event!r} for {demander} of {short}")

    assert first("transfer assigned", "a", "b") < first("transfer done", None, "a")
    status = await cluster.agent_status("a")
    assert status["served_bytes"].get("b", 0) >= big.size
    assert status["relayed_chunks"] > 0


async def test_relay_killed_mid_way_b_fails_over_and_the_job_ends_done(
    cluster: LocalCluster, image: Path
) -> None:
    view = await add_image(cluster, image, REF)
    big = max(view.layers, key=lambda layer: layer.size)
    async with InvariantMonitor(cluster) as inv:
        async with asyncio.timeout(120):
            async with cluster.admin() as admin:
                job = await admin.create_job(m.CreateJob(image=REF, targets=["a", "b"]))
            await relaying(cluster, big.digest, min_bytes=4 * CHUNK)
            cluster.kill("a", signal.SIGKILL)

            # b moves on without a: re-planned (to the origin) and done with the layer
            async def b_has_it() -> bool:
                st = await cluster.agent_status("b")
                return any(h["digest"] == big.digest for h in st["holdings"])

            await wait_until(b_has_it, timeout=30, what="b to hold the big layer")
            cluster.start_agent("a")
            async with cluster.admin() as admin:
                final = await admin.wait_job(job.job_id)
            await inv.check_jobs(timeout=30)
    assert final.state == "done", final.error
    for node in ("a", "b"):
        assert blob_digest(cluster, node, big.digest) == big.digest
    (b,) = [n for n in final.nodes if n.node_id == "b"]
    (use,) = [u for u in b.transfers if u.layer == big.digest]
    assert use.seeder == "origin"
    assert 0 < use.bytes < big.size  # it resumed from the chunks a had relayed
    failed = [
        e for e in log_events(cluster, "coordinator", "transfer failed") if e["demander"] == "b"
    ]
    assert failed and failed[0]["seeder"] == "a"
