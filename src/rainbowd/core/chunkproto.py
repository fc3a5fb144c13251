"""chunkproto: the framing spoken on the SSH chunk channel, sans I/O.

The demander opens the ``rbd-chunks@rainbowd`` subsystem on a seeder and
sends request frames naming a layer and chunk indices; the seeder answers each
request with one CHUNK frame per index, in order, followed by an END frame,
or with an ERROR frame (after which it closes the channel).

Every frame starts with the same 9-byte header, ``>BII``::

    type  u8    1 REQUEST | 2 CHUNK | 3 ERROR | 4 END
    arg   u32   CHUNK: chunk index; END: chunks sent for the request; else 0
    len   u32   bytes following the header

    REQUEST  payload = msgpack {"v": 1, "layer": "sha256:…", "chunks": [int, …]}
    CHUNK    payload = the chunk's raw bytes (no copy through msgpack)
    ERROR    payload = msgpack {"v": 1, "code": str, "message": str}
    END      no payload

Chunk bytes travel raw, so the seeder can hand the SSH channel the buffer it
read from disk and the demander gets one contiguous ``bytes`` per chunk to
hash; only the small control frames go through msgpack.

This module does no I/O (h11 style): :class:`Decoder` is fed whatever bytes
arrived and returns the complete events they finish; the ``encode_*``
functions return bytes to write. Everything a peer could get wrong (unknown
frame type, a frame the other side should send, oversize request, too many
chunks, malformed msgpack, a bad digest, a chunk longer than allowed) raises
:class:`ProtocolError` with a message naming what was wrong, and the decoder
refuses further input after that.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

import msgpack

from rainbowd.core.chunks import MAX_CHUNK_SIZE
from rainbowd.core.digest import Digest, DigestError, parse_digest

VERSION = 1
#: the SSH subsystem name the chunk channel is opened with
SUBSYSTEM = "rbd-chunks@rainbowd"

T_REQUEST = 1
T_CHUNK = 2
T_ERROR = 3
T_END = 4

HEADER = struct.Struct(">BII")
HEADER_SIZE = HEADER.size

#: largest REQUEST payload accepted (4096 indices below 2**32 fit in ~21 KiB)
MAX_REQUEST_BYTES = 64 * 1024
#: most chunk indices one request may name (a 16 GiB layer at 4 MiB chunks)
MAX_CHUNKS_PER_REQUEST = 4096
#: largest ERROR payload accepted
MAX_ERROR_BYTES = 8 * 1024
#: error codes the seeder sends
ERR_NOT_HELD = "not_held"
ERR_BAD_REQUEST = "bad_request"
ERR_BUSY = "busy"
ERR_INTERNAL = "internal"
#: a relay (a seeder still receiving the layer) does not have the chunk within its bound,
#: or its own pull ended; not the relay's fault: the demander fails over
ERR_UNAVAILABLE = "unavailable"
#: the seeder's stored copy of the chunk fails its manifest: the demander treats it as a
#: seeder fault (kind "verify") without reading bad bytes
ERR_CORRUPT = "corrupt"

Side = Literal["server", "client"]


class ProtocolError(ValueError):
    """The peer sent something that is not valid chunkproto; the channel is unusable."""


@dataclass(frozen=True, slots=True)
class Request:
    """A demander asks for ``chunks`` of ``layer`` (server-side event)."""

    layer: Digest
    chunks: list[int]


@dataclass(frozen=True, slots=True)
class Chunk:
    """One whole chunk as sent by the seeder (client-side event); not yet verified."""

    index: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Error:
    """The seeder refused or failed a request; it closes the channel after this."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class End:
    """The seeder finished one request, having sent ``count`` chunks."""

    count: int


Event = Request | Chunk | Error | End


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------
def encode_request(layer: str, chunks: list[int]) -> bytes:
    """A REQUEST frame; validates the same limits the decoder enforces."""
    try:
        parse_digest(layer)
    except DigestError as e:
        raise ProtocolError(str(e)) from None
    _check_indices(chunks)
    payload: bytes = msgpack.packb({"v": VERSION, "layer": layer, "chunks": chunks})
    if len(payload) > MAX_REQUEST_BYTES:
        raise ProtocolError(f"request of {len(payload)} bytes exceeds {MAX_REQUEST_BYTES}")
    return HEADER.pack(T_REQUEST, 0, len(payload)) + payload


def encode_chunk_header(index: int, length: int) -> bytes:
    """The header of a CHUNK frame; the caller writes the ``length`` raw bytes after it."""
    if not 0 <= index < 2**32 or not 0 <= length <= MAX_CHUNK_SIZE:
        raise ProtocolError(f"chunk {index} of {length} bytes cannot be framed")
    return HEADER.pack(T_CHUNK, index, length)


def encode_chunk(index: int, data: bytes) -> bytes:
    """A whole CHUNK frame (copies ``data``: cheaper than a second SSH packet for the header)."""
    return encode_chunk_header(index, len(data)) + data


def encode_error(code: str, message: str) -> bytes:
    """An ERROR frame; an overlong message is truncated rather than refused."""
    message = message[: MAX_ERROR_BYTES // 2]
    payload: bytes = msgpack.packb({"v": VERSION, "code": code[:64], "message": message})
    return HEADER.pack(T_ERROR, 0, len(payload)) + payload


def encode_end(count: int) -> bytes:
    return HEADER.pack(T_END, count, 0)


def _check_indices(chunks: object) -> list[int]:
    if not isinstance(chunks, list):
        raise ProtocolError("request 'chunks' must be a list of chunk indices")
    if not chunks:
        raise ProtocolError("request names no chunks")
    if len(chunks) > MAX_CHUNKS_PER_REQUEST:
        raise ProtocolError(
            f"request names {len(chunks)} chunks; at most {MAX_CHUNKS_PER_REQUEST} allowed"
        )
    for i in chunks:
        if type(i) is not int or not 0 <= i < 2**32:
            raise ProtocolError(f"request chunk index {i!r} is not an integer in 0..2**32-1")
    if len(set(chunks)) != len(chunks):
        raise ProtocolError("request names a chunk more than once")
    return chunks


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------
class Decoder:
    """Incremental decoder for one direction of a chunk channel.

    ``side="server"`` accepts only REQUEST frames (what a seeder receives);
    ``side="client"`` accepts CHUNK, ERROR and END (what a demander receives).
    ``max_chunk`` bounds a CHUNK frame's length, so a hostile seeder cannot
    make the demander buffer more than one chunk's worth; a demander sets it
    to its manifest's chunk size.
    """

    def __init__(self, side: Side, *, max_chunk: int = MAX_CHUNK_SIZE) -> None:
        if side not in ("server", "client"):
            raise ValueError(f"side must be 'server' or 'client', not {side!r}")
        self.side: Side = side
        self.max_chunk = max_chunk
        self._hdr = bytearray()
        self._type = 0
        self._arg = 0
        self._need = 0  # body bytes still missing for the current frame
        self._parts: list[bytes] = []
        self._in_body = False
        self._dead: ProtocolError | None = None

    @property
    def idle(self) -> bool:
        """True between frames (an EOF now is clean)."""
        return not self._in_body and not self._hdr

    def feed(self, data: bytes) -> list[Event]:
        """Consume ``data``; return the events it completes (possibly none)."""
        if self._dead is not None:
            raise ProtocolError(f"decoder already failed: {self._dead}")
        try:
            return self._feed(data)
        except ProtocolError as e:
            self._dead = e
            raise

    def eof(self) -> None:
        """The peer closed its side; raise ProtocolError if that cut a frame short."""
        if not self.idle:
            what = _TYPE_NAMES.get(self._type, "frame") if self._in_body else "frame header"
            raise ProtocolError(f"channel closed in the middle of a {what}")

    def _feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        pos = 0
        n = len(data)
        while pos < n:
            if not self._in_body:
                take = min(HEADER_SIZE - len(self._hdr), n - pos)
                self._hdr += data[pos : pos + take]
                pos += take
                if len(self._hdr) < HEADER_SIZE:
                    break
                self._start_frame()
                if self._need == 0:
                    events.append(self._finish_frame())
                continue
            take = min(self._need, n - pos)
            if pos == 0 and take == n:
                self._parts.append(data)
            else:
                self._parts.append(data[pos : pos + take])
            pos += take
            self._need -= take
            if self._need == 0:
                events.append(self._finish_frame())
        return events

    def _start_frame(self) -> None:
        ftype, arg, length = HEADER.unpack(self._hdr)
        self._hdr.clear()
        allowed = (T_REQUEST,) if self.side == "server" else (T_CHUNK, T_ERROR, T_END)
        if ftype not in _TYPE_NAMES:
            raise ProtocolError(f"unknown frame type {ftype}")
        if ftype not in allowed:
            raise ProtocolError(f"a {self.side} does not accept {_TYPE_NAMES[ftype]} frames")
        limit = {
            T_REQUEST: MAX_REQUEST_BYTES,
            T_CHUNK: self.max_chunk,
            T_ERROR: MAX_ERROR_BYTES,
            T_END: 0,
        }[ftype]
        if length > limit:
            raise ProtocolError(
                f"{_TYPE_NAMES[ftype]} frame of {length} bytes exceeds the {limit}-byte limit"
            )
        self._type, self._arg, self._need = ftype, arg, length
        self._in_body = True

    def _finish_frame(self) -> Event:
        parts, self._parts = self._parts, []
        self._in_body = False
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        if self._type == T_CHUNK:
            return Chunk(self._arg, body)
        if self._type == T_END:
            return End(self._arg)
        obj = _unpack(body, _TYPE_NAMES[self._type])
        if self._type == T_REQUEST:
            return _parse_request(obj)
        code, message = obj.get("code"), obj.get("message")
        if not isinstance(code, str) or not isinstance(message, str):
            raise ProtocolError("ERROR frame needs string 'code' and 'message'")
        return Error(code, message)


_TYPE_NAMES = {T_REQUEST: "REQUEST", T_CHUNK: "CHUNK", T_ERROR: "ERROR", T_END: "END"}


def _unpack(body: bytes, what: str) -> dict[str, object]:
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise ProtocolError(f"{what} payload is not valid msgpack") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} payload must be a map")
    if obj.get("v") != VERSION:
        raise ProtocolError(
            f"{what} has protocol version {obj.get('v')!r}; this side speaks {VERSION}"
        )
    return obj


def _parse_request(obj: dict[str, object]) -> Request:
    layer = obj.get("layer")
    if not isinstance(layer, str):
        raise ProtocolError("REQUEST needs a string 'layer'")
    try:
        digest = parse_digest(layer)
    except DigestError as e:
        raise ProtocolError(f"REQUEST layer: {e}") from None
    return Request(digest, _check_indices(obj.get("chunks")))
