"""Chunk channels to seeders: the client end of one, and the idle ones kept for the next pull.

Why keep channels: a pull used to open a channel of its own on the seeder's
connection and close it when done. Opening one is two round trips before the
first request can go out (CHANNEL_OPEN -> confirmation, then the subsystem
request -> success), and on a link busy with chunks each round trip waits
behind the data queued on it. A demander of the default policy pulls a layer
piece by piece, several pieces from one seeder, so most pulls go to a seeder
it has pulled from before; they now take a channel the last pull left idle
and send their first request at once.

A channel is kept only when its pull ended cleanly: every chunk requested was
received and checked, so nothing of the old pull can still arrive but the END
frames of its requests, which a new pull's FetchSession passes over
(rainbowd.core.chunksession). A failed or cancelled pull closes its channel.
At most ``MAX_IDLE_PER_CONNECTION`` idle channels are kept per connection,
well under the seeder's ``max_channels_per_connection`` (ssh_limits.py); they
close with their connection.

A kept channel may have been closed by the seeder while idle; one closed
before it is taken is dropped then, and one whose close was still on its way
fails the pull's first request with ``channel_closed`` before any chunk moved,
which :class:`~.chunk_fetch.ChunkFetcher` answers by opening a fresh channel
once (:meth:`ChunkChannels.take` says whether a channel is a reused one).
"""

from __future__ import annotations

import asyncio

import asyncssh

from rainbowd.core import chunkproto

from ..metrics import AgentMetrics
from .pull_failures import PullError
from .ssh_server import CHANNEL_MAX_PKTSIZE, CHANNEL_WINDOW

#: chunks decoded but not yet verified before the channel is paused
QUEUE_HIGH_WATER = 4
#: idle chunk channels kept per seeder connection: a demander of the default policy runs
#: at most two pieces from one seeder at once (swarm's ``stripe``), so two cover it
MAX_IDLE_PER_CONNECTION = 2


class ChunkClientSession(asyncssh.SSHClientSession[bytes]):
    """Client end of a chunk channel: decodes frames into a queue with backpressure.

    Working on raw packets (not asyncssh streams) saves a buffer copy and a
    task switch per packet; the queue holds whole chunks, and reading is
    paused when ``QUEUE_HIGH_WATER`` of them wait for verification, which
    stops SSH window adjusts and so throttles the seeder.
    """

    def __init__(self, max_chunk: int) -> None:
        self.decoder = chunkproto.Decoder("client", max_chunk=max_chunk)
        self.events: asyncio.Queue[chunkproto.Event | BaseException | None] = asyncio.Queue()
        self.chan: asyncssh.SSHClientChannel[bytes] | None = None
        self._chunks_queued = 0
        self._paused = False
        self._done = False

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        self.chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._done or datatype is not None:
            return
        try:
            evs = self.decoder.feed(data)
        except chunkproto.ProtocolError as e:
            self._finish(e)
            return
        for ev in evs:
            if isinstance(ev, chunkproto.Chunk):
                self._chunks_queued += 1
            self.events.put_nowait(ev)
        if self._chunks_queued >= QUEUE_HIGH_WATER and not self._paused and self.chan:
            self._paused = True
            self.chan.pause_reading()

    def eof_received(self) -> bool:
        try:
            self.decoder.eof()
        except chunkproto.ProtocolError as e:
            self._finish(e)
        else:
            self._finish(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc if exc is not None else None)

    def _finish(self, item: BaseException | None) -> None:
        if not self._done:
            self._done = True
            self.events.put_nowait(item)
            if item is not None and self.chan is not None:
                self.chan.close()

    @property
    def reusable(self) -> bool:
        """Open, nothing queued and not paused: a new pull may send its request on it."""
        return not self._done and self._chunks_queued == 0 and not self._paused

    def start_pull(self, max_chunk: int) -> None:
        """Bound CHUNK frames to the next pull's chunk size (the decoder is between frames)."""
        self.decoder.max_chunk = max_chunk

    async def next_event(self, timeout: float) -> chunkproto.Event | BaseException | None:
        # asyncio.timeout, not wait_for: wait_for wraps the get in a new task, per chunk
        async with asyncio.timeout(timeout):
            ev = await self.events.get()
        if isinstance(ev, chunkproto.Chunk):
            self._chunks_queued -= 1
            if self._paused and self._chunks_queued < QUEUE_HIGH_WATER and self.chan:
                self._paused = False
                self.chan.resume_reading()
        return ev

    def send(self, frame: bytes) -> None:
        assert self.chan is not None
        self.chan.write(frame)

    def close(self) -> None:
        self._done = True
        if self.chan is not None:
            self.chan.close()


class ChunkChannels:
    """Opens chunk channels on seeder connections and keeps the idle ones (module docstring)."""

    def __init__(self, metrics: AgentMetrics, max_idle: int = MAX_IDLE_PER_CONNECTION) -> None:
        self.max_idle = max_idle
        #: counts each channel taken, opened or reused (rbd_agent_chunk_channels_total)
        self.metrics = metrics
        self._idle: dict[asyncssh.SSHClientConnection, list[ChunkClientSession]] = {}

    async def take(
        self, conn: asyncssh.SSHClientConnection, max_chunk: int, where: str
    ) -> tuple[ChunkClientSession, bool]:
        """A channel on ``conn`` for one pull, and whether it is a reused one.

        An idle one if ``conn`` has one still open, else a new one (raises
        PullError ``io`` naming ``where`` if the seeder refuses it).
        """
        idle = self._idle.get(conn)
        while idle:
            session = idle.pop()
            if session.reusable:
                session.start_pull(max_chunk)
                self.metrics.chunk_channel("reused")
                return session, True
            session.close()
        self._idle.pop(conn, None)
        return await self.open(conn, max_chunk, where), False

    async def open(
        self, conn: asyncssh.SSHClientConnection, max_chunk: int, where: str
    ) -> ChunkClientSession:
        """A new chunk channel on ``conn`` (PullError ``io`` naming ``where`` if refused)."""
        for dead in [c for c in self._idle if c.is_closed()]:  # seeders gone since
            for s in self._idle.pop(dead):
                s.close()
        try:
            _chan, session = await conn.create_session(
                lambda: ChunkClientSession(max_chunk),
                subsystem=chunkproto.SUBSYSTEM,
                encoding=None,
                env={},
                send_env=[],
                request_pty=False,
                x11_forwarding=False,
                window=CHANNEL_WINDOW,
                max_pktsize=CHANNEL_MAX_PKTSIZE,
            )
        except asyncssh.ChannelOpenError as e:
            raise PullError("io", f"{where}: chunk channel refused: {e.reason}") from None
        except (asyncssh.Error, OSError) as e:
            raise PullError("io", f"{where}: cannot open chunk channel: {e}") from None
        assert isinstance(session, ChunkClientSession)
        self.metrics.chunk_channel("opened")
        return session

    def give_back(self, conn: asyncssh.SSHClientConnection, session: ChunkClientSession) -> None:
        """Keep ``session`` for the next pull on ``conn`` (its pull ended cleanly), or close it.

        A channel of a connection that closed is not reusable; lists of
        connections gone are dropped when a channel is next opened (:meth:`open`).
        """
        idle = self._idle.setdefault(conn, [])
        if not session.reusable or len(idle) >= self.max_idle:
            session.close()
            return
        idle.append(session)

    def idle(self, conn: asyncssh.SSHClientConnection) -> int:
        """Idle channels kept on ``conn`` (tests, status)."""
        return len(self._idle.get(conn, ()))

    def close(self) -> None:
        """Close every idle channel (their connections close after)."""
        for sessions in self._idle.values():
            for s in sessions:
                s.close()
        self._idle.clear()
