"""chunksession: what each end of a chunk channel remembers between frames, sans I/O.

:mod:`rainbowd.core.chunkproto` turns frames into bytes and back; this module holds
the protocol *state* on top of it and decides what each frame means:

* :class:`FetchSession` (the demander, one pull): which chunks to request next
  so that a window of them stays in flight, which chunk is due next (the
  seeder answers in order, so any other one is its fault), and what each event
  from the seeder means -- a chunk to verify and write, nothing (END), or a
  :class:`FetchFailure` carrying the kind the coordinator is told, whether the
  seeder is to blame, whether it said it does not hold the layer, and the
  label counted in ``rbd_agent_chunk_failures_total``.
* :class:`ServeSession` (the seeder, one REQUEST): which chunks to read now so
  that at most :data:`READ_AHEAD` are read ahead of the one on the wire, the
  frames that carry each chunk, the END frame, and the ERROR frame (and log
  line) that answers each way a read can fail (:data:`ReadFailure`).

Why apart from the I/O loops (``ChunkFetcher.fetch`` in agent/dataplane/chunk_fetch.py and
``ChunkServer._send_chunks`` in agent/dataplane/ssh_server.py): the rules are tested
frame by frame with no socket, thread or clock (tests/core/test_chunksession.py),
and the loops keep only what is I/O -- waiting, reading, writing, pacing.
Nothing here does I/O or reads the clock; tests/contracts/test_import_contracts.py
holds this module to that.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, assert_never

from rainbowd.core import chunkproto
from rainbowd.core.digest import short
from rainbowd.core.messages import FailureKind

#: keep at least this many bytes of chunks requested ahead (when chunks are small)
MIN_INFLIGHT_BYTES = 32 * 1024 * 1024
#: chunks a seeder reads ahead of the one being written to the channel: enough to
#: keep the disk busy while the wire drains, few enough to bound its memory per channel
READ_AHEAD = 2

#: labels of ``rbd_agent_chunk_failures_total`` a fetch names (agent/metrics.py lists them all)
FetchFailureLabel = Literal[
    "bad_chunk",
    "out_of_order",
    "seeder_corrupt",
    "seeder_error",
    "protocol",
    "timeout",
    "channel_closed",
]


def fetch_window(window: int, chunk_size: int) -> int:
    """Chunks a pull keeps requested but not yet received.

    ``window`` chunks, or ``MIN_INFLIGHT_BYTES`` worth when chunks are small
    (so small chunks still fill a long fat pipe), but never more than one
    REQUEST frame may name.
    """
    return min(max(window, -(-MIN_INFLIGHT_BYTES // chunk_size)), chunkproto.MAX_CHUNKS_PER_REQUEST)


# --------------------------------------------------------------------------
# The demander's side
# --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FetchFailure:
    """Why a fetch ends: everything the puller raises, counts and logs for it.

    ``log_event`` (with ``log_fields``), when set, is logged at error level:
    the seeder sent bad bytes or found its own copy corrupt, which an operator
    should see; the other failures are logged once, by the pull, as failed.
    """

    kind: FailureKind
    reason: str
    #: the ``reason`` label of rbd_agent_chunk_failures_total
    metric: FetchFailureLabel
    seeder_fault: bool = False
    #: the seeder answered not_held (the coordinator then stops counting it a holder)
    not_held: bool = False
    log_event: str = ""
    log_fields: tuple[tuple[str, object], ...] = ()


#: what an event from the seeder means: the chunk due next (verify it, write it, then
#: :meth:`FetchSession.chunk_written`), nothing to do (None), or stop
FetchStep = chunkproto.Chunk | FetchFailure | None


class FetchSession:
    """The demander's state on one chunk channel: the request window and the chunk due next.

    Requests are pipelined: :meth:`next_request` names up to ``window`` chunks
    at the start and tops the window up each time half of it has drained, so
    the seeder never waits for a request while the demander verifies. The
    seeder answers in request order, so the chunk due is always the oldest
    outstanding one. ``where`` (seeder, address, layer) starts every reason.
    """

    def __init__(
        self, layer: str, missing: Iterable[int], *, chunk_size: int, window: int, where: str
    ) -> None:
        self.layer = layer
        self.chunk_size = chunk_size
        self.where = where
        #: chunks kept requested but not received (see :func:`fetch_window`)
        self.window = fetch_window(window, chunk_size)
        self._todo = deque(missing)
        self._outstanding: deque[int] = deque()

    @property
    def outstanding(self) -> int:
        """Chunks requested and not yet written."""
        return len(self._outstanding)

    @property
    def done(self) -> bool:
        """Every chunk was requested and written."""
        return not self._outstanding and not self._todo

    def next_request(self) -> bytes | None:
        """The REQUEST frame to send now, or None.

        One at the start, then one whenever at most half the window is
        outstanding (and chunks are left to ask for): refilling by halves
        keeps requests few and the seeder's queue never empty.
        """
        if len(self._outstanding) > self.window // 2:
            return None
        batch: list[int] = []
        while self._todo and len(self._outstanding) + len(batch) < self.window:
            batch.append(self._todo.popleft())
        if not batch:
            return None
        self._outstanding.extend(batch)
        return chunkproto.encode_request(self.layer, batch)

    def receive(self, event: chunkproto.Event | BaseException | None) -> FetchStep:
        """What ``event`` from the channel means.

        ``event`` is a decoded frame, the :class:`~rainbowd.core.chunkproto.ProtocolError`
        the decoder raised, another exception that closed the channel, or
        None for a channel closed cleanly.
        """
        where = self.where
        if isinstance(event, chunkproto.Chunk):
            due = self._outstanding[0] if self._outstanding else None
            if event.index != due:
                return FetchFailure(
                    "verify",
                    f"{where}: sent chunk {event.index} where {'none' if due is None else due}"
                    " was due",
                    "out_of_order",
                    seeder_fault=True,
                )
            return event
        if isinstance(event, chunkproto.End):
            return None  # the chunks of a request are counted as they come
        if isinstance(event, chunkproto.Error):
            return self._seeder_error(event)
        if isinstance(event, chunkproto.ProtocolError):
            return FetchFailure(
                "verify",
                f"{where}: chunk protocol violation: {event}",
                "protocol",
                seeder_fault=True,
            )
        detail = f": {event}" if event is not None else ""
        return FetchFailure(
            "io",
            f"{where}: channel closed with {len(self._outstanding)} chunks outstanding{detail}",
            "channel_closed",
        )

    def _seeder_error(self, error: chunkproto.Error) -> FetchFailure:
        """An ERROR frame: whose fault it is decides what the coordinator does next."""
        said = f"{self.where}: seeder says {error.code}: {error.message}"
        if error.code == chunkproto.ERR_CORRUPT:
            # the seeder caught its own stored blob failing the manifest: its fault,
            # counted like a bad chunk, but no bad byte moved
            return FetchFailure(
                "verify",
                said,
                "seeder_corrupt",
                seeder_fault=True,
                log_event="seeder_reports_corrupt_blob",
                log_fields=(("error", error.message),),
            )
        # a relay whose own pull is behind or broke: not its fault, fail over
        kind: FailureKind = "relay" if error.code == chunkproto.ERR_UNAVAILABLE else "io"
        return FetchFailure(
            kind, said, "seeder_error", not_held=error.code == chunkproto.ERR_NOT_HELD
        )

    def chunk_written(self, index: int) -> None:
        """Chunk ``index`` (the one due) is verified and on disk: the next one is due."""
        if not self._outstanding or self._outstanding[0] != index:
            raise ValueError(f"chunk {index} is not the one due")
        self._outstanding.popleft()

    def chunk_rejected(self, index: int, length: int, why: str) -> FetchFailure:
        """Chunk ``index`` failed its manifest hash: the seeder's fault (SSH guarded the bytes)."""
        return FetchFailure(
            "verify",
            f"{self.where}: {why}",
            "bad_chunk",
            seeder_fault=True,
            log_event="bad_chunk",
            log_fields=(("chunk", index), ("length", length)),
        )

    def timed_out(self, wait_s: float) -> FetchFailure:
        """No event for ``wait_s`` seconds (the loop keeps the time)."""
        return FetchFailure(
            "io",
            f"{self.where}: no chunk for {wait_s:.0f}s "
            f"({len(self._outstanding)} outstanding, {self.chunk_size} B chunks)",
            "timeout",
        )


# --------------------------------------------------------------------------
# The seeder's side
# --------------------------------------------------------------------------
#: the ways a seeder's chunk read fails that have an answer on the wire (the agent
#: maps its exceptions to these); any other failure is answered ``internal``
ReadFailure = Literal[
    "layer_missing",  # the layer is not held here (store.LayerMissing)
    "bad_index",  # the layer has no such chunk (IndexError)
    "relay_not_pulling",  # not held and no pull of it started here in time
    "relay_unavailable",  # a pull here brings it, but not within the bound (or it ended)
    "corrupt",  # our own copy fails its manifest (store.CorruptBlob)
]
LogLevel = Literal["", "info", "warning", "error"]


@dataclass(frozen=True, slots=True)
class Refusal:
    """The ERROR frame answering a failed read, and what the seeder logs and records for it.

    The channel is closed after the frame. ``marks_corrupt``: this node's copy
    of the layer is bad; the server records ``message`` and tells the agent.
    """

    frame: bytes
    code: str
    message: str
    log_level: LogLevel = ""
    log_event: str = ""
    log_fields: tuple[tuple[str, object], ...] = ()
    marks_corrupt: bool = False


class ServeSession:
    """The seeder's answer to one REQUEST: reads in flight, then CHUNK frames in order, then END.

    :meth:`reads_to_start` names the chunks to read now: up to ``read_ahead``
    reads run while the chunk before them drains, so disk and wire overlap and
    memory stays bounded (the demander's SSH window bounds what is on the
    wire). The loop hands each read back in request order to
    :meth:`chunk_arrived` and writes the frames :meth:`chunk_frames` returns;
    a failed read is answered by :meth:`refuse` instead.
    """

    def __init__(
        self,
        request: chunkproto.Request,
        *,
        node_id: str,
        max_packet: int,
        read_ahead: int = READ_AHEAD,
    ) -> None:
        if read_ahead < 1:
            raise ValueError("read_ahead must be at least 1")
        self.layer = request.layer
        self.requested = len(request.chunks)
        self.node_id = node_id
        #: the channel's largest SSH packet: a chunk that fits one is sent in one write
        self.max_packet = max_packet
        self.read_ahead = read_ahead
        #: chunk bytes framed so far (what the request served)
        self.bytes_sent = 0
        self._unread = deque(request.chunks)
        self._reading: deque[int] = deque()

    @property
    def done(self) -> bool:
        """Every chunk was read and handed back."""
        return not self._unread and not self._reading

    def reads_to_start(self) -> list[int]:
        """Chunks to start reading now, keeping ``read_ahead`` reads in flight."""
        out: list[int] = []
        while self._unread and len(self._reading) < self.read_ahead:
            index = self._unread.popleft()
            self._reading.append(index)
            out.append(index)
        return out

    def chunk_arrived(self, index: int) -> list[int]:
        """The oldest read finished with chunk ``index``: the reads to start in its place."""
        if not self._reading or self._reading[0] != index:
            raise ValueError(f"chunk {index} is not the oldest read in flight")
        self._reading.popleft()
        return self.reads_to_start()

    def chunk_frames(self, index: int, data: bytes) -> tuple[bytes, ...]:
        """The writes carrying chunk ``index``; counts its bytes as sent.

        A chunk that fits one SSH packet goes in one write (header and bytes
        copied together): asyncssh sends an IGNORE packet before each packet,
        and each is an encryption, a send() and a wake-up on the far end. A
        bigger one spans packets anyway, so its header goes alone rather than
        copying the chunk.
        """
        self.bytes_sent += len(data)
        if len(data) < self.max_packet - chunkproto.HEADER_SIZE:
            return (chunkproto.encode_chunk(index, data),)
        return (chunkproto.encode_chunk_header(index, len(data)), data)

    def end_frame(self) -> bytes:
        """The END frame closing this request's answer."""
        return chunkproto.encode_end(self.requested)

    def refuse(self, failure: ReadFailure, why: str) -> Refusal:
        """The answer to a read that failed with ``failure``; ``why`` is the error's text.

        A relay's refusals name this node (the demander may have asked it
        only because the coordinator said a pull was on its way here).
        """
        layer = (("layer", short(self.layer)),)
        here = f"node {self.node_id}: {why}"
        if failure == "layer_missing":
            return _refusal(chunkproto.ERR_NOT_HELD, why, "warning", _NOT_HELD, layer)
        if failure == "bad_index":
            return _refusal(chunkproto.ERR_BAD_REQUEST, why)
        if failure == "relay_not_pulling":
            return _refusal(chunkproto.ERR_NOT_HELD, here, "warning", _NOT_HELD, layer)
        if failure == "relay_unavailable":
            fields = (*layer, ("error", why))
            return _refusal(
                chunkproto.ERR_UNAVAILABLE, here, "info", "relay_chunk_unavailable", fields
            )
        if failure == "corrupt":
            fields = (*layer, ("error", why))
            return _refusal(
                chunkproto.ERR_CORRUPT,
                why,
                "error",
                "serving_refused_corrupt_blob",
                fields,
                marks_corrupt=True,
            )
        assert_never(failure)


_NOT_HELD = "chunk_request_layer_not_held"


def _refusal(
    code: str,
    message: str,
    log_level: LogLevel = "",
    log_event: str = "",
    log_fields: tuple[tuple[str, object], ...] = (),
    *,
    marks_corrupt: bool = False,
) -> Refusal:
    return Refusal(
        chunkproto.encode_error(code, message),
        code,
        message,
        log_level,
        log_event,
        log_fields,
        marks_corrupt,
    )


def bad_request_frame(error: chunkproto.ProtocolError) -> bytes:
    """The answer to a demander that broke the protocol (the channel closes after it)."""
    return chunkproto.encode_error(chunkproto.ERR_BAD_REQUEST, str(error))


def internal_error_frame(error: BaseException) -> bytes:
    """The answer to a failure the seeder did not expect: its type only, no internals."""
    return chunkproto.encode_error(chunkproto.ERR_INTERNAL, type(error).__name__)
