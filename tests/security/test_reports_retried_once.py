"""No report is lost, and none is applied twice.

* ReportSender's schedule on a fake clock: retried on connection errors, 5xx,
  408/429 with capped, jittered exponential backoff and the same report id;
  a 4xx is not retried and is logged naming the node and the report; given up
  only after ``give_up_after``.
* The coordinator's ledger, on a real coordinator (aiohttp on loopback): a
  report id applied once is answered 204 and not applied again, also after a
  coordinator restart; a refused report's id is forgotten; a malformed id is 400.
* End to end, real processes: the coordinator's state directory is a small
  tmpfs that is filled while a transfer runs, so the done report gets 500;
  once space is freed the agent's retry lands, exactly once.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import structlog

# the coordinator tests' helpers (a real coordinator on loopback, fake images)
from coordinator_support import ADMIN, enroll, fake_image, ingest, poll, start
from rainbowd.agent.control.report_sender import BACKOFF_CAP, BACKOFF_START, ReportSender
from rainbowd.coordinator.http.app import REPORT_LEDGER
from rainbowd.coordinator.http.report_ids import PRUNE_EVERY, ReportLedger
from rainbowd.coordinator.state.sqlite import SqliteStore
from rainbowd.core import messages as m
from rainbowd.core.report_id import REPORT_ID_HEADER
from rainbowd.devcluster.imagebuild import BUSYBOX, build_demo_image
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from rainbowd.lib.client import AdminClient, ApiError, CoordinatorUnreachable
from testdeps import missing_dependency
from waiting import wait_until


class FakeTime:
    """A clock that moves only when the sender sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def sender(t: FakeTime, give_up_after: float = 3600.0, rand: float = 1.0) -> ReportSender:
    return ReportSender(
        "n1", give_up_after=give_up_after, clock=t.clock, sleep=t.sleep, rand=lambda: rand
    )


class Coordinator:
    """Answers each attempt with the next scripted outcome (None = accepted)."""

    def __init__(self, outcomes: list[ApiError | None]) -> None:
        self.outcomes = outcomes
        self.ids: list[str] = []

    async def __call__(self, report_id: str) -> None:
        self.ids.append(report_id)
        out = self.outcomes.pop(0) if self.outcomes else None
        if out is not None:
            raise out


# --------------------------------------------------------------------------
async def test_retried_on_connection_errors_and_5xx_with_one_id() -> None:
    t = FakeTime()
    fails: list[ApiError | None] = [
        CoordinatorUnreachable("connection refused"),
        ApiError(500, "internal error (OperationalError)"),
        ApiError(503, "busy"),
        ApiError(429, "slow down"),
        CoordinatorUnreachable("timed out"),
        ApiError(502, "bad gateway"),
        ApiError(500, "disk full"),
    ]
    coord = Coordinator(fails)
    s = sender(t)
    assert await s.send("transfer t1 done", coord)
    assert len(coord.ids) == 8 and len(set(coord.ids)) == 1  # one report, one id
    # 0.5, 1, 2, 4, 8, then capped at 10
    assert t.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert (s.sent, s.retries, s.lost, s.refused) == (1, 7, 0, 0)
    again = Coordinator([])
    assert await s.send("transfer t2 done", again)
    assert again.ids[0] != coord.ids[0]  # another report, another id


def test_backoff_is_jittered_within_half_to_full() -> None:
    t = FakeTime()
    low, high = sender(t, rand=0.0), sender(t, rand=0.999)
    for attempt in range(1, 12):
        step = min(BACKOFF_CAP, BACKOFF_START * 2 ** (attempt - 1))
        assert low.delay(attempt) == pytest.approx(step / 2)
        assert step / 2 <= high.delay(attempt) <= step
    assert sender(t).delay(10_000) == BACKOFF_CAP  # no overflow, still capped


async def test_4xx_is_not_retried_and_names_node_and_layer() -> None:
    t = FakeTime()
    s = sender(t)
    coord = Coordinator([ApiError(409, "image is failed; ingest is over")])
    what = "transfer t9 of layer sha256:abc from seed failed"
    with structlog.testing.capture_logs() as logs:
        assert not await s.send(what, coord)
    assert len(coord.ids) == 1 and t.sleeps == []
    assert s.refused == 1
    [entry] = [e for e in logs if e["log_level"] == "error"]
    assert entry["report"] == what and entry["status"] == 409
    # the logger is bound to the node (structlog's bind is not in capture_logs' dict)
    assert s._log._context["node"] == "n1"  # type: ignore[attr-defined]


async def test_given_up_only_after_the_deadline() -> None:
    t = FakeTime()
    s = sender(t, give_up_after=60.0)
    coord = Coordinator([ApiError(500, "down")] * 1000)
    with structlog.testing.capture_logs() as logs:
        assert not await s.send("load l1 done", coord)
    assert s.lost == 1
    assert sum(t.sleeps) <= 60.0 and sum(t.sleeps) + BACKOFF_CAP > 60.0
    assert any(e["event"].startswith("report lost") for e in logs)


# --------------------------------------------------------------------------
async def test_coordinator_applies_a_report_id_once_even_after_a_restart(tmp_path: Path) -> None:
    r = await start(tmp_path)
    image = fake_image()
    origin = await enroll(r.url, "origin", roles=["origin"])
    n1 = await enroll(r.url, "n1")
    try:
        async with AdminClient(r.url, ADMIN) as admin:
            await ingest(admin, origin, image)
            await n1.heartbeat(m.Heartbeat())
            await admin.create_job(m.CreateJob(image=image.record.ref, targets=["n1"]))
        transfers = [a for a in await poll(n1) if isinstance(a, m.TransferAssignment)]
        assert transfers
        tr = transfers[0]
        done = m.TransferDone(bytes_moved=tr.layer.size, seconds=0.1)
        ledger = r.server.app[REPORT_LEDGER]
        await n1.transfer_done(tr.transfer_id, done, report_id="rid-first-0001")
        assert ledger.duplicates == 0
        await n1.transfer_done(tr.transfer_id, done, report_id="rid-first-0001")
        assert ledger.duplicates == 1  # answered 204, handler not run
        # a refused report's id is forgotten: a retry of it is judged afresh
        url = f"{r.url}/v1/transfers/{tr.transfer_id}/failed"
        headers = {
            "Authorization": f"Bearer n1:{n1.credential}",
            REPORT_ID_HEADER: "rid-second-001",
            "Content-Type": m.MSGPACK,
            "Accept": m.JSON,
        }
        async with aiohttp.ClientSession() as http:
            async with http.post(url, data=b"\x01garbage", headers=headers) as resp:
                assert resp.status == 400
            route = f"/v1/transfers/{tr.transfer_id}/failed"
            assert not ledger.applied("n1", route, "rid-second-001")
            bad = {**headers, REPORT_ID_HEADER: "no spaces allowed"}
            async with http.post(url, data=b"", headers=bad) as resp:
                assert resp.status == 400
                assert REPORT_ID_HEADER in (await resp.json())["error"]
        credential = n1.credential
    finally:
        await origin.close()
        await n1.close()
        await r.stop()
    # a restarted coordinator still knows the id
    r = await start(tmp_path)
    try:
        ledger = r.server.app[REPORT_LEDGER]
        async with aiohttp.ClientSession() as http:
            url = f"{r.url}/v1/transfers/{tr.transfer_id}/done"
            headers = {
                "Authorization": f"Bearer n1:{credential}",
                REPORT_ID_HEADER: "rid-first-0001",
                "Content-Type": m.MSGPACK,
            }
            async with http.post(url, data=m.encode(done), headers=headers) as resp:
                assert resp.status == 204
        assert ledger.duplicates == 1
    finally:
        await r.stop()


# --------------------------------------------------------------------------
REF = "rbd-reports:latest"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        missing_dependency("a full coordinator disk needs root and mount(8) for a tmpfs")
    specs = [
        NodeSpec("origin", roles=["origin"], speed_hint_mbps=1000),
        # slow enough (4 MiB at 16 Mbit/s: ~2 s) to fill the coordinator's disk meanwhile
        NodeSpec("n1", config={"max_download_mbps": 16.0}),
    ]
    # whole layers (policy relay): one transfer, so one done report, per layer
    c = LocalCluster(tmp_path / "c", specs, heartbeat_interval=0.5, policy="relay")
    state = c.coordinator_dir
    state.mkdir(parents=True)
    mount = ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(state)]
    await asyncio.to_thread(subprocess.run, mount, check=True)
    try:
        await c.start()
        yield c
    finally:
        await c.stop()
        r = await asyncio.to_thread(subprocess.run, ["umount", str(state)], check=False)
        if r.returncode != 0:
            await asyncio.to_thread(subprocess.run, ["umount", "-l", str(state)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem is full; return it (delete it to free the space)."""
    path = directory / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 4096, 512):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return path


async def metric(cluster: LocalCluster, name: str) -> float:
    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"{cluster.admin_url}/metrics",
            headers={"Authorization": f"Bearer {cluster.admin_token}"},
        ) as resp:
            text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.integration
async def test_report_refused_while_the_coordinator_disk_is_full_lands_once(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    if not BUSYBOX.is_file():
        missing_dependency(f"{BUSYBOX} missing: apt-get install busybox-static")
    archive = await asyncio.to_thread(
        build_demo_image, tmp_path / "img.tar", ref=REF, payload_mib=4, seed=5
    )
    async with asyncio.timeout(120), cluster.admin() as admin:
        view = await admin.ingest(m.CreateImage(ref=REF, source=m.ArchiveSource(path=str(archive))))
        assert view.state == "ready", view.error
        job = await admin.create_job(m.CreateJob(image=REF, targets=["n1"]))

        async def pulling() -> bool:
            return bool((await cluster.agent_status("n1"))["active"])

        async def retrying() -> bool:
            return bool((await cluster.agent_status("n1"))["reports"]["retries"])

        await wait_until(pulling, timeout=60, what="n1 to start pulling")
        filler = fill(cluster.coordinator_dir)  # the coordinator's writes fail from now on
        # wait until a final report was refused with 500 and is being retried
        await wait_until(retrying, timeout=60, what="n1 to retry a refused report")
        filler.unlink()
        final = await admin.wait_job(job.job_id, timeout=90)
    assert final.state == "done", final.error
    [n1] = final.nodes
    layers = [u.layer for u in n1.transfers]
    assert sorted(layers) == sorted({lr.digest for lr in view.layers})  # each layer once
    st = await cluster.agent_status("n1")
    assert st["reports"]["lost"] == 0 and st["reports"]["refused"] == 0
    assert st["reports"]["retries"] >= 1
    done = await metric(cluster, 'rbd_transfers_total{outcome="done"}')
    assert done == len(view.layers)  # every done report applied exactly once
    print(f"\nreports: {st['reports']}; transfers done: {done:.0f}")


def test_ledger_keeps_a_bounded_number_of_ids_per_node(tmp_path: Path) -> None:
    """A node sending made-up ids pushes out only its own, and at most KEEP_PER_NODE stay."""
    store = SqliteStore(tmp_path / "state.sqlite")
    ledger = ReportLedger(store, keep_per_node=5)
    try:
        ledger.claim("honest", "/v1/transfers/t1/done", "honest-rid-1")
        for i in range(2 * PRUNE_EVERY):
            ledger.claim("flooder", "/v1/events", f"made-up-{i:06d}")
        assert ledger.count("flooder") == 5
        assert ledger.applied("flooder", "/v1/events", f"made-up-{2 * PRUNE_EVERY - 1:06d}")
        assert not ledger.applied("flooder", "/v1/events", "made-up-000000")
        assert ledger.applied("honest", "/v1/transfers/t1/done", "honest-rid-1")
        ledger.release("honest", "/v1/transfers/t1/done", "honest-rid-1")
        assert not ledger.applied("honest", "/v1/transfers/t1/done", "honest-rid-1")
    finally:
        store.close()
