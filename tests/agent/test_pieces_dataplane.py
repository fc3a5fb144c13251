"""Pieces on the real SSH data plane: several seeders feed one demander chunks of one layer.

asyncssh on both ends on 127.0.0.1, real stores on disk. A transfer names a
run of chunks [first_chunk, end_chunk) of its layer; pulls of different runs
of one layer go at once into one shared partial, a node serves the chunks of
a partial it has, and a failed piece keeps what it got.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import msgpack
import pytest

from rainbowd.agent.dataplane.keys import parse_public_line, public_line
from rainbowd.agent.dataplane.puller import LayerPuller, PullError
from rainbowd.agent.dataplane.relay import RelayBoard
from rainbowd.agent.dataplane.ssh_server import ChunkServer
from rainbowd.core import chunkproto
from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.digest import Digest, sha256_digest
from rainbowd.core.messages import MessageError, PeerInfo, TransferAssignment, TrustList, decode
from rainbowd.lib.store import LayerStore
from waiting import hang, wait_until

CHUNK = 64 * 1024
COUNT = 40
SIZE = COUNT * CHUNK - 4321  # the last chunk short
HALF = COUNT // 2


def new_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


@dataclass
class Seeder:
    name: str
    store: LayerStore
    host: asyncssh.SSHKey = field(default_factory=new_key)
    server: ChunkServer | None = None
    port: int = 0

    def peer(self) -> PeerInfo:
        return PeerInfo(
            node_id=self.name,
            address="127.0.0.1",
            ssh_port=self.port,
            host_key=public_line(self.host),
            client_key="",
        )

    @property
    def served(self) -> int:
        assert self.server is not None
        return self.server.bytes_served.get("dem", 0)


@dataclass
class Lab:
    tmp: Path
    data: bytes
    manifest: ChunkManifest
    dem_store: LayerStore
    dem_client: asyncssh.SSHKey
    trust: TrustList
    seeders: list[Seeder] = field(default_factory=list)
    pullers: list[LayerPuller] = field(default_factory=list)

    def bytes_of(self, first: int, end: int) -> int:
        return min(SIZE, end * CHUNK) - first * CHUNK

    def chunk(self, i: int) -> bytes:
        return self.data[i * CHUNK : (i + 1) * CHUNK]

    def assignment(
        self, tid: str, seeder: Seeder, first: int = 0, end: int = 0
    ) -> TransferAssignment:
        return TransferAssignment(
            transfer_id=tid,
            job_id="j",
            layer=self.manifest,
            seeder=seeder.peer(),
            reason="test",
            first_chunk=first,
            end_chunk=end,
        )

    def puller(self, **kw: float) -> LayerPuller:
        p = LayerPuller(self.dem_store, self.dem_client, node_id="dem", **kw)  # type: ignore[arg-type]
        self.pullers.append(p)
        return p

    async def seeder(
        self,
        name: str,
        cls: type[ChunkServer] = ChunkServer,
        *,
        holds: bool = True,
        **kw: object,
    ) -> Seeder:
        s = Seeder(name, LayerStore(self.tmp / name))
        if holds:
            s.store.ingest(io.BytesIO(self.data), Digest(self.manifest.digest), CHUNK)
        s.server = cls(s.store, s.host, node_id=name, **kw)  # type: ignore[arg-type]
        s.server.update_trust(self.trust)
        s.port = await s.server.start("127.0.0.1", 0)
        self.seeders.append(s)
        return s


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    data = os.urandom(SIZE)
    dem_store = LayerStore(tmp_path / "dem")
    import rainbowd.core.chunks as chunks

    manifest = chunks.build_manifest(io.BytesIO(data), sha256_digest(data), CHUNK)
    assert manifest.count == COUNT
    client = new_key()
    trust = TrustList(
        version=1,
        peers=[
            PeerInfo(
                node_id="dem",
                address="127.0.0.1",
                ssh_port=1,
                host_key=public_line(new_key()),
                client_key=public_line(client),
            )
        ],
    )
    lab = Lab(tmp_path, data, manifest, dem_store, client, trust)
    yield lab
    for p in lab.pullers:
        await p.close()
    for s in lab.seeders:
        assert s.server is not None
        await s.server.close()


def counting_installs(store: LayerStore) -> list[Path]:
    """Record each install into ``store`` (the real install runs)."""
    installs: list[Path] = []
    real = store._install

    def install(*args: object) -> Path:
        path = real(*args)  # type: ignore[arg-type]
        installs.append(path)
        return path

    store._install = install  # type: ignore[method-assign]
    return installs


# --------------------------------------------------------------------------
async def test_two_seeders_each_serve_half_of_a_layer_at_once_and_it_installs_once(
    lab: Lab,
) -> None:
    """Chunk-level multi-source: one demander, one layer, two seeders at the same time.

    Each seeder holds back its first chunk until the other one has served a
    chunk, so the test only passes if both pieces really move concurrently.
    """
    a_served, b_served = asyncio.Event(), asyncio.Event()

    class WaitsFor(ChunkServer):
        other: asyncio.Event
        mine: asyncio.Event

        async def _read(self, layer: Digest, index: int) -> tuple[int, bytes]:
            out = await super()._read(layer, index)
            self.mine.set()
            await asyncio.wait_for(self.other.wait(), 10)
            return out

    a = await lab.seeder("a", WaitsFor)
    b = await lab.seeder("b", WaitsFor)
    assert isinstance(a.server, WaitsFor) and isinstance(b.server, WaitsFor)
    a.server.mine, a.server.other = a_served, b_served
    b.server.mine, b.server.other = b_served, a_served
    installs = counting_installs(lab.dem_store)
    p = lab.puller()
    ra, rb = await asyncio.gather(
        p.pull(lab.assignment("ta", a, 0, HALF)), p.pull(lab.assignment("tb", b, HALF, COUNT))
    )
    assert (ra.bytes_moved, rb.bytes_moved) == (lab.bytes_of(0, HALF), lab.bytes_of(HALF, COUNT))
    assert ra.bytes_moved + rb.bytes_moved == SIZE
    assert (a.served, b.served) == (ra.bytes_moved, rb.bytes_moved)
    digest = Digest(lab.manifest.digest)
    assert installs == [lab.dem_store.path(digest)]
    assert lab.dem_store.path(digest).read_bytes() == lab.data
    assert list(lab.dem_store.partials()) == []
    assert p.pulling(digest) == 0 and p._layers == {}
    # a later pull of any piece finds the layer installed: done at once, nothing moved
    again = await p.pull(lab.assignment("tc", a, 0, HALF))
    assert again.bytes_moved == 0 and a.served == ra.bytes_moved


async def test_the_first_piece_to_finish_leaves_the_layer_partial_and_not_held(lab: Lab) -> None:
    a = await lab.seeder("a")
    p = lab.puller()
    r = await p.pull(lab.assignment("ta", a, HALF, COUNT))
    assert r.bytes_moved == lab.bytes_of(HALF, COUNT)
    digest = Digest(lab.manifest.digest)
    assert not lab.dem_store.has(digest)
    assert list(lab.dem_store.partials()) == [(digest, COUNT - HALF, COUNT)]  # on disk
    r2 = await p.pull(lab.assignment("tb", a, 0, HALF))  # the last piece commits
    assert r2.bytes_moved == lab.bytes_of(0, HALF)
    assert lab.dem_store.path(digest).read_bytes() == lab.data


async def test_a_seeder_holding_only_some_pieces_serves_those_chunks(lab: Lab) -> None:
    """A partial with no pull running is served from its persisted bitmap; the rest is refused."""
    s = await lab.seeder("s", holds=False, relay=RelayBoard(), relay_start_s=0.3, relay_wait_s=30)
    part = s.store.open_partial(lab.manifest)
    for i in range(HALF):
        part.write_chunk(i, lab.chunk(i))
    part.close()
    assert not s.store.has(Digest(lab.manifest.digest))
    p = lab.puller()
    r = await p.pull(lab.assignment("t1", s, 0, HALF))
    assert r.bytes_moved == lab.bytes_of(0, HALF) == s.served
    assert s.server is not None and s.server.partial_chunks_served == HALF
    # a chunk it does not have and nobody brings: refused at the start bound, not
    # after the 30 s a chunk being pulled may take
    with pytest.raises(PullError) as ei:
        await p.pull(lab.assignment("t2", s, HALF, COUNT))
    assert ei.value.kind == "relay" and "unavailable" in ei.value.reason
    assert "chunks [20, 40)" in ei.value.reason
    assert "no pull of it started within 0.3s" in ei.value.reason, ei.value.reason
    # the same without a relay board: "not held" at once
    bare = await lab.seeder("bare", holds=False)
    bare_part = bare.store.open_partial(lab.manifest)
    bare_part.write_chunk(HALF, lab.chunk(HALF))
    bare_part.close()
    with pytest.raises(PullError) as ei:
        await p.pull(lab.assignment("t3", bare, HALF, HALF + 2))
    assert ei.value.kind == "io" and "not_held" in ei.value.reason
    assert bare.served == CHUNK  # the chunk it had did move


async def test_a_node_serves_a_piece_it_got_while_it_pulls_another(lab: Lab) -> None:
    """A relay pulling piece 2 serves piece 1 (got earlier) from the shared partial."""
    origin = await lab.seeder("origin", max_upload_bps=2e6)
    relay_store = LayerStore(lab.tmp / "relay")
    board = RelayBoard()
    relay = Seeder("relay", relay_store)
    relay.server = ChunkServer(relay_store, relay.host, node_id="relay", relay=board)
    relay.server.update_trust(lab.trust)
    relay.port = await relay.server.start("127.0.0.1", 0)
    lab.seeders.append(relay)
    relay_client = new_key()
    trust = TrustList(
        version=2,
        peers=[
            *lab.trust.peers,
            PeerInfo(
                node_id="relay",
                address="127.0.0.1",
                ssh_port=relay.port,
                host_key=public_line(relay.host),
                client_key=public_line(relay_client),
            ),
        ],
    )
    assert origin.server is not None
    origin.server.update_trust(trust)
    rp = LayerPuller(relay_store, relay_client, node_id="relay", relay=board)
    lab.pullers.append(rp)
    await rp.pull(lab.assignment("r1", origin, 0, HALF))  # piece 1 held, as a partial
    slow = asyncio.create_task(rp.pull(lab.assignment("r2", origin, HALF, COUNT)))
    await wait_until(
        lambda: relay_store.shared_partial(lab.manifest.digest) is not None,
        timeout=10,
        what="the relay's pull of piece 2 to open the shared partial",
    )
    r = await lab.puller().pull(lab.assignment("d1", relay, 0, HALF))
    assert r.bytes_moved == lab.bytes_of(0, HALF) == relay.served
    assert not slow.done()  # served while its own pull of the other piece ran
    await slow
    assert relay_store.path(Digest(lab.manifest.digest)).read_bytes() == lab.data


async def test_a_failed_piece_keeps_its_chunks_and_the_retry_moves_only_the_rest(
    lab: Lab,
) -> None:
    """A stalled source's chunks move to another seeder without starting over."""
    got = 7

    class Stalls(ChunkServer):
        async def _read(self, layer: Digest, index: int) -> tuple[int, bytes]:
            if index >= HALF + got:
                await hang()  # stalls: never answers
            return await super()._read(layer, index)

    a = await lab.seeder("a", Stalls)
    p = lab.puller(chunk_timeout=30)
    task = asyncio.create_task(p.pull(lab.assignment("t1", a, HALF, COUNT)))
    assert a.server is not None
    server = a.server
    await wait_until(
        lambda: server.chunks_served.get("dem", 0) >= got, timeout=10, what=f"{got} chunks served"
    )
    shared = lab.dem_store.shared_partial(lab.manifest.digest)
    assert shared is not None
    await wait_until(
        lambda: len(shared.missing_in(HALF, COUNT)) <= COUNT - HALF - got,
        timeout=10,
        what="the demander to verify what arrived",
    )
    await a.server.close()  # the source stalls for good: its link drops
    with pytest.raises(PullError) as ei:
        await task
    assert ei.value.kind in ("io", "unreachable") and not ei.value.seeder_fault
    digest = Digest(lab.manifest.digest)
    assert list(lab.dem_store.partials()) == [(digest, got, COUNT)]

    b = await lab.seeder("b")
    r = await p.pull(lab.assignment("t2", b, HALF, COUNT))
    rest = lab.bytes_of(HALF + got, COUNT)
    assert r.bytes_moved == rest == b.served
    assert r.chunks_fetched == COUNT - HALF - got
    assert a.served == got * CHUNK
    assert not lab.dem_store.has(digest)  # piece 1 is still missing
    await p.pull(lab.assignment("t3", b, 0, HALF))
    assert lab.dem_store.path(digest).read_bytes() == lab.data


async def test_an_overlapping_pull_waits_and_moves_only_what_is_missing(lab: Lab) -> None:
    a = await lab.seeder("a", max_upload_bps=4e6)
    p = lab.puller()
    piece = asyncio.create_task(p.pull(lab.assignment("t1", a, 0, HALF)))
    await wait_until(
        lambda: p.overlapping(lab.manifest.digest, 0, COUNT), timeout=5, what="piece 1's pull"
    )
    assert not p.overlapping(lab.manifest.digest, HALF, COUNT)
    whole = asyncio.create_task(p.pull(lab.assignment("t2", a)))  # all of it: overlaps
    r1, r2 = await asyncio.gather(piece, whole)
    assert r1.bytes_moved == lab.bytes_of(0, HALF)
    assert r2.bytes_moved == lab.bytes_of(HALF, COUNT)  # no chunk moved twice
    assert a.served == SIZE
    assert lab.dem_store.path(Digest(lab.manifest.digest)).read_bytes() == lab.data


# -- ranges outside the layer ---------------------------------------------------
@pytest.mark.parametrize(("first", "end"), [(0, COUNT + 1), (5, 5), (6, 5), (-1, 3), (3, 0)])
def test_a_range_outside_the_manifest_is_refused(lab: Lab, first: int, end: int) -> None:
    seeder = Seeder("s", lab.dem_store, port=7722)
    with pytest.raises(ValueError, match=r"chunk range .* not within its 40 chunks"):
        lab.assignment("t", seeder, first, end)
    good = lab.assignment("t", seeder, 0, 1)
    body = msgpack.packb(
        {**msgpack.unpackb(msgpack.packb(_wire(good))), "first_chunk": first, "end_chunk": end}
    )
    # a negative index is already out of the field's bounds; the rest fail the range check
    with pytest.raises(
        MessageError, match=r"TransferAssignment: (transfer t: chunk range|.*first_chunk)"
    ):
        decode(body, TransferAssignment)


def test_an_old_assignment_without_a_range_is_the_whole_layer(lab: Lab) -> None:
    wire = _wire(lab.assignment("t", Seeder("s", lab.dem_store, port=7722)))
    del wire["first_chunk"], wire["end_chunk"]
    a = decode(msgpack.packb(wire), TransferAssignment)
    assert (a.first_chunk, a.end_chunk) == (0, 0) and a.chunk_range() == (0, COUNT)


def _wire(a: TransferAssignment) -> dict[str, object]:
    from rainbowd.core.messages import to_wire

    out: dict[str, object] = to_wire(a)
    return out


async def test_a_chunk_request_outside_a_partial_layer_is_a_bad_request(lab: Lab) -> None:
    s = await lab.seeder("s", holds=False, relay=RelayBoard())
    part = s.store.open_partial(lab.manifest)
    part.write_chunk(0, lab.chunk(0))
    part.close()
    conn = await asyncssh.connect(
        "127.0.0.1",
        s.port,
        username="rbd",
        config=[],
        known_hosts=([parse_public_line(public_line(s.host))], [], []),
        client_keys=[lab.dem_client],
        agent_path=None,
    )
    async with conn:
        proc = await conn.create_process(subsystem=chunkproto.SUBSYSTEM, encoding=None)
        proc.stdin.write(chunkproto.encode_request(lab.manifest.digest, [0, COUNT]))
        dec = chunkproto.Decoder("client")
        events: list[chunkproto.Event] = []
        while len(events) < 2:
            data = await proc.stdout.read(1 << 20)
            assert data, events
            events.extend(dec.feed(data))
    assert events[0] == chunkproto.Chunk(0, lab.chunk(0))
    err = events[1]
    assert isinstance(err, chunkproto.Error) and err.code == chunkproto.ERR_BAD_REQUEST
    assert f"not {COUNT}" in err.message


async def test_a_slow_seeder_is_given_a_chunk_s_time_at_the_least_rate(lab: Lab) -> None:
    """A seeder slower than chunk_timeout per chunk but above MIN_CHUNK_RATE_BPS is not dropped.

    In the lab, 4 MiB chunks from a seeder sharing 1.5 Mbit/s between three
    demanders took 67 s each and every pull of them failed at a flat 60 s.
    """
    from rainbowd.agent.dataplane.chunk_fetch import MIN_CHUNK_RATE_BPS, chunk_wait_s

    assert chunk_wait_s(CHUNK, 0.2) == CHUNK / MIN_CHUNK_RATE_BPS  # 4 s for 64 KiB
    assert chunk_wait_s(CHUNK, 60.0) == 60.0
    # 128 KiB/s: a 64 KiB chunk every 0.5 s, longer than the 0.2 s chunk_timeout
    slow = await lab.seeder("slow", max_upload_bps=2 * CHUNK)
    p = lab.puller(chunk_timeout=0.2)
    r = await p.pull(lab.assignment("t1", slow, 0, 3))
    assert r.bytes_moved == 3 * CHUNK == slow.served
