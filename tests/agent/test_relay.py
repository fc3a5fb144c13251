"""Cut-through relay on the real data plane: origin -> relay A -> demander B on 127.0.0.1.

A's LayerPuller and A's ChunkServer share one RelayBoard (as in the agent), so
A serves chunks of a layer it is still receiving; B's puller is unchanged and
verifies every chunk and the final digest.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import pytest

from rainbowd.agent.dataplane.keys import public_line
from rainbowd.agent.dataplane.pull_failures import PullError
from rainbowd.agent.dataplane.puller import LayerPuller
from rainbowd.agent.dataplane.relay import RelayBoard, RelayNotPulling, RelayUnavailable
from rainbowd.agent.dataplane.ssh_server import ChunkServer
from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.digest import Digest, sha256_digest
from rainbowd.core.messages import PeerInfo, TransferAssignment, TrustList
from rainbowd.lib.store import LayerStore
from waiting import FakeClock, wait_until

CHUNK = 64 * 1024
SIZE = 2 * 1024 * 1024 + 777  # 33 chunks
#: the origin's upload cap: A's pull of SIZE takes ~1.4 s, long enough to relay from
ORIGIN_BPS = 1.5e6


def new_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


@dataclass
class Node:
    name: str
    store: LayerStore
    host: asyncssh.SSHKey = field(default_factory=new_key)
    client: asyncssh.SSHKey = field(default_factory=new_key)
    board: RelayBoard = field(default_factory=RelayBoard)
    server: ChunkServer | None = None
    port: int = 0
    puller: LayerPuller | None = None

    def peer(self) -> PeerInfo:
        return PeerInfo(
            node_id=self.name,
            address="127.0.0.1",
            ssh_port=self.port,
            host_key=public_line(self.host),
            client_key=public_line(self.client),
        )


@dataclass
class Chain:
    origin: Node
    a: Node
    b: Node
    manifest: ChunkManifest
    data: bytes

    def assignment(self, tid: str, seeder: Node) -> TransferAssignment:
        return TransferAssignment(
            transfer_id=tid, job_id="j", layer=self.manifest, seeder=seeder.peer(), reason="t"
        )


def b_has_some(node: Node) -> bool:
    """Some chunks of the layer are verified in ``node``'s partial."""
    return any(have > 0 for _, have, _ in node.store.partials())


async def serve(node: Node, trust: TrustList, **kw: float) -> None:
    node.server = ChunkServer(node.store, node.host, node_id=node.name, relay=node.board, **kw)  # type: ignore[arg-type]
    node.server.update_trust(trust)
    node.port = await node.server.start("127.0.0.1", 0)


@pytest.fixture
async def chain(tmp_path: Path) -> AsyncIterator[Chain]:
    data = os.urandom(SIZE)
    o, a, b = (Node(n, LayerStore(tmp_path / n)) for n in ("origin", "a", "b"))
    manifest = o.store.ingest(io.BytesIO(data), sha256_digest(data), chunk_size=CHUNK)
    for n in (a, b):
        n.puller = LayerPuller(n.store, n.client, node_id=n.name, relay=n.board, chunk_timeout=30)
    trust = TrustList(version=1, peers=[n.peer() for n in (o, a, b)])
    await serve(o, trust, max_upload_bps=ORIGIN_BPS)
    await serve(a, trust, relay_wait_s=3.0, relay_start_s=1.0)
    yield Chain(o, a, b, manifest, data)
    for n in (a, b):
        assert n.puller is not None
        await n.puller.close()
    for n in (o, a, b):
        if n.server is not None:
            await n.server.close()


async def test_b_pulls_from_relay_a_while_a_still_receives(chain: Chain) -> None:
    a, b = chain.a, chain.b
    assert a.puller is not None and b.puller is not None and a.server is not None
    digest = Digest(chain.manifest.digest)
    a_pull = asyncio.create_task(a.puller.pull(chain.assignment("ta", chain.origin)))
    await wait_until(lambda: a.board.receiving(digest), timeout=10, what="A's pull to start")
    assert not a.store.has(digest)
    b_res = await b.puller.pull(chain.assignment("tb", a))
    a_res = await a_pull
    assert a_res.bytes_moved == SIZE and b_res.bytes_moved == SIZE
    assert a.store.path(digest).read_bytes() == chain.data
    assert b.store.path(digest).read_bytes() == chain.data
    # B's bytes came from A, most of them before A had the layer complete
    assert a.server.bytes_served == {"b": SIZE}
    assert a.board.relayed_chunks >= chain.manifest.count // 2


async def test_b_fails_over_cleanly_when_the_relays_own_pull_fails(chain: Chain) -> None:
    a, b = chain.a, chain.b
    assert a.puller is not None and b.puller is not None and chain.origin.server is not None
    digest = Digest(chain.manifest.digest)
    a_pull = asyncio.create_task(a.puller.pull(chain.assignment("ta", chain.origin)))
    await wait_until(lambda: a.board.receiving(digest), timeout=10, what="A's pull to start")
    b_pull = asyncio.create_task(b.puller.pull(chain.assignment("tb", a)))
    await wait_until(lambda: b_has_some(b), timeout=10, what="B's first chunks from A")
    await chain.origin.server.close()  # A's upstream dies mid-way
    with pytest.raises(PullError) as ea:
        await a_pull
    assert ea.value.kind == "io"
    with pytest.raises(PullError) as eb:
        await asyncio.wait_for(b_pull, 10)
    # not a hang, not the relay's fault: kind "relay", told that the pull ended (told at
    # once: had A waited out its 3 s bound, the reason would say "did not arrive within")
    assert eb.value.kind == "relay" and not eb.value.seeder_fault
    assert "unavailable" in eb.value.reason and "pull ended" in eb.value.reason
    assert not b.store.has(digest)
    # what B got is kept (verified chunks in its partial) for the next seeder
    (_, have, count) = next(iter(b.store.partials()))
    assert 0 < have < count


async def test_a_layer_nobody_pulls_is_not_held_after_the_start_bound(chain: Chain) -> None:
    b = chain.b
    assert b.puller is not None
    with pytest.raises(PullError) as eb:
        await b.puller.pull(chain.assignment("tb", chain.a))
    # A waited its start bound (relay_start_s = 1) for a pull that never came, then said so
    assert eb.value.kind == "io" and "not_held" in eb.value.reason


# -- the board alone: wait, notify, bounds -------------------------------------
def manifest_of(data: bytes) -> ChunkManifest:
    from rainbowd.core.chunks import build_manifest

    return build_manifest(io.BytesIO(data), sha256_digest(data), CHUNK)


async def test_a_waiting_server_is_woken_when_the_chunk_lands() -> None:
    board = RelayBoard()
    m = manifest_of(os.urandom(3 * CHUNK))
    board.begin(m, Path("/nonexistent.part"), [0])
    assert await board.wait_chunk(m.digest, 0, 1.0, lambda: False, 1.0) == (
        m,
        Path("/nonexistent.part"),
    )
    waiter = asyncio.create_task(board.wait_chunk(m.digest, 2, 5.0, lambda: False, 1.0))
    await wait_until(lambda: board.waiting(m.digest), timeout=5, what="the server to wait")
    assert not waiter.done()
    board.landed(m.digest, 2)
    assert (await asyncio.wait_for(waiter, 1.0)) is not None  # woken, not timed out (5 s)
    # the layer installed: waiters are told to read the blob
    waiter = asyncio.create_task(board.wait_chunk(m.digest, 1, 5.0, lambda: False, 1.0))
    await wait_until(lambda: board.waiting(m.digest), timeout=5, what="the server to wait")
    board.end(m.digest, installed=True)
    assert (await waiter) is None


async def test_a_chunk_that_does_not_come_is_unavailable_after_the_bound() -> None:
    clock = FakeClock()
    board = RelayBoard(clock=clock)
    m = manifest_of(os.urandom(3 * CHUNK))
    board.begin(m, Path("/x.part"), [])
    waiter = asyncio.create_task(board.wait_chunk(m.digest, 1, 0.3, lambda: False, 1.0))
    await wait_until(lambda: board.waiting(m.digest), timeout=5, what="the server to wait")
    clock.advance(0.35)  # past the bound
    board.landed(m.digest, 0)  # another chunk: wakes the waiter to look again
    with pytest.raises(RelayUnavailable, match=r"within 0\.3s"):
        await waiter
    # the pull ends without it: told at once
    waiter = asyncio.create_task(board.wait_chunk(m.digest, 1, 5.0, lambda: False, 1.0))
    await wait_until(lambda: board.waiting(m.digest), timeout=5, what="the server to wait")
    board.end(m.digest, installed=False, why="upstream gone")
    with pytest.raises(RelayUnavailable, match="upstream gone"):
        await waiter
    with pytest.raises(RelayUnavailable, match="upstream gone"):  # and later demanders too
        await asyncio.wait_for(board.wait_chunk(m.digest, 1, 5.0, lambda: False, 1.0), 0.5)


async def test_no_pull_at_all_is_not_held_and_a_held_layer_reads_the_blob() -> None:
    board = RelayBoard()
    with pytest.raises(RelayNotPulling):
        await board.wait_chunk("sha256:" + "0" * 64, 0, 5.0, lambda: False, 0.2)
    assert await board.wait_chunk("sha256:" + "0" * 64, 0, 5.0, lambda: True, 0.2) is None
    # a pull that starts within the start bound is waited for
    m = manifest_of(os.urandom(CHUNK))
    waiter = asyncio.create_task(board.wait_chunk(m.digest, 0, 5.0, lambda: False, 2.0))
    await wait_until(lambda: board.waiting(m.digest), timeout=5, what="the server to wait")
    board.begin(m, Path("/y.part"), [])
    board.landed(m.digest, 0)
    assert (await waiter) is not None
