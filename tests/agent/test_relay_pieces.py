"""RelayBoard with pieces: several pulls of one layer, each announced with its chunk range."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path

import pytest

from rainbowd.agent.dataplane.relay import RelayBoard, RelayUnavailable
from rainbowd.core.chunks import ChunkManifest, build_manifest
from rainbowd.core.digest import sha256_digest
from waiting import FakeClock, settle, wait_until

CHUNK = 64 * 1024
PART = Path("/nonexistent.part")


def manifest_of(n_chunks: int) -> ChunkManifest:
    data = os.urandom(n_chunks * CHUNK)
    return build_manifest(io.BytesIO(data), sha256_digest(data), CHUNK)


async def test_a_chunk_of_a_running_piece_is_waited_for_and_others_are_not() -> None:
    clock = FakeClock()
    board = RelayBoard(clock=clock)
    m = manifest_of(8)
    first = board.begin(m, PART, [], 0, 4)
    board.begin(m, PART, [], 4, 8)
    waiter = asyncio.create_task(board.wait_chunk(m.digest, 6, 5.0, lambda: False, 0.1))
    await wait_until(lambda: board.waiting(m.digest), timeout=5, what="the server to wait")
    clock.advance(0.2)  # past the start bound: chunk 6 is covered, so it waits on
    board.landed(m.digest, 5)  # wakes the waiter to look again
    await settle()
    assert not waiter.done()
    board.landed(m.digest, 6)
    assert await waiter == (m, PART)
    # the first piece's pull fails: its chunks are unavailable at once, the other piece's not
    board.end(m.digest, installed=False, why="upstream gone", token=first)
    with pytest.raises(RelayUnavailable, match="upstream gone"):  # at once: no time passes
        await board.wait_chunk(m.digest, 2, 5.0, lambda: False, 5.0)
    assert board.receiving(m.digest)  # the second pull still runs
    late = asyncio.create_task(board.wait_chunk(m.digest, 7, 5.0, lambda: False, 0.1))
    await wait_until(lambda: board.waiting(m.digest), timeout=5, what="the server to wait")
    board.landed(m.digest, 7)
    assert await late == (m, PART)


async def test_a_chunk_no_pull_covers_is_unavailable_after_the_start_bound() -> None:
    clock = FakeClock()
    board = RelayBoard(clock=clock)
    m = manifest_of(8)
    board.begin(m, PART, [0, 1], 0, 4)
    waiter = asyncio.create_task(board.wait_chunk(m.digest, 5, 30.0, lambda: False, 0.2))
    await wait_until(lambda: board.waiting(m.digest), timeout=5, what="the server to wait")
    clock.advance(0.25)  # past the start bound, far from the 30 s chunk bound
    board.landed(m.digest, 2)  # wakes the waiter to look again
    with pytest.raises(RelayUnavailable, match=r"no pull of it started within 0\.2s"):
        await waiter
    # a pull of that piece announced within the bound is waited for
    waiter = asyncio.create_task(board.wait_chunk(m.digest, 5, 30.0, lambda: False, 2.0))
    await wait_until(lambda: board.waiting(m.digest), timeout=5, what="the server to wait")
    board.begin(m, PART, [], 4, 8)
    board.landed(m.digest, 5)
    assert await waiter == (m, PART)


async def test_a_chunk_outside_the_layer_is_an_index_error() -> None:
    board = RelayBoard()
    m = manifest_of(4)
    board.begin(m, PART, [], 0, 4)
    with pytest.raises(IndexError, match=r"0\.\.3, not 4"):
        await board.wait_chunk(m.digest, 4, 5.0, lambda: False, 1.0)


async def test_the_last_piece_installing_the_layer_sends_waiters_to_the_blob() -> None:
    board = RelayBoard()
    m = manifest_of(8)
    a = board.begin(m, PART, [], 0, 4)
    b = board.begin(m, PART, [], 4, 8)
    waiter = asyncio.create_task(board.wait_chunk(m.digest, 1, 5.0, lambda: False, 1.0))
    await wait_until(lambda: board.waiting(m.digest), timeout=5, what="the server to wait")
    board.end(m.digest, installed=False, token=b, why="")  # its piece done, layer not yet
    await settle()
    assert not waiter.done()
    board.end(m.digest, installed=True, token=a)
    assert await waiter is None
