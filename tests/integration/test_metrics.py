"""Metrics end to end: a real cluster distributes the demo image, then every /metrics is scraped.

The coordinator and every agent are separate processes (LocalCluster with
agent metrics on); the scrapes go over HTTP and are parsed with
prometheus_client's parser. The numbers must tell the story the job view
tells: every byte a seeder served to a peer is a byte that peer received
from it, the per-peer labels are real node ids, the job finished once, and
the scheduler decided more than once. The Grafana dashboard in deploy/ is
checked against these real scrapes too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from metric_names import dashboard_names, exposable_names
from rainbowd.core import messages as m
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from waiting import wait_until

pytestmark = pytest.mark.integration

REF = "rbd-demo:latest"
CHUNK = 256 * 1024

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """{label value: sample value} of the samples ``name`` (one other label at most)."""
    out: dict[str, float] = {}
    for (n, labels), v in samples.items():
        if n == name:
            value = dict(labels)[label]
            out[value] = out.get(value, 0.0) + v
    return out


async def fetch(url: str, token: str = "") -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/plain")
        return await r.text()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    specs = [
        NodeSpec("origin", roles=["origin"], speed_hint_mbps=1000),
        NodeSpec("n1", speed_hint_mbps=1000),
        NodeSpec("n2", speed_hint_mbps=400),
        NodeSpec("n3", speed_hint_mbps=200),
    ]
    # policy slots: the default (relay) sends an image this small straight from the
    # origin to everyone (the direct rule), and this test wants peers seeding too
    c = LocalCluster(
        tmp_path / "cluster",
        specs,
        chunk_size=CHUNK,
        heartbeat_interval=1.0,
        agent_metrics=True,
        policy="slots",
    )
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


async def test_scraped_counters_match_the_distribution(
    cluster: LocalCluster, demo_image: Path
) -> None:
    async with cluster.admin() as admin:
        image = await admin.ingest(
            m.CreateImage(ref=REF, source=m.ArchiveSource(path=str(demo_image))), timeout=30
        )
        assert image.state == "ready", image.error
        job = await admin.distribute(m.CreateJob(image=REF, targets=["all"]), timeout=90)
    assert job.state == "done", job.error
    nodes = set(cluster.nodes)
    layer_bytes = sum(layer.size for layer in image.layers)

    coord_text = await fetch(f"{cluster.admin_url}/metrics", cluster.admin_token)
    coord = parse(coord_text)
    agent_text = {n: await fetch(await cluster.metrics_url(n)) for n in sorted(nodes)}
    agents = {n: parse(t) for n, t in agent_text.items()}

    # -- the data plane: served == received, per (seeder, demander) pair --
    served = {n: by_label(s, "rbd_agent_bytes_served_total", "peer") for n, s in agents.items()}
    received = {n: by_label(s, "rbd_agent_bytes_received_total", "peer") for n, s in agents.items()}
    for seeder, to in served.items():
        assert set(to) <= nodes - {seeder}, f"{seeder} served unknown peers: {to}"
        for demander, nbytes in to.items():
            assert received[demander].get(seeder) == nbytes, (seeder, demander, received)
    for demander, frm in received.items():
        assert set(frm) <= nodes - {demander}, f"{demander} received from unknown peers: {frm}"
        for seeder, nbytes in frm.items():
            assert served[seeder].get(demander) == nbytes, (seeder, demander, served)
    total_served = sum(sum(v.values()) for v in served.values())
    total_received = sum(sum(v.values()) for v in received.values())
    assert total_served == total_received > 0
    # every target but the origin received every layer once, nothing more
    assert received["origin"] == {}
    for n in nodes - {"origin"}:
        assert sum(received[n].values()) == layer_bytes, n
    assert total_received == layer_bytes * (len(nodes) - 1)
    # ... which is also what the demanders reported to the coordinator
    assert coord[("rbd_transfer_bytes_total", ())] == total_received
    # peers seeded too, not only the origin
    assert any(served[n] for n in nodes - {"origin"}), served

    # -- transfers: the job view, the coordinator and the agents agree ----
    done_transfers = sum(len(n.transfers) for n in job.nodes)
    assert done_transfers == len(image.layers) * (len(nodes) - 1)
    assert coord[("rbd_transfers_total", (("outcome", "done"),))] == done_transfers
    assert coord[("rbd_transfer_duration_seconds_count", (("outcome", "done"),))] == done_transfers
    assert coord[("rbd_scheduler_transfers_started_total", ())] == done_transfers
    pulls = sum(
        s.get(("rbd_agent_transfer_duration_seconds_count", (("outcome", "done"),)), 0)
        for s in agents.values()
    )
    assert pulls == done_transfers
    for n, s in agents.items():
        assert not any(name == "rbd_agent_chunk_failures_total" for name, _ in s), n
        assert s[("rbd_agent_active_transfers", ())] == 0, n
        assert s[("rbd_agent_layers", ())] == len(image.layers), n
        assert s[("rbd_agent_partial_layers", ())] == 0, n
        assert s[("rbd_agent_store_bytes", ())] >= layer_bytes, n
        assert s[("rbd_agent_disk_free_bytes", ())] > 0, n

    # -- the coordinator's own view --------------------------------------
    assert coord[("rbd_job_duration_seconds_count", (("state", "done"),))] == 1
    assert ("rbd_job_duration_seconds_count", (("state", "failed"),)) not in coord
    assert 0 < coord[("rbd_job_duration_seconds_sum", (("state", "done"),))] < 90
    assert coord[("rbd_scheduler_decision_seconds_count", ())] > 0
    # the job may beat the first heartbeat (1 s interval): one is handled soon after

    async def beats() -> float:
        later = parse(await fetch(f"{cluster.admin_url}/metrics", cluster.admin_token))
        return later.get(("rbd_heartbeat_duration_seconds_count", ()), 0)

    await wait_until(beats, timeout=10, what="a heartbeat in the coordinator's metrics")
    assert coord[("rbd_coordinator_nodes", (("state", "up"),))] == len(nodes)
    assert coord[("rbd_coordinator_jobs", (("state", "done"),))] == 1
    assert coord[("rbd_scheduler_pending_demands", ())] == 0
    assert coord[("rbd_scheduler_active_transfers", ())] == 0
    assert coord.get(("rbd_transfers_total", (("outcome", "failed"),)), 0) == 0
    # every agent keeps a long-poll parked (it may be between two polls: at most one each)
    assert 0 < coord[("rbd_assignment_polls_parked", ())] <= len(nodes)

    # -- the dashboard queries only what these real scrapes expose --------
    exposed = exposable_names(coord_text)
    for text in agent_text.values():
        exposed |= exposable_names(text)
    missing = sorted(dashboard_names() - exposed)
    assert not missing, f"deploy/grafana/rbd-dashboard.json queries unexposed metrics: {missing}"


async def test_coordinator_metrics_refuse_a_scrape_without_a_token(cluster: LocalCluster) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{cluster.admin_url}/metrics") as r:
            assert r.status == 401
            assert "metrics token" in await r.text()
    # the metrics token the coordinator created at start-up is accepted
    token = (cluster.coordinator_dir / "metrics-token").read_text().strip()
    assert token and token != cluster.admin_token
    text = await fetch(f"{cluster.admin_url}/metrics", token)
    assert parse(text)[("rbd_coordinator_nodes", (("state", "up"),))] == len(cluster.nodes)
