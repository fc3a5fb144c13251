"""POST /v1/pulls: a front door's miss becomes a pull job, and nodes pulling together share it.

A real coordinator over HTTP on both state backends; the agents are played
with AgentClient (coordinator/pulls.py says what must happen).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator_support import ADMIN, Running, enroll, fake_image, ingest, poll, start
from rainbowd.core.messages import (
    ArchiveSource,
    CreateImage,
    Heartbeat,
    IngestAssignment,
    LoadAssignment,
    PullRequest,
    RegistrySource,
    ResolveTag,
    TaskFailed,
    TransferAssignment,
    TransferDone,
)
from rainbowd.lib.client import AdminClient, ApiError


async def test_nodes_pulling_the_same_image_share_one_pull_job(
    coord: Running, admin: AdminClient
) -> None:
    origin = await enroll(coord.url, "origin", roles=["origin"])
    img = fake_image(sizes=(70_000,))
    await ingest(admin, origin, img)
    a = await enroll(coord.url, "a", docker=True, mirror=True)
    b = await enroll(coord.url, "b", mirror=True)
    first = await a.pull(PullRequest(image=img.record.ref))
    second = await b.pull(PullRequest(image=img.record.ref))
    assert (first.state, second.state) == ("joined", "joined")
    assert first.job_id == second.job_id and first.image == img.record
    again = await a.pull(PullRequest(image=img.record.ref))  # a client retrying
    assert (again.state, again.job_id) == ("joined", first.job_id)
    job = await admin.job(first.job_id)
    assert job.pull and sorted(n.node_id for n in job.nodes) == ["a", "b"]
    assert len((await admin.jobs()).jobs) == 1

    # both are fed by the normal scheduler; a pull job loads nothing into an engine (the
    # client pulling through the front door is the engine), even on a's Docker node
    for node in (a, b, a, b):
        for t in [x for x in await poll(node) if isinstance(x, TransferAssignment)]:
            await node.transfer_done(t.transfer_id, TransferDone(bytes_moved=1, seconds=0.1))
    done = await admin.job(first.job_id)
    assert done.state == "done", done
    assert not [x for x in await poll(a) if isinstance(x, LoadAssignment)]

    # now a holds it: its next pull is served at once, with the record to serve
    held = await a.pull(PullRequest(image=img.record.ref))
    assert (held.state, held.job_id, held.image) == ("held", "", img.record)
    # a pull after the job ended starts the next one
    c = await enroll(coord.url, "c", mirror=True)
    later = await c.pull(PullRequest(image=img.record.ref))
    assert later.state == "joined" and later.job_id != first.job_id
    for client in (origin, a, b, c):
        await client.close()


async def test_unknown_and_ingesting_images(coord: Running, admin: AdminClient) -> None:
    origin = await enroll(coord.url, "origin", roles=["origin"])
    n = await enroll(coord.url, "n", mirror=True)
    with pytest.raises(ApiError) as e:
        await n.pull(PullRequest(image="nobody/knows:1"))
    assert e.value.status == 404 and "nobody/knows:1" in str(e.value) and "n pulls" in str(e.value)
    await admin.add_image(CreateImage(ref="app:2", source=ArchiveSource(path="/srv/app.tar")))
    reply = await n.pull(PullRequest(image="app:2"))
    assert (reply.state, reply.job_id, reply.image) == ("ingesting", "", None)
    assert not (await admin.jobs()).jobs
    for client in (origin, n):
        await client.close()


async def test_a_pull_job_stays_a_pull_job_across_a_restart(tmp_path: Path) -> None:
    r = await start(tmp_path)
    try:
        async with AdminClient(r.url, ADMIN) as admin:
            origin = await enroll(r.url, "origin", roles=["origin"])
            img = fake_image(sizes=(70_000,))
            await ingest(admin, origin, img)
            n = await enroll(r.url, "n", mirror=True)
            job_id = (await n.pull(PullRequest(image=img.record.ref))).job_id
            for client in (origin, n):
                await client.close()
    finally:
        await r.stop()
    r2 = await start(tmp_path)
    try:
        async with AdminClient(r2.url, ADMIN) as admin:
            assert (await admin.job(job_id)).pull
    finally:
        await r2.stop()


async def test_a_tag_no_image_has_is_added_once_on_demand(tmp_path: Path) -> None:
    """POST /v1/tags/resolve of a new tag on an on-demand upstream: one image, read once."""
    upstreams = {
        "docker.io": {"upstream": "up.example:5000", "insecure": True},
        "closed.example": {"upstream": "closed.example", "on_demand": False},
    }
    r = await start(tmp_path, upstreams=upstreams)
    try:
        async with AdminClient(r.url, ADMIN) as admin:
            origin = await enroll(r.url, "origin", roles=["origin"])
            await origin.heartbeat(Heartbeat())
            a = await enroll(r.url, "a", mirror=True)
            b = await enroll(r.url, "b", mirror=True)
            ask = ResolveTag(registry="docker.io", repository="team/app", tag="v2")
            first = await a.resolve_tag(ask, timeout=5)
            second = await b.resolve_tag(ask, timeout=5)
            assert (first.state, first.ref, first.digest) == (
                "ingesting",
                "docker.io/team/app:v2",
                "",
            )
            assert second == first  # the same image: not added twice
            [image] = (await admin.images()).images
            assert image.ref == first.ref and image.state == "ingesting"
            assert "up.example:5000/team/app:v2" in image.source
            [task] = [t for t in await poll(origin) if isinstance(t, IngestAssignment)]
            assert isinstance(task.source, RegistrySource) and task.source.insecure
            assert task.source.reference == "up.example:5000/team/app:v2"
            # the read fails: for a while, pulls of the tag are 404s (the upstream is not
            # asked again by every pull of a bad tag)
            await origin.ingest_failed(task.ingest_id, TaskFailed(reason="manifest unknown"))
            with pytest.raises(ApiError) as e:
                await a.resolve_tag(ask, timeout=5)
            assert e.value.status == 404
            # an upstream whose entry says on_demand = false adds nothing
            closed = ResolveTag(registry="closed.example", repository="x", tag="1")
            with pytest.raises(ApiError) as e:
                await a.resolve_tag(closed, timeout=5)
            assert e.value.status == 404
            assert len((await admin.images()).images) == 1
            for client in (origin, a, b):
                await client.close()
    finally:
        await r.stop()
