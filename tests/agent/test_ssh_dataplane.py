"""The SSH data plane for real: asyncssh ChunkServer and LayerPuller on 127.0.0.1."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import stat
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import msgspec
import pytest

from rainbowd.agent.dataplane.keys import (
    KeyFormatError,
    fingerprint,
    load_or_create_key,
    parse_public_line,
    public_line,
    same_key,
)
from rainbowd.agent.dataplane.pacing import RatePacer
from rainbowd.agent.dataplane.pull_failures import HostKeyMismatch, PullError
from rainbowd.agent.dataplane.puller import LayerPuller
from rainbowd.agent.dataplane.seeder_connections import TRUST_RETRIES
from rainbowd.agent.dataplane.ssh_server import ChunkServer
from rainbowd.core import chunkproto
from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.digest import Digest, sha256_digest
from rainbowd.core.messages import PeerInfo, TransferAssignment, TrustList
from rainbowd.lib.store import LayerStore, PartialLayer
from waiting import FakeClock, hang, wait_until

CHUNK = 64 * 1024
SIZE = 3 * 1024 * 1024 + 12_345  # 49 chunks, the last one short


def new_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


def ingest(store: LayerStore, data: bytes) -> ChunkManifest:
    import io

    return store.ingest(io.BytesIO(data), sha256_digest(data), chunk_size=CHUNK)


@dataclass
class Lab:
    tmp: Path
    seed_store: LayerStore
    dem_store: LayerStore
    seed_host: asyncssh.SSHKey
    seed_client: asyncssh.SSHKey
    dem_host: asyncssh.SSHKey
    dem_client: asyncssh.SSHKey
    data: bytes
    manifest: ChunkManifest
    server: ChunkServer
    port: int = 0
    refusals: list[tuple[str, str]] = field(default_factory=list)
    pullers: list[LayerPuller] = field(default_factory=list)

    def trust(self, version: int = 1) -> TrustList:
        return TrustList(
            version=version,
            peers=[
                PeerInfo(
                    node_id="seed",
                    address="127.0.0.1",
                    ssh_port=self.port,
                    host_key=public_line(self.seed_host),
                    client_key=public_line(self.seed_client),
                ),
                PeerInfo(
                    node_id="dem",
                    address="127.0.0.1",
                    ssh_port=0,
                    host_key=public_line(self.dem_host),
                    client_key=public_line(self.dem_client),
                ),
            ],
        )

    def assignment(
        self, manifest: ChunkManifest | None = None, host_key: str | None = None
    ) -> TransferAssignment:
        return TransferAssignment(
            transfer_id="t1",
            job_id="j1",
            layer=manifest or self.manifest,
            seeder=PeerInfo(
                node_id="seed",
                address="127.0.0.1",
                ssh_port=self.port,
                host_key=host_key or public_line(self.seed_host),
                client_key=public_line(self.seed_client),
            ),
            reason="test",
        )

    def puller(self, client_key: asyncssh.SSHKey | None = None, **kw: float) -> LayerPuller:
        p = LayerPuller(self.dem_store, client_key or self.dem_client, node_id="dem", **kw)  # type: ignore[arg-type]
        self.pullers.append(p)
        return p


async def start_server(lab: Lab, server: ChunkServer) -> None:
    server.update_trust(lab.trust())
    lab.port = await server.start("127.0.0.1", lab.port)
    lab.server = server


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    seed_store = LayerStore(tmp_path / "seed")
    dem_store = LayerStore(tmp_path / "dem")
    data = os.urandom(SIZE)
    manifest = ingest(seed_store, data)
    refusals: list[tuple[str, str]] = []
    seed_host = new_key()
    server = ChunkServer(
        seed_store,
        seed_host,
        node_id="seed",
        on_refused=lambda fp, addr: refusals.append((fp, addr)),
    )
    lab = Lab(
        tmp_path,
        seed_store,
        dem_store,
        seed_host,
        new_key(),
        new_key(),
        new_key(),
        data,
        manifest,
        server,
        refusals=refusals,
    )
    await start_server(lab, server)
    yield lab
    for p in lab.pullers:
        await p.close()
    await lab.server.close()


def blob(store: LayerStore, digest: str) -> bytes:
    return store.path(Digest(digest)).read_bytes()


# --------------------------------------------------------------------------
async def test_full_transfer(lab: Lab) -> None:
    progress: list[tuple[int, int, float]] = []
    res = await lab.puller().pull(lab.assignment(), lambda *a: progress.append(a))
    assert res.bytes_moved == SIZE
    assert res.chunks_fetched == lab.manifest.count == 49
    assert lab.dem_store.has(Digest(lab.manifest.digest))
    assert blob(lab.dem_store, lab.manifest.digest) == lab.data
    assert lab.server.bytes_served == {"dem": SIZE}
    assert progress[-1][:2] == (SIZE, SIZE)
    assert list(lab.dem_store.partials()) == []
    # already held: nothing moves
    again = await lab.puller().pull(lab.assignment())
    assert again.bytes_moved == 0 and again.chunks_fetched == 0


@pytest.mark.parametrize("inline_io_max", [CHUNK, CHUNK - 1])
async def test_chunk_work_runs_inline_up_to_the_limit_and_in_threads_above(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, inline_io_max: int
) -> None:
    """Chunks up to ``inline_io_max`` are checked and copied on the loop; larger ones in threads.

    The flush (fdatasync, renamed bitmap) is never on the loop. Both paths
    move the same bytes; what differs is only the thread each step ran on.
    """
    loop_thread = threading.get_ident()
    seen: dict[str, set[bool]] = {"read": set(), "put": set(), "flush": set()}

    def spy(name: str, real: Any) -> Any:
        def wrapper(*args: Any, **kw: Any) -> Any:
            seen[name].add(threading.get_ident() == loop_thread)
            return real(*args, **kw)

        return wrapper

    monkeypatch.setattr(LayerStore, "read_blob_chunk", spy("read", LayerStore.read_blob_chunk))
    monkeypatch.setattr(PartialLayer, "put_chunk", spy("put", PartialLayer.put_chunk))
    monkeypatch.setattr(PartialLayer, "flush", spy("flush", PartialLayer.flush))
    monkeypatch.setattr(PartialLayer, "FLUSH_SECONDS", 0.0)  # a flush after every chunk
    await lab.server.close()
    server = ChunkServer(lab.seed_store, lab.seed_host, node_id="seed", inline_io_max=inline_io_max)
    await start_server(lab, server)
    res = await lab.puller(inline_io_max=inline_io_max).pull(lab.assignment())
    assert res.bytes_moved == SIZE
    assert blob(lab.dem_store, lab.manifest.digest) == lab.data
    inline = inline_io_max >= CHUNK
    # the first read of a layer loads its manifest from disk: always in a thread
    assert seen["read"] == ({True, False} if inline else {False})
    assert seen["put"] == {inline}
    assert seen["flush"] == {False}


async def test_connection_reused_for_several_layers(lab: Lab) -> None:
    other = os.urandom(CHUNK * 3 + 1)
    m2 = ingest(lab.seed_store, other)
    p = lab.puller()
    await asyncio.gather(p.pull(lab.assignment()), p.pull(lab.assignment(m2)))
    assert len(p.connections._conns) == 1
    assert blob(lab.dem_store, m2.digest) == other
    assert lab.server.bytes_served["dem"] == SIZE + len(other)


def seeder_conn(p: LayerPuller) -> asyncssh.SSHClientConnection:
    [conn] = p.connections._conns.values()
    return conn


def channels_taken(p: LayerPuller) -> tuple[int, int]:
    """(opened, reused) chunk channels, as the agent's metrics count them."""
    get = p.metrics.registry.get_sample_value
    name = "rbd_agent_chunk_channels_total"
    return int(get(name, {"how": "opened"}) or 0), int(get(name, {"how": "reused"}) or 0)


def open_channels(server: ChunkServer) -> int:
    """Chunk channels open now on the seeder, over all its connections."""
    return sum(pc.channels for pc in server._conns)


async def test_a_later_pull_from_a_seeder_takes_the_channel_the_last_one_left(lab: Lab) -> None:
    """A pull that ended cleanly leaves its channel open; the next one sends on it at once.

    The second layer has chunks twice as big: the kept channel's decoder takes
    the new pull's chunk size. A failed pull closes its channel.
    """
    bigger = os.urandom(CHUNK * 5 + 7)
    m2 = lab.seed_store.ingest(io.BytesIO(bigger), sha256_digest(bigger), chunk_size=2 * CHUNK)
    p = lab.puller()
    await p.pull(lab.assignment())
    conn = seeder_conn(p)
    assert (*channels_taken(p), p.channels.idle(conn)) == (1, 0, 1)
    assert open_channels(lab.server) == 1
    await p.pull(lab.assignment(m2))
    assert (*channels_taken(p), p.channels.idle(conn)) == (1, 1, 1)
    assert blob(lab.dem_store, m2.digest) == bigger
    assert blob(lab.dem_store, lab.manifest.digest) == lab.data
    assert open_channels(lab.server) == 1

    missing = ingest(LayerStore(lab.tmp / "other"), os.urandom(CHUNK + 5))
    with pytest.raises(PullError):
        await p.pull(lab.assignment(missing))  # the seeder answers not_held
    assert (channels_taken(p)[1], p.channels.idle(conn)) == (2, 0)
    await wait_until(lambda: open_channels(lab.server) == 0, timeout=10, what="channel closed")


class _OneRequestPerChannel(ChunkServer):
    """Closes a channel when a second request comes on it, unanswered (a seeder tidying up)."""

    async def _answer(
        self, peer: str, req: chunkproto.Request, stdout: asyncssh.SSHWriter[bytes], plog: Any
    ) -> bool:
        seen: set[int] = self.__dict__.setdefault("seen", set())
        if id(stdout) in seen:
            return False
        seen.add(id(stdout))
        return await super()._answer(peer, req, stdout, plog)


async def test_a_kept_channel_the_seeder_closed_is_replaced_before_any_chunk_moves(
    lab: Lab,
) -> None:
    await lab.server.close()
    await start_server(lab, _OneRequestPerChannel(lab.seed_store, lab.seed_host, node_id="seed"))
    other = os.urandom(CHUNK * 3 + 1)
    m2 = ingest(lab.seed_store, other)
    p = lab.puller()
    await p.pull(lab.assignment())
    res = await p.pull(lab.assignment(m2))
    assert res.bytes_moved == len(other)
    assert blob(lab.dem_store, m2.digest) == other
    assert channels_taken(p) == (2, 1)
    assert lab.server.bytes_served["dem"] == SIZE + len(other)


async def test_resume_from_prefilled_partial(lab: Lab) -> None:
    m = lab.manifest
    have = [*range(0, 10), 20, 33, m.count - 1]
    part = lab.dem_store.open_partial(m)
    for i in have:
        off = m.chunk_offset(i)
        part.write_chunk(i, lab.data[off : off + m.chunk_length(i)])
    part.close()
    expected = SIZE - sum(m.chunk_length(i) for i in have)
    res = await lab.puller().pull(lab.assignment())
    assert res.bytes_moved == expected
    assert res.chunks_fetched == m.count - len(have)
    assert lab.server.bytes_served["dem"] == expected
    assert blob(lab.dem_store, m.digest) == lab.data


def verified(lab: Lab) -> int:
    """Chunks of the layer the demander has verified into its partial so far."""
    shared = lab.dem_store.shared_partial(lab.manifest.digest)
    count = lab.manifest.count
    return 0 if shared is None else count - len(shared.missing_in(0, count))


class _DroppingServer(ChunkServer):
    """Reads ``limit`` chunks, then drops every connection (a seeder going away)."""

    limit = 20
    reads = 0

    async def _read(self, layer: Digest, index: int) -> tuple[int, bytes]:
        self.reads += 1
        if self.reads > self.limit:
            for pc in list(self._conns):
                pc.disconnect()
            await hang()
        return await super()._read(layer, index)


async def test_resume_after_seeder_drops(lab: Lab) -> None:
    await lab.server.close()
    await start_server(lab, _DroppingServer(lab.seed_store, lab.seed_host, node_id="seed"))
    with pytest.raises(PullError) as ei:
        await lab.puller().pull(lab.assignment())
    assert ei.value.kind == "io"
    assert "seed" in ei.value.reason and lab.manifest.digest in ei.value.reason
    assert not lab.dem_store.has(Digest(lab.manifest.digest))
    # the bitmap was flushed: a fresh store object sees what arrived
    [(_, have, count)] = list(LayerStore(lab.tmp / "dem").partials())
    assert 0 < have <= 20 and count == 49
    first = have * CHUNK

    await lab.server.close()
    await start_server(lab, ChunkServer(lab.seed_store, lab.seed_host, node_id="seed"))
    res = await lab.puller().pull(lab.assignment())
    assert res.bytes_moved == SIZE - first
    assert lab.server.bytes_served["dem"] == SIZE - first
    assert blob(lab.dem_store, lab.manifest.digest) == lab.data


async def test_host_key_mismatch(lab: Lab) -> None:
    impostor = public_line(new_key())
    with pytest.raises(HostKeyMismatch) as ei:
        await lab.puller().pull(lab.assignment(host_key=impostor))
    e = ei.value
    assert e.kind == "security" and e.seeder_fault
    assert e.presented == fingerprint(lab.seed_host)
    assert fingerprint(impostor) in e.reason and "seed" in e.reason
    assert e.to_failed().kind == "security"
    assert not lab.dem_store.has(Digest(lab.manifest.digest))
    assert lab.server.bytes_served == {}


async def test_untrusted_client_refused(lab: Lab) -> None:
    stranger = new_key()
    puller = lab.puller(client_key=stranger)
    puller.connections.trust_retry_delay = 0.0  # a refused key is tried TRUST_RETRIES more times
    with pytest.raises(PullError) as ei:
        await puller.pull(lab.assignment())
    assert ei.value.kind == "security" and not ei.value.seeder_fault
    assert lab.server.refused_count == 1 + TRUST_RETRIES
    rec = lab.server.refused_clients[0]
    assert rec.fingerprint == fingerprint(stranger)
    assert rec.address.startswith("127.0.0.1:")
    assert [fp for fp, _ in lab.refusals] == [rec.fingerprint] * (1 + TRUST_RETRIES)
    assert lab.refusals[0] == (rec.fingerprint, rec.address)
    assert not lab.dem_store.has(Digest(lab.manifest.digest))


async def test_trust_update_revokes(lab: Lab) -> None:
    p = lab.puller()
    await p.pull(lab.assignment())
    conn = next(iter(p.connections._conns.values()))
    lab.server.update_trust(TrustList(version=2, peers=[]))
    await asyncio.wait_for(conn.wait_closed(), 5)
    lab.dem_store.remove(Digest(lab.manifest.digest))
    with pytest.raises(PullError, match="refused our client key"):
        await p.pull(lab.assignment())


async def test_a_repeated_trust_list_parses_no_key_twice(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    # at a cold start every enrollment sends every agent the whole trust list: parsing all
    # of it each time cost N^2 key parses (the lab's 101 agents kept 2 vCPUs busy)
    import rainbowd.agent.dataplane.ssh_trust as ssh_trust

    parsed: list[str] = []
    real = ssh_trust.key_blob

    def counting(line: asyncssh.SSHKey | str) -> bytes:
        parsed.append(str(line))
        return real(line)

    monkeypatch.setattr(ssh_trust, "key_blob", counting)
    lab.server.update_trust(lab.trust(version=2))
    lab.server.update_trust(lab.trust(version=3))
    assert parsed == []  # both keys were parsed when the server started
    assert lab.server.trusted_peer(real(public_line(lab.dem_client))) == "dem"
    newcomer = new_key()
    more = lab.trust(version=4)
    more.peers.append(
        msgspec.structs.replace(more.peers[1], node_id="new", client_key=public_line(newcomer))
    )
    lab.server.update_trust(more)
    assert parsed == [public_line(newcomer)]  # only the new key
    assert lab.server.trusted_peer(real(public_line(newcomer))) == "new"
    # a key no longer listed is forgotten (and its holder refused), as before
    lab.server.update_trust(lab.trust(version=5))
    assert lab.server.trusted_peer(real(public_line(newcomer))) is None
    lab.server.update_trust(more)
    assert parsed == [public_line(newcomer)] * 2


async def test_only_the_chunk_subsystem_is_offered(lab: Lab) -> None:
    conn = await asyncssh.connect(
        "127.0.0.1",
        lab.port,
        username="whoever",
        config=[],
        known_hosts=([parse_public_line(public_line(lab.seed_host))], [], []),
        client_keys=[lab.dem_client],
        agent_path=None,
    )
    async with conn:
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.run("id")  # exec
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_process()  # shell
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_process(subsystem="sftp")
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_process(subsystem=chunkproto.SUBSYSTEM, term_type="xterm")
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_connection("127.0.0.1", lab.port)  # direct-tcpip
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 1)
        # and the subsystem does work, speaking chunkproto
        proc = await conn.create_process(subsystem=chunkproto.SUBSYSTEM, encoding=None)
        proc.stdin.write(chunkproto.encode_request(lab.manifest.digest, [48, 0]))
        dec = chunkproto.Decoder("client")
        events: list[chunkproto.Event] = []
        while len(events) < 3:
            events.extend(dec.feed(await proc.stdout.read(1 << 20)))
        assert events[0] == chunkproto.Chunk(48, lab.data[48 * CHUNK :])
        assert events[1] == chunkproto.Chunk(0, lab.data[:CHUNK])
        assert events[2] == chunkproto.End(2)
        # a malformed request gets an ERROR frame and the channel closes
        proc.stdin.write(b"\x07" + b"\x00" * 8)
        rest = await proc.stdout.read()
        [err] = dec.feed(rest)
        assert isinstance(err, chunkproto.Error) and err.code == chunkproto.ERR_BAD_REQUEST
        assert lab.server.bytes_served == {"dem": len(lab.data) - 48 * CHUNK + CHUNK}


async def test_password_and_kbdint_not_offered(lab: Lab) -> None:
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect(
            "127.0.0.1",
            lab.port,
            username="root",
            password="root",
            config=[],
            known_hosts=([parse_public_line(public_line(lab.seed_host))], [], []),
            client_keys=[],
            agent_path=None,
        )


def corrupt_chunk(store: LayerStore, digest: str, index: int) -> None:
    """Flip one byte of chunk ``index`` in a stored (0440) blob, as disk rot would."""
    path = store.path(Digest(digest))
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    raw = bytearray(path.read_bytes())
    raw[index * CHUNK + 100] ^= 0xFF
    path.write_bytes(bytes(raw))
    os.chmod(path, 0o440)


@pytest.mark.parametrize("verify_reads", [True, False], ids=["seeder-verifies", "lying-seeder"])
async def test_corrupt_seeder(lab: Lab, verify_reads: bool) -> None:
    """Bad bytes on a seeder's disk never land: refused at the seeder, or caught at the chunk.

    With ``verify_reads`` (the default) the seeder checks its own chunk and
    sends ERROR "corrupt" instead of the bad bytes; a seeder that does not
    (or lies) is caught by the demander's per-chunk check. Either way the
    failure is the seeder's, chunks before the bad one stay in the partial.
    """
    await lab.server.close()
    server = ChunkServer(lab.seed_store, lab.seed_host, node_id="seed", verify_reads=verify_reads)
    await start_server(lab, server)
    bad = 5
    corrupt_chunk(lab.seed_store, lab.manifest.digest, bad)
    with pytest.raises(PullError) as ei:
        await lab.puller().pull(lab.assignment())
    e = ei.value
    assert e.kind == "verify" and e.seeder_fault
    assert f"chunk {bad}" in e.reason and "seed" in e.reason
    assert not lab.dem_store.has(Digest(lab.manifest.digest))
    if verify_reads:
        assert "corrupt" in e.reason
        assert lab.manifest.digest in server.corrupt_layers
        # the bad chunk (and nothing after it) was never sent
        assert server.chunks_served["dem"] == bad
        assert server.bytes_served["dem"] == bad * CHUNK
    else:
        assert server.corrupt_layers == {}
    part = lab.dem_store.open_partial(lab.manifest)
    try:
        missing = part.missing()
        assert missing[0] == bad and set(range(bad)).isdisjoint(missing)
    finally:
        part.close()


async def second_seeder(lab: Lab, name: str = "seed2") -> tuple[ChunkServer, PeerInfo]:
    """Another seeder holding the same layer: own store, own host key, own port."""
    store = LayerStore(lab.tmp / name)
    ingest(store, lab.data)
    host = new_key()
    server = ChunkServer(store, host, node_id=name)
    server.update_trust(lab.trust())
    port = await server.start("127.0.0.1", 0)
    peer = PeerInfo(
        node_id=name,
        address="127.0.0.1",
        ssh_port=port,
        host_key=public_line(host),
        client_key=public_line(new_key()),
    )
    return server, peer


async def test_dropped_link_resumes_from_another_seeder(lab: Lab) -> None:
    """A seeder vanishing mid-transfer costs only the chunks that were in flight.

    The first seeder's server is closed (listener and connection) half-way;
    the pull fails with kind "io", the partial keeps every verified chunk, and
    a pull of the same layer from a *different* seeder moves exactly the
    missing chunks and installs the right bytes.
    """
    await lab.server.close()

    class Stalls(ChunkServer):
        async def _read(self, layer: Digest, index: int) -> tuple[int, bytes]:
            if index >= 20:
                await hang()
            return await super()._read(layer, index)

    first = Stalls(lab.seed_store, lab.seed_host, node_id="seed")
    await start_server(lab, first)
    task = asyncio.create_task(lab.puller().pull(lab.assignment()))
    await wait_until(
        lambda: first.chunks_served.get("dem", 0) >= 20, timeout=10, what="20 chunks served"
    )
    await wait_until(lambda: verified(lab) >= 20, timeout=10, what="the demander to verify 20")
    await first.close()  # the link drops mid-transfer
    with pytest.raises(PullError) as ei:
        await task
    assert ei.value.kind in ("io", "unreachable") and not ei.value.seeder_fault
    [(_, have, count)] = list(LayerStore(lab.tmp / "dem").partials())
    assert have == 20 and count == lab.manifest.count
    assert not lab.dem_store.has(Digest(lab.manifest.digest))

    seed2, peer2 = await second_seeder(lab)
    try:
        a2 = TransferAssignment(
            transfer_id="t2", job_id="j1", layer=lab.manifest, seeder=peer2, reason="retry"
        )
        res = await lab.puller().pull(a2)
    finally:
        await seed2.close()
    missing_bytes = SIZE - 20 * CHUNK
    assert res.bytes_moved == missing_bytes
    assert res.chunks_fetched == lab.manifest.count - 20
    assert seed2.bytes_served == {"dem": missing_bytes}
    assert first.bytes_served["dem"] == 20 * CHUNK
    assert blob(lab.dem_store, lab.manifest.digest) == lab.data
    assert list(lab.dem_store.partials()) == []


async def test_two_pulls_of_one_layer_run_one_after_the_other(lab: Lab) -> None:
    """A second assignment for a layer being pulled joins the first: the bytes move once."""
    p = lab.puller()
    a1 = lab.assignment()
    a2 = TransferAssignment(
        transfer_id="t2", job_id="j2", layer=a1.layer, seeder=a1.seeder, reason="again"
    )
    first = asyncio.create_task(p.pull(a1))
    await wait_until(lambda: p.pulling(a1.layer.digest) == 1, timeout=5, what="the first pull")
    second = asyncio.create_task(p.pull(a2))
    await wait_until(lambda: p.pulling(a1.layer.digest) == 2, timeout=5, what="it to join")
    r1, r2 = await asyncio.gather(first, second)
    assert (r1.bytes_moved, r2.bytes_moved) == (SIZE, 0)
    assert lab.server.bytes_served == {"dem": SIZE}
    assert p.pulling(a1.layer.digest) == 0 and p._layers == {}
    assert blob(lab.dem_store, lab.manifest.digest) == lab.data


async def test_second_pull_resumes_when_the_first_fails(lab: Lab) -> None:
    """The waiting pull is not poisoned by the first one's failure: it resumes the partial."""
    await lab.server.close()
    await start_server(lab, _DroppingServer(lab.seed_store, lab.seed_host, node_id="seed"))
    p = lab.puller()
    first = asyncio.create_task(p.pull(lab.assignment()))
    await wait_until(lambda: p.pulling(lab.manifest.digest), timeout=5, what="the first pull")
    seed2, peer2 = await second_seeder(lab)
    try:
        a2 = TransferAssignment(
            transfer_id="t2", job_id="j1", layer=lab.manifest, seeder=peer2, reason="retry"
        )
        second = asyncio.create_task(p.pull(a2))
        with pytest.raises(PullError):
            await first
        res = await second
    finally:
        await seed2.close()
    assert 0 < res.bytes_moved < SIZE
    assert seed2.bytes_served == {"dem": res.bytes_moved}
    assert blob(lab.dem_store, lab.manifest.digest) == lab.data


async def test_pull_that_cannot_fit_fails_fast_naming_node_layer_and_space(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Free space is checked before a byte moves; the reason says what an operator needs."""
    free = SIZE // 2
    monkeypatch.setattr(lab.dem_store, "bytes_free", lambda: free)
    with pytest.raises(PullError) as ei:
        await lab.puller().pull(lab.assignment())
    e = ei.value
    assert e.kind == "disk" and not e.seeder_fault
    assert "node dem" in e.reason and lab.manifest.digest in e.reason
    assert f"needs {SIZE / 2**20:.1f} MiB" in e.reason
    assert f"{free / 2**20:.1f} MiB free" in e.reason and str(lab.dem_store.root) in e.reason
    assert lab.server.bytes_served == {}  # nothing moved
    assert list(lab.dem_store.partial_dir.iterdir()) == []  # nothing left behind
    assert not lab.dem_store.has(Digest(lab.manifest.digest))

    # with most of the layer already received, the same free space is enough
    m = lab.manifest
    part = lab.dem_store.open_partial(m)
    for i in range(40):
        part.write_chunk(i, lab.data[m.chunk_offset(i) : m.chunk_offset(i) + m.chunk_length(i)])
    part.close()
    res = await lab.puller().pull(lab.assignment())
    assert res.bytes_moved == SIZE - 40 * CHUNK
    assert blob(lab.dem_store, m.digest) == lab.data


async def test_upload_cap_paces_the_seeder(lab: Lab) -> None:
    await lab.server.close()
    rate = 8e6
    await start_server(
        lab, ChunkServer(lab.seed_store, lab.seed_host, node_id="seed", max_upload_bps=rate)
    )
    assert isinstance(lab.server, ChunkServer)
    asked: list[float] = []

    async def sleep(seconds: float) -> None:  # the pacer's waits, noted; no time passes
        asked.append(seconds)

    lab.server._pacer = RatePacer(rate, clock=FakeClock(0.0), sleep=sleep)
    res = await lab.puller().pull(lab.assignment())
    assert res.bytes_moved == SIZE
    # every byte sent was booked on the pacer: the last booking ends SIZE / rate from the
    # start (the pacer's own arithmetic is tested in test_bandwidth_caps.py)
    assert max(asked) == pytest.approx(SIZE / rate)
    assert blob(lab.dem_store, lab.manifest.digest) == lab.data


async def test_layer_not_held_by_seeder(lab: Lab) -> None:
    data = os.urandom(CHUNK + 5)
    other = LayerStore(lab.tmp / "other")
    m = ingest(other, data)
    with pytest.raises(PullError) as ei:
        await lab.puller().pull(lab.assignment(m))
    assert ei.value.kind == "io" and "not_held" in ei.value.reason


async def test_unreachable(lab: Lab) -> None:
    await lab.server.close()
    with pytest.raises(PullError) as ei:
        await lab.puller(connect_timeout=2).pull(lab.assignment())
    assert ei.value.kind == "unreachable" and f"127.0.0.1:{lab.port}" in ei.value.reason


async def test_cancel_flushes_partial(lab: Lab) -> None:
    await lab.server.close()

    class Slow(ChunkServer):
        async def _read(self, layer: Digest, index: int) -> tuple[int, bytes]:
            if index >= 8:
                await hang()
            return await super()._read(layer, index)

    await start_server(lab, Slow(lab.seed_store, lab.seed_host, node_id="seed"))
    task = asyncio.create_task(lab.puller().pull(lab.assignment()))
    server = lab.server
    await wait_until(
        lambda: server.chunks_served.get("dem", 0) >= 8, timeout=10, what="8 chunks served"
    )
    await wait_until(lambda: verified(lab) >= 8, timeout=10, what="the demander to verify 8")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [(_, have, _count)] = list(LayerStore(lab.tmp / "dem").partials())
    assert have == 8


# --------------------------------------------------------------------------
def test_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "host_ed25519"
    k1 = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    k2 = load_or_create_key(path)
    line = public_line(k1)
    assert line.startswith("ssh-ed25519 AAAA") and "\n" not in line
    assert same_key(k1, k2) and same_key(line, parse_public_line(line))
    assert fingerprint(line).startswith("SHA256:")
    assert not same_key(k1, new_key())
    for bad in ["", "ssh-ed25519 notbase64", "a\nb"]:
        with pytest.raises(KeyFormatError):
            parse_public_line(bad)
    (tmp_path / "junk").write_text("junk")
    with pytest.raises(KeyFormatError):
        load_or_create_key(tmp_path / "junk")


async def test_disk_filling_up_mid_pull_is_a_clear_disk_failure_and_never_commits(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC after the pre-check (space taken by someone else) keeps what was written."""
    real = PartialLayer.put_chunk
    written: list[int] = []

    def put_chunk(self: PartialLayer, index: int, data: bytes) -> None:
        if len(written) >= 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, index, data)
        written.append(index)

    monkeypatch.setattr(PartialLayer, "put_chunk", put_chunk)
    with pytest.raises(PullError) as ei:
        await lab.puller().pull(lab.assignment())
    e = ei.value
    assert e.kind == "disk" and not e.seeder_fault
    assert "node dem" in e.reason and lab.manifest.digest in e.reason
    assert "disk full writing chunk 12" in e.reason and "MiB free on" in e.reason
    assert not lab.dem_store.has(Digest(lab.manifest.digest))  # never committed
    [(_, have, _count)] = list(LayerStore(lab.tmp / "dem").partials())
    assert have == 12

    monkeypatch.setattr(PartialLayer, "put_chunk", real)  # space freed: resume
    res = await lab.puller().pull(lab.assignment())
    assert res.bytes_moved == SIZE - 12 * CHUNK
    assert blob(lab.dem_store, lab.manifest.digest) == lab.data
