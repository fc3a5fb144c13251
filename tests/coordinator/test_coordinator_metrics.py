"""GET /metrics of a real coordinator app: who may scrape it, and what the numbers say.

Fake agents play the protocol through the real client (as in
test_coordinator_flow), so every counter is moved by the same code paths a
real cluster takes, and the scrape is parsed with prometheus_client's own
parser.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from coordinator_support import ADMIN, JOIN, Running, enroll, fake_image, ingest, open_state
from rainbowd.coordinator.core import Coordinator
from rainbowd.coordinator.http.app import create_app
from rainbowd.coordinator.metrics import CoordinatorMetrics
from rainbowd.core.chunks import MIN_CHUNK_SIZE
from rainbowd.core.messages import (
    CreateJob,
    Heartbeat,
    SecurityEvent,
    TransferAssignment,
    TransferDone,
    TransferFailed,
)
from rainbowd.lib.client import AdminClient, AgentClient
from waiting import wait_until

METRICS_TOKEN = "metrics-secret-for-tests"


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """{(sample name, sorted labels): value} of a text exposition."""
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(url: str, token: str = ADMIN) -> Samples:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Content-Type"].startswith("text/plain; version=")
            return samples(await r.text())


@pytest.fixture
async def with_metrics_token(tmp_path: Path) -> AsyncIterator[str]:
    store = open_state(tmp_path)
    c = Coordinator(
        store,
        join_token=JOIN,
        admin_token=ADMIN,
        chunk_size=MIN_CHUNK_SIZE,
        metrics_token=METRICS_TOKEN,
    )
    server = TestServer(create_app(c), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()
        store.close()


async def test_metrics_needs_the_metrics_or_admin_token(with_metrics_token: str) -> None:
    url = with_metrics_token
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/metrics") as r:
            assert r.status == 401
            assert r.content_type == "text/plain"
            assert "Bearer <metrics token>" in await r.text()
        async with s.get(f"{url}/metrics", headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 403
            assert "neither the metrics token nor the admin token" in await r.text()
        # a node credential is not enough either
        bad = {"Authorization": f"Bearer {JOIN}"}
        async with s.get(f"{url}/metrics", headers=bad) as r:
            assert r.status == 403
    for token in (METRICS_TOKEN, ADMIN):
        got = await scrape(url, token)
        assert got[("rbd_coordinator_nodes", (("state", "up"),))] == 0


async def test_metrics_token_unset_means_admin_token_only(coord: Running) -> None:
    assert coord.coordinator.metrics_token == ""
    async with aiohttp.ClientSession() as s:
        # an empty metrics token must never match an empty bearer token
        async with s.get(f"{coord.url}/metrics", headers={"Authorization": "Bearer "}) as r:
            assert r.status in (401, 403)
    await scrape(coord.url, ADMIN)


async def test_counters_follow_a_job(coord: Running, admin: AdminClient) -> None:
    origin = await enroll(coord.url, "origin", roles=["origin"], speed=100e6)
    a = await enroll(coord.url, "a", speed=50e6)
    b = await enroll(coord.url, "b", speed=10e6)
    try:
        img = fake_image(sizes=(150_000,))
        await ingest(admin, origin, img)
        before = await scrape(coord.url)
        assert before[("rbd_coordinator_nodes", (("state", "up"),))] == 3
        assert before[("rbd_assignment_polls_parked", ())] == 0

        job = await admin.create_job(CreateJob(image=img.record.ref, targets=["a", "b"]))
        mid = await scrape(coord.url)
        # one seeder, two demanders: one transfer runs, the other demand waits
        assert mid[("rbd_scheduler_active_transfers", ())] == 1
        assert mid[("rbd_scheduler_pending_demands", ())] == 1
        assert mid[("rbd_coordinator_jobs", (("state", "running"),))] == 1
        assert (
            mid[("rbd_scheduler_decision_seconds_count", ())]
            > before[("rbd_scheduler_decision_seconds_count", ())]
        )
        assert mid[("rbd_scheduler_transfers_started_total", ())] == 1

        cursors: dict[AgentClient, int] = {}

        async def transfer(c: AgentClient) -> TransferAssignment:
            batch = await c.assignments(cursors.get(c, 0), 10**9, 0)
            cursors[c] = batch.cursor
            (t,) = [x for x in batch.assignments if isinstance(x, TransferAssignment)]
            return t

        # a gets a bad chunk from the origin (the origin's fault) and fails; it now
        # avoids the origin, so b gets the origin, then a pulls from b
        ta = await transfer(a)
        await a.transfer_failed(
            ta.transfer_id, TransferFailed(reason="bad chunk 0", kind="verify", seeder_fault=True)
        )
        tb = await transfer(b)
        assert tb.seeder.node_id == "origin"
        await b.transfer_done(tb.transfer_id, TransferDone(bytes_moved=150_000, seconds=2.0))
        ta2 = await transfer(a)
        assert ta2.seeder.node_id == "b"
        await a.transfer_done(ta2.transfer_id, TransferDone(bytes_moved=150_000, seconds=0.5))
        assert (await admin.job(job.job_id)).state == "done"

        after = await scrape(coord.url)
        assert after[("rbd_transfers_total", (("outcome", "done"),))] == 2
        assert after[("rbd_transfers_total", (("outcome", "failed"),))] == 1
        assert after[("rbd_transfer_failures_total", (("kind", "verify"),))] == 1
        assert after[("rbd_transfer_bytes_total", ())] == 300_000
        assert after[("rbd_transfer_duration_seconds_count", (("outcome", "done"),))] == 2
        assert after[("rbd_transfer_duration_seconds_sum", (("outcome", "done"),))] == 2.5
        assert after[("rbd_seeder_faults_total", (("seeder", "origin"),))] == 1
        # the job finished once, and its duration is in the histogram once
        assert after[("rbd_job_duration_seconds_count", (("state", "done"),))] == 1
        assert ("rbd_job_duration_seconds_count", (("state", "failed"),)) not in after
        assert after[("rbd_coordinator_jobs", (("state", "done"),))] == 1
        assert after[("rbd_scheduler_active_transfers", ())] == 0
        assert after[("rbd_scheduler_pending_demands", ())] == 0

        # a host key mismatch (a pulled from b; the coordinator's own probe confirms it)
        # quarantines b: a quarantine, and the node state says so
        coord.probe_says("mismatch")
        await a.security_event(SecurityEvent(kind="host_key_mismatch", peer="b", detail="x"))
        await coord.coordinator.host_key_checks.wait()
        last = await scrape(coord.url)
        assert last[("rbd_quarantines_total", ())] == 1
        assert last[("rbd_coordinator_nodes", (("state", "quarantined"),))] == 1
        assert last[("rbd_coordinator_nodes", (("state", "up"),))] == 2
    finally:
        for c in (origin, a, b):
            await c.close()


async def test_heartbeats_and_parked_polls_are_seen(coord: Running) -> None:
    n = await enroll(coord.url, "n")
    try:
        await n.heartbeat(Heartbeat())
        await n.heartbeat(Heartbeat())
        got = await scrape(coord.url)
        assert got[("rbd_heartbeat_duration_seconds_count", ())] == 2
        poll = asyncio.create_task(n.assignments(0, 10**9, 5.0))

        async def parked() -> bool:
            got = await scrape(coord.url)
            return got[("rbd_assignment_polls_parked", ())] == 1

        await wait_until(parked, timeout=5, what="the metric to show one parked poll")
        poll.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poll
    finally:
        await n.close()


def test_each_coordinator_has_its_own_registry(tmp_path: Path) -> None:
    """Two coordinators in one process: separate numbers, no duplicate-name clash."""
    stores = [open_state(tmp_path / f"c{i}") for i in range(2)]
    try:
        cs = [Coordinator(s, join_token=JOIN, admin_token=ADMIN) for s in stores]
        cs[0].metrics.decision(0.001, 3)
        got = [samples(c.metrics.exposition().decode()) for c in cs]
        assert got[0][("rbd_scheduler_transfers_started_total", ())] == 3
        assert got[1][("rbd_scheduler_transfers_started_total", ())] == 0
        shared = CoordinatorMetrics()
        Coordinator(stores[0], join_token=JOIN, admin_token=ADMIN, metrics=shared)
        got_shared = samples(shared.exposition().decode())
        assert got_shared[("rbd_coordinator_nodes", (("state", "up"),))] == 0
    finally:
        for s in stores:
            s.close()
