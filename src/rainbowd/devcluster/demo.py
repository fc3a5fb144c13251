"""``rbd demo``: a whole cluster on this host, distributing a real image.

With nothing configured it builds a runnable image from busybox-static (three
layers, one of them a data payload), starts a coordinator and an origin plus
N agents as real processes on loopback, adds the image at the origin,
distributes it to every node with live progress, prints per-node times, and,
where a Docker engine can run here (root, ``dockerd`` installed), loads it into
a private engine through one agent and runs a container from it. With ``pull``
(``rbd demo --pull``; the default where skopeo is installed) every agent runs its
registry front door and the image is then pulled through each node's mirror,
served from the node's own store (devcluster/demo_pull.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

from rainbowd.core import messages as m
from rainbowd.core.sched.scheduler import DEFAULT_POLICY
from rainbowd.core.units import human_bytes
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from rainbowd.lib.progress import follow_job, summary

DEMO_REF = "rbd-demo:latest"


def _say(msg: str) -> None:
    print(msg, flush=True)


def _demo_nodes(n: int, docker_url: str) -> list[NodeSpec]:
    """An origin, a quarter fast nodes and the rest slower (speed hints, as in the paper)."""
    specs = [NodeSpec("origin", roles=["origin"], speed_hint_mbps=1000)]
    fast = max(1, n // 4)
    for i in range(1, n + 1):
        hint = 1000.0 if i <= fast else 128 + (512 - 128) * (i - fast - 1) / max(1, n - fast - 1)
        specs.append(NodeSpec(f"node-{i:02d}", speed_hint_mbps=round(hint)))
    if docker_url:
        specs[-1].docker_url = docker_url
    return specs


async def run_demo(
    *,
    nodes: int = 8,
    payload_mib: int = 64,
    workdir: Path | None = None,
    keep: bool = False,
    docker: bool = True,
    pull: bool | None = None,
) -> int:
    """Run the demo; ``pull`` None: pull through the mirrors where skopeo is installed."""
    from rainbowd.devcluster.demo_pull import skopeo_available
    from rainbowd.devcluster.dockerd import DockerdError, PrivateDockerd
    from rainbowd.devcluster.imagebuild import build_demo_image

    if nodes < 1:
        print("rbd demo: --nodes must be at least 1", file=sys.stderr)
        return 2
    if pull and not skopeo_available():
        print("rbd demo: --pull needs skopeo (apt-get install skopeo)", file=sys.stderr)
        return 2
    if pull is None:
        pull = skopeo_available()
    root = Path(workdir or tempfile.mkdtemp(prefix="rbd-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    _say(f"rbd demo: working in {root}")
    archive = root / "rbd-demo.tar"
    build_demo_image(archive, ref=DEMO_REF, payload_mib=payload_mib)
    _say(f"built {DEMO_REF} from busybox-static: {human_bytes(archive.stat().st_size)} archive")

    with contextlib.ExitStack() as stack:
        engine: PrivateDockerd | None = None
        if docker:
            try:
                engine = stack.enter_context(PrivateDockerd(root / "dockerd"))
                _say(f"started a private Docker engine at {engine.url}")
            except DockerdError as e:
                _say(f"no Docker engine for the demo ({e}); distributing only")
        specs = _demo_nodes(nodes, engine.url if engine else "")
        if pull:
            from rainbowd.devcluster.demo_pull import MIRROR_CONFIG

            for spec in specs:
                spec.config.update(MIRROR_CONFIG)
        cluster = LocalCluster(root / "cluster", specs)
        try:
            _say(f"starting rbd-coordinator and {len(specs)} rbd-agent processes on loopback ...")
            await cluster.start()
            code = await _run(cluster, archive, engine is not None, specs[-1].node_id)
            if code == 0 and pull:
                code = await _pull(cluster)
        finally:
            await cluster.stop()
    if keep:
        _say(f"kept {root} (logs in {root / 'cluster' / 'logs'})")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return code


async def _run(cluster: LocalCluster, archive: Path, docker: bool, docker_node: str) -> int:
    async with cluster.admin() as admin:
        _say(f"coordinator {cluster.url}; nodes up: {len((await admin.nodes()).nodes)}")
        view = await admin.ingest(
            m.CreateImage(ref=DEMO_REF, source=m.ArchiveSource(path=str(archive)))
        )
        if view.state != "ready":
            print(f"rbd demo: ingest failed: {view.error}", file=sys.stderr)
            return 1
        _say(f"origin ingested {DEMO_REF}: {len(view.layers)} layers, {human_bytes(view.size)}")
        _say(f"distributing {DEMO_REF} to all nodes (policy: {DEFAULT_POLICY})")
        job = await admin.create_job(m.CreateJob(image=DEMO_REF, targets=["all"]))
        final = await follow_job(admin, job.job_id)
        _say("")
        _say(summary(final))
        for n in sorted(final.nodes, key=lambda n: n.finished_at or 1e18):
            took = (n.finished_at - final.created_at) if n.finished_at else float("nan")
            seeders = sorted({t.seeder for t in n.transfers})
            _say(f"  {n.node_id:<10} {n.state:<7} {took:6.2f}s  from {', '.join(seeders) or '-'}")
        if final.state != "done":
            return 1
    if docker:
        from rainbowd.agent.docker.loader import DockerLoader

        loader = DockerLoader(_docker_url(cluster, docker_node))
        try:
            code, output = await loader.run(DEMO_REF)
        finally:
            await loader.close()
        _say(f"docker run {DEMO_REF} on {docker_node} (exit {code}):")
        for line in output.splitlines():
            _say(f"  | {line}")
        return 0 if code == 0 else 1
    return 0


async def _pull(cluster: LocalCluster) -> int:
    from rainbowd.devcluster.demo_pull import PullError, pull_everywhere

    _say(f"pulling {DEMO_REF} through every node's registry mirror (skopeo, by digest):")
    try:
        pulls = await pull_everywhere(cluster, DEMO_REF, _say)
    except PullError as e:
        print(f"rbd demo: {e}", file=sys.stderr)
        return 1
    _say(
        f"{len(pulls)} pulls served from the nodes' own stores: 0 bytes from peers, "
        "no transfer assigned (rbd distribute preheated them)"
    )
    return 0


def _docker_url(cluster: LocalCluster, node_id: str) -> str:
    return cluster.nodes[node_id].docker_url


if __name__ == "__main__":  # pragma: no cover
    sys.exit(asyncio.run(run_demo()))
