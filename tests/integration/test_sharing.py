"""Layer-level sharing, end to end, from a real registry.

Two images that share their base layers are pushed with skopeo into a real
``docker-registry``; the origin reads them from there, and rbd distributes
both to every node. Each node must receive each distinct layer exactly once:
the byte counters of every seeder's SSH server, summed per receiving node,
must equal the size of the union of the two images' layers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from rainbowd.core import messages as m
from rainbowd.devcluster.imagebuild import build_demo_image
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from registry_fixtures import RegistryProcess

pytestmark = pytest.mark.integration


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    specs = [NodeSpec("origin", roles=["origin"]), NodeSpec("n1"), NodeSpec("n2"), NodeSpec("n3")]
    async with LocalCluster(tmp_path / "c", specs, chunk_size=256 * 1024) as c:
        yield c


async def _add(cluster: LocalCluster, ref: str, reference: str) -> m.ImageView:
    async with cluster.admin() as admin:
        source = m.RegistrySource(reference=reference, insecure=True)
        view = await admin.ingest(m.CreateImage(ref=ref, source=source), timeout=60)
    assert view.state == "ready", view.error
    return view


async def _distribute(cluster: LocalCluster, ref: str) -> m.JobView:
    async with cluster.admin() as admin:
        job = await admin.distribute(m.CreateJob(image=ref, targets=["all"]), timeout=90)
    assert job.state == "done", job.error
    return job


async def test_shared_base_crosses_each_link_once(
    cluster: LocalCluster,
    registry: RegistryProcess,
    push_image: Callable[..., str],
    tmp_path: Path,
) -> None:
    a = build_demo_image(tmp_path / "a.tar", ref="team/app-a:1", payload_mib=1, seed=1)
    b = build_demo_image(tmp_path / "b.tar", ref="team/app-b:1", payload_mib=1, seed=2)
    push_image(a, f"{registry.host}/team/app-a:1")
    push_image(b, f"{registry.host}/team/app-b:1")

    view_a = await _add(cluster, "app-a:1", f"{registry.host}/team/app-a:1")
    view_b = await _add(cluster, "app-b:1", f"{registry.host}/team/app-b:1")
    layers_a = {layer.digest: layer.size for layer in view_a.layers}
    layers_b = {layer.digest: layer.size for layer in view_b.layers}
    shared = set(layers_a) & set(layers_b)
    assert shared, "the two test images should share their base layer"
    assert set(layers_b) - shared, "the second image should have a layer of its own"

    job_a = await _distribute(cluster, "app-a:1")
    job_b = await _distribute(cluster, "app-b:1")
    assert job_b.wire_bytes < job_a.wire_bytes  # only B's own layers moved the second time

    # the second job moved none of the shared layers, to any node
    for n in job_b.nodes:
        moved = {t.layer for t in n.transfers}
        assert not moved & shared, f"{n.node_id} received a shared layer again"
        if n.node_id != "origin":
            assert moved == set(layers_b) - shared, n.node_id

    # byte counters: what every seeder served to each node = each distinct layer once
    union = {**layers_a, **layers_b}
    statuses = {node: await cluster.agent_status(node) for node in cluster.nodes}
    for receiver in ("n1", "n2", "n3"):
        received = sum(s["served_bytes"].get(receiver, 0) for s in statuses.values())
        assert received == sum(union.values()), receiver
        held = {h["digest"] for h in statuses[receiver]["holdings"]}
        assert set(union) <= held
    # only the origin talked to the registry
    assert statuses["origin"]["origin_reads"] == 2
    assert all(statuses[n]["origin_reads"] == 0 for n in ("n1", "n2", "n3"))
