"""chunkproto: framing round trips, fragmented input, and refusal of bad frames."""

from __future__ import annotations

import struct

import msgpack
import pytest

from rainbowd.core import chunkproto as cp
from rainbowd.core.digest import Digest

LAYER = "sha256:" + "ab" * 32


def feed_all(dec: cp.Decoder, data: bytes, step: int | None = None) -> list[cp.Event]:
    if step is None:
        return dec.feed(data)
    out: list[cp.Event] = []
    for i in range(0, len(data), step):
        out.extend(dec.feed(data[i : i + step]))
    return out


def test_request_round_trip() -> None:
    frame = cp.encode_request(LAYER, [0, 5, 7])
    assert feed_all(cp.Decoder("server"), frame) == [cp.Request(Digest(LAYER), [0, 5, 7])]


@pytest.mark.parametrize("step", [None, 1, 3, 9, 10, 1000, 65536])
def test_response_stream_fragmented(step: int | None) -> None:
    a, b = b"x" * 100_000, b"y" * 17
    stream = (
        cp.encode_chunk_header(3, len(a))
        + a
        + cp.encode_chunk(4, b)
        + cp.encode_chunk(5, b"")
        + cp.encode_end(3)
        + cp.encode_error(cp.ERR_NOT_HELD, "layer gone")
    )
    dec = cp.Decoder("client")
    events = feed_all(dec, stream, step)
    assert events == [
        cp.Chunk(3, a),
        cp.Chunk(4, b),
        cp.Chunk(5, b""),
        cp.End(3),
        cp.Error(cp.ERR_NOT_HELD, "layer gone"),
    ]
    assert dec.idle
    dec.eof()


def test_several_requests_in_one_feed() -> None:
    data = cp.encode_request(LAYER, [1]) + cp.encode_request(LAYER, [2, 3])
    evs = cp.Decoder("server").feed(data)
    assert [e.chunks for e in evs if isinstance(e, cp.Request)] == [[1], [2, 3]]


def test_eof_mid_frame_is_an_error() -> None:
    dec = cp.Decoder("client")
    dec.feed(cp.encode_chunk(0, b"abcdef")[:-2])
    with pytest.raises(cp.ProtocolError, match="middle of a CHUNK"):
        dec.eof()
    dec2 = cp.Decoder("client")
    dec2.feed(b"\x02\x00")
    with pytest.raises(cp.ProtocolError, match="frame header"):
        dec2.eof()


def _raw_request(obj: object) -> bytes:
    payload: bytes = msgpack.packb(obj)
    return cp.HEADER.pack(cp.T_REQUEST, 0, len(payload)) + payload


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (b"\x09" + b"\x00" * 8, "unknown frame type"),
        (cp.encode_chunk(0, b"ab"), "does not accept CHUNK"),
        (cp.HEADER.pack(cp.T_REQUEST, 0, cp.MAX_REQUEST_BYTES + 1), "exceeds"),
        (cp.HEADER.pack(cp.T_REQUEST, 0, 3) + b"\xc1\xc1\xc1", "not valid msgpack"),
        (_raw_request([1, 2]), "must be a map"),
        (_raw_request({"v": 2, "layer": LAYER, "chunks": [0]}), "protocol version"),
        (_raw_request({"v": 1, "layer": "sha256:zz", "chunks": [0]}), "not a sha256 digest"),
        (_raw_request({"v": 1, "layer": 5, "chunks": [0]}), "string 'layer'"),
        (_raw_request({"v": 1, "layer": LAYER, "chunks": []}), "no chunks"),
        (_raw_request({"v": 1, "layer": LAYER, "chunks": "abc"}), "must be a list"),
        (_raw_request({"v": 1, "layer": LAYER, "chunks": [-1]}), "not an integer"),
        (_raw_request({"v": 1, "layer": LAYER, "chunks": [True]}), "not an integer"),
        (_raw_request({"v": 1, "layer": LAYER, "chunks": [2**32]}), "not an integer"),
        (_raw_request({"v": 1, "layer": LAYER, "chunks": [1, 1]}), "more than once"),
        (
            _raw_request({"v": 1, "layer": LAYER, "chunks": list(range(4097))}),
            "at most 4096",
        ),
    ],
)
def test_server_rejects_malformed(frame: bytes, match: str) -> None:
    dec = cp.Decoder("server")
    with pytest.raises(cp.ProtocolError, match=match):
        dec.feed(frame)
    with pytest.raises(cp.ProtocolError, match="already failed"):
        dec.feed(b"")


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (cp.encode_request(LAYER, [0]), "does not accept REQUEST"),
        (cp.HEADER.pack(cp.T_CHUNK, 0, 1025), "exceeds the 1024-byte limit"),
        (cp.HEADER.pack(cp.T_ERROR, 0, cp.MAX_ERROR_BYTES + 1), "exceeds"),
        (cp.HEADER.pack(cp.T_END, 0, 1) + b"x", "exceeds the 0-byte limit"),
        (
            cp.HEADER.pack(cp.T_ERROR, 0, 4) + msgpack.packb({"v": 1}),
            "string 'code' and 'message'",
        ),
    ],
)
def test_client_rejects_malformed(frame: bytes, match: str) -> None:
    with pytest.raises(cp.ProtocolError, match=match):
        cp.Decoder("client", max_chunk=1024).feed(frame)


def test_oversized_chunk_refused_before_buffering() -> None:
    dec = cp.Decoder("client", max_chunk=64 * 1024)
    with pytest.raises(cp.ProtocolError, match="CHUNK frame of"):
        dec.feed(struct.pack(">BII", cp.T_CHUNK, 0, 64 * 1024 + 1))


def test_encoders_validate() -> None:
    with pytest.raises(cp.ProtocolError):
        cp.encode_request("nope", [0])
    with pytest.raises(cp.ProtocolError):
        cp.encode_request(LAYER, [])
    with pytest.raises(cp.ProtocolError):
        cp.encode_chunk_header(-1, 0)
    long = cp.encode_error("x", "m" * 100_000)
    (ev,) = cp.Decoder("client").feed(long)
    assert isinstance(ev, cp.Error) and len(ev.message) <= cp.MAX_ERROR_BYTES


def test_decoder_side_checked() -> None:
    with pytest.raises(ValueError):
        cp.Decoder("both")  # type: ignore[arg-type]
