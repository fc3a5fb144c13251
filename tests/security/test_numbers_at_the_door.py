"""Every number, string and header is checked at the door (issue 14, item 3).

A hostile or broken node sends NaN, infinities, huge integers, lone
surrogates or non-ASCII Authorization bytes: each is refused with a 4xx that
names the field, nothing of it is stored, every JSON answer stays strict
JSON, and the coordinator restarts on the same state.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from door_support import ADMIN, Door, open_door, strict_json

from coordinator_support import register_request
from rainbowd.core.messages import JSON, MSGPACK, CreateOp, RunOp, to_wire

NAN = float("nan")
INF = float("inf")
D1 = "sha256:" + "a" * 64


def reg(node_id: str, **fields: Any) -> dict[str, Any]:
    doc = to_wire(register_request(node_id))
    doc.update(fields)
    return doc


# (what, path, body, content type, words the 400 must contain)
AGENT_CASES: list[tuple[str, str, dict[str, Any], str, str]] = [
    ("NaN load", "/v1/heartbeat", {"load": NAN}, MSGPACK, "$.load"),
    ("negative disk", "/v1/heartbeat", {"disk_used": -1}, MSGPACK, "$.disk_used"),
    ("huge disk_free", "/v1/heartbeat", {"disk_free": 10**30}, JSON, "$.disk_free"),
    (
        "inf rate in a heartbeat",
        "/v1/heartbeat",
        {
            "active": [
                {
                    "transfer_id": "t-1",
                    "layer": D1,
                    "seeder": "n2",
                    "bytes_done": 1,
                    "bytes_total": 2,
                    "rate_bps": INF,
                }
            ]
        },
        MSGPACK,
        "$.active[0].rate_bps",
    ),
    (
        "inf rate_bps",
        "/v1/transfers/t-1/progress",
        {"bytes_done": 1, "bytes_total": 2, "rate_bps": INF},
        MSGPACK,
        "$.rate_bps",
    ),
    (
        "NaN seconds",
        "/v1/transfers/t-1/done",
        {"bytes_moved": 1, "seconds": NAN},
        MSGPACK,
        "$.seconds",
    ),
    (
        "-inf load seconds",
        "/v1/loads/l-1/done",
        {"seconds": -INF, "layers_sent": 1},
        MSGPACK,
        "$.seconds",
    ),
    (
        "huge exit code",
        "/v1/ops/o-1/result",
        {"ok": True, "summary": "x", "exit_code": 2**40},
        MSGPACK,
        "$.exit_code",
    ),
    (
        "long security event",
        "/v1/events",
        {"kind": "bad_chunk", "peer": "n2", "detail": "x" * 5000},
        MSGPACK,
        "$.detail",
    ),
    (
        "lone surrogate",
        "/v1/events",
        {"kind": "bad_chunk", "peer": "\udc80", "detail": ""},
        JSON,
        "surrogate",
    ),
]


@pytest.mark.parametrize(
    ("what", "path", "doc", "ctype", "words"), AGENT_CASES, ids=[c[0] for c in AGENT_CASES]
)
async def test_agent_reports_with_bad_values_are_refused(
    door: Door, what: str, path: str, doc: dict[str, Any], ctype: str, words: str
) -> None:
    auth = await door.enroll("n1")
    status, body = await door.send("POST", path, doc, auth=auth, ctype=ctype)
    assert status == 400, (what, status, body)
    assert words in strict_json(body)["error"], body
    nodes = await door.admin_get("/v1/nodes")
    (n1,) = nodes["nodes"]
    assert n1["load"] == 0.0 and n1["disk_free"] == 0 and n1["disk_used"] == 0


REGISTER_CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("NaN speed hint", {"speed_hint_bps": NAN}, MSGPACK, "$.speed_hint_bps"),
    ("inf upload cap", {"max_upload_bps": INF}, MSGPACK, "$.max_upload_bps"),
    ("huge disk_free", {"disk_free": 10**30}, JSON, "$.disk_free"),
    ("port out of range", {"ssh_port": 70_000}, MSGPACK, "$.ssh_port"),
    ("label with a lone surrogate", {"labels": {"rack": "\udc80"}}, JSON, "surrogate"),
    ("too many labels", {"labels": {f"k{i}": "v" for i in range(65)}}, MSGPACK, "$.labels"),
    ("long address", {"address": "a" * 300}, MSGPACK, "$.address"),
    ("too many holdings", {"holdings": [D1] * 20_001}, MSGPACK, "$.holdings"),
]


@pytest.mark.parametrize(
    ("what", "fields", "ctype", "words"), REGISTER_CASES, ids=[c[0] for c in REGISTER_CASES]
)
async def test_registration_with_bad_values_is_refused_and_not_stored(
    door: Door, what: str, fields: dict[str, Any], ctype: str, words: str
) -> None:
    status, body = await door.send("POST", "/v1/register", reg("evil", **fields), ctype=ctype)
    assert status == 400, (what, status, body)
    assert words in strict_json(body)["error"], body
    # nothing half-written: the node is not enrolled, not stored, and the coordinator restarts
    assert (await door.admin_get("/v1/nodes"))["nodes"] == []
    await door.stop()
    again = await open_door(door.state_dir, door.clock)
    try:
        assert (await again.admin_get("/v1/nodes"))["nodes"] == []
    finally:
        await again.stop()


async def test_admin_requests_with_bad_values_are_refused(door: Door) -> None:
    admin = f"Bearer {ADMIN}"
    op = to_wire(CreateOp(op=RunOp(image="app:1"), targets=["all"]))
    op["op"]["wait"] = NAN
    cases: list[tuple[str, dict[str, Any], str, str]] = [
        ("/v1/ops", op, MSGPACK, "$.op.wait"),
        ("/v1/jobs", {"image": "app:1", "targets": ["n"] * 10_001}, MSGPACK, "$.targets"),
        (
            "/v1/images",
            {"ref": "r" * 5000, "source": {"kind": "archive", "path": "/a"}},
            JSON,
            "$.ref",
        ),
        (
            "/v1/images",
            {"ref": "app:1", "source": {"kind": "archive", "path": "\ud800"}},
            JSON,
            "not valid JSON",
        ),
    ]
    for path, doc, ctype, words in cases:
        status, body = await door.send("POST", path, doc, auth=admin, ctype=ctype)
        assert status == 400, (path, body)
        assert words in strict_json(body)["error"], body
    assert (await door.admin_get("/v1/images"))["images"] == []
    assert (await door.admin_get("/v1/ops"))["ops"] == []


async def _raw_request(port: int, method: bytes, path: bytes, auth: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            method + b" " + path + b" HTTP/1.1\r\nHost: test\r\nAccept: application/json\r\n"
            b"Content-Length: 0\r\nConnection: close\r\nAuthorization: " + auth + b"\r\n\r\n"
        )
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


@pytest.mark.parametrize(
    "auth",
    [b"Bearer \xff\xfe", b"Bearer n1:\xff\xfe", b"Bearer \xc3\xa9t\xc3\xa9", b"Bearer n1:\xc3\xa9"],
    ids=["latin1", "node-latin1", "utf8", "node-utf8"],
)
async def test_non_ascii_authorization_is_401_never_500(door: Door, auth: bytes) -> None:
    await door.enroll("n1")
    for method, path in [
        (b"GET", b"/v1/nodes"),
        (b"POST", b"/v1/heartbeat"),
        (b"GET", b"/metrics"),
    ]:
        status, body = await _raw_request(door.port, method, path, auth)
        assert status == 401, (path, status, body)
        if path != b"/metrics":  # /metrics answers in plain text
            assert "not ASCII" in strict_json(body)["error"]


async def test_json_answers_stay_strict_after_hostile_reports(door: Door) -> None:
    """The console's data (nodes, jobs, events, images) parses as strict JSON after each."""
    auth = await door.enroll("n1", speed=1e8)
    for doc, ctype in [
        ({"load": NAN}, MSGPACK),
        ({"load": INF}, MSGPACK),
        ({"disk_free": 2**64}, JSON),
    ]:
        await door.send("POST", "/v1/heartbeat", doc, auth=auth, ctype=ctype)
        for path in ("/v1/nodes", "/v1/jobs", "/v1/security-events", "/v1/images", "/v1/ops"):
            await door.admin_get(path)
    status, body = await door.send("GET", "/v1/health")
    assert status == 200 and strict_json(body)["status"] == "ok"
