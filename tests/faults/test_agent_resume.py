"""An agent SIGKILLed mid-transfer resumes from its persisted chunk bitmap.

Real processes: one rbd-coordinator, an origin agent and a demander agent on
loopback. The origin's upload is capped (``RBD_AGENT_MAX_UPLOAD_MBPS``, the
agent's own pacer) so the 24 MiB payload layer takes ~1.5 s to move and the
demander can be killed while it is half-way. The bound being proven:

* the restarted demander pulls only the chunks its persisted bitmap lacks:
  its recorded transfer of that layer (``TransferDone.bytes_moved``, kept by
  the coordinator as the job's per-transfer ``bytes``) is exactly the layer
  size minus the bytes persisted at the kill, and the origin serves it
  exactly the missing bytes after the restart;
* what the kill wasted (served to the node, never persisted) is at most one
  flush interval (puller.FLUSH_BYTES, or PartialLayer.FLUSH_SECONDS worth of
  chunks) plus what was in flight (one SSH channel window), so the total
  served is < layer bytes + that bound.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import msgspec
import pytest
from faultkit import WHOLE_LAYERS, add_image
from invariants import InvariantMonitor

from rainbowd.agent.dataplane.puller import FLUSH_BYTES
from rainbowd.agent.dataplane.ssh_server import CHANNEL_WINDOW
from rainbowd.core import messages as m
from rainbowd.core.chunks import ChunkBitmap, ChunkManifest
from rainbowd.devcluster.imagebuild import BUSYBOX, build_demo_image
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from testdeps import missing_dependency
from waiting import wait_until

pytestmark = pytest.mark.integration

REF = "rbd-resume:latest"
CHUNK = 256 * 1024
PAYLOAD_MIB = 24
UPLOAD_MBPS = 128  # 16 MB/s: the payload layer takes ~1.5 s
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not BUSYBOX.is_file():
        missing_dependency(f"{BUSYBOX} missing: apt-get install busybox-static")
    out = tmp_path_factory.mktemp("resume") / "resume.tar"
    return build_demo_image(out, ref=REF, payload_mib=PAYLOAD_MIB, seed=7)


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LocalCluster]:
    monkeypatch.setenv("RBD_AGENT_MAX_UPLOAD_MBPS", str(UPLOAD_MBPS))
    specs = [NodeSpec("origin", roles=["origin"], speed_hint_mbps=1000), NodeSpec("n1")]
    c = LocalCluster(
        tmp_path / "cluster", specs, chunk_size=CHUNK, heartbeat_interval=0.5, policy=WHOLE_LAYERS
    )
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


def survived(store_dir: Path, layer: str) -> tuple[set[str], int]:
    """(layers held, bytes of ``layer`` its persisted bitmap covers) in a dead agent's store.

    Read straight from the files (no LayerStore: opening one tidies tmp/).
    """
    held = {
        "sha256:" + p.name
        for p in (store_dir / "blobs" / "sha256").iterdir()
        if "." not in p.name and p.with_name(p.name + ".chunks").exists()
    }
    h = layer.split(":")[1]
    raw = (store_dir / "partial" / f"{h}.chunks").read_bytes()
    manifest = msgspec.convert(msgpack.unpackb(raw), ChunkManifest)
    bitmap = ChunkBitmap(manifest.count, (store_dir / "partial" / f"{h}.bitmap").read_bytes())
    return held, sum(manifest.chunk_length(i) for i in bitmap.present())


def blob_digest(cluster: LocalCluster, node: str, digest: str) -> str:
    path = cluster.agent_dir(node) / "store" / "blobs" / "sha256" / digest.split(":")[1]
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


async def test_sigkilled_agent_resumes_from_its_bitmap(cluster: LocalCluster, image: Path) -> None:
    t_start = time.monotonic()
    async with asyncio.timeout(55):
        view = await add_image(cluster, image, REF)
        sizes = {layer.digest: layer.size for layer in view.layers}
        big = max(sizes, key=lambda d: sizes[d])
        assert sizes[big] >= PAYLOAD_MIB * MiB
        store_dir = cluster.agent_dir("n1") / "store"

        async with InvariantMonitor(cluster) as inv:
            async with cluster.admin() as admin:
                job = await admin.create_job(m.CreateJob(image=REF, targets=["n1"]))
            # wait until the big layer is under way with some of it persisted

            async def under_way() -> bool:
                status = await cluster.agent_status("n1")
                active = [a for a in status["active"] if a["layer"] == big]
                part = {p["digest"]: p["have"] for p in status["partials"]}
                persisted = part.get(big, 0) * CHUNK
                if active and 4 * MiB <= persisted <= sizes[big] - 8 * MiB:
                    return True
                assert big not in {h["digest"] for h in status["holdings"]}, "too late to kill"
                return False

            await wait_until(under_way, timeout=50, what="n1 to have persisted part of the layer")
            cluster.kill("n1", signal.SIGKILL)

            # what survived the kill, read from the dead agent's disk
            held_at_kill, persisted = survived(store_dir, big)
            assert persisted >= 4 * MiB

            async def origin_let_go() -> bool:  # the origin notices the dead connection
                return "n1" not in (await cluster.agent_status("origin"))["ssh_peers"]

            await wait_until(origin_let_go, timeout=30, what="the origin to drop n1's connection")
            served_at_kill = (await cluster.agent_status("origin"))["served_bytes"]["n1"]

            cluster.start_agent("n1")
            await cluster.wait_nodes_up(["n1"])
            async with cluster.admin() as admin:
                job = await admin.wait_job(job.job_id)
        jobs = await inv.check_jobs(timeout=20)

    assert job.state == "done", job.error
    assert any(j.job_id == job.job_id and j.state == "done" for j in jobs)
    served_total = (await cluster.agent_status("origin"))["served_bytes"]["n1"]
    layer_bytes = sum(sizes.values())
    need_after = sum(s for d, s in sizes.items() if d not in held_at_kill) - persisted
    served_after = served_total - served_at_kill
    wasted = served_total - layer_bytes
    [n1] = [n for n in job.nodes if n.node_id == "n1"]
    [big_transfer] = [t for t in n1.transfers if t.layer == big]
    print(
        f"\nresume: layer {sizes[big]} B, persisted at kill {persisted} B, "
        f"second transfer moved {big_transfer.bytes} B; origin served n1 {served_total} B "
        f"for {layer_bytes} B of layers (re-fetched after the kill: {wasted} B); "
        f"test took {time.monotonic() - t_start:.1f}s"
    )
    # the resumed transfer moved exactly the chunks the bitmap lacked
    assert big_transfer.bytes == sizes[big] - persisted
    assert served_after == need_after
    # a SIGKILL loses at most one flush interval plus one channel window in flight
    assert 0 <= wasted <= FLUSH_BYTES + CHANNEL_WINDOW + 2 * CHUNK
    assert served_total < layer_bytes + FLUSH_BYTES + CHANNEL_WINDOW + 2 * CHUNK

    status = await cluster.agent_status("n1")
    assert set(sizes) <= {h["digest"] for h in status["holdings"]}
    assert status["partials"] == []
    for d in sizes:
        assert blob_digest(cluster, "n1", d) == d
