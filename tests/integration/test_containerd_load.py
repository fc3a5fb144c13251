"""``rbd distribute`` to a node with containerd and no Docker: the image lands in containerd.

The operator's ``rbd`` commands, real coordinator and agent processes
(LocalCluster) and a real containerd (Debian's package, its own root;
tests/support/containerd_fixtures.py); no dockerd but in the last test. The
target registers ``containerd: true``, so the coordinator sends it a load
once it holds every layer; the agent imports the image into containerd's
content store and image table. Then ``ctr`` shows the image under its
normalized name with the manifest digest the node's front door names it by,
calls its content complete, and runs it. A node with Docker too gets the
image into both.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from containerd_fixtures import ContainerdProcess, listed_digests
from rainbowd.agent.docker.loader import DockerLoader
from rainbowd.core import messages as m
from rainbowd.devcluster.dockerd import PrivateDockerd
from rainbowd.devcluster.imagebuild import build_demo_image
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec

pytestmark = [pytest.mark.integration]

REF = "rbd-demo:latest"
NAME = "docker.io/library/rbd-demo:latest"
#: a namespace of the test's own (the agent's default, k8s.io, is the CRI's)
NAMESPACE = "rbd-load"
CHUNK = 256 * 1024
BIN = Path(sys.executable).parent


@pytest.fixture
async def cluster(tmp_path: Path, containerd: ContainerdProcess) -> AsyncIterator[LocalCluster]:
    target = {
        "containerd_address": containerd.address,
        "containerd_namespace": NAMESPACE,
        "mirror_listen": "127.0.0.1:0",
    }
    specs = [
        NodeSpec("origin", roles=["origin"], speed_hint_mbps=1000),
        NodeSpec("n1", speed_hint_mbps=1000, config=target),
    ]
    c = LocalCluster(tmp_path / "cluster", specs, chunk_size=CHUNK, heartbeat_interval=1.0)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


async def run(*argv: str, env: dict[str, str], timeout: float = 180) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_rbd_distribute_loads_into_containerd_on_a_node_without_docker(
    cluster: LocalCluster, containerd: ContainerdProcess, demo_image: Path
) -> None:
    rbd = str(BIN / "rbd")
    env = {"RBD_COORDINATOR": cluster.url, "RBD_ADMIN_TOKEN_FILE": str(cluster.admin_token_file)}
    code, out, err = await run(rbd, "nodes", env=env)
    assert code == 0, err
    assert re.search(r"^n1\s+up\b.*\bcontainerd\b", out, re.M), out
    assert "docker" not in out, out  # no Docker anywhere in this cluster
    code, _, err = await run(rbd, "images", "add", REF, "--archive", str(demo_image), env=env)
    assert code == 0, err
    code, out, err = await run(rbd, "distribute", REF, "--to", "n1", env=env)
    assert code == 0, err
    assert re.search(r"^n1\s+done\b", out, re.M), out
    async with cluster.admin() as admin:
        view = await admin.image(REF)
        nodes = {n.node_id: n for n in (await admin.nodes()).nodes}
    assert nodes["n1"].containerd and not nodes["n1"].docker
    assert not nodes["origin"].containerd
    n1 = await cluster.agent_status("n1")
    digest = n1["mirror_images"][REF]  # the manifest digest the node's front door serves
    assert n1["containerd"] == {"address": containerd.address, "namespace": NAMESPACE}
    assert [i["ref"] for i in n1["images"]] == [REF]
    assert listed_digests(containerd, NAMESPACE)[NAME] == digest
    check = containerd.ctr("images", "check", namespace=NAMESPACE).stdout
    (row,) = [line for line in check.splitlines() if line.startswith(NAME)]
    n = len(view.layers) + 1  # the config and every layer
    assert f"complete ({n}/{n})" in row, row
    ran = containerd.ctr("run", "--rm", NAME, "rbd-distributed", namespace=NAMESPACE)
    assert "hello from rbd" in ran.stdout
    agent = str(BIN / "rbd-agent")
    socket = str(cluster.status_socket("n1"))
    code, out, err = await run(agent, "status", "--socket", socket, env={})
    assert code == 0, err
    assert f"containerd  {containerd.address} (namespace {NAMESPACE})" in out, out


@pytest.mark.docker
async def test_a_node_with_docker_and_containerd_gets_the_image_into_both(
    tmp_path: Path, containerd: ContainerdProcess, dockerd: PrivateDockerd
) -> None:
    ref, name = "rbd-both:1", "docker.io/library/rbd-both:1"
    archive = build_demo_image(tmp_path / "both.tar", ref=ref, payload_mib=1, seed=11)
    both = {"containerd_address": containerd.address, "containerd_namespace": NAMESPACE}
    specs = [
        NodeSpec("origin", roles=["origin"], speed_hint_mbps=1000),
        NodeSpec("n2", speed_hint_mbps=1000, docker_url=dockerd.url, config=both),
    ]
    async with (
        LocalCluster(tmp_path / "c", specs, chunk_size=CHUNK, heartbeat_interval=1.0) as c,
        c.admin() as admin,
    ):
        nodes = {n.node_id: n for n in (await admin.nodes()).nodes}
        assert nodes["n2"].containerd and nodes["n2"].docker
        view = await admin.ingest(
            m.CreateImage(ref=ref, source=m.ArchiveSource(path=str(archive))), timeout=60
        )
        assert view.state == "ready", view.error
        job = await admin.distribute(m.CreateJob(image=ref, targets=["n2"]), timeout=120)
        assert job.state == "done", job
        n2 = await c.agent_status("n2")
    # containerd names it as the front door does; Docker's loader checked its image ID
    assert listed_digests(containerd, NAMESPACE)[name] == n2["mirror_images"][ref]
    async with DockerLoader(dockerd.url) as docker:
        assert await docker.has_image(ref)


async def test_a_load_containerd_cannot_take_fails_the_node_by_name(
    cluster: LocalCluster, containerd: ContainerdProcess, demo_image: Path
) -> None:
    """containerd goes away after the agent registered it: the job fails, naming node and image."""
    async with cluster.admin() as admin:
        view = await admin.ingest(
            m.CreateImage(
                ref=REF, source=m.ArchiveSource(path=str(demo_image)), compression="gzip"
            ),
            timeout=60,
        )
        assert view.state == "ready", view.error
        containerd.stop()
        job = await admin.distribute(m.CreateJob(image=REF, targets=["n1"]), timeout=120)
    assert job.state == "failed", job
    (p,) = job.nodes
    assert p.state == "failed"
    for text in (job.error, p.error):
        assert "n1" in text and REF in text and "containerd" in text, text
