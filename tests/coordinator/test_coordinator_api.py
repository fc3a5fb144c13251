"""The coordinator's HTTP API against the real app: auth, input validation, JSON, long-poll."""

from __future__ import annotations

import asyncio
import io
import json

import aiohttp
import msgpack
import pytest

from coordinator_support import (
    ADMIN,
    JOIN,
    Running,
    enroll,
    fake_image,
    ingest,
    register_request,
    stored_text,
)
from rainbowd.core.messages import (
    MAX_BODY,
    ArchiveSource,
    CreateImage,
    CreateJob,
    Heartbeat,
    IngestAssignment,
    IngestDone,
    TransferAssignment,
    to_wire,
)
from rainbowd.lib.client import AdminClient, AgentClient, ApiError
from waiting import wait_until


async def raw(
    url: str,
    method: str,
    path: str,
    body: bytes | io.BytesIO | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, url + path, data=body, headers=headers or {}) as resp,
    ):
        return resp.status, resp.content_type, await resp.read()


def error_of(ctype: str, body: bytes) -> str:
    doc = json.loads(body) if ctype == "application/json" else msgpack.unpackb(body)
    assert set(doc) == {"v", "error"}, doc
    return str(doc["error"])


# --------------------------------------------------------------------------
# enrollment and credentials
# --------------------------------------------------------------------------
async def test_enroll_needs_the_join_token(coord: Running) -> None:
    async with AgentClient(coord.url) as a:
        with pytest.raises(ApiError) as e:
            await a.register(register_request("n1", join=""))
        assert e.value.status == 401 and "join token" in e.value.message
        with pytest.raises(ApiError) as e:
            await a.register(register_request("n1", join="wrong"))
        assert e.value.status == 403 and "join token is wrong" in e.value.message
        reply = await a.register(register_request("n1"))
        assert reply.node_id == "n1" and len(reply.credential) >= 32
        assert reply.heartbeat_interval == 5.0
        assert [p.node_id for p in reply.trust.peers] == ["n1"]
        # only the hash is stored
        assert reply.node_id in stored_text(coord.store)
        assert reply.credential not in stored_text(coord.store)


async def test_agent_endpoints_need_the_node_credential(coord: Running) -> None:
    async with AgentClient(coord.url) as a:
        reply = await a.register(register_request("n1"))
        assert (await a.heartbeat(Heartbeat())).trust_version >= 1
        a.set_credential("n1", "not-the-credential")
        with pytest.raises(ApiError) as e:
            await a.heartbeat(Heartbeat())
        assert e.value.status == 403 and "credential" in e.value.message
        a.set_credential("ghost", reply.credential)
        with pytest.raises(ApiError) as e:
            await a.assignments(0, 0, 0)
        assert e.value.status == 403 and "not enrolled" in e.value.message
    async with AgentClient(coord.url) as anon:
        with pytest.raises(ApiError) as e:
            await anon.heartbeat(Heartbeat())
        assert e.value.status == 401 and "Bearer <node_id>:<credential>" in e.value.message
    status, ctype, body = await raw(
        coord.url, "POST", "/v1/heartbeat", b"\x80", {"Authorization": "Bearer nocolon"}
    )
    assert status == 401 and "<node_id>:<credential>" in error_of(ctype, body)


async def test_node_id_takeover_is_refused(coord: Running) -> None:
    a = await enroll(coord.url, "n1")
    credential = a.credential
    async with AgentClient(coord.url) as intruder:
        with pytest.raises(ApiError) as e:
            await intruder.register(register_request("n1", address="192.0.2.66"))
        assert e.value.status == 409
        assert "already enrolled" in e.value.message and "rbd node remove n1" in e.value.message
        with pytest.raises(ApiError) as e:
            await intruder.register(register_request("n1", join="", credential="guess"))
        assert e.value.status == 403
    # the real node re-registers with its credential and keeps it
    reply = await a.register(register_request("n1", join="", credential=credential))
    assert reply.credential == credential
    nodes = {n.node_id: n for n in coord.coordinator.node_views().nodes}
    assert nodes["n1"].address != "192.0.2.66"
    await a.close()


async def test_register_validates_fields(coord: Running) -> None:
    async with AgentClient(coord.url) as a:
        for req, words in [
            (register_request("bad id!"), "node id"),
            (register_request("n1", holdings=["sha256:xyz"]), "sha256"),
        ]:
            with pytest.raises(ApiError) as e:
                await a.register(req)
            assert e.value.status == 400 and words in e.value.message


async def test_admin_token_required(coord: Running) -> None:
    async with AdminClient(coord.url, "") as anon:
        with pytest.raises(ApiError) as e:
            await anon.nodes()
        assert e.value.status == 401
    async with AdminClient(coord.url, "wrong") as bad:
        with pytest.raises(ApiError) as e:
            await bad.jobs()
        assert e.value.status == 403 and "admin token" in e.value.message
    async with AdminClient(coord.url, ADMIN) as good:
        assert (await good.nodes()).nodes == []
        health = await good.health()
        assert health["status"] == "ok"
    # an agent credential is not an admin token
    a = await enroll(coord.url, "n1")
    status, _, _ = await raw(
        coord.url, "GET", "/v1/nodes", headers={"Authorization": f"Bearer n1:{a.credential}"}
    )
    assert status == 403
    await a.close()


# --------------------------------------------------------------------------
# bad input never crashes
# --------------------------------------------------------------------------
async def test_malformed_bodies_get_4xx_with_a_message(coord: Running) -> None:
    ct = {"Content-Type": "application/msgpack"}
    status, ctype, body = await raw(coord.url, "POST", "/v1/register", b"\xc1\xff garbage", ct)
    assert status == 400 and "not valid msgpack" in error_of(ctype, body)

    wrong_types = to_wire(register_request("n1"))
    wrong_types["ssh_port"] = "twenty-two"
    status, ctype, body = await raw(
        coord.url, "POST", "/v1/register", msgpack.packb(wrong_types), ct
    )
    assert status == 400 and "ssh_port" in error_of(ctype, body)

    old = to_wire(register_request("n1"))
    old["v"] = 99
    status, ctype, body = await raw(coord.url, "POST", "/v1/register", msgpack.packb(old), ct)
    assert status == 400 and "protocol version 99" in error_of(ctype, body)

    status, ctype, body = await raw(
        coord.url, "POST", "/v1/register", io.BytesIO(b"\x00" * (MAX_BODY + 1024)), ct
    )
    assert status == 413 and "too large" in error_of(ctype, body)

    status, ctype, body = await raw(
        coord.url, "POST", "/v1/register", b"x", {"Content-Type": "text/plain"}
    )
    assert status == 400 and "Content-Type" in error_of(ctype, body)

    status, ctype, body = await raw(coord.url, "GET", "/v1/nope")
    assert status == 404 and "no such endpoint" in error_of(ctype, body)
    status, ctype, body = await raw(coord.url, "DELETE", "/v1/register")
    assert status == 405 and "not allowed" in error_of(ctype, body)

    a = await enroll(coord.url, "n1")
    auth = {"Authorization": f"Bearer n1:{a.credential}"}
    status, ctype, body = await raw(coord.url, "GET", "/v1/assignments?cursor=abc", headers=auth)
    assert status == 400 and "cursor" in error_of(ctype, body)
    status, ctype, body = await raw(coord.url, "POST", "/v1/transfers/t-x/done", b"\x80", auth)
    assert status == 400  # {} lacks bytes_moved
    status, ctype, body = await raw(
        coord.url,
        "POST",
        "/v1/transfers/t-nope/done",
        msgpack.packb({"bytes_moved": 1, "seconds": 1.0}),
        auth,
    )
    # a late report for a transfer nobody knows (e.g. from before a restart) is harmless
    assert status == 204
    # still alive
    assert (await a.heartbeat(Heartbeat())).trust_version >= 1
    await a.close()


async def test_admin_api_speaks_json(coord: Running) -> None:
    origin = await enroll(coord.url, "origin", roles=["origin"])
    hdr = {"Authorization": f"Bearer {ADMIN}", "Accept": "application/json"}
    status, ctype, body = await raw(coord.url, "GET", "/v1/nodes", headers=hdr)
    assert status == 200 and ctype == "application/json"
    assert json.loads(body)["nodes"][0]["node_id"] == "origin"

    req = {"ref": "x/y:1", "source": {"kind": "archive", "path": "/tmp/y.tar"}}
    hdr2 = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}
    status, ctype, body = await raw(coord.url, "POST", "/v1/images", json.dumps(req).encode(), hdr2)
    assert status == 201 and ctype == "application/json"
    assert json.loads(body)["state"] == "ingesting" and json.loads(body)["origin"] == "origin"

    status, ctype, body = await raw(coord.url, "POST", "/v1/jobs", b"{not json", hdr2)
    assert status == 400 and ctype == "application/json" and "JSON" in error_of(ctype, body)

    status, ctype, body = await raw(coord.url, "GET", "/v1/images/x/y:1", headers=hdr)
    assert status == 200 and json.loads(body)["ref"] == "x/y:1"
    status, ctype, body = await raw(
        coord.url, "GET", "/v1/health", headers={"Accept": "application/json"}
    )
    assert status == 200 and json.loads(body)["nodes"] == 1
    await origin.close()


async def test_a_get_without_a_preference_answers_json(coord: Running) -> None:
    """``curl http://HOST:7700/v1/health`` (Accept: */*) reads as JSON; rbd's clients
    ask for msgpack and get it; a msgpack body without Accept is answered in msgpack."""
    for accept in ({}, {"Accept": "*/*"}):
        status, ctype, body = await raw(coord.url, "GET", "/v1/health", headers=accept)
        assert status == 200 and ctype == "application/json", (accept, ctype)
        assert json.loads(body)["status"] == "ok"
    status, ctype, body = await raw(coord.url, "GET", "/v1/nodes", headers={"Accept": "*/*"})
    assert status == 401 and ctype == "application/json" and "admin token" in error_of(ctype, body)
    admin_curl = {"Authorization": f"Bearer {ADMIN}", "Accept": "*/*"}
    status, ctype, body = await raw(coord.url, "GET", "/v1/nodes", headers=admin_curl)
    assert status == 200 and ctype == "application/json" and json.loads(body)["nodes"] == []

    status, ctype, body = await raw(
        coord.url, "GET", "/v1/health", headers={"Accept": "application/msgpack"}
    )
    assert ctype == "application/msgpack" and msgpack.unpackb(body)["status"] == "ok"
    status, ctype, body = await raw(
        coord.url,
        "POST",
        "/v1/register",
        msgpack.packb(to_wire(register_request("n1"))),
        {"Content-Type": "application/msgpack"},
    )
    assert status == 200 and ctype == "application/msgpack" and msgpack.unpackb(body)["credential"]


# --------------------------------------------------------------------------
# images and jobs: refusals
# --------------------------------------------------------------------------
async def test_image_and_job_refusals(coord: Running, admin: AdminClient) -> None:
    src = ArchiveSource(path="/srv/a.tar")
    with pytest.raises(ApiError) as e:
        await admin.add_image(CreateImage(ref="a:1", source=src))
    assert e.value.status == 400 and "no node with the origin role" in e.value.message
    o1 = await enroll(coord.url, "o1", roles=["origin"])
    o2 = await enroll(coord.url, "o2", roles=["origin"])
    with pytest.raises(ApiError) as e:
        await admin.add_image(CreateImage(ref="a:1", source=src))
    assert e.value.status == 400 and "o1" in e.value.message and "o2" in e.value.message
    with pytest.raises(ApiError) as e:
        await admin.add_image(CreateImage(ref="a:1", source=src, origin="nobody"))
    assert e.value.status == 400
    view = await admin.add_image(CreateImage(ref="a:1", source=src, origin="o2"))
    assert view.origin == "o2"
    with pytest.raises(ApiError) as e:
        await admin.add_image(CreateImage(ref="a:1", source=src, origin="o2"))
    assert e.value.status == 409

    with pytest.raises(ApiError) as e:
        await admin.create_job(CreateJob(image="a:1", targets=["all"]))
    assert e.value.status == 409 and "ingesting" in e.value.message
    with pytest.raises(ApiError) as e:
        await admin.create_job(CreateJob(image="zzz:9", targets=["all"]))
    assert e.value.status == 404
    with pytest.raises(ApiError) as e:
        await admin.image("zzz:9")
    assert e.value.status == 404 and "a:1" in e.value.message

    # ingest reported by the wrong node is refused; a bad report fails the image
    img = fake_image("a:1")
    batch = await o2.assignments(0, 0, 0)
    (ingest_a,) = [a for a in batch.assignments if isinstance(a, IngestAssignment)]
    with pytest.raises(ApiError) as e:
        await o1.ingest_done(
            ingest_a.ingest_id, IngestDone(image=img.record, manifests=img.manifests)
        )
    assert e.value.status == 403
    with pytest.raises(ApiError) as e:
        await o2.ingest_done(
            ingest_a.ingest_id, IngestDone(image=img.record, manifests=img.manifests[:1])
        )
    assert e.value.status == 400 and "no chunk manifest for layer 1" in e.value.message
    failed = await admin.image("a:1")
    assert failed.state == "failed" and "layer 1" in failed.error

    # a failed image can be added again; a job naming an unknown node is refused by name
    await admin.add_image(CreateImage(ref="a:1", source=src, origin="o2"))
    batch = await o2.assignments(0, 0, 0)
    again = [a for a in batch.assignments if isinstance(a, IngestAssignment)][-1]
    await o2.ingest_done(again.ingest_id, IngestDone(image=img.record, manifests=img.manifests))
    assert (await admin.image("a:1")).state == "ready"
    assert (await admin.image("a:1")).nodes == ["o2"]
    with pytest.raises(ApiError) as e:
        await admin.create_job(CreateJob(image="a:1", targets=["o1", "nodeX"]))
    assert e.value.status == 400 and "nodeX" in e.value.message
    with pytest.raises(ApiError) as e:
        await admin.create_job(CreateJob(image="a:1", targets=[]))
    assert e.value.status == 400
    await o1.close()
    await o2.close()


# --------------------------------------------------------------------------
# long-poll wake-ups (their latency is measured in bench/, not here)
# --------------------------------------------------------------------------
def parked(coord: Running, node_id: str) -> bool:
    """A long-poll of ``node_id`` is waiting in the coordinator right now."""
    return coord.coordinator.cluster.nodes[node_id].polls > 0


async def test_long_poll_wakes_promptly_on_a_new_assignment(
    coord: Running, admin: AdminClient
) -> None:
    origin = await enroll(coord.url, "origin", roles=["origin"], speed=100e6)
    node = await enroll(coord.url, "n1")
    img = fake_image()
    await ingest(admin, origin, img)
    first = await node.assignments(0, 0, 0)  # trust list catch-up
    trust_version = first.trust.version if first.trust else 0

    # nothing to do: the poll parks until its wait is over, then returns the same cursor
    empty_poll = asyncio.create_task(node.assignments(first.cursor, trust_version, 0.3))
    await wait_until(lambda: parked(coord, "n1"), timeout=5, what="n1's poll to park")
    assert not empty_poll.done()
    empty = await asyncio.wait_for(empty_poll, 5.0)
    assert empty.assignments == [] and empty.cursor == first.cursor and empty.trust is None

    # a poll of 20 s is woken by the job, long before its wait is over
    waiter = asyncio.create_task(node.assignments(first.cursor, trust_version, 20.0))
    await wait_until(lambda: parked(coord, "n1"), timeout=5, what="n1's poll to park")
    assert not waiter.done()
    await admin.create_job(CreateJob(image=img.record.ref, targets=["n1"]))
    batch = await asyncio.wait_for(waiter, 5.0)
    (t,) = batch.assignments
    assert isinstance(t, TransferAssignment)
    assert t.seeder.node_id == "origin" and t.layer == img.manifests[0]
    assert batch.cursor > first.cursor
    # the cursor acknowledges: polling again with it returns nothing new
    again = await node.assignments(batch.cursor, trust_version, 0)
    assert again.assignments == []
    # acknowledged assignments are dropped, even for a poll with an old cursor
    assert (await node.assignments(first.cursor, trust_version, 0)).assignments == []
    await origin.close()
    await node.close()


async def test_long_poll_wakes_on_trust_change(coord: Running) -> None:
    n1 = await enroll(coord.url, "n1")
    first = await n1.assignments(0, 0, 0)
    assert first.trust is not None
    waiter = asyncio.create_task(n1.assignments(first.cursor, first.trust.version, 20.0))
    await wait_until(lambda: parked(coord, "n1"), timeout=5, what="n1's poll to park")
    n2 = await enroll(coord.url, "n2")
    batch = await asyncio.wait_for(waiter, 5.0)  # woken: its 20 s wait is far from over
    assert batch.trust is not None and batch.trust.version > first.trust.version
    assert [p.node_id for p in batch.trust.peers] == ["n1", "n2"]
    assert JOIN not in str(batch)
    await n1.close()
    await n2.close()
