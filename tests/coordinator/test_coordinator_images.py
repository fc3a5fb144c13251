"""Image sources, compression, removal, layer sharing across images and job byte accounting.

Fake agents play the protocol against the real coordinator app (no SSH, no
Docker), as in test_coordinator_flow.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from coordinator_support import ADMIN, FakeImage, Running, enroll, fake_image, start
from rainbowd.core.messages import (
    ArchiveSource,
    Assignment,
    CreateImage,
    CreateJob,
    DockerEngineSource,
    Heartbeat,
    ImageSource,
    IngestAssignment,
    IngestDone,
    LoadAssignment,
    LoadDone,
    OciLayoutSource,
    RegistrySource,
    TaskFailed,
    TransferAssignment,
    TransferDone,
)
from rainbowd.lib.client import AdminClient, AgentClient, ApiError


class Agent:
    """A fake agent: an AgentClient plus its assignment cursor."""

    def __init__(self, client: AgentClient) -> None:
        self.c = client
        self.cursor = 0

    async def take(self) -> list[Assignment]:
        batch = await self.c.assignments(self.cursor, 10**9, 0.0)
        self.cursor = batch.cursor
        return batch.assignments

    async def transfers(self) -> list[TransferAssignment]:
        return [a for a in await self.take() if isinstance(a, TransferAssignment)]

    async def ingests(self) -> list[IngestAssignment]:
        return [a for a in await self.take() if isinstance(a, IngestAssignment)]

    async def done(self, t: TransferAssignment, bytes_moved: int | None = None) -> None:
        moved = t.layer.size if bytes_moved is None else bytes_moved
        await self.c.transfer_done(t.transfer_id, TransferDone(bytes_moved=moved, seconds=0.01))


async def agent(url: str, node_id: str, **kw: object) -> Agent:
    return Agent(await enroll(url, node_id, **kw))


def with_uncompressed(img: FakeImage, factor: int = 3) -> FakeImage:
    layers = [
        msgspec.structs.replace(lr, uncompressed_size=lr.size * factor) for lr in img.record.layers
    ]
    return FakeImage(msgspec.structs.replace(img.record, layers=layers), img.manifests)


def sharing_images() -> tuple[FakeImage, FakeImage]:
    """Two images with the same base layer and one layer of their own each."""
    a = with_uncompressed(fake_image("app-a:1", sizes=(200_000, 60_000)))
    other = with_uncompressed(fake_image("app-b:1", sizes=(10_000, 90_000)))
    b = FakeImage(
        msgspec.structs.replace(other.record, layers=[a.record.layers[0], other.record.layers[1]]),
        [a.manifests[0], other.manifests[1]],
    )
    return a, b


async def add_and_ingest(
    admin: AdminClient,
    origin: Agent,
    img: FakeImage,
    source: ImageSource | None = None,
    **kw: object,
) -> IngestAssignment:
    src = source or ArchiveSource(path=f"/srv/{img.record.ref.replace(':', '_')}.tar")
    view = await admin.add_image(CreateImage(ref=img.record.ref, source=src, **kw))  # type: ignore[arg-type]
    assert view.state == "ingesting"
    (ia,) = await origin.ingests()
    assert ia.ref == img.record.ref and ia.source == src
    await origin.c.ingest_done(ia.ingest_id, IngestDone(image=img.record, manifests=img.manifests))
    await origin.c.heartbeat(Heartbeat(holdings=sorted(set(img.digests))))
    return ia


# --------------------------------------------------------------------------
# sources and compression
# --------------------------------------------------------------------------
async def test_source_and_compression_reach_the_origin_and_survive_a_restart(
    tmp_path: Path,
) -> None:
    r = await start(tmp_path)
    async with AdminClient(r.url, ADMIN) as admin:
        origin = await agent(r.url, "origin", roles=["origin"])
        src = OciLayoutSource(path="/srv/layouts/app", tag="1.0")
        view = await admin.add_image(CreateImage(ref="app:1", source=src, compression="zstd"))
        assert view.source == "oci:/srv/layouts/app:1.0" and view.state == "ingesting"
        (ia,) = await origin.ingests()
        assert ia.source == src and ia.compression == "zstd"
        assert ia.chunk_size == r.coordinator.chunk_size

        # the default stays off; a docker: source is described as it was written
        await admin.add_image(CreateImage(ref="eng:1", source=DockerEngineSource(image="busy:1")))
        (ib,) = await origin.ingests()
        assert ib.compression == "off"
        assert (await admin.image("eng:1")).source == "docker:busy:1"

        # compression cannot apply to registry blobs: refused, not silently ignored
        reg = RegistrySource(reference="reg.local:5000/app:1")
        with pytest.raises(ApiError) as e:
            await admin.add_image(CreateImage(ref="reg:1", source=reg, compression="gzip"))
        assert e.value.status == 400 and "registry" in e.value.message
        view = await admin.add_image(CreateImage(ref="reg:1", source=reg))
        assert view.source == "registry:reg.local:5000/app:1"
        # an empty source is refused with a message
        with pytest.raises(ApiError) as e:
            await admin.add_image(CreateImage(ref="bad:1", source=ArchiveSource(path="")))
        assert e.value.status == 400 and "bad:1" in e.value.message
        cred = origin.c.credential
        await origin.c.close()
    await r.stop()

    # a restart re-queues the unfinished ingest with the same source and compression
    r2 = await start(tmp_path)
    try:
        async with AgentClient(r2.url, node_id="origin", credential=cred) as c:
            batch = await c.assignments(0, 10**9, 0.0)
            again = [
                a for a in batch.assignments if isinstance(a, IngestAssignment) and a.ref == "app:1"
            ]
            assert again and again[-1].compression == "zstd" and again[-1].source == src
    finally:
        await r2.stop()


async def test_ingest_failure_is_visible_and_blocks_jobs(
    coord: Running, admin: AdminClient
) -> None:
    origin = await agent(coord.url, "origin", roles=["origin"])
    src = RegistrySource(reference="reg.local:5000/nope:1")
    await admin.add_image(CreateImage(ref="nope:1", source=src))
    with pytest.raises(ApiError) as e:
        await admin.create_job(CreateJob(image="nope:1", targets=["all"]))
    assert e.value.status == 409 and "ingesting" in e.value.message
    (ia,) = await origin.ingests()
    why = "origin origin could not ingest nope:1 from registry:reg.local:5000/nope:1: 404 unknown"
    await origin.c.ingest_failed(ia.ingest_id, TaskFailed(reason=why))
    view = await admin.image("nope:1")
    assert view.state == "failed" and view.error == why
    with pytest.raises(ApiError) as e:
        await admin.create_job(CreateJob(image="nope:1", targets=["all"]))
    assert e.value.status == 409 and "failed" in e.value.message
    assert "404 unknown" in e.value.message
    # a failed image may be added again (a ready one may not)
    await admin.add_image(CreateImage(ref="nope:1", source=src))
    assert (await admin.image("nope:1")).state == "ingesting"
    await origin.c.close()


# --------------------------------------------------------------------------
# removal
# --------------------------------------------------------------------------
async def test_remove_image(coord: Running, admin: AdminClient) -> None:
    origin = await agent(coord.url, "origin", roles=["origin"])
    n1 = await agent(coord.url, "n1")
    img = fake_image("rm-me:1", sizes=(80_000,))
    await add_and_ingest(admin, origin, img)
    with pytest.raises(ApiError) as e:
        await admin.add_image(CreateImage(ref="rm-me:1", source=ArchiveSource(path="/x.tar")))
    assert e.value.status == 409 and "already exists" in e.value.message

    with pytest.raises(ApiError) as e:
        await admin.remove_image("ghost:1")
    assert e.value.status == 404 and "ghost:1" in e.value.message and "rm-me:1" in e.value.message

    job = await admin.create_job(CreateJob(image="rm-me:1", targets=["n1"]))
    with pytest.raises(ApiError) as e:
        await admin.remove_image("rm-me:1")
    assert e.value.status == 409 and job.job_id in e.value.message

    (t,) = await n1.transfers()
    await n1.done(t)
    assert (await admin.job(job.job_id)).state == "done"
    await admin.remove_image("rm-me:1")
    assert (await admin.images()).images == []
    with pytest.raises(ApiError) as e:
        await admin.image("rm-me:1")
    assert e.value.status == 404
    # the finished job is still readable; the layers stay on the nodes
    assert (await admin.job(job.job_id)).state == "done"
    nodes = {n.node_id: n.holdings for n in (await admin.nodes()).nodes}
    assert nodes == {"origin": 1, "n1": 1}
    assert coord.store.load_images() == []

    # the ref can be added again; the nodes' layers count at once
    await add_and_ingest(admin, origin, img)
    assert (await admin.image("rm-me:1")).nodes == ["n1", "origin"]
    for a in (origin, n1):
        await a.c.close()


async def test_removing_an_ingesting_image_ignores_the_late_report(
    coord: Running, admin: AdminClient
) -> None:
    origin = await agent(coord.url, "origin", roles=["origin"])
    img = fake_image("late:1", sizes=(50_000,))
    await admin.add_image(CreateImage(ref="late:1", source=ArchiveSource(path="/late.tar")))
    (ia,) = await origin.ingests()
    await admin.remove_image("late:1")
    with pytest.raises(ApiError) as e:
        await origin.c.ingest_done(
            ia.ingest_id, IngestDone(image=img.record, manifests=img.manifests)
        )
    assert e.value.status == 404
    assert (await admin.images()).images == []
    await origin.c.close()


# --------------------------------------------------------------------------
# layer-level sharing and byte accounting
# --------------------------------------------------------------------------
async def test_layers_are_shared_across_images(coord: Running, admin: AdminClient) -> None:
    origin = await agent(coord.url, "origin", roles=["origin"], speed=100e6)
    n1 = await agent(coord.url, "n1", speed=50e6)
    n2 = await agent(coord.url, "n2", speed=10e6, docker=True)
    a, b = sharing_images()
    base, a_own = a.digests
    b_base, b_own = b.digests
    assert b_base == base
    await add_and_ingest(admin, origin, a)
    await add_and_ingest(admin, origin, b)
    view_b = await admin.image(b.record.ref)
    assert view_b.state == "ready" and view_b.nodes == ["origin"]
    assert view_b.size == b.record.size
    assert view_b.uncompressed_size == 3 * b.record.size == b.record.uncompressed_size

    # image A to n1: both layers from the origin
    job_a = await admin.create_job(CreateJob(image=a.record.ref, targets=["n1"]))
    got: list[str] = []
    for _ in range(2):
        (t,) = await n1.transfers()
        assert t.seeder.node_id == "origin"
        got.append(t.layer.digest)
        await n1.done(t)
    assert got == [base, a_own]
    final_a = await admin.job(job_a.job_id)
    assert final_a.state == "done" and final_a.wire_bytes == a.record.size
    assert final_a.image_bytes == a.record.uncompressed_size

    # image B to n1 and n2: n1 already holds the base (from A) and only demands B's own
    # layer; n2 needs both, and n1 seeds the base to it
    job_b = await admin.create_job(CreateJob(image=b.record.ref, targets=["n1", "n2"]))
    start_view = {n.node_id: n for n in job_b.nodes}
    assert start_view["n1"].layers_done == 1 and start_view["n1"].layers_total == 2
    assert start_view["n2"].layers_done == 0
    t1 = await n1.transfers()
    t2 = await n2.transfers()
    assert [(t.layer.digest, t.seeder.node_id) for t in t1] == [(b_own, "origin")]
    assert [(t.layer.digest, t.seeder.node_id) for t in t2] == [(base, "n1")]
    await n1.done(t1[0])
    await n2.done(t2[0], bytes_moved=50_000)  # a resumed transfer moves less than the layer
    (t2b,) = await n2.transfers()
    assert t2b.layer.digest == b_own
    await n2.done(t2b)
    # n1 never receives the base again, in this job or any
    assert await n1.transfers() == []
    (load,) = [x for x in await n2.take() if isinstance(x, LoadAssignment)]
    await n2.c.load_done(load.load_id, LoadDone(seconds=0.1, layers_sent=2))

    final_b = await admin.job(job_b.job_id)
    assert final_b.state == "done"
    per_node = {n.node_id: n for n in final_b.nodes}
    assert [u.layer for u in per_node["n1"].transfers] == [b_own]
    assert per_node["n1"].wire_bytes == b.record.layers[1].size
    assert per_node["n2"].wire_bytes == 50_000 + b.record.layers[1].size
    assert final_b.wire_bytes == 50_000 + 2 * b.record.layers[1].size
    assert final_b.image_bytes == b.record.uncompressed_size

    # everyone holds everything: a new job moves nothing; docker nodes go straight to load
    job_c = await admin.create_job(CreateJob(image=b.record.ref, targets=["all"]))
    states = {n.node_id: n.state for n in job_c.nodes}
    assert states == {"origin": "done", "n1": "done", "n2": "loading"}
    assert job_c.wire_bytes == 0
    for x in (origin, n1):
        assert await x.transfers() == []
    assert [type(x) for x in await n2.take()] == [LoadAssignment]
    for x in (origin, n1, n2):
        await x.c.close()


async def test_a_node_holding_a_shared_layer_seeds_it_for_another_image(
    coord: Running, admin: AdminClient
) -> None:
    """The origin is busy; n1 holds the base only through image A and serves it for B."""
    origin = await agent(coord.url, "origin", roles=["origin"])
    n1 = await agent(coord.url, "n1")
    n2 = await agent(coord.url, "n2")
    n3 = await agent(coord.url, "n3")
    a, b = sharing_images()
    base = a.digests[0]
    await add_and_ingest(admin, origin, a)
    await add_and_ingest(admin, origin, b)
    # n1 gets only image A
    await admin.create_job(CreateJob(image=a.record.ref, targets=["n1"]))
    for _ in range(2):
        (t,) = await n1.transfers()
        await n1.done(t)
    # n2 and n3 want B: the origin serves one of them, n1 (not in this job) the other
    job = await admin.create_job(CreateJob(image=b.record.ref, targets=["n2", "n3"]))
    assert {n.node_id for n in job.nodes} == {"n2", "n3"}
    (t2,) = await n2.transfers()
    (t3,) = await n3.transfers()
    assert t2.layer.digest == t3.layer.digest == base
    assert {t2.seeder.node_id, t3.seeder.node_id} == {"origin", "n1"}
    for x in (origin, n1, n2, n3):
        await x.c.close()
