"""A blob whose layer is still landing streams chunk by chunk (issue 17 item 2).

Real parts: a LayerStore with a shared partial written the way the puller
writes it, the agent's RelayBoard told of each landed chunk the way the
puller tells it, the real MirrorServer on loopback, aiohttp as the client.
Time is a fake clock (the board's): a stall is the clock moved past
``stall_s`` and the board woken, never a wait.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import structlog

from rainbowd.agent.dataplane.relay import RelayBoard
from rainbowd.agent.metrics import AgentMetrics
from rainbowd.agent.mirror.catalog import ImageCatalog
from rainbowd.agent.mirror.landing import LayerLanding, NotLanding
from rainbowd.agent.mirror.server import MirrorServer
from rainbowd.core.chunks import ChunkManifest, build_manifest
from rainbowd.core.digest import Digest, sha256_digest
from rainbowd.lib.store import LayerStore, PartialLayer
from waiting import FakeClock, settle, wait_until

CHUNK = 64 * 1024
COUNT = 5
#: no new chunk for this long (fake seconds): the blob stops
STALL_S = 30.0


class Landing:
    """A layer being pulled into ``store`` the puller's way: shared partial + board."""

    def __init__(self, store: LayerStore, board: RelayBoard) -> None:
        self.store = store
        self.board = board
        self.data = os.urandom(COUNT * CHUNK - 1234)
        self.manifest: ChunkManifest = build_manifest(
            io.BytesIO(self.data), sha256_digest(self.data), CHUNK
        )
        self.digest = Digest(self.manifest.digest)
        self.partial: PartialLayer = store.share_partial(self.manifest)
        self.token = board.begin(self.manifest, self.partial.data_path, [])

    def chunk(self, i: int) -> bytes:
        return self.data[i * CHUNK : (i + 1) * CHUNK]

    def land(self, i: int) -> None:
        """Chunk ``i`` verified, written and announced, as the puller does it."""
        self.partial.write_chunk(i, self.chunk(i))
        self.board.landed(self.digest, i)

    def install(self) -> None:
        """The rest written, the partial committed (renamed into the blob), the pull ended."""
        for i in range(COUNT):
            self.partial.write_chunk(i, self.chunk(i))
        self.partial.commit()
        self.store.release_partial(self.partial)
        self.board.end(self.digest, installed=True, token=self.token)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def landing(tmp_path: Path, clock: FakeClock) -> Landing:
    return Landing(LayerStore(tmp_path / "store"), RelayBoard(clock=clock))


def waiter_of(
    lay: Landing, progress: list[int], ended: asyncio.Future[None] | None = None
) -> LayerLanding:
    return LayerLanding(
        lay.board,
        lay.store,
        lay.digest,
        stall_s=STALL_S,
        progress=lambda: progress[0],
        ended=ended,
    )


# --------------------------------------------------------------------------
# LayerLanding: when a chunk may be read, and when to give up
# --------------------------------------------------------------------------
async def test_a_chunk_is_handed_out_once_it_lands_and_the_blob_once_installed(
    landing: Landing,
) -> None:
    w = waiter_of(landing, [0])
    assert await w.manifest() == landing.manifest  # the pull opened its partial: known at once
    task = asyncio.create_task(w.wait(landing.digest, 1))
    await wait_until(lambda: landing.board.waiting(landing.digest), timeout=5, what="a waiter")
    landing.land(0)  # another chunk: not the one asked for
    await settle()
    assert not task.done()
    landing.land(1)
    assert await task == (landing.manifest, landing.partial.data_path)
    task = asyncio.create_task(w.wait(landing.digest, 3))
    await wait_until(lambda: landing.board.waiting(landing.digest), timeout=5, what="a waiter")
    landing.install()
    assert await task is None  # installed: read the blob
    assert landing.store.has(landing.digest)


async def test_no_progress_for_the_stall_time_gives_up_and_progress_keeps_it_waiting(
    landing: Landing, clock: FakeClock
) -> None:
    progress = [7]
    w = waiter_of(landing, progress)
    task = asyncio.create_task(w.wait(landing.digest, 2))
    await wait_until(lambda: landing.board.waiting(landing.digest), timeout=5, what="a waiter")
    # past the stall time, but the image moved meanwhile (another layer of it landed)
    progress[0] += 3
    clock.advance(STALL_S + 1)
    landing.board.landed(landing.digest, 2 + 1)  # wakes the waiter (a chunk it does not wait for)
    await settle()
    assert not task.done()
    # then nothing new for the stall time: it gives up
    clock.advance(STALL_S + 1)
    landing.board.landed(landing.digest, 2 + 1)  # the same chunk again: no progress, a wake
    with pytest.raises(NotLanding, match="nothing new landed"):
        await task


async def test_a_pull_piece_that_fails_is_waited_past_until_another_brings_the_chunk(
    landing: Landing,
) -> None:
    w = waiter_of(landing, [0])
    task = asyncio.create_task(w.wait(landing.digest, 0))
    await wait_until(lambda: landing.board.waiting(landing.digest), timeout=5, what="a waiter")
    landing.board.end(landing.digest, installed=False, why="seeder gone", token=landing.token)
    await settle()
    assert not task.done()  # a relay demander would fail over now; a client cannot
    landing.board.begin(landing.manifest, landing.partial.data_path, [])
    landing.land(0)
    assert await task is not None


async def test_the_pull_bringing_it_ending_without_it_gives_up_at_once(landing: Landing) -> None:
    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    w = waiter_of(landing, [0], ended)
    task = asyncio.create_task(w.wait(landing.digest, 0))
    await wait_until(lambda: landing.board.waiting(landing.digest), timeout=5, what="a waiter")
    ended.set_result(None)  # the pull-on-miss stalled (its own watch) or was refused
    with pytest.raises(NotLanding, match="ended without it"):
        await task
    assert landing.board.waiting(landing.digest) == 0  # its board wait was cancelled


async def test_the_pull_ending_with_the_layer_installed_reads_the_blob(landing: Landing) -> None:
    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    w = waiter_of(landing, [0], ended)
    landing.install()
    ended.set_result(None)
    assert await w.wait(landing.digest, 4) is None


async def test_the_manifest_of_a_layer_whose_pull_has_not_begun_comes_with_its_first_chunk(
    tmp_path: Path, clock: FakeClock
) -> None:
    store = LayerStore(tmp_path / "store")
    board = RelayBoard(clock=clock)
    data = os.urandom(2 * CHUNK)
    m = build_manifest(io.BytesIO(data), sha256_digest(data), CHUNK)
    w = LayerLanding(board, store, Digest(m.digest), stall_s=STALL_S, progress=lambda: 0)
    task = asyncio.create_task(w.manifest())
    await wait_until(lambda: board.waiting(m.digest), timeout=5, what="a waiter")
    partial = store.share_partial(m)  # the pull-on-miss's assignment arrives
    board.begin(m, partial.data_path, [])
    partial.write_chunk(0, data[:CHUNK])
    board.landed(m.digest, 0)
    assert await task == m
    store.release_partial(partial)


# --------------------------------------------------------------------------
# the front door streams it
# --------------------------------------------------------------------------
class Door:
    def __init__(self, server: MirrorServer, metrics: AgentMetrics) -> None:
        self.server = server
        self.metrics = metrics


@pytest.fixture
async def door(landing: Landing, tmp_path: Path) -> AsyncIterator[Door]:
    metrics = AgentMetrics()
    server = MirrorServer(
        landing.store,
        ImageCatalog(tmp_path / "mirror"),
        "127.0.0.1",
        0,
        node_id="n1",
        hooks=metrics,
        relay=landing.board,
        stall_s=STALL_S,
    )
    await server.start()
    try:
        yield Door(server, metrics)
    finally:
        await server.close()


def streamed(metrics: AgentMetrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "rbd_agent_mirror_requests_total", {"kind": "blob", "outcome": outcome}
    )
    return value or 0.0


async def test_the_first_bytes_go_out_while_the_layer_is_a_partial_and_the_rest_after_install(
    landing: Landing, door: Door
) -> None:
    url = f"{door.server.url}/v2/app/blobs/{landing.digest}"
    landing.land(0)
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200 and resp.content_length == len(landing.data)
        first = await resp.content.readexactly(CHUNK)
        # the first chunk is out; the layer is not in the store, only its partial
        assert first == landing.chunk(0)
        assert not landing.store.has(landing.digest) and landing.store.has_partial(landing.digest)
        landing.land(1)
        assert await resp.content.readexactly(CHUNK) == landing.chunk(1)
        # the server now waits for chunk 2 on the board; the layer is installed instead
        await wait_until(lambda: landing.board.waiting(landing.digest), timeout=5, what="wait")
        landing.install()  # the partial file is renamed into the blob: the rest from there
        rest = await resp.read()
    assert first + landing.chunk(1) + rest == landing.data
    assert streamed(door.metrics, "streamed") == 1 and streamed(door.metrics, "hit") == 0


async def test_a_range_starts_at_its_chunk_while_the_layer_lands(
    landing: Landing, door: Door
) -> None:
    start = 2 * CHUNK + 100
    url = f"{door.server.url}/v2/app/blobs/{landing.digest}"
    async with aiohttp.ClientSession() as http:
        get = asyncio.create_task(http.get(url, headers={"Range": f"bytes={start}-"}))
        await wait_until(lambda: landing.board.waiting(landing.digest), timeout=5, what="wait")
        landing.land(2)  # chunks 0 and 1 are not needed
        async with await get as resp:
            assert resp.status == 206
            assert resp.headers["Content-Range"] == (
                f"bytes {start}-{len(landing.data) - 1}/{len(landing.data)}"
            )
            assert await resp.content.readexactly(CHUNK - 100) == landing.chunk(2)[100:]
            for i in (3, 4):
                landing.land(i)
            assert await resp.read() == landing.data[3 * CHUNK :]


async def test_a_stall_before_the_first_chunk_is_a_clean_404(
    landing: Landing, door: Door, clock: FakeClock
) -> None:
    url = f"{door.server.url}/v2/app/blobs/{landing.digest}"
    landing.land(4)  # the last chunk is here, the first never comes
    async with aiohttp.ClientSession() as http:
        get = asyncio.create_task(http.get(url))
        await wait_until(lambda: landing.board.waiting(landing.digest), timeout=5, what="wait")
        clock.advance(STALL_S + 1)
        landing.board.landed(landing.digest, 4)  # a wake, no progress
        async with await get as resp:
            assert resp.status == 404
            assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"


async def test_a_stall_after_the_headers_cuts_the_connection_after_only_checked_bytes(
    landing: Landing, door: Door, clock: FakeClock
) -> None:
    url = f"{door.server.url}/v2/app/blobs/{landing.digest}"
    landing.land(0)
    got = b""
    with structlog.testing.capture_logs() as logs:
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert resp.status == 200
            got = await resp.content.readexactly(CHUNK)
            await wait_until(lambda: landing.board.waiting(landing.digest), timeout=5, what="w")
            clock.advance(STALL_S + 1)
            landing.board.landed(landing.digest, 0)  # a wake, no progress
            with pytest.raises(aiohttp.ClientPayloadError):
                got += await resp.read()
    assert got == landing.chunk(0)  # a short body, never a wrong one
    [cut] = [e for e in logs if e["event"] == "mirror_layer_unservable"]
    assert cut["node"] == "n1" and cut["bytes_sent"] == CHUNK and cut["headers_sent"]
    assert streamed(door.metrics, "error") == 1


async def test_a_partial_nothing_is_bringing_is_still_a_miss(landing: Landing, door: Door) -> None:
    landing.land(0)
    landing.board.end(landing.digest, installed=False, why="gone", token=landing.token)
    landing.store.release_partial(landing.partial)
    url = f"{door.server.url}/v2/app/blobs/{landing.digest}"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 404
