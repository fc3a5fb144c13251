"""Disk full on one demander: a clear failure naming node, layer and free space.

Real processes and a real small filesystem: node ``small`` keeps its whole
state directory (store included) on an 8 MiB tmpfs mounted before its agent
starts. The demo image has a 16 MiB payload layer, which cannot fit. The
agent checks free space before a pull and refuses at once with kind "disk"
and a reason like ``node small: layer sha256:… needs 16.0 MiB, 6.9 MiB free
on …/store``; the job shows ``small`` failed with that reason, the store of
``small`` has neither a blob nor a partial of the payload (nothing that could
ever be taken for complete), and every other node completes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from faultkit import WHOLE_LAYERS
from invariants import InvariantMonitor

from rainbowd.core import messages as m
from rainbowd.devcluster.imagebuild import BUSYBOX, build_demo_image
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from testdeps import missing_dependency

pytestmark = pytest.mark.integration

REF = "rbd-disk:latest"
CHUNK = 256 * 1024
OTHERS = ["origin", "n1", "n2"]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not BUSYBOX.is_file():
        missing_dependency(f"{BUSYBOX} missing: apt-get install busybox-static")
    out = tmp_path_factory.mktemp("disk") / "disk.tar"
    return build_demo_image(out, ref=REF, payload_mib=16, seed=3)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        missing_dependency("mounting a tmpfs needs root and mount(8)")
    specs = [
        NodeSpec("origin", roles=["origin"], speed_hint_mbps=1000),
        NodeSpec("n1"),
        NodeSpec("n2"),
        NodeSpec("small"),
    ]
    c = LocalCluster(
        tmp_path / "cluster", specs, chunk_size=CHUNK, heartbeat_interval=0.5, policy=WHOLE_LAYERS
    )
    small_dir = c.agent_dir("small")
    mounted = False
    try:
        await c.start_coordinator()
        for n in OTHERS:
            c.start_agent(n)
        await c.wait_nodes_up(OTHERS)
        small_dir.mkdir(parents=True)
        mount = ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small_dir)]
        await asyncio.to_thread(subprocess.run, mount, check=True)
        mounted = True
        c.start_agent("small")
        await c.wait_nodes_up(["small"])
        yield c
    finally:
        await c.stop()
        if mounted:
            r = await asyncio.to_thread(subprocess.run, ["umount", str(small_dir)], check=False)
            if r.returncode != 0:  # something still open: detach it rather than leak a mount
                await asyncio.to_thread(
                    subprocess.run, ["umount", "-l", str(small_dir)], check=False
                )


def blob_digest(cluster: LocalCluster, node: str, digest: str) -> str:
    path = cluster.agent_dir(node) / "store" / "blobs" / "sha256" / digest.split(":")[1]
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


async def test_full_disk_fails_that_node_clearly_and_others_complete(
    cluster: LocalCluster, image: Path
) -> None:
    t0 = time.monotonic()
    store = cluster.agent_dir("small") / "store"
    async with asyncio.timeout(50), cluster.admin() as admin:
        source = m.ArchiveSource(path=str(image))
        view = await admin.ingest(m.CreateImage(ref=REF, source=source))
        assert view.state == "ready", view.error
        payload = max(view.layers, key=lambda layer: layer.size)
        free_before = shutil.disk_usage(store).free
        assert payload.size > free_before  # the premise: it cannot fit

        async with InvariantMonitor(cluster) as inv:
            job = await admin.distribute(m.CreateJob(image=REF, targets=["all"]))
        await inv.check_jobs(timeout=10)

    nodes = {n.node_id: n for n in job.nodes}
    for n in OTHERS:
        assert nodes[n].state == "done", (n, nodes[n].error)
    small = nodes["small"]
    assert small.state == "failed"
    err = small.error
    print(f"\ndisk full: job {job.state} in {time.monotonic() - t0:.1f}s; small: {err}")
    assert "disk" in err and "node small" in err and payload.digest in err
    assert f"needs {payload.size / 2**20:.1f} MiB" in err
    assert "MiB free on" in err and str(store) in err
    assert "small" in job.error  # the job names the failed node
    assert "times" not in err  # failed at the first try: retrying cannot free space

    # nothing of the payload is held or half-held on small; the rest is intact
    status = await cluster.agent_status("small")
    held = {h["digest"] for h in status["holdings"]}
    assert payload.digest not in held
    assert not (store / "blobs" / "sha256" / payload.digest.split(":")[1]).exists()
    assert [p for p in status["partials"] if p["digest"] == payload.digest] == []
    for d in held:
        assert blob_digest(cluster, "small", d) == d
    for n in OTHERS:
        st = await cluster.agent_status(n)
        assert {layer.digest for layer in view.layers} <= {h["digest"] for h in st["holdings"]}
        for layer in view.layers:
            assert blob_digest(cluster, n, layer.digest) == layer.digest
