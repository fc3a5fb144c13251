"""A seeder whose stored blob is corrupt never gets a bad byte into another node.

Real processes: a coordinator, an origin, a seeder ``bad`` made the fastest
(a huge speed hint) and three demanders. Image A (small payload) goes to every
node first, so all hold the layers A shares with image B (busybox and the
files layer); image B goes to ``bad`` alone. Then one byte of chunk
``BAD_CHUNK`` of B's payload layer is flipped on bad's disk, and B is
distributed to the three demanders, so the only layer they need is the one
bad holds corrupt, and bad (the fastest idle seeder) is certain to be tried.

Two variants:

* ``seeder-verifies`` (the default agent): bad checks each chunk against its
  manifest before sending, answers ERROR "corrupt" at chunk BAD_CHUNK and
  notes the layer in its ``corrupt_layers``;
* ``lying-seeder`` (``RBD_AGENT_VERIFY_SERVED=false``): bad sends the bad
  bytes and the demander's per-chunk check catches them.

Either way the demander reports ``verify``/``seeder_fault``, the coordinator
re-plans it onto another seeder, the partial keeps chunks 0..BAD_CHUNK-1
(so that demander's finished transfer moved exactly size - BAD_CHUNK chunks),
the job completes "done", every layer every demander holds hashes to its
digest, and no finished transfer came from bad. Whether bad is quarantined at
once or after repeated failures is the coordinator's policy; only what holds
under both is asserted.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from invariants import InvariantMonitor

from rainbowd.core import messages as m
from rainbowd.devcluster.imagebuild import BUSYBOX, build_demo_image
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from rainbowd.lib.client import AdminClient
from testdeps import missing_dependency

pytestmark = pytest.mark.integration

SMALL, BIG = "rbd-small:latest", "rbd-big:latest"
CHUNK = 256 * 1024
BAD_CHUNK = 20
DEMANDERS = ["n1", "n2", "n3"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if not BUSYBOX.is_file():
        missing_dependency(f"{BUSYBOX} missing: apt-get install busybox-static")
    d = tmp_path_factory.mktemp("corrupt")
    return (
        build_demo_image(d / "small.tar", ref=SMALL, payload_mib=1, seed=1),
        build_demo_image(d / "big.tar", ref=BIG, payload_mib=16, seed=2),
    )


@pytest.fixture(params=[True, False], ids=["seeder-verifies", "lying-seeder"])
async def cluster(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[LocalCluster]:
    monkeypatch.setenv("RBD_AGENT_VERIFY_SERVED", "true" if request.param else "false")
    specs = [
        NodeSpec("origin", roles=["origin"], speed_hint_mbps=1000),
        NodeSpec("bad", speed_hint_mbps=1_000_000),
        *(NodeSpec(n) for n in DEMANDERS),
    ]
    # Algorithm 1 (policy paper) hands every demander to the fastest idle seeder, "bad",
    # which is what this test needs; best fit (slots) would route them to the origin at once
    c = LocalCluster(
        tmp_path / "cluster", specs, chunk_size=CHUNK, heartbeat_interval=0.5, policy="paper"
    )
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


def blob_path(cluster: LocalCluster, node: str, digest: str) -> Path:
    return cluster.agent_dir(node) / "store" / "blobs" / "sha256" / digest.split(":")[1]


def file_digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def flip_byte(path: Path, offset: int) -> None:
    """Disk rot: one byte of a stored (0440, immutable) blob changes under the agent."""
    os.chmod(path, 0o640)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    os.chmod(path, 0o440)


async def add_image(admin: AdminClient, ref: str, archive: Path) -> m.ImageView:
    view = await admin.ingest(m.CreateImage(ref=ref, source=m.ArchiveSource(path=str(archive))))
    assert view.state == "ready", view.error
    return view


async def run_job(admin: AdminClient, ref: str, targets: list[str]) -> m.JobView:
    return await admin.distribute(m.CreateJob(image=ref, targets=targets))


async def test_corrupt_seeder_is_routed_around_and_nothing_bad_is_held(
    cluster: LocalCluster, images: tuple[Path, Path], request: pytest.FixtureRequest
) -> None:
    verifies = os.environ["RBD_AGENT_VERIFY_SERVED"] == "true"
    small_archive, big_archive = images
    t0 = time.monotonic()
    async with asyncio.timeout(50), cluster.admin() as admin:
        await add_image(admin, SMALL, small_archive)
        assert (await run_job(admin, SMALL, ["all"])).state == "done"
        big_view = await add_image(admin, BIG, big_archive)
        assert (await run_job(admin, BIG, ["bad"])).state == "done"
        small_layers = {layer.digest for layer in (await admin.image(SMALL)).layers}
        [payload] = [layer for layer in big_view.layers if layer.digest not in small_layers]
        assert payload.size > (BAD_CHUNK + 1) * CHUNK
        flip_byte(blob_path(cluster, "bad", payload.digest), BAD_CHUNK * CHUNK + 100)

        async with InvariantMonitor(cluster) as inv:
            job = await run_job(admin, BIG, DEMANDERS)
        await inv.check_jobs(timeout=10)
        bad_node = next(n for n in (await admin.nodes()).nodes if n.node_id == "bad")

    assert job.state == "done", job.error
    resumed = payload.size - BAD_CHUNK * CHUNK
    moved = {}
    for n in job.nodes:
        [t] = [t for t in n.transfers if t.layer == payload.digest]
        assert t.seeder != "bad", f"{n.node_id} recorded a finished transfer from the bad seeder"
        # either a clean pull from a good seeder, or a resume after bad's good chunks
        assert t.bytes in (payload.size, resumed), (n.node_id, t)
        moved[n.node_id] = t.bytes
    assert resumed in moved.values(), f"no demander kept bad's good chunks: {moved}"

    for node in DEMANDERS:
        status = await cluster.agent_status(node)
        held = {h["digest"] for h in status["holdings"]}
        assert {layer.digest for layer in big_view.layers} <= held
        assert status["partials"] == [], f"{node} kept a partial"
        for d in held:  # nothing held anywhere but the bad seeder fails its digest
            assert file_digest(blob_path(cluster, node, d)) == d, f"{node} holds a bad {d}"
    origin = await cluster.agent_status("origin")
    for h in origin["holdings"]:
        assert file_digest(blob_path(cluster, "origin", h["digest"])) == h["digest"]

    bad = await cluster.agent_status("bad")
    if verifies:
        # bad refused to serve its rotten chunk and knows which layer is rotten
        assert payload.digest in bad["corrupt_layers"]
        assert "chunk 20" in bad["corrupt_layers"][payload.digest]
    else:
        assert bad["corrupt_layers"] == {}
    bad_served = sum(bad["served_bytes"].get(n, 0) for n in DEMANDERS)
    print(
        f"\ncorruption ({request.node.callspec.id}): payload {payload.size} B; "
        f"demanders moved {moved}; bad served {bad_served} B; "
        f"bad quarantined={bad_node.quarantined}; {time.monotonic() - t0:.1f}s"
    )
