"""The agent keeps its most recently used seeder connections open, no more (seeder_connections.py).

Real parts: three ChunkServers (asyncssh) on loopback serving one store under three node
names and host keys, and the agent's LayerPuller pulling from them.
"""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest
import structlog

from rainbowd.agent.dataplane.keys import public_line
from rainbowd.agent.dataplane.puller import LayerPuller
from rainbowd.agent.dataplane.seeder_connections import SeederConnections
from rainbowd.agent.dataplane.ssh_server import ChunkServer
from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.digest import sha256_digest
from rainbowd.core.messages import PeerInfo, TransferAssignment, TrustList
from rainbowd.lib.store import LayerStore
from waiting import wait_until

CHUNK = 64 * 1024
SEEDERS = ("s1", "s2", "s3")


def new_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.store = LayerStore(tmp / "seed")
        self.dem_store = LayerStore(tmp / "dem")
        self.dem_client = new_key()
        self.layers: list[ChunkManifest] = []
        for _ in range(4):
            data = os.urandom(3 * CHUNK + 1)
            self.layers.append(
                self.store.ingest(io.BytesIO(data), sha256_digest(data), chunk_size=CHUNK)
            )
        self.hosts = {s: new_key() for s in SEEDERS}
        self.servers: dict[str, ChunkServer] = {}
        self.ports: dict[str, int] = {}
        self.pullers: list[LayerPuller] = []

    def puller(self, max_cached: int) -> LayerPuller:
        """The demander's puller, keeping at most ``max_cached`` seeder connections open."""
        p = LayerPuller(self.dem_store, self.dem_client, node_id="dem")
        p.connections.max_cached = max_cached
        self.pullers.append(p)
        return p

    def peer(self, name: str) -> PeerInfo:
        return PeerInfo(
            node_id=name,
            address="127.0.0.1",
            ssh_port=self.ports.get(name, 1),
            host_key=public_line(self.hosts[name]),
            client_key=public_line(self.hosts[name]),
        )

    async def start(self) -> None:
        dem = PeerInfo(
            node_id="dem",
            address="127.0.0.1",
            ssh_port=1,
            host_key=public_line(self.dem_client),
            client_key=public_line(self.dem_client),
        )
        for name in SEEDERS:
            server = ChunkServer(self.store, self.hosts[name], node_id=name)
            server.update_trust(TrustList(version=1, peers=[dem]))
            self.ports[name] = await server.start("127.0.0.1", 0)
            self.servers[name] = server

    def assignment(self, seeder: str, layer: int) -> TransferAssignment:
        return TransferAssignment(
            transfer_id=f"t{layer}",
            job_id="j",
            layer=self.layers[layer],
            seeder=self.peer(seeder),
            reason="test",
        )


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path)
    await c.start()
    yield c
    for p in c.pullers:
        await p.close()
    for s in c.servers.values():
        await s.close()


def peers_of(server: ChunkServer) -> dict[str, int]:
    return dict(server.gate.per_peer)


async def test_past_the_bound_the_least_recently_used_connection_closes(
    cluster: Cluster,
) -> None:
    p = cluster.puller(max_cached=2)
    await p.pull(cluster.assignment("s1", 0))
    await p.pull(cluster.assignment("s2", 1))
    await p.pull(cluster.assignment("s1", 2))  # s1 is the most recently used now
    assert p.connections.open_count() == 2
    await p.pull(cluster.assignment("s3", 3))  # a third: s2, used least recently, closes
    assert p.connections.open_count() == 2
    s2 = cluster.servers["s2"]
    await wait_until(lambda: peers_of(s2) == {}, timeout=10, what="s2 to see its close")
    assert peers_of(cluster.servers["s1"]) == {"dem": 1}
    assert peers_of(cluster.servers["s3"]) == {"dem": 1}


async def test_a_connection_with_a_pull_running_is_not_closed_for_the_bound(
    cluster: Cluster,
) -> None:
    p = cluster.puller(max_cached=1)
    async with p.connections.use(cluster.peer("s1")):  # a pull from s1 runs meanwhile
        await p.pull(cluster.assignment("s2", 1))  # over the bound: s2 closes, not s1
        assert p.connections.open_count() == 1
        s2 = cluster.servers["s2"]
        await wait_until(lambda: peers_of(s2) == {}, timeout=10, what="s2 to see its close")
        assert peers_of(cluster.servers["s1"]) == {"dem": 1}


def test_the_bound_is_at_least_one() -> None:
    with pytest.raises(ValueError, match="max_cached 0"):
        SeederConnections(
            new_key(),
            connect_timeout=1,
            encryption_algs=[],
            log=structlog.get_logger(),
            max_cached=0,
        )
