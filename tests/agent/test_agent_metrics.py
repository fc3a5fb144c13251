"""Agent metrics for real: two Agent objects, a real SSH pull between them, a real scrape.

No coordinator is needed: the seeder's ChunkServer and the demander's
LayerPuller are the agents' own (so the metric wiring of Agent is what is
tested), the pull goes over asyncssh on loopback, and the endpoint is
scraped over HTTP and parsed with prometheus_client's parser.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rainbowd.agent.agent import Agent
from rainbowd.agent.config import ConfigError, load_config
from rainbowd.agent.dataplane.keys import public_line
from rainbowd.agent.dataplane.pull_failures import PullError
from rainbowd.agent.metrics import AgentMetrics, MetricsServer
from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.digest import Digest, sha256_digest
from rainbowd.core.messages import PeerInfo, TransferAssignment, TrustList

CHUNK = 64 * 1024
SIZE = 20 * CHUNK + 999  # 21 chunks, the last one short

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def make_agent(tmp: Path, node_id: str, extra: str = "") -> Agent:
    cfg = tmp / f"{node_id}.toml"
    cfg.write_text(
        f'node_id = "{node_id}"\ncoordinator_url = "http://127.0.0.1:1"\n'
        f'state_dir = "{tmp / node_id}"\nlisten_address = "127.0.0.1"\n{extra}'
    )
    return Agent(load_config(cfg))


def peer(agent: Agent) -> PeerInfo:
    return PeerInfo(
        node_id=agent.config.node_id,
        address="127.0.0.1",
        ssh_port=agent.server_port,
        host_key=public_line(agent.host_key),
        client_key=public_line(agent.client_key),
    )


class Pair:
    def __init__(self, seeder: Agent, demander: Agent, manifest: ChunkManifest) -> None:
        self.seeder, self.demander, self.manifest = seeder, demander, manifest

    def assignment(self) -> TransferAssignment:
        return TransferAssignment(
            transfer_id="t1", job_id="j1", layer=self.manifest, seeder=peer(self.seeder), reason=""
        )


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    seeder, demander = make_agent(tmp_path, "seed"), make_agent(tmp_path, "dem")
    data = os.urandom(SIZE)
    manifest = seeder.store.ingest(io.BytesIO(data), sha256_digest(data), chunk_size=CHUNK)
    seeder.server_port = await seeder.server.start("127.0.0.1", 0)
    seeder.server.update_trust(TrustList(version=1, peers=[peer(seeder), peer(demander)]))
    try:
        yield Pair(seeder, demander, manifest)
    finally:
        await demander.puller.close()
        await seeder.server.close()


async def test_a_pull_is_counted_on_both_ends(pair: Pair) -> None:
    before = samples(pair.demander.metrics.exposition().decode())
    assert ("rbd_agent_bytes_received_total", (("peer", "seed"),)) not in before
    result = await pair.demander.puller.pull(pair.assignment())
    assert result.bytes_moved == SIZE

    served = samples((await pair.seeder.metrics.exposition_async()).decode())
    got = samples((await pair.demander.metrics.exposition_async()).decode())
    # what the seeder sent to dem is what dem received from seed
    assert served[("rbd_agent_bytes_served_total", (("peer", "dem"),))] == SIZE
    assert served[("rbd_agent_chunks_served_total", (("peer", "dem"),))] == 21
    assert got[("rbd_agent_bytes_received_total", (("peer", "seed"),))] == SIZE
    assert got[("rbd_agent_transfer_duration_seconds_count", (("outcome", "done"),))] == 1
    assert got[("rbd_agent_active_transfers", ())] == 0
    # the store figures are refreshed by the scrape: the demander holds the layer now
    assert got[("rbd_agent_layers", ())] == 1
    assert got[("rbd_agent_store_bytes", ())] >= SIZE
    assert got[("rbd_agent_disk_free_bytes", ())] > 0
    assert got[("rbd_agent_partial_layers", ())] == 0
    assert not any(name == "rbd_agent_chunk_failures_total" for name, _ in got)


async def test_a_bad_chunk_is_a_chunk_failure_of_that_seeder(pair: Pair) -> None:
    pair.seeder.server.verify_reads = False  # a seeder that sends what it has
    path = pair.seeder.store.path(Digest(pair.manifest.digest))
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    raw = bytearray(path.read_bytes())
    raw[3 * CHUNK + 7] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(PullError) as ei:
        await pair.demander.puller.pull(pair.assignment())
    assert ei.value.kind == "verify"
    got = samples(pair.demander.metrics.exposition().decode())
    assert got[("rbd_agent_chunk_failures_total", (("peer", "seed"), ("reason", "bad_chunk")))] == 1
    assert got[("rbd_agent_transfer_duration_seconds_count", (("outcome", "verify"),))] == 1
    # the bad chunk crossed the wire: received counts it, as the seeder's served does
    served = samples(pair.seeder.metrics.exposition().decode())
    sent = served[("rbd_agent_bytes_served_total", (("peer", "dem"),))]
    assert got[("rbd_agent_bytes_received_total", (("peer", "seed"),))] <= sent
    assert got[("rbd_agent_bytes_received_total", (("peer", "seed"),))] >= 4 * CHUNK


async def test_endpoint_over_http_with_a_token(tmp_path: Path, pair: Pair) -> None:
    token_file = tmp_path / "metrics-token"
    token_file.write_text("s3cret\n")
    agent = make_agent(tmp_path, "tok", f'metrics_token_file = "{token_file}"\n')
    server = MetricsServer(agent.metrics, "127.0.0.1", 0, agent.config.metrics_token())
    await server.start()
    try:
        assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/metrics")
        async with aiohttp.ClientSession() as s:
            async with s.get(server.url) as r:
                assert r.status == 401 and "Bearer" in await r.text()
            async with s.get(server.url, headers={"Authorization": "Bearer nope"}) as r:
                assert r.status == 403
            async with s.get(server.url, headers={"Authorization": "Bearer s3cret"}) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain; version=")
                got = samples(await r.text())
        assert got[("rbd_agent_active_transfers", ())] == 0
    finally:
        await server.close()


async def test_endpoint_without_a_token_and_a_busy_port(pair: Pair) -> None:
    first = MetricsServer(pair.seeder.metrics, "127.0.0.1", 0)
    host, port = await first.start()
    try:
        async with aiohttp.ClientSession() as s, s.get(first.url) as r:
            assert r.status == 200
        second = MetricsServer(pair.demander.metrics, host, port)
        with pytest.raises(OSError, match=r"metrics_listen 127\.0\.0\.1:\d+: cannot listen"):
            await second.start()
    finally:
        await first.close()


def test_registries_are_per_object() -> None:
    a, b = AgentMetrics(), AgentMetrics()
    a.received("x", 10)
    assert samples(a.exposition().decode())[("rbd_agent_bytes_received_total", (("peer", "x"),))]
    assert not any(
        k[0] == "rbd_agent_bytes_received_total" for k in samples(b.exposition().decode())
    )


def _cfg(tmp_path: Path, extra: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(
        f'node_id = "n"\ncoordinator_url = "http://127.0.0.1:1"\nstate_dir = "{tmp_path}"\n{extra}'
    )
    return p


def test_metrics_config_is_off_by_default_and_checked(tmp_path: Path) -> None:
    cfg = load_config(_cfg(tmp_path, ""))
    assert cfg.metrics_address() is None and cfg.metrics_token() == ""
    cfg = load_config(_cfg(tmp_path, 'metrics_listen = "[::1]:9465"\n'))
    assert cfg.metrics_address() == ("::1", 9465)
    for bad in ("9465", "host:", "host:http", "h:70000"):
        with pytest.raises(ConfigError, match="metrics_listen"):
            load_config(_cfg(tmp_path, f'metrics_listen = "{bad}"\n'))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cfg = load_config(_cfg(tmp_path, f'metrics_token_file = "{empty}"\n'))
    with pytest.raises(ConfigError, match=r"metrics_token_file .* is empty"):
        cfg.metrics_token()
    cfg = load_config(_cfg(tmp_path, f'metrics_token_file = "{tmp_path / "absent"}"\n'))
    with pytest.raises(ConfigError, match="metrics_token_file"):
        cfg.metrics_token()


def test_agent_cli_refuses_an_unusable_metrics_listen(tmp_path: Path) -> None:
    """rbd-agent run with a bad metrics_listen: exit 2, the key named, nothing started."""
    from rainbowd.agent.cli import main

    assert main(["run", "--config", str(_cfg(tmp_path, 'metrics_listen = "nope"\n'))]) == 2
    assert not (tmp_path / "keys").exists()
