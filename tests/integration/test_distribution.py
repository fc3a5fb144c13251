"""End to end: a real coordinator and real agent processes on loopback.

Every part is real: rbd-coordinator and rbd-agent run as separate processes
started from their entry points, agents move layers to each other over
asyncssh, one agent loads into a real dockerd and a container runs.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest
from test_cli import run

from rainbowd.agent.dataplane.keys import load_or_create_key
from rainbowd.agent.dataplane.ssh_server import ChunkServer
from rainbowd.agent.docker.loader import DockerLoader
from rainbowd.core import messages as m
from rainbowd.devcluster.dockerd import PrivateDockerd
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from rainbowd.lib.store import LayerStore

pytestmark = pytest.mark.integration

REF = "rbd-demo:latest"
CHUNK = 256 * 1024


async def _add_image(cluster: LocalCluster, archive: Path) -> m.ImageView:
    async with cluster.admin() as admin:
        view = await admin.ingest(
            m.CreateImage(ref=REF, source=m.ArchiveSource(path=str(archive))), timeout=30
        )
    assert view.state == "ready", view.error
    return view


async def _run_job(cluster: LocalCluster, targets: list[str], timeout: float = 90) -> m.JobView:
    async with cluster.admin() as admin:
        return await admin.distribute(m.CreateJob(image=REF, targets=targets), timeout=timeout)


def _blob_digest(cluster: LocalCluster, node: str, digest: str) -> str:
    path = cluster.agent_dir(node) / "store" / "blobs" / "sha256" / digest.split(":")[1]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return "sha256:" + h.hexdigest()


@pytest.fixture
def dockerd_url(dockerd: PrivateDockerd) -> str:
    return dockerd.url


@pytest.fixture
async def cluster(tmp_path: Path, dockerd_url: str) -> AsyncIterator[LocalCluster]:
    specs = [
        NodeSpec("origin", roles=["origin"], speed_hint_mbps=1000),
        NodeSpec("n1", speed_hint_mbps=1000),
        NodeSpec("n2", speed_hint_mbps=400),
        NodeSpec("n3", speed_hint_mbps=200),
        NodeSpec("n4", speed_hint_mbps=128, docker_url=dockerd_url),
    ]
    # policy paper: the scenarios below are staged by Algorithm 1's choices (the fastest
    # seeder is picked); the capacity policies have their own test
    c = LocalCluster(
        tmp_path / "cluster", specs, chunk_size=CHUNK, heartbeat_interval=1.0, policy="paper"
    )
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


async def test_distribute_to_all_verifies_every_layer_and_runs_in_docker(
    cluster: LocalCluster, demo_image: Path, dockerd_url: str
) -> None:
    image = await _add_image(cluster, demo_image)
    assert len(image.layers) >= 3

    job = await _run_job(cluster, ["all"])
    assert job.state == "done", job.error
    assert {n.node_id for n in job.nodes} == set(cluster.nodes)

    layer_digests = {layer.digest for layer in image.layers}
    for node in cluster.nodes:
        status = await cluster.agent_status(node)
        held = {h["digest"] for h in status["holdings"]}
        assert layer_digests <= held, f"{node} lacks layers"
        assert not status["partials"], f"{node} has partial layers left"
        for d in layer_digests:  # the bytes on disk are the content their name claims
            assert _blob_digest(cluster, node, d) == d
        # only the origin read from the origin (the archive)
        assert status["origin_reads"] == (1 if node == "origin" else 0), node

    # every non-origin node got each layer exactly once, and peers seeded too
    seeders = set()
    for n in job.nodes:
        if n.node_id == "origin":
            assert n.transfers == []
            continue
        assert sorted(t.layer for t in n.transfers) == sorted(layer_digests), n.node_id
        seeders |= {t.seeder for t in n.transfers}
        assert all(t.reason.rule and t.reason.render() for t in n.transfers)
    assert seeders - {"origin"}, "finished demanders never became seeders"

    # the docker node loaded the image: a container from it runs
    n4 = await cluster.agent_status("n4")
    assert REF in {i["ref"] for i in n4["images"]}
    loader = DockerLoader(dockerd_url)
    try:
        code, output = await loader.run(REF)
    finally:
        await loader.close()
    assert code == 0
    assert "hello from rbd" in output


@pytest.mark.parametrize("policy", ["slots", "deadline", "relay", "swarm"])
async def test_capacity_policies_distribute_to_all(
    tmp_path: Path, demo_image: Path, policy: str
) -> None:
    """Real agents under a capacity-aware policy: several transfers per node, every layer once."""
    specs = [
        NodeSpec("origin", roles=["origin"], speed_hint_mbps=1000),
        NodeSpec("n1", speed_hint_mbps=1000),
        NodeSpec("n2", speed_hint_mbps=200),
        NodeSpec("n3", speed_hint_mbps=100),
        NodeSpec("n4", speed_hint_mbps=100),
    ]
    c = LocalCluster(
        tmp_path / "cluster", specs, chunk_size=CHUNK, heartbeat_interval=1.0, policy=policy
    )
    await c.start()
    try:
        image = await _add_image(c, demo_image)
        job = await _run_job(c, ["all"])
        assert job.state == "done", job.error
        digests = {layer.digest for layer in image.layers}
        for n in job.nodes:
            if n.node_id == "origin":
                continue
            # every layer arrived; a split layer may show a line per seeder that fed it
            assert {t.layer for t in n.transfers} == digests, n.node_id
            assert all(t.reason.policy == policy for t in n.transfers)
            assert all(t.reason.render(t.seeder).startswith(f"{policy}: ") for t in n.transfers)
            status = await c.agent_status(n.node_id)
            assert digests <= {h["digest"] for h in status["holdings"]}
            assert not status["partials"]
            for d in digests:
                assert _blob_digest(c, n.node_id, d) == d
    finally:
        await c.stop()


async def test_spoofed_seeder_is_refused_and_reported(
    cluster: LocalCluster, demo_image: Path, tmp_path: Path
) -> None:
    image = await _add_image(cluster, demo_image)
    # n1 gets the image first, so it is a seeder; make it the fastest seeder known
    first = await _run_job(cluster, ["n1"])
    assert first.state == "done", first.error
    async with cluster.admin() as admin:
        n1 = next(n for n in (await admin.nodes()).nodes if n.node_id == "n1")

    # n1 dies and an imposter with another host key takes its address and port
    cluster.kill("n1")
    imposter_store = LayerStore(tmp_path / "imposter")
    imposter = ChunkServer(
        imposter_store, load_or_create_key(tmp_path / "imposter-key"), node_id="n1"
    )
    await imposter.start(n1.address, n1.ssh_port)
    try:
        job = await _run_job(cluster, ["n2", "n3"])
    finally:
        await imposter.close()
    assert job.state == "done", job.error  # the demanders were re-served by honest seeders

    async with cluster.admin() as admin:
        n1_after = next(n for n in (await admin.nodes()).nodes if n.node_id == "n1")
        events = (await admin.security_events()).events
    assert n1_after.quarantined, "the spoofed seeder was not quarantined"
    # reported: the operator sees the refused host key, naming the spoofed node
    mismatches = [e for e in events if e.peer == "n1" and "host_key" in e.kind]
    reporters = {e.reporter for e in mismatches}
    # a demander's claim, confirmed by the coordinator's own probe of n1's address
    assert reporters & {"n2", "n3"} and reporters <= {"n2", "n3", "coordinator"}, events
    assert "coordinator" in reporters, events
    code, out, err = await run(
        str(Path(sys.executable).parent / "rbd"),
        "events",
        env={"RBD_COORDINATOR": cluster.url, "RBD_ADMIN_TOKEN_FILE": str(cluster.admin_token_file)},
    )
    assert code == 0, err
    assert "host_key_mismatch" in out and "n1" in out, out
    refused_by = []
    for node in ("n2", "n3"):
        status = await cluster.agent_status(node)
        if status["security_events"]:
            refused_by.append(node)
            assert any("n1" in e for e in status["security_events"])
        held = {h["digest"] for h in status["holdings"]}
        assert {layer.digest for layer in image.layers} <= held
    assert refused_by, "no demander saw the host key mismatch"
    # no transfer in the final job came from the imposter
    for n in job.nodes:
        ok = [t for t in n.transfers if t.seeder == "n1"]
        assert ok == [], f"{n.node_id} recorded a completed transfer from the spoofed n1"


async def test_client_key_not_on_trust_list_is_refused(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    async with cluster.admin() as admin:
        origin = next(n for n in (await admin.nodes()).nodes if n.node_id == "origin")
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(asyncssh.PermissionDenied):
        async with asyncssh.connect(
            origin.address,
            origin.ssh_port,
            username="rbd",
            client_keys=[stranger],
            known_hosts=None,
            agent_path=None,
            password=None,
            config=None,
        ):
            pass
    status = await cluster.agent_status("origin")
    assert status["refused_clients"] >= 1
