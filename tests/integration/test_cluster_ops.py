"""The cluster functions end to end: real coordinator and agents, a real dockerd, the rbd CLI.

One node (n2) has the session's private Docker engine, one (n1) has none.
The demo image is distributed first; then, through ``rbd`` run as a
subprocess: Docker checks, containers run and removed, a Dockerfile built on
the distributed base (COPY + RUN) and run, and the image removed from the
nodes again -- its layers gone from their stores and from the coordinator's
holdings, the origin's copy and layers another image needs kept.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import aiodocker
import pytest
from test_cli import BIN, rbd_env, run

from rainbowd.core import messages as m
from rainbowd.devcluster.dockerd import PrivateDockerd
from rainbowd.devcluster.imagebuild import build_demo_image
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.docker]

REF = "rbd-demo:latest"
#: the cluster's heartbeat interval (seconds)
HEARTBEAT = 0.5
#: heartbeats a node sends before a claim that it "still" holds something is checked
HEARTBEATS_LATER = 3
OTHER = "rbd-demo-shared:1"


async def heard_from(cluster: LocalCluster, node: str, beats: int) -> None:
    """Wait until the coordinator has heard from ``node`` for ``beats`` more intervals."""
    async with cluster.admin() as admin:

        async def last_seen() -> float:
            return next(n.last_seen for n in (await admin.nodes()).nodes if n.node_id == node)

        since = await last_seen()

        async def later() -> bool:
            return await last_seen() >= since + beats * HEARTBEAT

        await wait_until(later, timeout=30, what=f"{beats} more heartbeats from {node}")


@pytest.fixture
async def cluster(tmp_path: Path, dockerd: PrivateDockerd) -> AsyncIterator[LocalCluster]:
    specs = [
        NodeSpec("origin", roles=["origin"], speed_hint_mbps=1000),
        NodeSpec("n1", speed_hint_mbps=500),
        NodeSpec("n2", speed_hint_mbps=500, docker_url=dockerd.url),
    ]
    c = LocalCluster(
        tmp_path / "cluster", specs, chunk_size=256 * 1024, heartbeat_interval=HEARTBEAT
    )
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


async def rbd(c: LocalCluster, *argv: str) -> tuple[int, str, str]:
    return await run(str(BIN / "rbd"), *argv, env=rbd_env(c), timeout=180)


async def distribute(c: LocalCluster, ref: str, archive: Path, targets: list[str]) -> m.ImageView:
    async with c.admin() as admin:
        view = await admin.ingest(
            m.CreateImage(ref=ref, source=m.ArchiveSource(path=str(archive))), timeout=60
        )
        assert view.state == "ready", view.error
        job = await admin.distribute(m.CreateJob(image=ref, targets=targets), timeout=120)
        assert job.state == "done", job
    return view


def layer_files(c: LocalCluster, node: str) -> set[str]:
    blobs = c.agent_dir(node) / "store" / "blobs" / "sha256"
    return {"sha256:" + p.name for p in blobs.iterdir() if "." not in p.name}


async def test_cluster_functions_end_to_end(
    cluster: LocalCluster, demo_image: Path, dockerd: PrivateDockerd, tmp_path: Path
) -> None:
    image = await distribute(cluster, REF, demo_image, ["all"])
    layers = [lr.digest for lr in image.layers]
    tag = secrets.token_hex(4)

    # -- docker check: the engine on n2, nothing on n1 (exit 1) -------------------
    code, out, err = await rbd(cluster, "docker", "check", "--on", "n1", "n2")
    assert code == 1, (out, err)
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("n")}
    assert "done" in lines["n2"] and "Docker 20.10" in lines["n2"] and "storage driver" in out
    assert "failed" in lines["n1"] and "not reachable" in lines["n1"]
    assert "Docker engine not reachable: no docker_url configured" in out

    # -- run: output and exit code of a container that ends in the wait ------------
    name = f"rbd-ops-{tag}"
    code, out, err = await rbd(
        cluster, "run", REF, "--on", "n2", "--name", name, "--network", "none"
    )
    assert code == 0, (out, err)
    assert f"n2  done     exited 0 ({name})" in out and "| hello from rbd" in out
    # a command after --, failing with 3: exit 1, the code reported
    code, out, _ = await rbd(
        cluster, "--json", "run", REF, "--on", "n2", "--network", "none", "--",
        "/bin/sh", "-c", "echo about to fail; exit 3",
    )  # fmt: skip
    assert code == 1
    view = m.decode(out.encode(), m.OpView, m.JSON)
    (n2,) = view.nodes
    assert (n2.state, n2.exit_code, n2.output.strip()) == ("failed", 3, "about to fail")
    assert "exited with 3" in n2.error and f"rbd rm {n2.container[:12]} --on n2" in n2.error
    failed_container = n2.container[:12]
    # n1 has no Docker: refused clearly
    code, out, _ = await rbd(cluster, "--json", "run", REF, "--on", "n1", "n2", "--network", "none")
    assert code == 1
    view = m.decode(out.encode(), m.OpView, m.JSON)
    states = {n.node_id: n for n in view.nodes}
    assert states["n1"].state == "failed" and states["n2"].state == "done"
    assert "n1 has no Docker engine configured" in states["n1"].error
    unnamed = states["n2"].container
    # a long-running one is reported running; an image not loaded is refused
    sleeper = f"rbd-sleep-{tag}"
    code, out, _ = await rbd(
        cluster, "run", REF, "--on", "n2", "--name", sleeper, "--network", "none",
        "--wait", "1", "--", "/bin/sleep", "600",
    )  # fmt: skip
    assert code == 0 and f"running ({sleeper})" in out, out
    code, out, _ = await rbd(cluster, "run", "rbd-absent:1", "--on", "n2")
    assert code == 1 and "image rbd-absent:1 is not loaded in Docker on node n2" in out
    assert "rbd distribute rbd-absent:1 --to n2" in out

    # -- rm: stop + remove -----------------------------------------------------------
    code, out, _ = await rbd(cluster, "rm", sleeper, "--on", "n2", "--stop-timeout", "1")
    assert code == 0 and f"stopped and removed {sleeper}" in out, out
    code, out, _ = await rbd(cluster, "rm", name, "--on", "n2")
    assert code == 0 and f"removed {name}" in out
    for container in (failed_container, unnamed):
        code, out, _ = await rbd(cluster, "rm", container, "--on", "n2")
        assert code == 0, out
    code, out, _ = await rbd(cluster, "rm", name, "--on", "n2")
    assert code == 1 and f"no container {name} on node n2" in out
    async with aiodocker.Docker(url=dockerd.url) as docker:
        names = {n for c in await docker.containers.list(all=True) for n in c["Names"]}
    assert f"/{name}" not in names and f"/{sleeper}" not in names

    # -- build on top of the distributed base: COPY + RUN, then run it -------------
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "greeting.txt").write_text(f"built on every node {tag}\n")
    (ctx / "Dockerfile").write_text(
        f"FROM {REF}\n"
        "COPY greeting.txt /greeting.txt\n"
        'RUN /bin/sh -c "cat /greeting.txt > /built.txt && echo RUN-step-ran >> /built.txt"\n'
        'CMD ["/bin/cat", "/built.txt"]\n'
    )
    built = f"rbd-built-{tag}:1"
    code, out, err = await rbd(
        cluster, "build", built, "--base", REF, "--context", str(ctx), "--to", "n2",
        "--network", "none",
    )  # fmt: skip
    assert code == 0, (out, err)
    assert "uploaded" in out and f"built {built}" in out
    code, out, _ = await rbd(cluster, "run", built, "--on", "n2", "--network", "none")
    assert code == 0, out
    assert f"| built on every node {tag}" in out and "| RUN-step-ran" in out
    built_container = next(w for w in out.split() if w.startswith("(")).strip("()")
    await rbd(cluster, "rm", built_container, "--on", "n2")
    # n1 cannot build (no Docker); a FROM that is not the base is refused before upload
    code, out, _ = await rbd(
        cluster, "build", built, "--base", REF, "--context", str(ctx), "--to", "n1"
    )
    assert code == 1 and "n1 has no Docker engine configured" in out
    (ctx / "Dockerfile.bad").write_text("FROM debian:12\nRUN true\n")
    code, out, err = await rbd(
        cluster, "build", built, "--base", REF, "--context", str(ctx), "-f", "Dockerfile.bad",
        "--to", "n2",
    )  # fmt: skip
    assert code == 2 and "FROM debian:12 is not the base rbd-demo:latest" in err
    code, _, err = await rbd(cluster, "build", built, "--base", "rbd-nope:1", "--context",
                             str(ctx), "-f", "Dockerfile.bad", "--to", "n2")  # fmt: skip
    assert code == 2

    # -- remove the image from the nodes -----------------------------------------------
    # a second image sharing the busybox layer, held by n1 only: that layer stays on n1
    other_archive = tmp_path / "other.tar"
    await asyncio.to_thread(build_demo_image, other_archive, ref=OTHER, payload_mib=1, seed=7)
    other = await distribute(cluster, OTHER, other_archive, ["n1"])
    shared = {lr.digest for lr in other.layers} & set(layers)
    assert shared, "the second image shares no layer with the first"

    # a container using the image on n2: Docker refuses, n2's store is untouched
    blocker = f"rbd-block-{tag}"
    code, _, _ = await rbd(cluster, "run", REF, "--on", "n2", "--name", blocker, "--network",
                           "none")  # fmt: skip
    assert code == 0
    code, out, _ = await rbd(cluster, "images", "rm-nodes", REF, "--from", "n2")
    assert code == 1 and "refused to remove rbd-demo:latest" in out, out
    assert set(layers) <= layer_files(cluster, "n2")
    async with cluster.admin() as admin:  # n2's heartbeats list its layers as holdings again

        async def n2_holds() -> bool:
            return "n2" in (await admin.image(REF)).nodes

        await wait_until(n2_holds, timeout=30, what="n2's heartbeat to list the image's layers")
    await rbd(cluster, "rm", blocker, "--on", "n2")

    code, out, err = await rbd(cluster, "images", "rm-nodes", REF, "--from", "all")
    assert code == 0, out + err
    assert "removed from Docker" in out and "layers kept: origin copy" in out
    assert set(layers).isdisjoint(layer_files(cluster, "n2"))
    assert layer_files(cluster, "n1") & set(layers) == shared  # other image still needs it
    assert set(layers) <= layer_files(cluster, "origin")  # never the origin's copy
    async with aiodocker.Docker(url=dockerd.url) as docker:
        tags = {t for i in await docker.images.list() for t in i.get("RepoTags") or []}
    assert REF not in tags and built in tags  # the built image keeps its own layers

    await heard_from(cluster, "n2", HEARTBEATS_LATER)  # and later the removal still holds
    async with cluster.admin() as admin:
        assert (await admin.image(REF)).nodes == ["origin"]
        assert (await admin.image(OTHER)).nodes == ["n1", "origin"]
        nodes = {n.node_id: n.holdings for n in (await admin.nodes()).nodes}
        assert nodes["n2"] == 0 and nodes["n1"] == len({lr.digest for lr in other.layers})
        # distributing again moves the removed layers only from nodes that hold them
        job = await admin.distribute(m.CreateJob(image=REF, targets=["n1", "n2"]), timeout=120)
        assert job.state == "done", job
        n1 = next(n for n in job.nodes if n.node_id == "n1")
        assert {t.layer for t in n1.transfers} == set(layers) - shared
    code, out, _ = await rbd(cluster, "ops")
    assert code == 0 and "rm-image" in out and "docker-check" in out
    async with aiodocker.Docker(url=dockerd.url) as docker:
        await docker.images.delete(built)


async def test_docker_install_runs_apt_get_when_asked(cluster: LocalCluster) -> None:
    """--install runs apt-get (docker.io is installed here, so apt-get has nothing to do).

    Guarded: the test first asks apt-get for a dry run and refuses to go on if
    the real run would change this machine (an upgrade would restart every
    engineer's Docker engine).
    """
    code, dry, _ = await run("apt-get", "install", "-s", "docker.io", timeout=120)
    if code != 0 or "0 upgraded, 0 newly installed" not in dry:
        pytest.fail(f"apt-get install docker.io would change this machine; not running it:\n{dry}")
    code, out, err = await rbd(cluster, "docker", "check", "--on", "n2", "--install", "-v")
    assert code == 0, (out, err)
    assert "docker.io" in out and "Docker 20.10" in out
