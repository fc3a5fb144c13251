"""Clients configured with several coordinators find the leader (lib/client.py, issue 16).

Real parts on loopback: the leader is a real coordinator (tests/support/
coordinator_support.py); the standby is a stand-in speaking the standby's side
of the protocol until the real standby (coordinator/) lands, and a dead
coordinator is a closed port (tests/support/leader_support.py); a connection
that breaks after the request went out is :class:`Breaker`, a TCP server that
reads the request and hangs up.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coordinator_support import ADMIN, Running, register_request, start
from leader_support import dead_url, standby_stand_in
from rainbowd.core.messages import Heartbeat, SecurityEvent
from rainbowd.core.report_id import new_report_id
from rainbowd.lib.client import AdminClient, AgentClient, ApiError, CoordinatorUnreachable


class Breaker:
    """A TCP server that reads a request and closes without answering (a crash mid-request)."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            await reader.readuntil(b"\r\n\r\n")  # the request's head reached us
            writer.close()

        self.server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def leader(tmp_path: Path) -> AsyncIterator[Running]:
    r = await start(tmp_path)
    yield r
    await r.stop()


async def test_agent_and_admin_reach_the_leader_a_standby_names(leader: Running) -> None:
    standby, server = await standby_stand_in(lambda: leader.url)
    try:
        async with AgentClient([standby.url, leader.url]) as agent:
            await agent.register(register_request("n1"))
            assert agent.base_url == leader.url  # remembered: later calls go there first
            await agent.heartbeat(Heartbeat())
        assert standby.seen == ["POST /v1/register"]  # one refusal, then never again
        async with AdminClient(f"{standby.url},{leader.url}", ADMIN) as admin:
            assert [n.node_id for n in (await admin.nodes()).nodes] == ["n1"]
            assert admin.base_url == leader.url
    finally:
        await server.close()


async def test_a_dead_coordinator_is_skipped(leader: Running) -> None:
    dead = dead_url()
    async with AdminClient([dead, leader.url], ADMIN, timeout=5) as admin:
        assert (await admin.nodes()).nodes == []
        assert admin.base_url == leader.url


async def test_a_leader_outside_the_list_is_not_followed(leader: Running) -> None:
    impostor, impostor_server = await standby_stand_in(lambda: "")
    standby, server = await standby_stand_in(lambda: impostor.url)
    try:
        # alone in the list: the standby's refusal is the answer, as with one coordinator
        async with AdminClient(standby.url, ADMIN) as admin:
            with pytest.raises(ApiError) as e:
                await admin.nodes()
        assert e.value.status == 503 and "not the leader" in e.value.message
        # with the real leader listed too, round robin finds it
        async with AdminClient([standby.url, leader.url], ADMIN) as admin:
            await admin.nodes()
            assert admin.base_url == leader.url
        assert impostor.seen == []  # the admin token never went to the named address
        assert standby.auth == [f"Bearer {ADMIN}"] * 2
    finally:
        await server.close()
        await impostor_server.close()


async def test_a_broken_post_is_not_retried_but_a_get_and_an_identified_report_are(
    leader: Running,
) -> None:
    breaker = Breaker()
    await breaker.start()
    try:
        async with AgentClient(leader.url) as first:
            reg = await first.register(register_request("n1"))
        async with AgentClient(
            [breaker.url, leader.url], node_id="n1", credential=reg.credential
        ) as agent:
            # may have been applied: raised as before, not sent to the next coordinator
            with pytest.raises(CoordinatorUnreachable) as e:
                await agent.heartbeat(Heartbeat())
            assert breaker.url in str(e.value)
            assert breaker.connections == 1
            assert agent.base_url == breaker.url
            # a GET is safe to send again: the leader answers it
            assert (await agent.trust()).version >= 1
            assert agent.base_url == leader.url
        # (aiohttp itself resends a GET once on the same connection: 1 or 2 more)
        before = breaker.connections
        async with AgentClient(
            [breaker.url, leader.url], node_id="n1", credential=reg.credential
        ) as agent:
            # a report with a report id is applied once however often it is sent
            ev = SecurityEvent(kind="bad_chunk", peer="n2", detail="chunk 3 of sha256:ab")
            await agent.security_event(ev, new_report_id())
        assert breaker.connections == before + 1  # tried once there, then the leader
        async with AdminClient(leader.url, ADMIN) as admin:
            events = (await admin.security_events()).events
        assert [(x.kind, x.peer) for x in events] == [("bad_chunk", "n2")]
    finally:
        await breaker.stop()


async def test_the_deadline_error_names_every_coordinator() -> None:
    standby, server = await standby_stand_in(lambda: "")
    dead = dead_url()
    try:
        async with AdminClient([standby.url, dead], ADMIN, timeout=0.5) as admin:
            with pytest.raises(CoordinatorUnreachable) as e:
                await admin.nodes()
        text = str(e.value)
        assert standby.url in text and dead in text and "within 0.5s" in text
        assert "not the leader" in text
        assert len(standby.seen) >= 2  # it kept trying, round robin with backoff
    finally:
        await server.close()


async def rbd(*args: str, coordinator_env: str = "") -> tuple[int, str, str]:
    """Run the real ``rbd`` program; returns exit code, stdout, stderr."""
    env = {**os.environ, "RBD_ADMIN_TOKEN": ADMIN}
    env.pop("RBD_COORDINATOR", None)
    if coordinator_env:
        env["RBD_COORDINATOR"] = coordinator_env
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rainbowd.cli.main",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_rbd_follows_the_leader_from_flag_and_environment(leader: Running) -> None:
    standby, server = await standby_stand_in(lambda: leader.url)
    impostor, impostor_server = await standby_stand_in(lambda: "")
    try:
        code, out, err = await rbd("--coordinator", f"{standby.url},{leader.url}", "nodes")
        assert code == 0, err
        assert out.startswith("NODE")
        code, out, err = await rbd("jobs", "--json", coordinator_env=f"{dead_url()},{leader.url}")
        assert code == 0, err
        # a list with only a standby that names an unlisted leader: refused, named, exit 1
        rogue, rogue_server = await standby_stand_in(lambda: impostor.url)
        try:
            code, out, err = await rbd("--coordinator", rogue.url, "nodes")
        finally:
            await rogue_server.close()
        assert code == 1 and "not the leader" in err
        assert impostor.seen == []
        # a bad list is a usage error naming the setting
        code, out, err = await rbd("--coordinator", f"{leader.url},{leader.url}/", "nodes")
        assert code == 2 and "listed twice" in err and "--coordinator" in err
    finally:
        await server.close()
        await impostor_server.close()
