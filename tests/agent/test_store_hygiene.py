"""Store eviction end to end in one process: a real coordinator app, a real LayerStore.

The agent side is the real :class:`StoreHygiene` talking to the coordinator
through the real AgentClient; the jobs around it are played by fake agents
(coordinator_support). Checked: LRU layers are evicted and forgotten by
the coordinator (holdings, scheduler, image view) before they leave the disk;
layers pinned by a running job, an active transfer, an origin's image or
local use are kept; nothing is deleted while the coordinator cannot be asked.
"""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coordinator_support import ADMIN, Running, enroll, start
from rainbowd.agent.hygiene import StoreHygiene, store_footprint
from rainbowd.agent.layer_uses import LayerUses
from rainbowd.core.chunks import MIN_CHUNK_SIZE, ChunkManifest
from rainbowd.core.digest import Digest, sha256_digest
from rainbowd.core.eviction import StoreLimits
from rainbowd.core.messages import (
    ArchiveSource,
    CreateImage,
    CreateJob,
    EvictRequest,
    Heartbeat,
    ImageRecord,
    IngestAssignment,
    IngestDone,
    LayerRef,
    TransferAssignment,
    TransferDone,
)
from rainbowd.lib.client import AdminClient, AgentClient
from rainbowd.lib.store import LayerStore

LAYER = 3 * MIN_CHUNK_SIZE


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def coord(tmp_path: Path) -> AsyncIterator[Running]:
    r = await start(tmp_path / "coord")
    yield r
    await r.stop()


@pytest.fixture
async def admin(coord: Running) -> AsyncIterator[AdminClient]:
    async with AdminClient(coord.url, ADMIN) as a:
        yield a


def make_layers(store: LayerStore, n: int) -> list[ChunkManifest]:
    out = []
    for _ in range(n):
        data = os.urandom(LAYER)
        digest = Digest(sha256_digest(data))
        out.append(store.ingest(io.BytesIO(data), digest, chunk_size=MIN_CHUNK_SIZE))
    return out


def record(ref: str, manifests: list[ChunkManifest]) -> ImageRecord:
    config = '{"architecture":"amd64","os":"linux"}'
    return ImageRecord(
        ref=ref,
        config_digest=sha256_digest(config.encode()),
        config=config,
        layers=[
            LayerRef(digest=m.digest, size=m.size, media_type="x", diff_id=m.digest)
            for m in manifests
        ],
    )


async def add_image(
    admin: AdminClient, origin: AgentClient, ref: str, manifests: list[ChunkManifest]
) -> None:
    await admin.add_image(CreateImage(ref=ref, source=ArchiveSource(path="/srv/x.tar")))
    batch = await origin.assignments(0, 0, 0)
    (ing,) = [a for a in batch.assignments if isinstance(a, IngestAssignment) and a.ref == ref]
    await origin.ingest_done(
        ing.ingest_id, IngestDone(image=record(ref, manifests), manifests=manifests)
    )


def holders(coord: Running, layer: str) -> list[str]:
    return coord.coordinator.scheduler.holders(layer)


async def test_lru_layers_are_forgotten_by_the_coordinator_then_deleted(
    coord: Running, admin: AdminClient, tmp_path: Path
) -> None:
    store = LayerStore(tmp_path / "a-store")
    l_old, l_mid, l_new = make_layers(store, 3)
    origin = await enroll(coord.url, "origin", roles=["origin"])
    await add_image(admin, origin, "app:1", [l_old, l_mid, l_new])
    a = await enroll(coord.url, "a", holdings=[m.digest for m in (l_old, l_mid, l_new)])
    assert holders(coord, l_old.digest) == ["a", "origin"]
    assert (await admin.image("app:1")).nodes == ["a", "origin"]

    clock = Clock()
    used = store_footprint(store)
    # room for two layers under the low watermark, not three under the high one
    limits = StoreLimits(int(used / 0.95), high=0.9, low=0.8)
    hygiene = StoreHygiene(store, limits, node_id="a", clock=clock)
    for t, m in zip((10.0, 20.0, 30.0), (l_old, l_mid, l_new), strict=True):
        hygiene.uses.touch(m.digest, t)

    result = await hygiene.check(a)
    assert result.evicted == [l_old.digest] and result.refused == {}
    assert not store.has(Digest(l_old.digest))
    assert store.has(Digest(l_mid.digest)) and store.has(Digest(l_new.digest))
    # the coordinator forgot a's copy: not a seeder any more, not listed for the image
    assert holders(coord, l_old.digest) == ["origin"]
    assert holders(coord, l_mid.digest) == ["a", "origin"]
    assert (await admin.image("app:1")).nodes == ["origin"]
    assert {n.node_id: n.holdings for n in (await admin.nodes()).nodes}["a"] == 2
    # durable: the eviction is on record (status and the fault invariants read it)
    assert [e["digest"] for e in hygiene.status()["evicted"]] == [l_old.digest]
    reread = LayerUses(store.root)
    assert [e.digest for e in reread.evicted] == [l_old.digest]
    assert reread.last_used(l_new.digest, store.path(Digest(l_new.digest))) == 30.0

    # below the high watermark now: the next check does nothing (hysteresis)
    assert (await hygiene.check(a)).evicted == []
    for c in (origin, a):
        await c.close()


async def test_pinned_layers_are_refused_and_kept(
    coord: Running, admin: AdminClient, tmp_path: Path
) -> None:
    """A running job's layers, the origin's image layers and layers being seeded stay."""
    origin_store = LayerStore(tmp_path / "origin-store")
    img_layers = make_layers(origin_store, 2)
    origin = await enroll(coord.url, "origin", roles=["origin"])
    await add_image(admin, origin, "app:1", img_layers)
    digests = [m.digest for m in img_layers]

    # the origin of an image in the table never evicts its layers
    reply = await origin.heartbeat(Heartbeat(holdings=digests))
    assert reply.pinned == sorted(digests)
    out = await origin.evict(EvictRequest(layers=digests))
    assert out.accepted == [] and all("origin of image app:1" in r for r in out.refused.values())
    limits = StoreLimits(max(1, int(store_footprint(origin_store) / 2)))
    hygiene = StoreHygiene(origin_store, limits, node_id="origin")
    hygiene.coordinator_pins(reply.pinned)
    result = await hygiene.check(origin)
    assert result.plan.evict == [] and result.plan.shortfall > 0
    assert all(origin_store.has(Digest(d)) for d in digests)

    # b holds layer 0 and is in a running job for the image: it needs both layers
    b_store = LayerStore(tmp_path / "b-store")
    b_store.ingest(
        io.BytesIO(origin_store.open_blob(Digest(digests[0])).read()),
        Digest(digests[0]),
        chunk_size=MIN_CHUNK_SIZE,
    )
    b = await enroll(coord.url, "b", holdings=[digests[0]])
    c = await enroll(coord.url, "c")
    job = await admin.create_job(CreateJob(image="app:1", targets=["b"]))
    hb = await b.heartbeat(Heartbeat(holdings=[digests[0]]))
    assert set(hb.pinned) == set(digests)
    # asked anyway (a job created after its last heartbeat): refused at the moment of asking
    b_hygiene = StoreHygiene(b_store, StoreLimits(1, 0.9, 0.5), node_id="b")
    result = await b_hygiene.check(b)
    assert result.evicted == []
    assert f"job {job.job_id}" in result.refused[digests[0]]
    assert b_store.has(Digest(digests[0]))
    assert holders(coord, digests[0]) == ["b", "origin"]

    # a layer b is seeding right now is refused too (c pulls it from b)
    batch = await b.assignments(0, 0, 0)
    (tb,) = [x for x in batch.assignments if isinstance(x, TransferAssignment)]
    await b.transfer_done(tb.transfer_id, _done(tb))
    coord.coordinator.scheduler.penalize("origin", 1e-9)  # so b is the fastest holder
    await admin.create_job(CreateJob(image="app:1", targets=["c"]))
    (seeding,) = [t for t in coord.coordinator.scheduler.active() if t.demander == "c"]
    assert seeding.seeder == "b"
    assert seeding.layer in (await b.heartbeat(Heartbeat(holdings=digests))).pinned
    out = await b.evict(EvictRequest(layers=[seeding.layer]))
    assert "seeding it to c" in out.refused[seeding.layer]
    for x in (origin, b, c):
        await x.close()


def _done(t: TransferAssignment) -> TransferDone:
    return TransferDone(bytes_moved=t.layer.size, seconds=0.01)


async def test_local_pins_and_an_absent_coordinator_keep_layers(
    coord: Running, admin: AdminClient, tmp_path: Path
) -> None:
    store = LayerStore(tmp_path / "a-store")
    l_busy, l_free = make_layers(store, 2)
    # layers of a known image (holdings of no known layer are ignored by the coordinator)
    origin = await enroll(coord.url, "origin", roles=["origin"])
    await add_image(admin, origin, "app:1", [l_busy, l_free])
    a = await enroll(coord.url, "a", holdings=[l_busy.digest, l_free.digest])
    busy = {l_busy.digest}
    hygiene = StoreHygiene(
        store, StoreLimits(1, 0.9, 0.5), node_id="a", local_pins=lambda: busy, clock=Clock()
    )
    hygiene.uses.touch(l_busy.digest, 1.0)  # the older one, yet being served
    hygiene.uses.touch(l_free.digest, 2.0)

    # coordinator unreachable: nothing is deleted, nothing is forgotten
    gone = AgentClient("http://127.0.0.1:9", timeout=1.0)
    gone.set_credential("a", "x")
    result = await hygiene.check(gone)
    await gone.close()
    assert result.evicted == [] and "coordinator" in result.skipped
    assert store.has(Digest(l_free.digest)) and hygiene.evicting == set()

    # during an ingest: postponed
    hygiene.ingesting = 1
    assert (await hygiene.check(a)).skipped
    hygiene.ingesting = 0

    result = await hygiene.check(a)
    assert result.evicted == [l_free.digest]
    assert store.has(Digest(l_busy.digest)) and not store.has(Digest(l_free.digest))
    assert holders(coord, l_busy.digest) == ["a", "origin"]
    await a.close()
    await origin.close()
