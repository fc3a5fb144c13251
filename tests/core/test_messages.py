"""The control-plane codec: round trips and every way a body can be refused."""

from __future__ import annotations

import io
import json

import msgpack
import msgspec
import pytest

from rainbowd.core import messages as m
from rainbowd.core.chunks import MIN_CHUNK_SIZE, ChunkManifest, build_manifest
from rainbowd.core.messages import (
    JSON,
    MAX_BODY,
    MSGPACK,
    PROTOCOL_VERSION,
    ArchiveSource,
    Assignment,
    AssignmentBatch,
    Heartbeat,
    ImageRecord,
    IngestAssignment,
    IngestDone,
    LayerProgress,
    LayerRef,
    LoadAssignment,
    MessageError,
    PeerInfo,
    RegisterRequest,
    TransferAssignment,
    TransferDone,
    TransferFailed,
    TrustList,
    decode,
    encode,
    to_wire,
)

D1 = "sha256:" + "a" * 64
D2 = "sha256:" + "b" * 64

PEER = PeerInfo(
    node_id="n1",
    address="10.0.0.1",
    ssh_port=2222,
    host_key="ssh-ed25519 AAAAhost",
    client_key="ssh-ed25519 AAAAclient",
)
MANIFEST = build_manifest(io.BytesIO(b"x" * (MIN_CHUNK_SIZE + 1)), chunk_size=MIN_CHUNK_SIZE)
IMAGE = ImageRecord(
    ref="busybox:latest",
    config_digest=D1,
    config='{"architecture":"amd64"}',
    layers=[
        LayerRef(digest=D1, size=10, media_type="application/x-tar", diff_id=D1),
        LayerRef(digest=D2, size=32, media_type="application/x-tar", diff_id=D2),
    ],
)


def batch() -> AssignmentBatch:
    return AssignmentBatch(
        cursor=7,
        assignments=[
            TransferAssignment(
                transfer_id="t1", job_id="j1", layer=MANIFEST, seeder=PEER, reason="paper: x"
            ),
            IngestAssignment(
                ingest_id="i1",
                ref="busybox:latest",
                source=ArchiveSource(path="/srv/busybox.tar"),
                chunk_size=MIN_CHUNK_SIZE,
            ),
            LoadAssignment(load_id="l1", job_id="j1", image=IMAGE),
        ],
        trust=TrustList(version=3, peers=[PEER]),
    )


def register() -> RegisterRequest:
    return RegisterRequest(
        node_id="n1",
        join_token="tok",
        address="10.0.0.1",
        ssh_port=2222,
        host_key="hk",
        client_key="ck",
        labels={"rack": "a"},
        roles=["origin"],
        docker=True,
        disk_free=1 << 40,
        speed_hint_bps=1.25e8,
        holdings=[D1, D2],
    )


CT = pytest.mark.parametrize("ct", [MSGPACK, JSON])


# -- round trips -----------------------------------------------------------------
@CT
def test_round_trip_register(ct: str) -> None:
    msg = register()
    assert decode(encode(msg, ct), RegisterRequest, ct) == msg


@CT
def test_round_trip_heartbeat(ct: str) -> None:
    msg = Heartbeat(holdings=[D1], partials=[LayerProgress(digest=D2, have=3, count=9)], load=0.5)
    assert decode(encode(msg, ct), Heartbeat, ct) == msg


@CT
def test_round_trip_assignment_batch(ct: str) -> None:
    msg = batch()
    back = decode(encode(msg, ct), AssignmentBatch, ct)
    assert back == msg
    kinds = [type(a) for a in back.assignments]
    assert kinds == [TransferAssignment, IngestAssignment, LoadAssignment]
    t = back.assignments[0]
    assert isinstance(t, TransferAssignment)
    assert t.layer == MANIFEST
    assert t.layer.verify_chunk(1, b"x")


@CT
def test_round_trip_ingest_done(ct: str) -> None:
    msg = IngestDone(image=IMAGE, manifests=[MANIFEST])
    back = decode(encode(msg, ct), IngestDone, ct)
    assert back == msg
    assert back.image.size == 42


@CT
def test_assignment_union_is_tagged_by_kind(ct: str) -> None:
    wire = to_wire(batch())
    assert [a["kind"] for a in wire["assignments"]] == ["transfer", "ingest", "load"]
    assert wire["assignments"][1]["source"]["kind"] == "archive"
    for a in batch().assignments:
        assert decode(encode(a, ct), Assignment, ct) == a  # type: ignore[arg-type]


def test_version_is_on_the_wire_and_defaulted() -> None:
    assert to_wire(TransferDone(bytes_moved=1, seconds=2.0))["v"] == PROTOCOL_VERSION
    body = msgpack.packb({"bytes_moved": 1, "seconds": 2.0})
    assert decode(body, TransferDone).v == PROTOCOL_VERSION


def test_json_is_plain_json() -> None:
    body = encode(TransferDone(bytes_moved=5, seconds=1.5), JSON)
    assert json.loads(body) == {"v": PROTOCOL_VERSION, "bytes_moved": 5, "seconds": 1.5}


# -- refusals ----------------------------------------------------------------------
def test_malformed_msgpack() -> None:
    with pytest.raises(MessageError, match="TransferDone: body is not valid msgpack"):
        decode(b"\xc1\x00\x01", TransferDone)
    # trailing garbage after a valid object
    with pytest.raises(MessageError, match="not valid msgpack"):
        decode(encode(TransferDone(bytes_moved=1, seconds=1.0)) + b"\x00", TransferDone)
    # truncated
    with pytest.raises(MessageError, match="not valid msgpack"):
        decode(encode(register())[:-3], RegisterRequest)


def test_malformed_json() -> None:
    with pytest.raises(MessageError, match="Heartbeat: body is not valid JSON"):
        decode(b'{"v": 1,', Heartbeat, JSON)


def test_wrong_field_type() -> None:
    body = msgpack.packb({"v": 1, "bytes_moved": "lots", "seconds": 1.0})
    with pytest.raises(MessageError, match=r"TransferDone: Expected `int`, got `str`.*bytes_moved"):
        decode(body, TransferDone)
    body = msgpack.packb({"v": 1, "holdings": [1]})
    with pytest.raises(MessageError, match=r"holdings\[0\]"):
        decode(body, Heartbeat)


def test_body_that_is_not_an_object() -> None:
    with pytest.raises(MessageError, match="TransferDone"):
        decode(msgpack.packb([1, 2]), TransferDone)


def test_missing_field() -> None:
    body = msgpack.packb({"v": 1, "bytes_moved": 1})
    with pytest.raises(MessageError, match="missing required field `seconds`"):
        decode(body, TransferDone)


def test_literal_field_out_of_range() -> None:
    body = encode(TransferFailed(reason="r", kind="io"), JSON).replace(b'"io"', b'"meteor"')
    with pytest.raises(MessageError, match="kind"):
        decode(body, TransferFailed, JSON)


def test_unknown_assignment_kind() -> None:
    wire = to_wire(batch())
    wire["assignments"][0]["kind"] = "teleport"
    with pytest.raises(MessageError, match="teleport"):
        decode(msgpack.packb(wire), AssignmentBatch)


@CT
@pytest.mark.parametrize("version", [0, 2, 99])
def test_wrong_protocol_version_says_upgrade(ct: str, version: int) -> None:
    wire = to_wire(TransferDone(bytes_moved=1, seconds=1.0))
    wire["v"] = version
    body = msgpack.packb(wire) if ct == MSGPACK else json.dumps(wire).encode()
    with pytest.raises(MessageError, match="upgrade") as e:
        decode(body, TransferDone, ct)
    assert f"protocol version {version}" in str(e.value)


def test_oversized_body() -> None:
    body = b"\x00" * (MAX_BODY + 1)
    with pytest.raises(MessageError, match="exceeds"):
        decode(body, Heartbeat)
    with pytest.raises(MessageError, match="exceeds"):
        decode(body, Heartbeat, JSON)


@CT
def test_bad_digest_inside_a_manifest(ct: str) -> None:
    wire = to_wire(batch())
    wire["assignments"][0]["layer"]["digest"] = "sha256:NOTHEX"
    body = msgpack.packb(wire) if ct == MSGPACK else json.dumps(wire).encode()
    with pytest.raises(MessageError, match=r"AssignmentBatch:.*not a sha256 digest"):
        decode(body, AssignmentBatch, ct)


def test_inconsistent_manifest_is_refused() -> None:
    wire = to_wire(IngestDone(image=IMAGE, manifests=[MANIFEST]))
    wire["manifests"][0]["chunks"].append(D1)  # one chunk too many for the size
    with pytest.raises(MessageError, match="does not fit"):
        decode(msgpack.packb(wire), IngestDone)


def test_non_string_map_keys_are_refused() -> None:
    with pytest.raises(MessageError, match=r"Heartbeat: Expected `str`, got `int`"):
        decode(msgpack.packb({1: 2}), Heartbeat)


def test_deeply_nested_json_is_a_message_error() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    assert len(body) < MAX_BODY
    with pytest.raises(MessageError):
        decode(body, Heartbeat, JSON)


def test_deeply_nested_msgpack_is_a_message_error() -> None:
    body = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(MessageError, match="Heartbeat: Expected `object`, got `array`"):
        decode(body, Heartbeat)
    nested_version = b"\x81\xa1v" + body  # {"v": [[[...]]]}: the version is read first
    with pytest.raises(MessageError, match="not valid msgpack"):
        decode(nested_version, Heartbeat)


# -- every field the coordinator decodes is bounded (rainbowd.core.wirebounds) ----------
#: every body the coordinator decodes (coordinator/http/app.py and ops_routes.py)
INBOUND = [
    m.RegisterRequest,
    m.Heartbeat,
    m.EvictRequest,
    m.TransferProgress,
    m.TransferDone,
    m.TransferFailed,
    m.IngestDone,
    m.TaskFailed,
    m.LoadDone,
    m.SecurityEvent,
    m.CreateImage,
    m.CreateJob,
    m.CreateOp,
    m.OpStarted,
    m.OpResult,
]


def _unbounded(t: msgspec.inspect.Type, where: str, seen: set[type]) -> list[str]:
    """Paths of fields in ``t`` that have no limit (a float without both bounds, ...)."""
    mi = msgspec.inspect
    if isinstance(t, mi.FloatType):
        ok = (t.ge is not None or t.gt is not None) and (t.le is not None or t.lt is not None)
        return [] if ok else [where]
    if isinstance(t, mi.IntType):
        ok = (t.ge is not None or t.gt is not None) and (t.le is not None or t.lt is not None)
        return [] if ok else [where]
    if isinstance(t, mi.StrType):
        return [] if t.max_length is not None else [where]
    if isinstance(t, mi.ListType):
        own = [] if t.max_length is not None else [where]
        return own + _unbounded(t.item_type, where + "[]", seen)
    if isinstance(t, mi.DictType):
        own = [] if t.max_length is not None else [where]
        return (
            own
            + _unbounded(t.key_type, where + "{key}", seen)
            + _unbounded(t.value_type, where + "{}", seen)
        )
    if isinstance(t, mi.UnionType):
        return [p for u in t.types for p in _unbounded(u, where, seen)]
    if isinstance(t, mi.StructType):
        # ChunkManifest checks itself (chunks.py): its chunk list must match size and
        # chunk_size, both bounded there, and its digests are parsed
        if t.cls in seen or t.cls is ChunkManifest:
            return []
        seen.add(t.cls)
        return [p for f in t.fields for p in _unbounded(f.type, f"{where}.{f.name}", seen)]
    return []  # bool, None, Literal: nothing to bound


@pytest.mark.parametrize("kind", INBOUND, ids=lambda k: k.__name__)
def test_every_field_the_coordinator_decodes_is_bounded(kind: type) -> None:
    assert _unbounded(msgspec.inspect.type_info(kind), kind.__name__, set()) == []


@pytest.mark.parametrize("ct", [MSGPACK, JSON])
@pytest.mark.parametrize(
    ("field", "value"),
    [("seconds", float("nan")), ("seconds", float("inf")), ("bytes_moved", 2**53 + 1)],
)
def test_non_finite_and_huge_numbers_are_refused_naming_the_field(
    ct: str, field: str, value: float
) -> None:
    wire = to_wire(TransferDone(bytes_moved=1, seconds=1.0))
    wire[field] = value
    body = msgpack.packb(wire) if ct == MSGPACK else json.dumps(wire).encode()
    with pytest.raises(MessageError, match=rf"TransferDone: .*`\$\.{field}`|not valid JSON"):
        decode(body, TransferDone, ct)


def test_lone_surrogates_are_refused_in_both_encodings() -> None:
    with pytest.raises(MessageError, match="surrogate"):
        decode(b'{"reason": "\\udc80", "kind": "io"}', TransferFailed, JSON)
    body = b"\x82\xa6reason\xa3\xed\xb2\x80\xa4kind\xa2io"  # UTF-8-encoded surrogate
    with pytest.raises(MessageError, match="UTF-8"):
        decode(body, TransferFailed)


def test_json_replies_are_strict() -> None:
    """NaN never goes out as JSON (the console's JSON.parse would refuse the reply)."""
    with pytest.raises(ValueError, match="JSON compliant"):
        encode(TransferDone(bytes_moved=1, seconds=float("nan")), JSON)
