"""Bounded everything, coordinator side (issue 14, item 5).

Security events per node (a token bucket on the coordinator's clock), the
size of the event log and of one page of it, the holdings a heartbeat may
list (and digests of no known layer, ignored), and the HTTP server's idle,
header and body timeouts. Each limit is in README ("Limits").
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from door_support import ADMIN, Door, FakeClock, open_door, strict_json

from coordinator_support import fake_image, ingest, register_request
from rainbowd.coordinator.limits import (
    EVENT_BURST,
    EVENT_RATE_PER_S,
    EVENTS_PAGE_DEFAULT,
    EVENTS_PAGE_MAX,
    EventBudget,
)
from rainbowd.core.messages import MSGPACK
from rainbowd.core.wirebounds import MAX_HOLDINGS
from rainbowd.lib.client import AdminClient, AgentClient
from waiting import wait_until

D_UNKNOWN = "sha256:" + "e" * 64


# --------------------------------------------------------------------------
# security events: rate, size, stored count, pages
# --------------------------------------------------------------------------
def test_event_budget_is_a_token_bucket_on_the_given_clock() -> None:
    clock = FakeClock()
    budget = EventBudget(clock)
    assert all(budget.take("n1") for _ in range(EVENT_BURST))
    assert not budget.take("n1") and not budget.take("n1")
    assert budget.refused_in_a_row("n1") == 2
    assert budget.retry_after("n1") == pytest.approx(1 / EVENT_RATE_PER_S)
    assert budget.take("n2")  # each node has its own bucket
    clock.now += 1 / EVENT_RATE_PER_S
    assert budget.take("n1") and not budget.take("n1")
    assert budget.refused_in_a_row("n1") == 1
    clock.now += 10_000  # refills to the burst, no further
    assert sum(budget.take("n1") for _ in range(EVENT_BURST + 5)) == EVENT_BURST


async def test_a_node_flooding_security_events_gets_429_and_stores_nothing_more(
    door: Door, clock: FakeClock
) -> None:
    auth = await door.enroll("n1")
    event = {"kind": "client_key_refused", "peer": "ghost", "detail": "refused"}
    for _ in range(EVENT_BURST):
        status, body = await door.send("POST", "/v1/events", event, auth=auth, ctype=MSGPACK)
        assert status in (204, 403), body  # 403: a report without evidence (issue 14 item 1)
    stored = door.store.security_event_count()
    for _ in range(5):
        status, body = await door.send("POST", "/v1/events", event, auth=auth, ctype=MSGPACK)
        assert status == 429, body
        assert "not recorded" in strict_json(body)["error"]
    assert door.store.security_event_count() == stored
    other = await door.enroll("n2")  # another node is not affected
    status, _ = await door.send("POST", "/v1/events", event, auth=other, ctype=MSGPACK)
    assert status in (204, 403)
    clock.now += 1 / EVENT_RATE_PER_S
    status, _ = await door.send("POST", "/v1/events", event, auth=auth, ctype=MSGPACK)
    assert status in (204, 403)


async def test_a_security_event_over_the_size_limit_is_refused(door: Door) -> None:
    auth = await door.enroll("n1")
    event = {"kind": "bad_chunk", "peer": "ghost", "detail": "x" * 4097}
    status, body = await door.send("POST", "/v1/events", event, auth=auth, ctype=MSGPACK)
    assert status == 400 and "$.detail" in strict_json(body)["error"]
    assert door.store.security_event_count() == 0


def test_the_event_log_keeps_only_the_newest_rows(tmp_path: Path) -> None:
    from rainbowd.coordinator.state.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "c.sqlite")
    for i in range(8):
        store.add_security_event("n1", "n2", "bad_chunk", f"e{i}", keep=5)
    assert [d for *_, d in store.security_events()] == [f"e{i}" for i in range(3, 8)]
    store.add_security_event("n1", "n2", "transfer_verify", "x" * 70_000)  # a long reason
    assert len(store.security_events()[-1][4]) == 4096
    store.close()


async def test_security_events_are_paginated(door: Door) -> None:
    for i in range(250):
        door.store.add_security_event("n1", "n2", "bad_chunk", f"e{i}")
    page = await door.admin_get("/v1/security-events")  # the newest page, oldest first
    assert page["total"] == 250 and len(page["events"]) == EVENTS_PAGE_DEFAULT
    assert [e["detail"] for e in page["events"]][-1] == "e249"
    assert page["events"][0]["detail"] == f"e{250 - EVENTS_PAGE_DEFAULT}"
    seen: list[str] = []
    after = 0
    while True:
        page = await door.admin_get(f"/v1/security-events?after={after}&limit=120")
        seen += [e["detail"] for e in page["events"]]
        if not page["more"]:
            break
        after = page["events"][-1]["id"]
    assert seen == [f"e{i}" for i in range(250)]
    for query, words in [
        (f"limit={EVENTS_PAGE_MAX + 1}", "after="),
        ("limit=abc", "must be an integer in 0.."),
        ("after=-1", "must be an integer in 0.."),
        ("after=1.5", "must be an integer in 0.."),
        ("after=99999999999999999999", "must be an integer in 0.."),  # was a 500 (SQLite)
        (f"after={2**53 + 1}", "must be at most"),
    ]:
        status, body = await door.send(
            "GET", f"/v1/security-events?{query}", auth=f"Bearer {ADMIN}"
        )
        assert status == 400 and words in strict_json(body)["error"], body


async def test_the_cli_events_command_reads_one_page(door: Door) -> None:
    for i in range(150):
        door.store.add_security_event("n1", "n2", "bad_chunk", f"event-{i}")
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "rbd"),
        "--coordinator",
        door.url,
        "events",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "RBD_ADMIN_TOKEN": ADMIN},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, err
    assert "event-149" in text and "event-49 " not in text
    assert f"the newest {EVENTS_PAGE_DEFAULT} of 150" in text


# --------------------------------------------------------------------------
# holdings
# --------------------------------------------------------------------------
@pytest.fixture
async def with_image(door: Door) -> AsyncIterator[tuple[Door, list[str]]]:
    origin = AgentClient(door.url)
    await origin.open()
    await origin.register(register_request("origin", roles=["origin"], speed=1e8))
    img = fake_image(sizes=(70_000,))
    async with AdminClient(door.url, ADMIN) as admin:
        await ingest(admin, origin, img)
    await origin.close()
    yield door, img.digests


async def test_holdings_of_no_known_layer_are_ignored_not_stored(
    with_image: tuple[Door, list[str]],
) -> None:
    door, digests = with_image
    made_up = [f"sha256:{i:064x}" for i in range(1000)]
    auth = await door.enroll("n1", holdings=[made_up[0], digests[0]])
    status, body = await door.send(
        "POST", "/v1/heartbeat", {"holdings": [*made_up, digests[0]]}, auth=auth, ctype=MSGPACK
    )
    assert status == 200, body
    assert door.coordinator.cluster.nodes["n1"].holdings == {digests[0]}
    assert door.coordinator.scheduler.holders(made_up[0]) == []
    db = door.state_dir / "coordinator.sqlite"
    (row,) = sqlite3.connect(db).execute("SELECT body FROM nodes WHERE node_id='n1'").fetchone()
    assert made_up[0] not in row and digests[0] in row


async def test_a_heartbeat_over_the_holdings_limit_is_refused(door: Door) -> None:
    auth = await door.enroll("n1")
    too_many = [D_UNKNOWN] * (MAX_HOLDINGS + 1)
    status, body = await door.send(
        "POST", "/v1/heartbeat", {"holdings": too_many}, auth=auth, ctype=MSGPACK
    )
    assert status == 400 and "$.holdings" in strict_json(body)["error"]
    status, body = await door.send(
        "POST", "/v1/heartbeat", {"holdings": ["sha256:nothex"]}, auth=auth, ctype=MSGPACK
    )
    assert status == 400 and "not sha256 digests" in strict_json(body)["error"]


# --------------------------------------------------------------------------
# the HTTP server's timeouts (real sockets; the tests wait for the close, not for seconds)
# --------------------------------------------------------------------------
SHORT = 0.5


@pytest.fixture
async def quick(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Door]:
    d = await open_door(tmp_path / "quick", clock, keepalive_timeout=SHORT, body_timeout=SHORT)
    yield d
    await d.stop()


async def _closed(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes; fails if it keeps the connection 20 s."""
    return await asyncio.wait_for(reader.read(), 20)


async def test_an_idle_connection_is_closed(quick: Door) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", quick.port)
    try:
        assert await _closed(reader) == b""
    finally:
        writer.close()


async def test_a_half_sent_request_header_is_closed(quick: Door) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", quick.port)
    try:
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: test\r\nX-Slow: ")
        await writer.drain()
        assert await _closed(reader) == b""
    finally:
        writer.close()


async def test_a_kept_alive_connection_is_closed_when_idle(quick: Door) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", quick.port)
    try:
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: test\r\nAccept: application/json\r\n\r\n")
        await writer.drain()
        data = await _closed(reader)
        assert data.startswith(b"HTTP/1.1 200") and b'"status": "ok"' in data
    finally:
        writer.close()


async def test_a_half_sent_body_is_answered_408_and_closed(quick: Door) -> None:
    auth = await quick.enroll("n1")
    reader, writer = await asyncio.open_connection("127.0.0.1", quick.port)
    try:
        writer.write(
            b"POST /v1/heartbeat HTTP/1.1\r\nHost: test\r\nAccept: application/json\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n"
            b"Authorization: " + auth.encode() + b'\r\n\r\n{"load": '
        )
        await writer.drain()
        data = await _closed(reader)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), data
    assert "not received within" in strict_json(body)["error"]


async def test_a_client_gone_mid_body_is_no_internal_error(quick: Door) -> None:
    """An agent that drops its connection mid-request (its own timeout, under load) is logged
    as gone; before, the lab's coordinator logged each as an "internal error" traceback."""
    import structlog

    auth = await quick.enroll("n1")
    with structlog.testing.capture_logs() as logs:
        _reader, writer = await asyncio.open_connection("127.0.0.1", quick.port)
        writer.write(
            b"POST /v1/heartbeat HTTP/1.1\r\nHost: test\r\nAccept: application/json\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n"
            b"Authorization: " + auth.encode() + b'\r\n\r\n{"load": '
        )
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        await wait_until(  # the handler sees the reset when the read fails
            lambda: any(e["event"] in ("client gone", "internal error") for e in logs),
            timeout=10,
            what="the coordinator to log the dropped request",
        )
    events = [e["event"] for e in logs]
    assert "client gone" in events and "internal error" not in events, events
