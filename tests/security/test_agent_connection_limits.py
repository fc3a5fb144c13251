"""The agent's SSH server is bounded: connections in total, per peer, pending; channels; fds.

In-process tests run a real ChunkServer and real asyncssh clients on
127.0.0.1; the last one runs real agent processes, one of them under a
lowered RLIMIT_NOFILE (``prlimit``), and opens 300 idle TCP connections to
it: before, that made the agent exit ("Too many open files" in its
heartbeat path); now it refuses what does not fit and keeps heartbeating
and serving.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from rainbowd.agent.config import ConfigError, load_config
from rainbowd.agent.dataplane.keys import load_or_create_key, public_line
from rainbowd.agent.dataplane.ssh_limits import ConnectionGate, SshLimits
from rainbowd.agent.dataplane.ssh_server import ChunkServer
from rainbowd.core import chunkproto
from rainbowd.core.messages import PeerInfo, TrustList
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from rainbowd.lib.store import LayerStore
from testdeps import missing_dependency
from waiting import wait_until

PEERS = ["p1", "p2", "p3"]


@dataclass
class Server:
    server: ChunkServer
    port: int
    keys: dict[str, asyncssh.SSHKey]

    async def connect(self, peer: str) -> asyncssh.SSHClientConnection:
        return await asyncssh.connect(
            "127.0.0.1",
            self.port,
            username="rbd",
            client_keys=[self.keys[peer]],
            known_hosts=None,
            config=None,
        )


async def start(
    tmp: Path, limits: SshLimits, clock: Callable[[], float] = time.monotonic
) -> Server:
    keys = {p: asyncssh.generate_private_key("ssh-ed25519") for p in PEERS}
    server = ChunkServer(
        LayerStore(tmp / "store"),
        asyncssh.generate_private_key("ssh-ed25519"),
        node_id="seed",
        limits=limits,
        clock=clock,
    )
    server.update_trust(
        TrustList(
            version=1,
            peers=[
                PeerInfo(
                    node_id=p,
                    address="127.0.0.1",
                    ssh_port=1,
                    host_key=public_line(k),
                    client_key=public_line(k),
                )
                for p, k in keys.items()
            ],
        )
    )
    port = await server.start("127.0.0.1", 0)
    return Server(server, port, keys)


@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[list[Server]]:
    made: list[Server] = []
    yield made
    for s in made:
        await s.server.close()


async def channel(conn: asyncssh.SSHClientConnection) -> asyncssh.SSHClientChannel[bytes]:
    chan, _session = await conn.create_session(
        asyncssh.SSHClientSession, subsystem=chunkproto.SUBSYSTEM, encoding=None
    )
    return chan


async def until(done: Callable[[], bool], what: str) -> None:
    """Wait for the server's bookkeeping to see a close (it lands a loop turn or two later)."""
    await wait_until(done, timeout=10, what=what)


async def refused(conn_or_connect: asyncssh.SSHClientConnection) -> None:
    """The server closes this connection (after auth) with "too many connections"."""
    async with asyncio.timeout(10):
        await conn_or_connect.wait_closed()


# --------------------------------------------------------------------------
async def test_connections_per_peer_are_limited(tmp_path: Path, servers: list[Server]) -> None:
    s = await start(tmp_path, SshLimits(max_connections_per_peer=2))
    servers.append(s)
    first = await s.connect("p1")
    second = await s.connect("p1")
    third = await s.connect("p1")  # authenticates, then is closed: p1 has 2 already
    await refused(third)
    assert s.server.gate.refused == {"peer": 1}
    await channel(first)  # the admitted ones serve
    await channel(second)
    other = await s.connect("p2")  # another peer is not affected
    await channel(other)
    assert s.server.gate.per_peer == {"p1": 2, "p2": 1}
    first.close()
    await first.wait_closed()
    await until(lambda: s.server.gate.per_peer.get("p1") == 1, "p1's first connection to close")
    again = await s.connect("p1")  # a slot freed: p1 gets in again
    await channel(again)
    for c in (second, other, again):
        c.close()


async def test_connections_in_total_are_limited(tmp_path: Path, servers: list[Server]) -> None:
    s = await start(tmp_path, SshLimits(max_connections=2))
    servers.append(s)
    a = await s.connect("p1")
    b = await s.connect("p2")
    await channel(a)  # both pulling: neither may be closed for a newcomer
    await channel(b)
    c = await s.connect("p3")
    await refused(c)
    assert s.server.gate.refused == {"open": 1} and s.server.gate.evicted == 0
    a.close()
    b.close()


async def test_at_the_limit_the_longest_idle_connection_makes_room(
    tmp_path: Path, servers: list[Server]
) -> None:
    """A newcomer is admitted in place of an idle connection, the one idle longest.

    Demanders keep their connection to every seeder they pulled from: with more
    demanders than ``max_connections`` a seeder refused every later one for good.
    """
    now = [100.0]
    s = await start(tmp_path, SshLimits(max_connections=2), clock=lambda: now[0])
    servers.append(s)
    old = await s.connect("p1")  # idle since 100
    now[0] = 101.0
    recent = await s.connect("p2")  # idle since 101
    newcomer = await s.connect("p3")
    await channel(newcomer)  # admitted, and it serves
    async with asyncio.timeout(10):
        await old.wait_closed()  # the one idle longest was closed for it
    assert s.server.gate.evicted == 1 and s.server.gate.refused == {}
    await until(lambda: s.server.gate.per_peer == {"p2": 1, "p3": 1}, "p1 to be counted out")
    await channel(recent)  # the other idle one stayed: it serves
    again = await s.connect("p1")  # now every connection has a pull running: refused
    await refused(again)
    assert s.server.gate.refused == {"open": 1} and s.server.gate.per_peer == {"p2": 1, "p3": 1}
    recent.close()
    newcomer.close()


async def test_channels_per_connection_are_limited(tmp_path: Path, servers: list[Server]) -> None:
    s = await start(tmp_path, SshLimits(max_channels_per_connection=2))
    servers.append(s)
    conn = await s.connect("p1")
    one = await channel(conn)
    await channel(conn)
    with pytest.raises(asyncssh.ChannelOpenError):
        await channel(conn)
    assert s.server.gate.refused == {"channel": 1}
    one.close()
    await one.wait_closed()

    async def reopened() -> bool:  # the server sees the close a moment later
        try:
            await channel(conn)
        except asyncssh.ChannelOpenError:
            return False
        return True

    await wait_until(reopened, timeout=10, what="a channel to open again after a close")
    conn.close()


async def test_pending_connections_are_bounded_and_time_out(
    tmp_path: Path, servers: list[Server]
) -> None:
    """Idle TCP connections hold at most max_pending slots, each for at most login_timeout."""
    s = await start(tmp_path, SshLimits(max_pending=3, login_timeout=1.0))
    servers.append(s)
    idle = [await asyncio.open_connection("127.0.0.1", s.port) for _ in range(3)]
    extra_r, extra_w = await asyncio.open_connection("127.0.0.1", s.port)
    async with asyncio.timeout(5):
        assert b"too many unauthenticated" in await extra_r.read()  # closed at once
    assert s.server.gate.refused == {"pending": 1}
    with pytest.raises((asyncssh.Error, OSError)):  # a real peer is refused while they sit
        conn = await s.connect("p1")
        await channel(conn)
    async with asyncio.timeout(10):  # the login timeout closes them ...
        for r, _w in idle:
            await r.read()
    await until(lambda: s.server.gate.pending == 0, "the idle connections to time out")
    conn = await s.connect("p1")  # ... and a real peer gets in
    await channel(conn)
    conn.close()
    for _r, w in [*idle, (extra_r, extra_w)]:
        w.close()


def test_gate_counts_every_state() -> None:
    gate = ConnectionGate(SshLimits(max_connections=2, max_pending=1), max_open=10)
    assert gate.accept() == ""
    assert "unauthenticated" in gate.accept()
    assert gate.authenticated("p1") == ""
    assert gate.accept() == ""
    assert gate.authenticated("p2") == ""
    assert gate.accept() == ""
    assert "too many peer connections" in gate.authenticated("p3")
    gate.closed(None, was_pending=False)  # the refused one
    gate.closed("p1", was_pending=False)
    assert (gate.open, gate.pending, gate.per_peer) == (1, 0, {"p2": 1})
    tight = ConnectionGate(SshLimits(), max_open=1)  # the descriptor budget wins
    assert tight.accept() == ""
    assert "too many connections (1 open, limit 1)" in tight.accept()


def test_gate_says_when_only_the_total_refuses_a_peer() -> None:
    gate = ConnectionGate(SshLimits(max_connections=2, max_connections_per_peer=1), max_open=10)
    for p in ("p1", "p2"):
        assert gate.accept() == "" and gate.authenticated(p) == ""
    assert gate.full_for("p3")  # closing an idle connection would let it in
    assert not gate.full_for("p1")  # at its own limit: closing another's would not
    gate.closed("p2", was_pending=False)
    assert not gate.full_for("p3")  # room again


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("ssh_max_pending = 0", "ssh_max_pending"),
        ("ssh_max_connections = -1", "ssh_max_connections"),
        ("ssh_max_channels_per_connection = 10000000", "ssh_max_channels_per_connection"),
        ("ssh_login_timeout = nan", "ssh_login_timeout"),
        ("ssh_login_timeout = 0.0", "ssh_login_timeout"),
    ],
)
def test_limits_are_checked_in_the_config(tmp_path: Path, line: str, key: str) -> None:
    cfg = tmp_path / "agent.toml"
    base = 'node_id = "n"\ncoordinator_url = "http://c:1"\nstate_dir = "/tmp/x"\n'
    cfg.write_text(base + line + "\n")
    with pytest.raises(ConfigError, match=key):
        load_config(cfg)
    cfg.write_text(base)
    assert load_config(cfg).ssh_limits() == SshLimits()
    assert not math.isnan(SshLimits().login_timeout)


# --------------------------------------------------------------------------
#: the seed agent's descriptor limit: 300 idle connections used to exhaust it
NOFILE = 256
IDLE = 300


@pytest.mark.integration
async def test_fd_exhaustion_refuses_connections_and_the_agent_lives(tmp_path: Path) -> None:
    if shutil.which("prlimit") is None:
        missing_dependency("prlimit (util-linux) is needed to lower an agent's RLIMIT_NOFILE")
    cluster = LocalCluster(
        tmp_path / "c",
        [NodeSpec("seed"), NodeSpec("dem")],
        heartbeat_interval=0.5,
        prefix_for=lambda n: (
            ["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--"] if n == "seed" else []
        ),
    )
    idle: list[socket.socket] = []
    try:
        await cluster.start()
        st = await cluster.agent_status("seed")
        port = st["ssh"]["port"]
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(60):
            for _ in range(IDLE):  # one after another: each is accepted before the next
                sock = socket.socket()
                sock.setblocking(False)
                idle.append(sock)
                await loop.sock_connect(sock, ("127.0.0.1", port))
                assert cluster.running("seed"), cluster.log_tail("seed")

        # every connection was either held (pending) or refused at once
        async def status() -> dict[str, Any]:
            assert cluster.running("seed"), cluster.log_tail("seed")
            return await cluster.agent_status("seed")

        async def refused_enough() -> dict[str, Any] | None:
            got = await status()
            return got if sum(got["ssh_refused"].values()) >= IDLE - 32 else None

        st = await wait_until(refused_enough, timeout=30, what="the seed to refuse the idle ones")
        # two more heartbeats land while the idle connections are held
        for _ in range(2):
            seen = st["coordinator"]["last_contact_at"]

            async def contact_after(seen: float = seen) -> dict[str, Any] | None:
                got = await status()
                return got if got["coordinator"]["last_contact_at"] > seen else None

            st = await wait_until(contact_after, timeout=30, what="the seed's next heartbeat")
        assert st["coordinator"]["connected"]
        for sock in idle:
            sock.close()
        idle.clear()
        # a real peer (dem's client key) is served again
        dem_key = load_or_create_key(cluster.agent_dir("dem") / "keys" / "client_ed25519")

        async def served() -> asyncssh.SSHClientConnection | None:
            try:
                conn = await asyncssh.connect(
                    "127.0.0.1",
                    port,
                    username="rbd",
                    client_keys=[dem_key],
                    known_hosts=None,
                    config=None,
                )
                await channel(conn)
            except (asyncssh.Error, OSError):  # pending slots free as the server sees closes
                return None
            return conn

        conn = await wait_until(served, timeout=30, what="a real peer to be served again")
        conn.close()
        assert cluster.running("seed")
        print(f"\nfd limit {NOFILE}, {IDLE} idle connections: refused {st['ssh_refused']}")
    finally:
        for sock in idle:
            sock.close()
        await cluster.stop()
