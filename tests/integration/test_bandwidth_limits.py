"""Per-node bandwidth caps with real agents on loopback (issue 7).

Loopback moves hundreds of MB/s, so any rate near a cap of a few MB/s is the
cap's doing. The origin has ``max_upload_mbps`` set; ``n2`` has
``max_download_mbps`` set. Each job's transfer records (bytes and seconds as
the demander measured them) must show no rate above 1.2x the cap that
applies, and the coordinator's speed estimate for the origin must not exceed
its upload cap.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rainbowd.core import messages as m
from rainbowd.devcluster.imagebuild import build_demo_image
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec

pytestmark = pytest.mark.integration

UPLOAD_MBPS = 40.0  # origin: 5 MB/s
DOWNLOAD_MBPS = 24.0  # n2: 3 MB/s
TOLERANCE = 1.2


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    specs = [
        NodeSpec("origin", roles=["origin"], config={"max_upload_mbps": UPLOAD_MBPS}),
        NodeSpec("n1"),
        NodeSpec("n2", config={"max_download_mbps": DOWNLOAD_MBPS}),
    ]
    # whole layers (policy relay): each cap is read off one transfer of >= 1 MiB, and
    # swarm's pieces of this small image are smaller than that
    c = LocalCluster(
        tmp_path / "c", specs, chunk_size=256 * 1024, heartbeat_interval=0.5, policy="relay"
    )
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


def _rates(job: m.JobView, node: str) -> tuple[list[tuple[str, float]], float]:
    """(seeder, bytes/s) of each transfer of at least 1 MiB to ``node``, and the overall rate."""
    (n,) = [x for x in job.nodes if x.node_id == node]
    big = [(u.seeder, u.bytes / u.seconds) for u in n.transfers if u.bytes >= 1 << 20]
    total = sum(u.bytes for u in n.transfers) / sum(u.seconds for u in n.transfers)
    return big, total


async def test_upload_and_download_caps_are_honoured(cluster: LocalCluster, tmp_path: Path) -> None:
    archive = build_demo_image(tmp_path / "img.tar", ref="caps:1", payload_mib=3, seed=5)
    async with cluster.admin() as admin:
        view = await admin.ingest(
            m.CreateImage(ref="caps:1", source=m.ArchiveSource(path=str(archive))), timeout=60
        )
        assert view.state == "ready", view.error

        # n1 pulls from the origin only: the origin's upload cap is the limit
        job = await admin.distribute(m.CreateJob(image="caps:1", targets=["n1"]), timeout=120)
        assert job.state == "done", job.error
        big, total = _rates(job, "n1")
        up_cap = UPLOAD_MBPS * 1e6 / 8
        assert big, "the image should have a layer of at least 1 MiB"
        for seeder, rate in big:
            assert seeder == "origin"
            assert rate <= TOLERANCE * up_cap, f"origin served at {rate / 1e6:.1f} MB/s"
        assert total <= TOLERANCE * up_cap
        nodes = {n.node_id: n for n in (await admin.nodes()).nodes}
        assert 0 < nodes["origin"].speed_bps <= up_cap  # the estimate is clamped too

        # n2 pulls from n1 (uncapped) or the origin: its own download cap is the limit
        job = await admin.distribute(m.CreateJob(image="caps:1", targets=["n2"]), timeout=120)
        assert job.state == "done", job.error
        big, total = _rates(job, "n2")
        down_cap = DOWNLOAD_MBPS * 1e6 / 8
        for seeder, rate in big:
            assert rate <= TOLERANCE * down_cap, (
                f"n2 received at {rate / 1e6:.1f} MB/s from {seeder}"
            )
        assert total <= TOLERANCE * down_cap
