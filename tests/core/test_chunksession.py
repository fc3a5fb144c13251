"""chunksession: the fetch and serve sessions, frame by frame, with no socket, thread or clock.

The sessions are driven through the real codec (chunkproto): what a
FetchSession asks for is decoded as a seeder would, and what a ServeSession
writes is decoded as a demander would.
"""

from __future__ import annotations

from typing import get_args

import pytest

from rainbowd.agent.dataplane.relay import RelayNotPulling, RelayUnavailable
from rainbowd.agent.dataplane.ssh_server import read_failure
from rainbowd.agent.metrics import CHUNK_FAILURE_REASONS
from rainbowd.core import chunkproto as cp
from rainbowd.core.chunksession import (
    MIN_INFLIGHT_BYTES,
    READ_AHEAD,
    FetchFailure,
    FetchFailureLabel,
    FetchSession,
    ReadFailure,
    ServeSession,
    bad_request_frame,
    fetch_window,
    internal_error_frame,
)
from rainbowd.core.digest import Digest, short
from rainbowd.lib.store import CorruptBlob, LayerMissing, StoreError

LAYER = Digest("sha256:" + "ab" * 32)
WHERE = f"seeder s1 at 10.0.0.1:7022, layer {LAYER}"
#: chunks this big make the window exactly what the caller asks for (one chunk of 32 MiB)
BIG = MIN_INFLIGHT_BYTES


def requested(frame: bytes | None) -> list[int]:
    """The chunk indices a REQUEST frame names (decoded as the seeder does)."""
    assert frame is not None
    (req,) = cp.Decoder("server").feed(frame)
    assert isinstance(req, cp.Request) and req.layer == LAYER
    return req.chunks


def fetch(missing: list[int], window: int = 4, chunk_size: int = BIG) -> FetchSession:
    return FetchSession(LAYER, missing, chunk_size=chunk_size, window=window, where=WHERE)


def deliver(session: FetchSession, index: int) -> None:
    """The seeder sends chunk ``index`` and the demander writes it."""
    step = session.receive(cp.Chunk(index, b"x"))
    assert step == cp.Chunk(index, b"x")
    session.chunk_written(index)


# -- the demander: window ----------------------------------------------------------
def test_window_is_the_asked_one_or_32_mib_worth_within_one_request() -> None:
    assert fetch_window(4, BIG) == 4
    assert fetch_window(4, 4 * 1024 * 1024) == 8  # 32 MiB of 4 MiB chunks
    assert fetch_window(64, 4 * 1024 * 1024) == 64
    assert fetch_window(4, 3 * 1024 * 1024) == 11  # rounded up
    assert fetch_window(4, 1024) == cp.MAX_CHUNKS_PER_REQUEST


def test_first_request_fills_the_window_and_refills_when_half_drained() -> None:
    session = fetch(list(range(10)), window=4)
    assert requested(session.next_request()) == [0, 1, 2, 3]
    assert session.next_request() is None  # the window is full
    deliver(session, 0)
    assert session.next_request() is None  # 3 outstanding: more than half of 4
    deliver(session, 1)
    assert requested(session.next_request()) == [4, 5]  # 2 left: topped up to 4
    for i in (2, 3, 4):
        deliver(session, i)
    assert requested(session.next_request()) == [6, 7, 8]
    for i in (5, 6, 7, 8):
        deliver(session, i)
    assert requested(session.next_request()) == [9]
    assert not session.done
    deliver(session, 9)
    assert session.next_request() is None
    assert session.done and session.outstanding == 0


def test_a_window_of_one_asks_for_one_chunk_at_a_time() -> None:
    session = fetch([7, 3, 5], window=1)
    seen = []
    while not session.done:
        (index,) = requested(session.next_request())
        seen.append(index)
        deliver(session, index)
    assert seen == [7, 3, 5]  # the order of the missing list, which the seeder keeps


def test_end_frames_change_nothing() -> None:
    session = fetch([0, 1], window=2)
    requested(session.next_request())
    deliver(session, 0)
    assert session.receive(cp.End(2)) is None
    assert session.outstanding == 1


# -- the demander: what each event means -------------------------------------------
def test_a_chunk_out_of_order_is_a_verify_failure_of_the_seeder() -> None:
    session = fetch([0, 1, 2])
    requested(session.next_request())
    step = session.receive(cp.Chunk(1, b"x"))
    assert step == FetchFailure(
        "verify", f"{WHERE}: sent chunk 1 where 0 was due", "out_of_order", seeder_fault=True
    )


def test_a_chunk_when_none_is_due_is_out_of_order_too() -> None:
    session = fetch([0])
    requested(session.next_request())
    deliver(session, 0)
    step = session.receive(cp.Chunk(0, b"x"))
    assert isinstance(step, FetchFailure)
    assert (step.kind, step.metric, step.seeder_fault) == ("verify", "out_of_order", True)
    assert step.reason == f"{WHERE}: sent chunk 0 where none was due"


def test_only_the_chunk_due_can_be_written() -> None:
    session = fetch([0, 1])
    requested(session.next_request())
    with pytest.raises(ValueError, match="chunk 1 is not the one due"):
        session.chunk_written(1)


#: error code -> (kind, metric, seeder_fault, not_held)
ERROR_CODES = {
    cp.ERR_NOT_HELD: ("io", "seeder_error", False, True),
    cp.ERR_BAD_REQUEST: ("io", "seeder_error", False, False),
    cp.ERR_BUSY: ("io", "seeder_error", False, False),
    cp.ERR_INTERNAL: ("io", "seeder_error", False, False),
    cp.ERR_UNAVAILABLE: ("relay", "seeder_error", False, False),
    cp.ERR_CORRUPT: ("verify", "seeder_corrupt", True, False),
    "something-new": ("io", "seeder_error", False, False),
}


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
def test_each_error_code_has_its_kind(code: str) -> None:
    session = fetch([0, 1])
    requested(session.next_request())
    (error,) = cp.Decoder("client").feed(cp.encode_error(code, "why"))
    step = session.receive(error)
    assert isinstance(step, FetchFailure)
    assert (step.kind, step.metric, step.seeder_fault, step.not_held) == ERROR_CODES[code]
    assert step.reason == f"{WHERE}: seeder says {code}: why"
    if code == cp.ERR_CORRUPT:  # the seeder's own copy is bad: an operator should see it
        assert (step.log_event, step.log_fields) == (
            "seeder_reports_corrupt_blob",
            (("error", "why"),),
        )
    else:
        assert step.log_event == ""


def test_a_protocol_violation_is_the_seeders_fault() -> None:
    session = fetch([0])
    requested(session.next_request())
    with pytest.raises(cp.ProtocolError) as ei:
        cp.Decoder("client").feed(cp.encode_request(LAYER, [0]))  # a seeder sending a REQUEST
    step = session.receive(ei.value)
    assert step == FetchFailure(
        "verify",
        f"{WHERE}: chunk protocol violation: a client does not accept REQUEST frames",
        "protocol",
        seeder_fault=True,
    )


def test_a_closed_channel_counts_what_was_outstanding() -> None:
    session = fetch([0, 1, 2])
    requested(session.next_request())
    deliver(session, 0)
    assert session.receive(None) == FetchFailure(
        "io", f"{WHERE}: channel closed with 2 chunks outstanding", "channel_closed"
    )
    step = session.receive(ConnectionResetError("reset by peer"))
    assert isinstance(step, FetchFailure)
    assert step.reason == f"{WHERE}: channel closed with 2 chunks outstanding: reset by peer"


def test_a_timeout_and_a_rejected_chunk() -> None:
    session = fetch([0, 1], chunk_size=65536)
    requested(session.next_request())
    assert session.timed_out(60.4) == FetchFailure(
        "io", f"{WHERE}: no chunk for 60s (2 outstanding, 65536 B chunks)", "timeout"
    )
    assert session.chunk_rejected(0, 65536, "layer x chunk 0: bad") == FetchFailure(
        "verify",
        f"{WHERE}: layer x chunk 0: bad",
        "bad_chunk",
        seeder_fault=True,
        log_event="bad_chunk",
        log_fields=(("chunk", 0), ("length", 65536)),
    )


def test_every_label_a_fetch_names_is_a_metric_label() -> None:
    assert set(get_args(FetchFailureLabel)) <= set(CHUNK_FAILURE_REASONS)


# -- the seeder: reads in flight and frames ----------------------------------------
def serve(chunks: list[int], max_packet: int = 1024, read_ahead: int = READ_AHEAD) -> ServeSession:
    return ServeSession(
        cp.Request(LAYER, chunks), node_id="n1", max_packet=max_packet, read_ahead=read_ahead
    )


@pytest.mark.parametrize("read_ahead", [1, 2, 3])
def test_reads_never_run_more_than_read_ahead_ahead(read_ahead: int) -> None:
    chunks = [5, 1, 9, 2, 7]
    session = serve(chunks, read_ahead=read_ahead)
    in_flight = session.reads_to_start()
    assert in_flight == chunks[:read_ahead]
    assert session.reads_to_start() == []  # nothing more until a read is handed back
    order = []
    while in_flight:
        index = in_flight.pop(0)
        order.append(index)
        in_flight += session.chunk_arrived(index)
        assert len(in_flight) <= read_ahead
    assert order == chunks
    assert session.done


def test_reads_are_handed_back_in_request_order() -> None:
    session = serve([0, 1, 2])
    session.reads_to_start()
    with pytest.raises(ValueError, match="chunk 1 is not the oldest read"):
        session.chunk_arrived(1)


def test_a_chunk_that_fits_a_packet_is_one_write_a_bigger_one_two() -> None:
    session = serve([0, 1], max_packet=100)
    small, big = b"s" * (100 - cp.HEADER_SIZE - 1), b"b" * (100 - cp.HEADER_SIZE)
    assert session.chunk_frames(0, small) == (cp.encode_chunk(0, small),)
    header, body = session.chunk_frames(1, big)
    assert header == cp.encode_chunk_header(1, len(big)) and body is big  # not copied
    assert session.bytes_sent == len(small) + len(big)
    stream = cp.encode_chunk(0, small) + header + body + session.end_frame()
    assert cp.Decoder("client").feed(stream) == [cp.Chunk(0, small), cp.Chunk(1, big), cp.End(2)]


def test_end_frame_counts_the_chunks_requested() -> None:
    assert cp.Decoder("client").feed(serve([3, 4, 8]).end_frame()) == [cp.End(3)]


# -- the seeder: what answers each failed read -------------------------------------
LAYER_FIELD = ("layer", short(LAYER))
#: failure -> (code, message sent, log level, log event, log fields, marks corrupt)
REFUSALS: dict[str, tuple[str, str, str, str, tuple[tuple[str, object], ...], bool]] = {
    "layer_missing": (
        cp.ERR_NOT_HELD,
        "why",
        "warning",
        "chunk_request_layer_not_held",
        (LAYER_FIELD,),
        False,
    ),
    "bad_index": (cp.ERR_BAD_REQUEST, "why", "", "", (), False),
    "relay_not_pulling": (
        cp.ERR_NOT_HELD,
        "node n1: why",
        "warning",
        "chunk_request_layer_not_held",
        (LAYER_FIELD,),
        False,
    ),
    "relay_unavailable": (
        cp.ERR_UNAVAILABLE,
        "node n1: why",
        "info",
        "relay_chunk_unavailable",
        (LAYER_FIELD, ("error", "why")),
        False,
    ),
    "corrupt": (
        cp.ERR_CORRUPT,
        "why",
        "error",
        "serving_refused_corrupt_blob",
        (LAYER_FIELD, ("error", "why")),
        True,
    ),
}


@pytest.mark.parametrize("failure", get_args(ReadFailure))
def test_each_failed_read_has_its_error_frame(failure: ReadFailure) -> None:
    refusal = serve([0]).refuse(failure, "why")
    code, message, level, event, fields, corrupt = REFUSALS[failure]
    assert (refusal.code, refusal.message) == (code, message)
    assert (refusal.log_level, refusal.log_event, refusal.log_fields) == (level, event, fields)
    assert refusal.marks_corrupt is corrupt
    assert cp.Decoder("client").feed(refusal.frame) == [cp.Error(code, message)]


#: what the ChunkServer's reads raise -> the failure, and so the ERROR code, it answers with
SERVER_ERRORS: list[tuple[Exception, ReadFailure | None, str]] = [
    (LayerMissing("node n1 does not hold layer x"), "layer_missing", cp.ERR_NOT_HELD),
    (IndexError("layer x has chunks 0..3, not 9"), "bad_index", cp.ERR_BAD_REQUEST),
    (RelayNotPulling("no pull of it here"), "relay_not_pulling", cp.ERR_NOT_HELD),
    (RelayUnavailable("chunk 3 not within 20 s"), "relay_unavailable", cp.ERR_UNAVAILABLE),
    (CorruptBlob("node n1: stored layer x chunk 0 ..."), "corrupt", cp.ERR_CORRUPT),
    (StoreError("layer x chunk 0: short read (1/2)"), None, cp.ERR_INTERNAL),
    (ValueError("a bug"), None, cp.ERR_INTERNAL),
]


@pytest.mark.parametrize(("error", "failure", "code"), SERVER_ERRORS, ids=lambda v: str(v)[:20])
def test_each_server_exception_has_its_error_frame(
    error: Exception, failure: ReadFailure | None, code: str
) -> None:
    assert read_failure(error) == failure
    if failure is None:  # the channel fails: the demander learns the type, nothing more
        frame = internal_error_frame(error)
        assert cp.Decoder("client").feed(frame) == [cp.Error(code, type(error).__name__)]
        return
    (answer,) = cp.Decoder("client").feed(serve([0]).refuse(failure, str(error)).frame)
    assert isinstance(answer, cp.Error) and answer.code == code


def test_a_demander_breaking_the_protocol_is_told_so() -> None:
    error = cp.ProtocolError("request names no chunks")
    assert cp.Decoder("client").feed(bad_request_frame(error)) == [
        cp.Error(cp.ERR_BAD_REQUEST, "request names no chunks")
    ]


def test_a_read_ahead_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="read_ahead"):
        serve([0], read_ahead=0)
