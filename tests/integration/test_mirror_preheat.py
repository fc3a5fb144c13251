"""``rbd distribute`` as preheat: afterwards the target's front door serves the image itself.

Real coordinator and agent processes (LocalCluster), a real dockerd for the
target's load, skopeo as the client. The origin catalogs the image when it
ingests it, the target when it is sent its load; both name it by the same
manifest digest (the manifest is built from the image record, the same on
every node), and a pull from the target's mirror_listen gets the source's
config and layers, byte for byte, with no request leaving the host.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from clients import copy_by_digest, skopeo
from rainbowd.core import messages as m
from rainbowd.devcluster.dockerd import PrivateDockerd
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec

pytestmark = [pytest.mark.integration, pytest.mark.docker]

REF = "rbd-demo:latest"
CHUNK = 256 * 1024
MIRROR = {"mirror_listen": "127.0.0.1:0"}


@pytest.fixture
async def cluster(tmp_path: Path, dockerd: PrivateDockerd) -> AsyncIterator[LocalCluster]:
    specs = [
        NodeSpec("origin", roles=["origin"], speed_hint_mbps=1000, config=MIRROR),
        NodeSpec("n1", speed_hint_mbps=1000, docker_url=dockerd.url, config=MIRROR),
    ]
    c = LocalCluster(tmp_path / "cluster", specs, chunk_size=CHUNK, heartbeat_interval=1.0)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


async def test_a_distributed_image_is_pulled_from_the_targets_front_door(
    cluster: LocalCluster, dockerd: PrivateDockerd, demo_image: Path, tmp_path: Path
) -> None:
    skopeo()  # a missing one fails under CI=true before the image is distributed
    async with cluster.admin() as admin:
        view = await admin.ingest(
            m.CreateImage(
                ref=REF, source=m.ArchiveSource(path=str(demo_image)), compression="gzip"
            ),
            timeout=60,
        )
        assert view.state == "ready", view.error
        job = await admin.distribute(m.CreateJob(image=REF, targets=["n1"]), timeout=120)
        assert job.state == "done", job
    origin = await cluster.agent_status("origin")
    n1 = await cluster.agent_status("n1")
    assert n1["mirror_url"].startswith("http://127.0.0.1:")
    digest = n1["mirror_images"][REF]
    assert origin["mirror_images"][REF] == digest  # every node names the image alike
    host = n1["mirror_url"].removeprefix("http://")
    manifest = await copy_by_digest(host, "rbd-demo", digest, tmp_path / "pulled")
    # the layers are the ones the origin ingested and the job moved, the config the
    # image Docker loaded on n1 (its image ID)
    assert [d["digest"] for d in manifest["layers"]] == [x.digest for x in view.layers]
    assert {d["digest"] for d in manifest["layers"]} <= {h["digest"] for h in n1["holdings"]}
    loaded = await asyncio.to_thread(
        subprocess.run,
        ["docker", "-H", dockerd.url, "image", "inspect", "--format", "{{.Id}}", REF],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert loaded.stdout.strip() == manifest["config"]["digest"]
