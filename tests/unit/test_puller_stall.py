"""A pull times out on a seeder that sends nothing, not on one that sends a big chunk slowly.

In the lab's upload-bound profile a 4 MiB chunk from a 0.5 Mbit/s upload
takes 67 s, longer than the 60 s chunk timeout: every pull from that node
failed with "no chunk for 60s" although its bytes kept coming. The chunk
channel's session now times out only after ``timeout`` seconds without a
byte. (Timeouts here are tenths of a second, like tests/unit/test_relay.py's.)
"""

from __future__ import annotations

import asyncio

import pytest

from rainbowd import chunkproto
from rainbowd.agent.puller import _ChunkClientSession

CHUNK = 64 * 1024
#: the session's timeout here: a chunk's bytes come in steps shorter than it
TIMEOUT = 0.2


async def test_a_chunk_arriving_slower_than_the_timeout_is_not_a_stall() -> None:
    session = _ChunkClientSession(max_chunk=CHUNK)
    frame = chunkproto.encode_chunk(0, b"x" * CHUNK)
    steps = 8  # the whole chunk takes 8 x 0.1 s = 4 timeouts; no gap is as long as one

    async def trickle() -> None:
        for i in range(steps):
            await asyncio.sleep(TIMEOUT / 2)
            session.data_received(
                frame[i * len(frame) // steps : (i + 1) * len(frame) // steps], None
            )

    feeder = asyncio.create_task(trickle())
    ev = await session.next_event(TIMEOUT)
    await feeder
    assert isinstance(ev, chunkproto.Chunk) and ev.index == 0 and len(ev.data) == CHUNK


async def test_a_seeder_that_sends_nothing_times_out() -> None:
    session = _ChunkClientSession(max_chunk=CHUNK)
    session.data_received(chunkproto.encode_chunk(0, b"x" * CHUNK)[:100], None)  # then silence
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(TimeoutError):
        await session.next_event(TIMEOUT)
    # the bytes before the call count for the first wait only; then one silent timeout
    assert TIMEOUT <= loop.time() - t0 < 3 * TIMEOUT


async def test_a_queued_chunk_is_returned_at_once() -> None:
    session = _ChunkClientSession(max_chunk=CHUNK)
    session.data_received(chunkproto.encode_chunk(3, b"y" * 10), None)
    ev = await session.next_event(TIMEOUT)
    assert isinstance(ev, chunkproto.Chunk) and ev.index == 3
