"""The fetch loop of one pull: chunks requested over one SSH channel, checked and written.

Why a module of its own: :class:`~rainbowd.agent.dataplane.puller.LayerPuller`
decides *whether* and *from whom* to pull (the seeder's connection, the
layer's running pulls, disk space, the install); this is the part that moves
bytes, the hot loop of a transfer. Protocol state (the request window, the
chunk due next, and what each frame or error code from the seeder means) is
:class:`~rainbowd.core.chunksession.FetchSession`'s, tested without sockets;
:meth:`ChunkFetcher.fetch` is the I/O loop driving it. It stops on a failure
with a :class:`~rainbowd.agent.dataplane.pull_failures.PullError`, which the
puller reports as it is.

Throughput: requests are pipelined, keeping ``max(window, 32 MiB worth)``
chunks requested but not yet received; the SSH channel's receive window is
the hard bound, and the reader pauses the channel when verification/disk
falls behind. Hashing and disk writes run in a worker thread (hashlib drops
the GIL on large buffers) while the event loop keeps decrypting packets;
chunks small enough run inline (chunk_io.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncssh

from rainbowd.core import chunkproto
from rainbowd.core.chunksession import FetchFailure, FetchSession
from rainbowd.lib.store import ChunkRejected, LayerStore, PartialLayer, StoreError

from ..metrics import AgentMetrics
from .chunk_channels import ChunkChannels, ChunkClientSession
from .chunk_io import runs_inline
from .pacing import RatePacer
from .pull_failures import PullError, disk_reason
from .relay import RelayBoard

ProgressCallback = Callable[[int, int, float], None]

#: the slowest a seeder may deliver a chunk before the pull gives up on it: a chunk may take
#: ``chunk_timeout`` or chunk_size / this, whichever is longer (chunk_wait_s). A flat 60 s
#: failed every 4 MiB chunk from a seeder sharing 1.5 Mbit/s between three demanders (the
#: namespace lab's bimodal profile: 15 of 26 failed transfers, each costing a slow node
#: 60 s); 16 KiB/s (0.13 Mbit/s) is below any uplink rbd plans for and still ends a
#: dribbling seeder's hold on a 4 MiB chunk within 256 s
MIN_CHUNK_RATE_BPS = 16 * 1024
#: minimum seconds between two on_progress calls
PROGRESS_INTERVAL = 0.25


@dataclass(slots=True)
class PullCounters:
    """One pull's byte and chunk counters, and the seeder label its metrics carry.

    Not a transfer record (the pull's identity is its ``TransferAssignment``):
    counters kept outside :meth:`ChunkFetcher.fetch` so a failure can still log and count them.
    """

    peer: str = ""  # the seeder's node id (metrics label)
    moved: int = 0  # bytes of verified chunks written
    fetched: int = 0  # verified chunks written


def chunk_wait_s(chunk_size: int, chunk_timeout: float) -> float:
    """Seconds a pull waits for its next chunk: ``chunk_timeout``, or longer for big chunks.

    A chunk arrives whole, so a slow seeder is silent for a whole chunk's time:
    the wait is at least that time at ``MIN_CHUNK_RATE_BPS``.
    """
    return max(chunk_timeout, chunk_size / MIN_CHUNK_RATE_BPS)


class _StaleChannel(Exception):
    """A reused channel was closed by the seeder before this pull moved a chunk on it."""


class ChunkFetcher:
    """Fetches chunks of one pull's range into its partial, over one channel at a time.

    Made per pull by the puller, with its settings of the moment and what it
    shares between pulls (metrics, the download pacer, the relay board).
    """

    def __init__(
        self,
        store: LayerStore,
        partial: PartialLayer,
        counters: PullCounters,
        *,
        where: str,
        log: Any,
        node_id: str,
        window: int,
        chunk_timeout: float,
        inline_io_max: int,
        metrics: AgentMetrics,
        pacer: RatePacer,
        relay: RelayBoard | None,
        channels: ChunkChannels,
    ) -> None:
        self._store = store
        self._partial = partial
        self._counters = counters
        self._where = where
        self._log = log
        self._node_id = node_id
        self._window = window
        self._chunk_timeout = chunk_timeout
        self._inline_io_max = inline_io_max
        self._metrics = metrics
        self._pacer = pacer
        self._relay = relay
        self._channels = channels

    async def fetch(
        self,
        conn: asyncssh.SSHClientConnection,
        missing: list[int],
        done_of: tuple[int, int],
        t0: float,
        on_progress: ProgressCallback | None,
    ) -> None:
        """Fetch ``missing`` over one channel; the FetchSession (chunksession) says what to do.

        The channel is one the last pull from this seeder left idle where there
        is one (chunk_channels.py), else a new one; a reused channel the seeder
        closed meanwhile is replaced once, before any chunk moved.
        """
        chunk_size = self._partial.manifest.chunk_size
        channel, reused = await self._channels.take(conn, chunk_size, self._where)
        try:
            await self._fetch_on(conn, channel, missing, done_of, t0, on_progress, reused)
        except _StaleChannel:  # raised only on a reused channel
            self._log.info("chunk_channel_stale_reopened")
            channel = await self._channels.open(conn, chunk_size, self._where)
            await self._fetch_on(conn, channel, missing, done_of, t0, on_progress, False)

    async def _fetch_on(
        self,
        conn: asyncssh.SSHClientConnection,
        channel: ChunkClientSession,
        missing: list[int],
        done_of: tuple[int, int],
        t0: float,
        on_progress: ProgressCallback | None,
        reused: bool,
    ) -> None:
        """The fetch loop on ``channel``: kept for the next pull if it ends cleanly, else closed.

        This loop only waits for events, writes chunks, paces and reports
        progress; which chunks to request, which one is due and what each
        frame means are the session's.
        """
        manifest, counters = self._partial.manifest, self._counters
        present, total = done_of  # bytes of the range already here, and of the whole range
        fetch = FetchSession(
            manifest.digest,
            missing,
            chunk_size=manifest.chunk_size,
            window=self._window,
            where=self._where,
        )
        last_progress = 0.0
        wait_s = chunk_wait_s(manifest.chunk_size, self._chunk_timeout)
        landed = 0
        try:
            if (frame := fetch.next_request()) is not None:
                channel.send(frame)
            while not fetch.done:
                try:
                    ev = await channel.next_event(wait_s)
                except TimeoutError:
                    raise self._chunk_failure(fetch.timed_out(wait_s)) from None
                if isinstance(ev, chunkproto.Chunk):
                    self._metrics.received(counters.peer, len(ev.data))
                step = fetch.receive(ev)
                if isinstance(step, FetchFailure):
                    if reused and not landed and step.metric == "channel_closed":
                        raise _StaleChannel
                    raise self._chunk_failure(step)
                if step is None:
                    continue
                await self._land(fetch, step)
                landed += 1
                await self._pacer.pace(len(step.data))
                if (frame := fetch.next_request()) is not None:
                    channel.send(frame)
                now = time.monotonic()
                if on_progress is not None and now - last_progress >= PROGRESS_INTERVAL:
                    last_progress = now
                    on_progress(
                        present + counters.moved, total, counters.moved / max(now - t0, 1e-9)
                    )
        except BaseException:
            channel.close()
            raise
        self._channels.give_back(conn, channel)

    async def _land(self, fetch: FetchSession, chunk: chunkproto.Chunk) -> None:
        """Verify and write the chunk due, and tell the relay and the counters it landed."""
        partial = self._partial
        try:
            await self._write(chunk.index, chunk.data)
        except ChunkRejected as e:
            failure = fetch.chunk_rejected(chunk.index, len(chunk.data), str(e))
            raise self._chunk_failure(failure) from None
        except OSError as e:
            reason = disk_reason(
                e,
                node_id=self._node_id,
                store=self._store,
                manifest=partial.manifest,
                what=f"writing chunk {chunk.index}",
            )
            raise PullError("disk", reason) from None
        except StoreError as e:  # the shared partial was discarded under us
            raise PullError("io", f"node {self._node_id}: {self._where}: {e}") from None
        fetch.chunk_written(chunk.index)
        if self._relay is not None:
            self._relay.landed(partial.manifest.digest, chunk.index)
        self._counters.moved += len(chunk.data)
        self._counters.fetched += 1

    async def _write(self, index: int, data: bytes) -> None:
        """Check and write one received chunk; persist the bitmap when due.

        A layer of small chunks is checked and written on the loop (agent/dataplane/chunk_io.py);
        the flush (``fdatasync`` and a renamed bitmap) always runs in a thread.
        Neither is cut off by cancellation (see :func:`_uninterrupted`).
        """
        partial = self._partial
        if not runs_inline(partial.manifest.chunk_size, self._inline_io_max):
            await _uninterrupted(partial.write_chunk, index, data)
            return
        partial.put_chunk(index, data)
        if partial.flush_due():
            await _uninterrupted(partial.flush)

    def _chunk_failure(self, failure: FetchFailure) -> PullError:
        """Log and count a failure the FetchSession named; the abort that ends the fetch."""
        if failure.log_event:
            self._log.error(failure.log_event, **dict(failure.log_fields))
        self._metrics.chunk_failure(self._counters.peer, failure.metric)
        return PullError.of(failure)


async def _uninterrupted(func: Callable[..., object], *args: Any) -> None:
    """Run ``func`` in a thread and let it finish even if we are cancelled.

    A chunk write cut off by cancellation would otherwise race the partial's
    close(): the thread could pwrite to a file descriptor already closed (or
    reused), so the write always completes before cancellation proceeds.
    """
    task = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        try:
            await task
        except Exception:
            pass
        raise
