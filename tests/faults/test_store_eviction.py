"""Disk hygiene with real agents: store limits, LRU eviction, pins (issue 7).

One cluster of real processes: an origin (upload capped so jobs take a few
seconds), ``n1`` with a Docker engine and a store limit sized so that image A
fits but A and B together pass the high watermark, ``n2`` with a limit smaller
than one image, and ``n3`` without a limit. A and B share their base layers
and each has a payload layer of its own.

Checked:
* n2 receives all of A although A alone is over its limit: a layer a running
  job needs on the node is never evicted (every eviction record is later than
  n2's finish in the job, and the holdings invariant holds throughout);
  once the job is over its layers go, and the coordinator forgets them;
* n1 receives B after A: it evicts A's payload (the least recently used,
  unpinned, exclusive layer) and keeps the shared ones (B's load used them);
* the coordinator no longer offers n1 or n2 as seeders of what they evicted:
  a later job sending A to n3 takes those layers from the origin only.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from faultkit import WHOLE_LAYERS
from invariants import InvariantMonitor

from rainbowd.agent.status import render_status
from rainbowd.core import messages as m
from rainbowd.devcluster.dockerd import PrivateDockerd
from rainbowd.devcluster.imagebuild import build_demo_image
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from rainbowd.lib.image import ingest_docker_archive
from rainbowd.lib.store import LayerStore
from waiting import wait_until

pytestmark = [pytest.mark.docker, pytest.mark.integration]

CHUNK = 256 * 1024
PAYLOAD_MIB = 4


def _sizes(archive: Path, scratch: Path) -> dict[str, int]:
    """digest -> bytes the layer takes in a store (blob + manifest), in image order."""
    store = LayerStore(scratch)
    image, _ = ingest_docker_archive(archive, store, chunk_size=CHUNK)
    out = {}
    for lr in image.layers:
        blob = store.path(lr.digest)  # type: ignore[arg-type]
        out[lr.digest] = sum(
            p.stat().st_blocks * 512 for p in (blob, blob.with_name(blob.name + ".chunks"))
        )
    return out


@pytest.fixture
async def setup(
    tmp_path: Path, dockerd: PrivateDockerd
) -> AsyncIterator[tuple[LocalCluster, Path, Path, dict[str, int], dict[str, int]]]:
    a = build_demo_image(tmp_path / "a.tar", ref="evict-a:1", payload_mib=PAYLOAD_MIB, seed=11)
    b = build_demo_image(tmp_path / "b.tar", ref="evict-b:1", payload_mib=PAYLOAD_MIB, seed=12)
    sa = _sizes(a, tmp_path / "scratch-a")
    sb = _sizes(b, tmp_path / "scratch-b")
    union = sum({**sa, **sb}.values())
    own_a = sum(v for d, v in sa.items() if d not in sb)
    # high x max < A+B (so B triggers an eviction) and, once A's own layer is
    # gone, the store is below low x max (one eviction is enough); A alone fits
    n1_max = int((union - own_a / 2) / 0.85)
    assert sum(sa.values()) < 0.8 * n1_max < union - 0 and 0.9 * n1_max < union
    specs = [
        NodeSpec("origin", roles=["origin"], config={"max_upload_mbps": 60}),
        NodeSpec("n1", docker_url=dockerd.url, config={"store_max_bytes": n1_max}),
        NodeSpec("n2", config={"store_max_bytes": f"{sum(sa.values()) // 2 // 1024}KiB"}),
        NodeSpec("n3"),
    ]
    c = LocalCluster(
        tmp_path / "c", specs, chunk_size=CHUNK, heartbeat_interval=0.5, policy=WHOLE_LAYERS
    )
    await c.start()
    try:
        yield c, a, b, sa, sb
    finally:
        await c.stop()


async def _status(cluster: LocalCluster, node: str) -> dict[str, Any]:
    return await cluster.agent_status(node)


async def _wait_evicted(cluster: LocalCluster, node: str, layers: set[str], timeout: float) -> None:

    async def evicted() -> bool:
        st = await _status(cluster, node)
        return layers <= {e["digest"] for e in st["store"]["evicted"]}

    await wait_until(evicted, timeout=timeout, what=f"{node} to evict {sorted(layers)}")


async def test_lru_eviction_respects_jobs_and_updates_the_coordinator(
    setup: tuple[LocalCluster, Path, Path, dict[str, int], dict[str, int]],
) -> None:
    cluster, archive_a, archive_b, sa, sb = setup
    shared = set(sa) & set(sb)
    own_a = set(sa) - shared
    assert shared and own_a and set(sb) - shared

    async with cluster.admin() as admin:
        for ref, archive in (("a:1", archive_a), ("b:1", archive_b)):
            view = await admin.ingest(
                m.CreateImage(ref=ref, source=m.ArchiveSource(path=str(archive))), timeout=60
            )
            assert view.state == "ready", view.error
            assert {lr.digest for lr in view.layers} == set(sa if ref == "a:1" else sb)

        # -- A to n1 and n2; n2's limit is smaller than A ------------------
        async with InvariantMonitor(cluster, interval=0.1):
            job_a = await admin.distribute(m.CreateJob(image="a:1", targets=["n1", "n2"]))
            assert job_a.state == "done", job_a.error
            n2_done = {n.node_id: n for n in job_a.nodes}["n2"].finished_at
            # once n2's job is over, nothing pins A on it: it evicts down to its limit
            await _wait_evicted(cluster, "n2", set(sa) - shared, timeout=30)
        n2 = await _status(cluster, "n2")
        evicted_n2 = {e["digest"]: e["at"] for e in n2["store"]["evicted"]}
        # never while the job needed the layers on n2
        assert all(at >= n2_done - 0.05 for at in evicted_n2.values()), (evicted_n2, n2_done)
        log = cluster.log_path("n2").read_text()
        considered = [
            json.loads(line)
            for line in log.splitlines()
            if "every layer left is pinned" in line or '"layers evicted"' in line
        ]
        assert considered, "n2 never checked its store during the job"
        held_n2 = {h["digest"] for h in n2["holdings"]}
        assert not held_n2 & set(evicted_n2)
        assert n2["disk"]["used"] <= int(n2["store"]["max_bytes"] * 0.8) + 64 * 1024

        n1 = await _status(cluster, "n1")
        assert {h["digest"] for h in n1["holdings"]} == set(sa)
        assert n1["store"]["evicted"] == []  # A alone is below n1's high watermark

        # -- then B to n1: A's own layer goes, the shared ones stay --------
        async with InvariantMonitor(cluster, interval=0.1):
            job_b = await admin.distribute(m.CreateJob(image="b:1", targets=["n1"]))
            assert job_b.state == "done", job_b.error
            await _wait_evicted(cluster, "n1", own_a, timeout=30)
        n1 = await _status(cluster, "n1")
        evicted_n1 = {e["digest"] for e in n1["store"]["evicted"]}
        assert evicted_n1 == own_a, "only A's exclusive layer is evicted"
        assert {h["digest"] for h in n1["holdings"]} == set(sb)
        assert "1 layer(s) evicted" in render_status(n1)  # what `rbd-agent status` prints

        # the coordinator's view follows: n1 holds B (not A), n2 neither
        images = {i.ref: i for i in (await admin.images()).images}
        assert "n1" not in images["a:1"].nodes and "n1" in images["b:1"].nodes
        assert "n2" not in images["a:1"].nodes
        nodes = {n.node_id: n for n in (await admin.nodes()).nodes}
        assert nodes["n1"].holdings == len(sb)

        # -- and does not offer them as seeders of what they evicted -------
        job_c = await admin.distribute(m.CreateJob(image="a:1", targets=["n3"]))
        assert job_c.state == "done", job_c.error
        (n3,) = job_c.nodes
        for use in n3.transfers:
            if use.layer in own_a:
                assert use.seeder == "origin", use
            if use.layer in evicted_n2:
                assert use.seeder != "n2", use
        assert not n3.error
