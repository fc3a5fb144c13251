"""Two coordinator processes on one PostgreSQL: one leads, the other takes over (issue 16).

Real processes (``rbd-coordinator`` on a throwaway PostgreSQL,
rainbowd.devcluster.pgserver), sharing their tokens as a standby pair does:
the first leads; the second, a standby, answers every /v1/ request but health
with 503 and ``RBD-Leader`` naming the first. ``kill -9`` of the leader: the
standby leads once the lease has run out (the test waits on the
``leader_takeover`` event, bounded by ``TAKEOVER_TIMEOUT_S``, and prints how
long it took). The old leader restarted finds the lease held and stands by,
naming the new leader.

With agents (LocalCluster on PostgreSQL, every agent configured with both
URLs): the leader is killed while the agents pull a layer from each other;
the standby takes over (restore.py, then the agents' heartbeats re-adopt
their transfers), the job completes, no node pulls a layer twice, and the
invariant monitor holds (holdings never revert, every job ends final).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from faultkit import WHOLE_LAYERS, add_image, log_events
from invariants import InvariantMonitor
from pairkit import TAKEOVER_TIMEOUT_S, role_of, start, takeover_events

from rainbowd.core import messages as m
from rainbowd.core.leader import LEADER_HEADER
from rainbowd.core.lease import LEASE_S
from rainbowd.devcluster.coordprocs import CoordinatorProcess
from rainbowd.devcluster.imagebuild import BUSYBOX, build_demo_image
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec, free_port
from rainbowd.devcluster.pgserver import PostgresServer
from testdeps import missing_dependency
from waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def pair_dirs(tmp_path: Path, postgres: PostgresServer) -> Iterator[tuple[str, Path]]:
    """A database of its own and the token directory both coordinators share."""
    url = postgres.create_database(str(tmp_path))
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    try:
        yield url, tokens
    finally:
        postgres.drop_database(url)


async def test_the_standby_leads_after_the_leader_is_killed_and_the_old_one_stands_by(
    tmp_path: Path, pair_dirs: tuple[str, Path]
) -> None:
    state_url, tokens = pair_dirs
    a = start(tmp_path, "a", state_url, tokens)
    procs = [a]
    try:
        async with aiohttp.ClientSession() as http:
            await wait_until(
                lambda: role_of(http, a, "leader", a.url),
                timeout=TAKEOVER_TIMEOUT_S,
                what="the first coordinator to lead",
            )
            admin = (tokens / "admin-token").read_text().strip()
            b = start(tmp_path, "b", state_url, tokens)
            procs.append(b)
            await wait_until(
                lambda: role_of(http, b, "standby", a.url),
                timeout=TAKEOVER_TIMEOUT_S,
                what="the second coordinator to stand by, naming the first",
            )
            auth = {"Authorization": f"Bearer {admin}", "Accept": "application/json"}
            async with http.get(f"{b.url}/v1/nodes", headers=auth) as r:
                assert r.status == 503
                assert r.headers[LEADER_HEADER] == a.url
                assert "not the leader" in (await r.json())["error"]
                assert a.url in (await r.json())["error"]
            async with http.get(f"{a.url}/v1/nodes", headers=auth) as r:
                assert r.status == 200 and LEADER_HEADER not in r.headers

            killed_at = time.monotonic()
            a.kill()
            [event] = await wait_until(
                lambda: takeover_events(http, b, admin, by=b.url),
                timeout=TAKEOVER_TIMEOUT_S,
                what="the standby's leader_takeover event",
            )
            took = time.monotonic() - killed_at
            print(f"takeover after kill -9: {took:.2f} s (lease {LEASE_S} s)")
            assert "token 2" in event["detail"] and a.url in event["detail"]
            assert [e["peer"] for e in await takeover_events(http, b, admin, a.url)] == [a.url]
            assert await role_of(http, b, "leader", b.url)
            async with http.get(f"{b.url}/v1/nodes", headers=auth) as r:
                assert r.status == 200
            [logged] = b.log_events("took over as the leader")
            assert logged["token"] == 2 and logged["previous"] == a.url

            a2 = start(tmp_path, "a", state_url, tokens)  # the old leader restarted
            procs.append(a2)
            await wait_until(
                lambda: role_of(http, a2, "standby", b.url),
                timeout=TAKEOVER_TIMEOUT_S,
                what="the restarted old leader to stand by, naming the new one",
            )
            async with http.get(f"{a2.url}/v1/jobs", headers=auth) as r:
                assert r.status == 503 and r.headers[LEADER_HEADER] == b.url
            assert a2.log_events("took over as the leader") == []
    finally:
        for p in procs:
            p.stop()


REF = "rbd-takeover:latest"
CHUNK = 256 * 1024
#: big enough that a layer's transfer outlasts a takeover (lease + poll) on loopback
PAYLOAD_MIB = 32
NODES = ["n1", "n2", "n3"]


async def test_a_distribution_in_flight_completes_after_the_leader_is_killed(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    if not BUSYBOX.is_file():
        missing_dependency(f"{BUSYBOX} missing: apt-get install busybox-static")
    archive = build_demo_image(tmp_path / "img.tar", payload_mib=PAYLOAD_MIB)
    state_url = postgres.create_database(str(tmp_path / "pair"))
    a_port, b_port = free_port(), free_port()
    a_url, b_url = f"http://127.0.0.1:{a_port}", f"http://127.0.0.1:{b_port}"
    both = {"coordinator_url": [a_url, b_url]}
    specs = [NodeSpec("origin", roles=["origin"], speed_hint_mbps=1000, config=both)]
    specs += [NodeSpec(n, speed_hint_mbps=900 - 100 * i, config=both) for i, n in enumerate(NODES)]
    cluster = LocalCluster(
        tmp_path / "cluster",
        specs,
        chunk_size=CHUNK,
        heartbeat_interval=0.5,
        policy=WHOLE_LAYERS,
        state_url=state_url,
        port=a_port,
    )
    b: CoordinatorProcess | None = None
    try:
        await cluster.start()  # its coordinator ("a") leads: the first to take the lease
        b = start(
            tmp_path,
            "b",
            state_url,
            cluster.coordinator_dir,
            listen=f"127.0.0.1:{b_port}",
            extra=("--policy", WHOLE_LAYERS),  # a standby pair runs one configuration
        )
        async with aiohttp.ClientSession() as http:
            await wait_until(
                lambda: role_of(http, b, "standby", a_url),
                timeout=TAKEOVER_TIMEOUT_S,
                what="the standby to name the leader",
            )
        cluster._admin_url = f"{a_url},{b_url}"  # the test's admin client follows the leader too
        image = await add_image(cluster, archive, REF)
        big = max(image.layers, key=lambda layer: layer.size).digest
        async with InvariantMonitor(cluster) as inv:
            async with asyncio.timeout(120):
                async with cluster.admin() as admin:
                    job = await admin.create_job(m.CreateJob(image=REF, targets=["all"]))
                pulling = await wait_for_active_pull(cluster, big)
                cluster.kill("coordinator", signal.SIGKILL)
                killed_at = time.monotonic()
                async with aiohttp.ClientSession() as http:
                    await wait_until(
                        lambda: role_of(http, b, "leader", b_url),
                        timeout=TAKEOVER_TIMEOUT_S,
                        what="the standby to lead",
                    )
                took = time.monotonic() - killed_at
                await cluster.wait_nodes_up(list(cluster.nodes), timeout=30)
                up_after = time.monotonic() - killed_at
                jobs = await inv.check_jobs(timeout=60)
        (final,) = [j for j in jobs if j.job_id == job.job_id]
        assert final.state == "done", final.error
        pulls: Counter[tuple[str, str]] = Counter()
        for n in NODES:
            for ev in log_events(cluster, n, "pulling layer"):
                pulls[(n, str(ev["layer"]))] += 1
        twice = {k: v for k, v in pulls.items() if v > 1}
        assert not twice, f"layers pulled more than once: {twice}"
        for n in NODES:  # nobody enrolled again: the credentials are in the shared database
            assert len(log_events(cluster, n, "registered")) == 1, n
        assert b.log_events("took over as the leader")
        print(
            f"\ntakeover mid-job: pulling at kill {pulling}; standby led {took:.2f} s after the "
            f"kill; all up {up_after:.2f} s after it"
        )
    finally:
        if b is not None:
            b.stop()
        await cluster.stop()
        postgres.drop_database(state_url)


async def wait_for_active_pull(cluster: LocalCluster, layer: str) -> list[str]:
    """Nodes with a transfer of ``layer`` in progress (polled until there is one)."""

    async def busy() -> list[str]:
        return [
            n
            for n in NODES
            if any(a["layer"] == layer for a in (await cluster.agent_status(n))["active"])
        ]

    return await wait_until(busy, timeout=60, what=f"a pull of {layer} to start")
