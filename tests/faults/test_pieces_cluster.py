"""Pieces with real agent processes: one layer reaches a node from two seeders at once.

Real agents (processes, asyncssh, stores on disk) on loopback; the
coordinator runs in this process (the real app on a loopback port) with the
piece scheduler (rainbowd.core.sched.pieces, policy ``swarm``) in place of the plain
one, because it is not yet the coordinator's own. Every agent's upload is
capped, so one seeder cannot fill the demander's download: ``s`` first gets
the image from the origin, then ``d`` gets the big layer as pieces from the
origin and ``s``, several at once, into one partial. The layer is installed
once, with the right digest, no chunk crosses the wire twice, and the job
ends done; the fault invariants hold throughout. Then ``s`` is SIGKILLed while
it feeds ``d`` pieces of several chunks: its pieces move to the origin, and what
``d`` got from ``s`` is kept (the bytes moved add up to the layer exactly).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from faultkit import add_image, log_events
from invariants import InvariantMonitor

from rainbowd.coordinator import core
from rainbowd.coordinator.http.app import create_app
from rainbowd.coordinator.state.sqlite import SqliteStore
from rainbowd.core import messages as m
from rainbowd.core.digest import short
from rainbowd.core.sched.pieces import PieceScheduler
from rainbowd.core.sched.policies import RULES
from rainbowd.devcluster.imagebuild import BUSYBOX, build_demo_image
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from testdeps import missing_dependency
from waiting import wait_until

pytestmark = pytest.mark.integration

REF = "rbd-pieces:latest"
CHUNK = 256 * 1024
PAYLOAD_MIB = 16
UPLOAD_MBPS = 24  # 3 MB/s per seeder: the payload layer takes ~6 s from one seeder


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not BUSYBOX.is_file():
        missing_dependency(f"{BUSYBOX} missing: apt-get install busybox-static")
    out = tmp_path_factory.mktemp("pieces") / "pieces.tar"
    return build_demo_image(out, ref=REF, payload_mib=PAYLOAD_MIB, seed=13)


def write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LocalCluster]:
    capped = {"max_upload_mbps": UPLOAD_MBPS}
    specs = [
        NodeSpec("origin", roles=["origin"], speed_hint_mbps=UPLOAD_MBPS, config=capped),
        NodeSpec("s", speed_hint_mbps=UPLOAD_MBPS, config=capped),
        NodeSpec("d", speed_hint_mbps=4 * UPLOAD_MBPS),  # downloads faster than one upload
    ]
    c = LocalCluster(tmp_path / "cluster", specs, chunk_size=CHUNK, heartbeat_interval=0.5)
    write_secret(c.coordinator_dir / "join-token", c.join_token)
    write_secret(c.admin_token_file, c.admin_token)
    store = SqliteStore(c.coordinator_dir / "coordinator.sqlite")
    coord = core.Coordinator(
        store,
        join_token=c.join_token,
        admin_token=c.admin_token,
        heartbeat_interval=0.5,
        chunk_size=CHUNK,
        policy="swarm",
    )
    assert isinstance(coord.scheduler, PieceScheduler)
    server = TestServer(create_app(coord), host="127.0.0.1", port=0)
    await server.start_server()
    assert server.port is not None
    c.port = server.port
    try:
        for node in c.nodes:
            c.start_agent(node)
        await c.wait_nodes_up(list(c.nodes), 60)
        yield c
    finally:
        await c.stop()
        await server.close()
        store.close()


def read_log(cluster: LocalCluster, name: str) -> list[dict[str, object]]:
    out = []
    for line in cluster.log_path(name).read_text().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def blob_digest(cluster: LocalCluster, node: str, digest: str) -> str:
    path = cluster.agent_dir(node) / "store" / "blobs" / "sha256" / digest.split(":", 1)[1]
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


async def test_a_layer_comes_in_pieces_from_two_seeders_at_once(
    cluster: LocalCluster, image: Path
) -> None:
    view = await add_image(cluster, image, REF)
    big = max(view.layers, key=lambda layer: layer.size)
    async with InvariantMonitor(cluster) as inv:
        async with asyncio.timeout(120):
            async with cluster.admin() as admin:
                first = await admin.create_job(m.CreateJob(image=REF, targets=["s"]))
                assert (await admin.wait_job(first.job_id)).state == "done"
                job = await admin.create_job(m.CreateJob(image=REF, targets=["d"]))
                final = await admin.wait_job(job.job_id)
            await inv.check_jobs(timeout=20)
    assert final.state == "done", final.error
    assert blob_digest(cluster, "d", big.digest) == big.digest
    pulls = [
        e for e in log_events(cluster, "d", "pull_done") if e.get("layer") == short(big.digest)
    ]
    seeders = {e["seeder"] for e in pulls}
    assert seeders == {"origin", "s"}, pulls  # both uploads fed the one layer
    assert all("first_chunk" in e for e in pulls)  # pieces, not whole-layer pulls
    ranges = sorted((int(e["first_chunk"]), int(e["end_chunk"])) for e in pulls)  # type: ignore[call-overload]
    assert ranges[0][0] == 0 and all(a[1] <= b[0] for a, b in itertools.pairwise(ranges))
    assert sum(int(e["bytes"]) for e in pulls) == big.size  # type: ignore[call-overload]
    assert [e["installed"] for e in pulls].count(True) == 1  # committed once
    # pieces from the two seeders were on the way at the same time (d's log is in order)
    running: dict[str, str] = {}
    together = 0
    for e in read_log(cluster, "d"):
        if e.get("layer") != short(big.digest):
            continue
        if e.get("event") == "pull_started":
            running[str(e["transfer"])] = str(e["seeder"])
            together = max(together, len(set(running.values())))
        elif e.get("event") in ("pull_done", "pull_failed", "pull_cancelled"):
            running.pop(str(e["transfer"]), None)
    assert together == 2
    status = await cluster.agent_status("d")
    assert any(h["digest"] == big.digest for h in status["holdings"])
    assert status["partials"] == []


@pytest.fixture
def four_chunk_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """``swarm`` with pieces of four chunks: its own are one chunk, and a kill mid-piece then
    leaves no whole chunk of the piece behind (requested before ``cluster``, which builds
    the scheduler)."""
    older = dataclasses.replace(RULES["swarm"], piece_bytes=4 * CHUNK)
    monkeypatch.setitem(RULES, "swarm", older)


async def test_a_seeder_killed_mid_piece_costs_nothing_already_received(
    four_chunk_pieces: None, cluster: LocalCluster, image: Path
) -> None:
    view = await add_image(cluster, image, REF)
    big = max(view.layers, key=lambda layer: layer.size)
    async with InvariantMonitor(cluster) as inv:
        async with asyncio.timeout(120):
            async with cluster.admin() as admin:
                first = await admin.create_job(m.CreateJob(image=REF, targets=["s"]))
                assert (await admin.wait_job(first.job_id)).state == "done"
                job = await admin.create_job(m.CreateJob(image=REF, targets=["d"]))

            async def s_feeds_d() -> bool:
                return any(
                    t["layer"] == big.digest and t["seeder"] == "s" and t["bytes_done"]
                    for t in (await cluster.agent_status("d"))["active"]
                )

            await wait_until(s_feeds_d, timeout=60, what="s to feed d the big layer")
            cluster.kill("s", signal.SIGKILL)
            async with cluster.admin() as admin:
                final = await admin.wait_job(job.job_id)
            await inv.check_jobs(timeout=30)
    assert final.state == "done", final.error
    assert blob_digest(cluster, "d", big.digest) == big.digest
    events = [e for e in read_log(cluster, "d") if e.get("layer") == short(big.digest)]
    failed = [e for e in events if e.get("event") == "pull_failed" and e["seeder"] == "s"]
    assert failed, "no piece from s failed"
    done = [e for e in events if e.get("event") == "pull_done"]
    kept = sum(int(e["moved"]) for e in events if e.get("event") == "pull_failed")  # type: ignore[call-overload]
    assert kept > 0  # s's chunks that landed before it died ...
    # ... are not fetched again: the layer's bytes crossed the wire once in all
    assert sum(int(e["bytes"]) for e in done) + kept == big.size  # type: ignore[call-overload]
