"""Issue 14, item 2: a seeder whose trust list is behind is not under attack.

A node enrolled a moment ago pulls from a seeder that has not heard of it
yet. The seeder fetches the current list when it meets the unknown key
(agent/dataplane/ssh_server.py), the demander tries a refused key again a few times
(agent/dataplane/puller.py), the pull succeeds and nobody is quarantined; and a
refusal that still gets reported blames nobody (coordinator). Real asyncssh
on both ends; the real coordinator app where the list comes from it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest
from aiohttp.test_utils import TestServer

from fake_clock_coordinator import ADMIN, JOIN, Clock, Sim
from rainbowd.agent.dataplane.keys import load_or_create_key, public_line
from rainbowd.agent.dataplane.pull_failures import PullError
from rainbowd.agent.dataplane.puller import LayerPuller
from rainbowd.agent.dataplane.seeder_connections import TRUST_RETRIES
from rainbowd.agent.dataplane.ssh_server import ChunkServer
from rainbowd.agent.dataplane.ssh_trust import TRUST_REFRESH_INTERVAL
from rainbowd.coordinator.core import Coordinator
from rainbowd.coordinator.http.app import create_app
from rainbowd.coordinator.state.sqlite import SqliteStore
from rainbowd.core import messages as m
from rainbowd.core.chunks import MIN_CHUNK_SIZE
from rainbowd.core.digest import Digest, sha256_digest
from rainbowd.lib.client import AgentClient
from rainbowd.lib.store import LayerStore

SIZE = 40 * MIN_CHUNK_SIZE + 123


def peer(node_id: str, host: asyncssh.SSHKey, client: asyncssh.SSHKey, port: int) -> m.PeerInfo:
    return m.PeerInfo(
        node_id=node_id,
        address="127.0.0.1",
        ssh_port=port,
        host_key=public_line(host),
        client_key=public_line(client),
    )


def seeded(tmp_path: Path) -> tuple[LayerStore, m.ChunkManifest, bytes]:
    store = LayerStore(tmp_path / "seed")
    data = os.urandom(SIZE)
    manifest = store.ingest(io.BytesIO(data), sha256_digest(data), chunk_size=MIN_CHUNK_SIZE)
    return store, manifest, data


def assignment(manifest: m.ChunkManifest, seeder: m.PeerInfo) -> m.TransferAssignment:
    return m.TransferAssignment(
        transfer_id="t1", job_id="j1", layer=manifest, seeder=seeder, reason="test"
    )


async def test_seeder_fetches_the_list_from_the_coordinator_and_serves_the_new_node(
    tmp_path: Path,
) -> None:
    """Real coordinator app, real asyncssh: the seeder's list predates the demander."""
    store = SqliteStore(tmp_path / "coordinator.sqlite")
    coord = Coordinator(store, join_token=JOIN, admin_token=ADMIN, chunk_size=MIN_CHUNK_SIZE)
    app = TestServer(create_app(coord), host="127.0.0.1", port=0)
    await app.start_server()
    url = str(app.make_url("")).rstrip("/")
    keys = {n: load_or_create_key(tmp_path / "keys" / n) for n in ("sh", "sc", "dh", "dc")}
    seed_store, manifest, data = seeded(tmp_path)
    seeder_api, demander_api = AgentClient(url), AgentClient(url)
    server: ChunkServer | None = None
    puller: LayerPuller | None = None
    try:
        await seeder_api.open()
        await demander_api.open()
        server = ChunkServer(
            seed_store, keys["sh"], node_id="seeder", refresh_trust=seeder_api.trust
        )
        port = await server.start("127.0.0.1", 0)

        async def enroll(api: AgentClient, node_id: str, host: str, client: str) -> m.TrustList:
            reply = await api.register(
                m.RegisterRequest(
                    node_id=node_id,
                    join_token=JOIN,
                    address="127.0.0.1",
                    ssh_port=port if node_id == "seeder" else 1,
                    host_key=public_line(keys[host]),
                    client_key=public_line(keys[client]),
                )
            )
            api.set_credential(node_id, reply.credential)
            return reply.trust

        server.update_trust(await enroll(seeder_api, "seeder", "sh", "sc"))
        stale = server.trust_version
        await enroll(demander_api, "dem", "dh", "dc")  # the seeder's poll never hears of it
        assert coord.cluster.trust_version > stale

        puller = LayerPuller(LayerStore(tmp_path / "dem"), keys["dc"], node_id="dem")
        seeder = peer("seeder", keys["sh"], keys["sc"], port)
        result = await puller.pull(assignment(manifest, seeder))
        assert result.bytes_moved == SIZE
        assert puller.store.path(Digest(manifest.digest)).read_bytes() == data
        assert server.trust_refreshes == 1 and server.refused_count == 0
        assert server.trust_version == coord.cluster.trust_version
        assert not any(n.quarantined for n in coord.cluster.nodes.values())
        assert store.security_events() == []
    finally:
        if puller is not None:
            await puller.close()
        if server is not None:
            await server.close()
        await seeder_api.close()
        await demander_api.close()
        await app.close()
        store.close()


async def test_unknown_keys_fetch_the_list_at_most_once_per_interval(tmp_path: Path) -> None:
    """A stranger's attempts cost the coordinator one request per TRUST_REFRESH_INTERVAL."""
    seed_store, manifest, _ = seeded(tmp_path)
    host, client = asyncssh.generate_private_key("ssh-ed25519"), load_or_create_key(tmp_path / "c")
    clock = Clock(100.0)
    fetched: list[float] = []
    trust = m.TrustList(version=1, peers=[])

    async def refresh() -> m.TrustList:
        fetched.append(clock())
        return trust

    server = ChunkServer(seed_store, host, node_id="seed", refresh_trust=refresh, clock=clock)
    server.update_trust(trust)
    port = await server.start("127.0.0.1", 0)
    stranger = LayerPuller(LayerStore(tmp_path / "s"), client, node_id="stranger")
    stranger.connections.trust_retry_delay = 0.0
    try:
        job = assignment(manifest, peer("seed", host, client, port))
        with pytest.raises(PullError, match="refused our client key"):
            await stranger.pull(job)
        assert fetched == [100.0]  # 1 + TRUST_RETRIES connections, one fetch
        assert server.refused_count == 1 + TRUST_RETRIES
        clock.advance(TRUST_REFRESH_INTERVAL)
        with pytest.raises(PullError, match="refused our client key"):
            await stranger.pull(job)
        assert fetched == [100.0, 100.0 + TRUST_REFRESH_INTERVAL]
    finally:
        await stranger.close()
        await server.close()


async def test_demander_tries_a_refused_key_again_after_the_seeder_caught_up(
    tmp_path: Path,
) -> None:
    """No refresh path on the seeder: its poll brings the list; the demander's retry wins."""
    seed_store, manifest, data = seeded(tmp_path)
    host, client = load_or_create_key(tmp_path / "h"), load_or_create_key(tmp_path / "c")
    server: ChunkServer

    def poll_brings_the_list(fp: str, address: str) -> None:
        server.update_trust(m.TrustList(version=2, peers=[peer("dem", host, client, 0)]))

    server = ChunkServer(seed_store, host, node_id="seed", on_refused=poll_brings_the_list)
    server.update_trust(m.TrustList(version=1, peers=[]))
    port = await server.start("127.0.0.1", 0)
    puller = LayerPuller(LayerStore(tmp_path / "dem"), client, node_id="dem")
    puller.connections.trust_retry_delay = 0.0
    try:
        result = await puller.pull(assignment(manifest, peer("seed", host, client, port)))
        assert result.bytes_moved == SIZE and server.refused_count == 1
        assert puller.store.path(Digest(manifest.digest)).read_bytes() == data
    finally:
        await puller.close()
        await server.close()


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    s = Sim(tmp_path)
    yield s
    s.close()


def test_a_refused_client_key_blames_nobody(sim: Sim) -> None:
    """Reported anyway (the seeder never caught up): nobody is quarantined or suspected."""
    sim.enroll("origin", roles=["origin"], speed=1e6)
    img = sim.add_image("origin")
    sim.enroll("seeder", speed=500e6, holdings=img.layers)
    d = sim.enroll("d")
    sim.job(img, ["d"])
    t = sim.transfer("d")
    assert t.seeder.node_id == "seeder"
    version = sim.c.cluster.trust_version
    refused = m.TransferFailed(
        reason="seeder refused our client key (not on its trust list yet?)", kind="security"
    )
    sim.c.transfer_failed(d, t.transfer_id, refused)
    assert not sim.node("seeder").quarantined
    assert not sim.c.scheduler.is_suspect("seeder")
    assert sim.c.cluster.trust_version == version  # nobody left the trust list
    assert sim.events() == []
    # d tries another seeder now, and "seeder" again after a heartbeat interval
    assert sim.transfer("d").seeder.node_id == "origin"
