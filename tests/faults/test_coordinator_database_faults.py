"""A standby pair when the database itself fails (issue 16, item 4): real processes.

Two ``rbd-coordinator`` processes on one PostgreSQL of this module's own
(rainbowd.devcluster.pgserver: it is shut down and started again here, so not
the session's), each logging in as a database role of its own so that
:class:`~pairkit.WriteAudit` tells their writes apart:

* **the database restarted** under the pair (with agents): nobody leads while
  it is down, both recover when it is back, exactly one leads, and a job
  created after it completes with every node on its first credential;
* **the leader cut off from the database** (its role refused new connections,
  its open ones ended): it steps down by its own clock before the other takes
  over -- never two leaders, asked in the order that would show it -- and a
  write it is asked for lands nowhere; **its connection restored**, it stands
  by under the new leader and writes nothing;
* **the leader paused** (SIGSTOP past its lease): the other takes over; woken
  (SIGCONT), the paused one steps down, and the enrollment that waited for it
  during the pause is refused (by the fence, or by the standby's gate if the
  step-down came first): nothing of it lands.

Every wait is on an event (a health answer, a log line, the lease row, the
audit table); the timeouts are failure deadlines.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psycopg
import pytest
from faultkit import WHOLE_LAYERS, add_image, log_events
from pairkit import (
    TAKEOVER_TIMEOUT_S,
    SplitBrainWatch,
    WriteAudit,
    create_login_role,
    cut_off,
    log_time,
    reconnect,
    role_now,
    role_of,
    start,
)

from coordinator_support import register_request
from rainbowd.core import messages as m
from rainbowd.core.leader import LEADER_HEADER
from rainbowd.core.lease import LEASE_S
from rainbowd.devcluster.coordprocs import CoordinatorProcess
from rainbowd.devcluster.imagebuild import BUSYBOX, build_demo_image
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec, free_port
from rainbowd.devcluster.pgserver import PostgresServer, PostgresUnavailable
from rainbowd.lib.client import AdminClient, AgentClient, ApiError
from testdeps import missing_dependency
from waiting import wait_until

pytestmark = pytest.mark.integration

#: seconds the paused leader's held enrollment may wait for an answer (the pause, the
#: takeover, the wake-up, on a loaded machine); the client's default 10 s could end first
HELD_REQUEST_TIMEOUT_S = 60.0
#: the agents' test: a small image, two targets
REF = "rbd-dbfault:latest"
NODES = ["n1", "n2"]


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for this module alone: its tests shut it down and restart it."""
    try:
        server = PostgresServer()
        server.start()
    except PostgresUnavailable as e:
        missing_dependency(str(e))
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Pair:
    """A database, the login role of each coordinator, their shared tokens."""

    server: PostgresServer
    database: str
    tokens: Path

    @property
    def admin_url(self) -> str:
        return self.server.url(self.database)

    def url_as(self, role: str) -> str:
        return self.server.url(self.database, user=role)

    def admin_token(self) -> str:
        return (self.tokens / "admin-token").read_text().strip()

    def join_token(self) -> str:
        return (self.tokens / "join-token").read_text().strip()


@pytest.fixture
def pair(tmp_path: Path, own_postgres: PostgresServer) -> Iterator[Pair]:
    """A database of its own, a login role per coordinator, the token directory they share."""
    url = own_postgres.create_database(str(tmp_path))
    database = url.rsplit("/", 1)[1]
    for who in ("a", "b"):
        create_login_role(own_postgres.url(database), f"{database}_{who}")
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    try:
        yield Pair(own_postgres, database, tokens)
    finally:
        own_postgres.drop_database(url)


def role_name(pair: Pair, who: str) -> str:
    return f"{pair.database}_{who}"


@pytest.fixture
async def leader_and_standby(
    tmp_path: Path, pair: Pair
) -> AsyncIterator[tuple[CoordinatorProcess, CoordinatorProcess]]:
    """``a`` leads, ``b`` stands by naming it; each logs in as its own role."""
    a = start(tmp_path, "a", pair.url_as(role_name(pair, "a")), pair.tokens)
    procs = [a]
    try:
        async with aiohttp.ClientSession() as http:
            await wait_until(
                lambda: role_of(http, a, "leader", a.url),
                timeout=TAKEOVER_TIMEOUT_S,
                what="the first coordinator to lead",
            )
            b = start(tmp_path, "b", pair.url_as(role_name(pair, "b")), pair.tokens)
            procs.append(b)
            await wait_until(
                lambda: role_of(http, b, "standby", a.url),
                timeout=TAKEOVER_TIMEOUT_S,
                what="the second coordinator to stand by, naming the first",
            )
        yield a, b
    finally:
        for p in procs:
            if p.running:
                os.kill(p.popen.pid, signal.SIGCONT)  # (a test that failed while it slept)
            p.stop()


def lease_token(pair: Pair) -> int:
    with psycopg.connect(pair.admin_url, autocommit=True) as conn:
        row = conn.execute("SELECT token FROM leader WHERE id = 1").fetchone()
    assert row is not None
    return int(row[0])


def node_ids(pair: Pair) -> list[str]:
    with psycopg.connect(pair.admin_url, autocommit=True) as conn:
        return [str(r[0]) for r in conn.execute("SELECT node_id FROM nodes").fetchall()]


async def test_a_leader_cut_off_from_the_database_steps_down_and_stands_by_when_back(
    pair: Pair, leader_and_standby: tuple[CoordinatorProcess, CoordinatorProcess]
) -> None:
    a, b = leader_and_standby
    role_a = role_name(pair, "a")
    audit = WriteAudit(pair.admin_url)
    try:
        token = lease_token(pair)
        async with aiohttp.ClientSession() as http, SplitBrainWatch(http, new=b, old=a) as watch:
            assert cut_off(pair.admin_url, role_a) >= 1
            # after the cut-off (a renewal just before it may land: it is not one of the
            # writes a cut-off leader must not make)
            mark = audit.mark()
            cut_at = time.time()  # (the logs' clock: this host's)
            # a write asked of the cut-off leader (an enrollment) lands nowhere
            async with AgentClient(a.url) as agent:
                with pytest.raises(ApiError) as refused:
                    await agent.register(register_request("late", join=pair.join_token()))
            assert refused.value.status in (500, 503), refused.value
            await wait_until(
                lambda: role_of(http, a, "standby", ""),
                timeout=TAKEOVER_TIMEOUT_S,
                what="the cut-off leader to stand by",
            )
            await wait_until(
                lambda: role_of(http, b, "leader", b.url),
                timeout=TAKEOVER_TIMEOUT_S,
                what="the other coordinator to lead",
            )
            rounds = watch.rounds
            await wait_until(
                lambda: watch.rounds > rounds, timeout=10, what="a round of the watch after it"
            )
        assert not watch.violations, watch.violations
        [down] = a.log_events("stepped down: no longer the leader")
        assert "own clock" in down["why"]
        [took] = b.log_events("took over as the leader")
        assert took["token"] == token + 1 and took["previous"] == a.url
        assert log_time(down) <= log_time(took), "the old leader stopped after the new one led"
        assert lease_token(pair) == token + 1
        assert a.log_events("lease: renew failed; still leading until the lease ends")
        assert audit.writes_by(role_a, after=mark) == []
        assert "late" not in node_ids(pair)

        reconnect(pair.admin_url, role_a)  # the old leader's database comes back
        async with aiohttp.ClientSession() as http:
            await wait_until(
                lambda: role_of(http, a, "standby", b.url),
                timeout=TAKEOVER_TIMEOUT_S,
                what="the old leader, reconnected, to stand by naming the new one",
            )
            assert await role_now(http, b) == ("leader", b.url)
            headers = {"Authorization": f"Bearer {pair.admin_token()}"}
            async with http.get(f"{a.url}/v1/nodes", headers=headers) as r:
                assert r.status == 503 and r.headers[LEADER_HEADER] == b.url
        assert len(a.log_events("took over as the leader")) == 1  # its first lead only
        assert audit.writes_by(role_a, after=mark) == []
        assert audit.writes_by(role_name(pair, "b"), after=mark)  # the new leader's renews
        print(
            f"\ncut off at lease token {token}: the old leader stood down "
            f"{log_time(down) - cut_at:.2f} s after the cut (lease {LEASE_S:g} s), the new one "
            f"led {log_time(took) - cut_at:.2f} s after it; {watch.rounds} rounds of the "
            "split-brain watch, none with two leaders"
        )
    finally:
        audit.close()


async def test_a_paused_leader_steps_down_on_waking_and_writes_nothing(
    pair: Pair, leader_and_standby: tuple[CoordinatorProcess, CoordinatorProcess]
) -> None:
    a, b = leader_and_standby
    role_a = role_name(pair, "a")
    audit = WriteAudit(pair.admin_url)
    try:
        token = lease_token(pair)
        os.kill(a.popen.pid, signal.SIGSTOP)
        paused_at = time.monotonic()
        agent = AgentClient(a.url, timeout=HELD_REQUEST_TIMEOUT_S)
        await agent.open()
        try:
            # an enrollment sent to the sleeping leader: it waits in its listen queue
            held = asyncio.create_task(
                agent.register(register_request("late", join=pair.join_token()))
            )
            async with aiohttp.ClientSession() as http:
                await wait_until(
                    lambda: role_of(http, b, "leader", b.url),
                    timeout=TAKEOVER_TIMEOUT_S,
                    what="the standby to lead while the leader sleeps",
                )
                took_after = time.monotonic() - paused_at
                # what it writes from here is after the takeover: a renewal it had sent just
                # before the pause may still commit before it (its own token, still current)
                mark = audit.mark()
                assert not held.done()
                os.kill(a.popen.pid, signal.SIGCONT)
                with pytest.raises(ApiError) as refused:
                    await held
                assert refused.value.status == 503, refused.value
                await wait_until(
                    lambda: role_of(http, a, "standby", b.url),
                    timeout=TAKEOVER_TIMEOUT_S,
                    what="the woken leader to stand by naming the new one",
                )
        finally:
            await agent.close()
        assert took_after >= LEASE_S / 2  # (sanity: the lease, not a crash, let b in)
        [down] = a.log_events("stepped down: no longer the leader")
        fenced = a.log_events("write refused: this coordinator's lease was taken")
        assert lease_token(pair) == token + 1
        assert audit.writes_by(role_a, after=mark) == []
        assert "late" not in node_ids(pair)
        print(
            f"\npaused leader: the standby led {took_after:.2f} s into the pause; woken, the "
            f"old one stepped down ({down['why']}); its held enrollment refused "
            f"{'by the fence' if fenced else 'by the standby gate'}"
        )
    finally:
        audit.close()


def pulls_per_layer(cluster: LocalCluster) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for n in NODES:
        for ev in log_events(cluster, n, "pulling layer"):
            key = (n, str(ev["layer"]))
            out[key] = out.get(key, 0) + 1
    return out


async def test_the_pair_recovers_after_the_database_restarts_and_a_job_completes(
    tmp_path: Path, own_postgres: PostgresServer
) -> None:
    if not BUSYBOX.is_file():
        missing_dependency(f"{BUSYBOX} missing: apt-get install busybox-static")
    archive = build_demo_image(tmp_path / "img.tar", payload_mib=2)
    state_url = own_postgres.create_database(str(tmp_path / "pair"))
    a_port, b_port = free_port(), free_port()
    a_url, b_url = f"http://127.0.0.1:{a_port}", f"http://127.0.0.1:{b_port}"
    both = {"coordinator_url": [a_url, b_url]}
    specs = [NodeSpec("origin", roles=["origin"], config=both)]
    specs += [NodeSpec(n, config=both) for n in NODES]
    cluster = LocalCluster(
        tmp_path / "cluster",
        specs,
        heartbeat_interval=0.5,
        policy=WHOLE_LAYERS,
        state_url=state_url,
        port=a_port,
    )
    b: CoordinatorProcess | None = None
    try:
        await cluster.start()  # its coordinator ("a") leads
        cluster._admin_url = f"{a_url},{b_url}"  # the test's admin client follows the leader too
        b = start(
            tmp_path,
            "b",
            state_url,
            cluster.coordinator_dir,
            listen=f"127.0.0.1:{b_port}",
            extra=("--policy", WHOLE_LAYERS),
        )
        async with aiohttp.ClientSession() as http:
            await wait_until(
                lambda: role_of(http, b, "standby", a_url),
                timeout=TAKEOVER_TIMEOUT_S,
                what="the standby to name the leader",
            )
            await add_image(cluster, archive, REF)

            own_postgres.shut_down()
            try:
                # nobody leads with no database: a stops by its own clock (b, which cannot
                # read the lease row either, still names the last leader it read)
                await wait_until(
                    lambda: role_of(http, a_url, "standby", ""),
                    timeout=TAKEOVER_TIMEOUT_S,
                    what="the leader to stand by while the database is down",
                )
                assert await role_now(http, b) == ("standby", a_url)
            finally:
                own_postgres.start_again()

            async def one_leads() -> str:
                ra, rb = await role_now(http, a_url), await role_now(http, b)
                if ra == ("leader", a_url) and rb == ("standby", a_url):
                    return a_url
                if rb == ("leader", b_url) and ra == ("standby", b_url):
                    return b_url
                return ""

            leader = await wait_until(
                one_leads, timeout=TAKEOVER_TIMEOUT_S, what="exactly one coordinator to lead"
            )
        async with asyncio.timeout(120):
            async with cluster.admin() as admin:
                job = await admin.create_job(m.CreateJob(image=REF, targets=["all"]))
                final = await wait_until(
                    lambda: _final(admin, job.job_id),
                    timeout=90,
                    what="the job created after the restart to end",
                )
        assert final.state == "done", final.error
        twice = {k: v for k, v in pulls_per_layer(cluster).items() if v > 1}
        assert not twice, f"layers pulled more than once: {twice}"
        for n in [*NODES, "origin"]:  # every node kept its credential across the restart
            assert len(log_events(cluster, n, "registered")) == 1, n
        print(f"\ndatabase restarted: {leader} leads after it; the job ran to {final.state}")
    finally:
        if b is not None:
            b.stop()
        await cluster.stop()
        own_postgres.drop_database(state_url)


async def _final(admin: AdminClient, job_id: str) -> m.JobView | None:
    view = await admin.job(job_id)
    return None if view.state == "running" else view
