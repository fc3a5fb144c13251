"""The upstream's manifest at the coordinator: checked at the door, stored verbatim, resolved.

An origin's ingest report may carry the source registry's own manifest (and
index) of the image (issue 17). The coordinator refuses one that does not
hash to its digest or lists other blobs than the image's, keeps the bytes in
the ``image_manifests`` table (schema 5) across restarts on both backends,
hands them to targets in their load, and answers a node's mirror asking which
manifest a tag names -- only for registries its ``[upstreams]`` maps.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from coordinator_support import (
    ADMIN,
    FakeImage,
    enroll,
    fake_image,
    open_state,
    register_request,
    start,
)
from rainbowd.coordinator.config import ConfigError, build
from rainbowd.coordinator.state import SCHEMA_VERSION
from rainbowd.coordinator.upstreams import Upstream, parse_upstreams
from rainbowd.core.imagemanifest import manifest_for
from rainbowd.core.messages import (
    CreateImage,
    CreateJob,
    Heartbeat,
    IngestAssignment,
    IngestDone,
    LoadAssignment,
    LoadDone,
    ManifestDoc,
    RegistrySource,
    ResolveTag,
    UpstreamManifest,
)
from rainbowd.core.upstreammanifest import DOCKER_LIST
from rainbowd.lib.client import AdminClient, AgentClient, ApiError
from upstream_docs import upstream_manifest

REGISTRY = "reg.local:5000"
#: no tag is added on demand here (test_coordinator_pulls.py tests that): a tag no image
#: has is a 404
UPSTREAMS = {
    "docker.io": {"upstream": REGISTRY, "on_demand": False},
    REGISTRY: {"upstream": REGISTRY, "on_demand": False},
}


def upstream_of(image: FakeImage, *, index: bool = True) -> UpstreamManifest:
    """The image's manifest (and a list naming it) as a registry might serialize them."""
    return upstream_manifest(image.record, other_platform=False, index=index)


async def ingest_from_registry(
    admin: AdminClient, origin: AgentClient, ref: str, reference: str, done: IngestDone
) -> None:
    await admin.add_image(CreateImage(ref=ref, source=RegistrySource(reference=reference)))
    batch = await origin.assignments(0, 10**9, 0.0)
    ingest = [a for a in batch.assignments if isinstance(a, IngestAssignment) and a.ref == ref]
    await origin.ingest_done(ingest[-1].ingest_id, done)


async def test_the_upstream_manifest_is_kept_verbatim_resolved_and_sent_with_loads(
    tmp_path: Path,
) -> None:
    image = fake_image("app:1")
    up = upstream_of(image)
    record = msgspec.structs.replace(image.record, upstream=up)
    r = await start(tmp_path, upstreams=UPSTREAMS)
    async with AdminClient(r.url, ADMIN) as admin:
        origin = await enroll(r.url, "origin", roles=["origin"])
        target = await enroll(r.url, "t1", docker=True)
        try:
            await ingest_from_registry(
                admin,
                origin,
                "app:1",
                f"{REGISTRY}/team/app:v1",
                IngestDone(image=record, manifests=image.manifests),
            )
            view = await admin.image("app:1")
            assert view.state == "ready"
            assert up.index is not None and (view.digest, view.upstream) == (up.index.digest, True)
            want = ResolveTag(registry=REGISTRY, repository="team/app", tag="v1")
            got = await target.resolve_tag(want, timeout=5)
            assert up.index is not None
            assert (got.digest, got.media_type, got.ref) == (up.index.digest, DOCKER_LIST, "app:1")
            # docker.io maps to the same upstream; a registry not mapped, a tag, a repository
            # no image has: 404, which the mirror answers as a miss
            hub = ResolveTag(registry="docker.io", repository="team/app", tag="v1")
            assert (await target.resolve_tag(hub, timeout=5)).digest == got.digest
            for miss in (
                ResolveTag(registry="other.example", repository="team/app", tag="v1"),
                ResolveTag(registry=REGISTRY, repository="team/app", tag="v2"),
                ResolveTag(registry=REGISTRY, repository="team/other", tag="v1"),
            ):
                with pytest.raises(ApiError) as e:
                    await target.resolve_tag(miss, timeout=5)
                assert e.value.status == 404, miss
            # a target's load carries the bytes, as they came
            await admin.create_job(CreateJob(image="app:1", targets=["t1"]))
            await origin.heartbeat(Heartbeat(holdings=image.digests))
            await target.heartbeat(Heartbeat(holdings=image.digests))
            batch = await target.assignments(0, 10**9, 0.0)
            loads = [a for a in batch.assignments if isinstance(a, LoadAssignment)]
            assert loads and loads[0].image.upstream == up
            await target.load_done(loads[0].load_id, LoadDone(seconds=0.1, layers_sent=2))
        finally:
            await origin.close()
            await target.close()
    # the row keeps the digests only; the bytes are rows of their own, exactly as sent
    body = r.store.execute("SELECT body FROM images WHERE ref = 'app:1'").fetchone()[0]
    assert up.manifest.text not in body and '"text":""' in body.replace(" ", "")
    rows = r.store.execute(
        "SELECT digest, media_type, body FROM image_manifests WHERE ref = 'app:1' ORDER BY digest"
    ).fetchall()
    assert sorted(tuple(row) for row in rows) == sorted(
        (d.digest, d.media_type, d.text) for d in (up.manifest, up.index) if d is not None
    )
    await r.stop()

    r2 = await start(tmp_path, upstreams=UPSTREAMS)  # restarted: the same bytes, resolvable
    try:
        stored = r2.coordinator.images["app:1"].record
        assert stored is not None and stored.upstream == up
        async with AgentClient(r2.url) as nobody:
            with pytest.raises(ApiError) as e:  # agents only
                await nobody.resolve_tag(want, timeout=5)
            assert e.value.status == 401
        async with AdminClient(r2.url, ADMIN) as admin:
            await admin.remove_image("app:1")
        assert r2.store.execute("SELECT count(*) FROM image_manifests").fetchone()[0] == 0
    finally:
        await r2.stop()


@pytest.mark.parametrize("flaw", ["digest", "layers", "index"])
async def test_an_upstream_manifest_that_is_not_the_images_fails_the_ingest(
    tmp_path: Path, flaw: str
) -> None:
    image = fake_image("app:1")
    up = upstream_of(image)
    if flaw == "digest":
        m = up.manifest
        up = UpstreamManifest(
            manifest=ManifestDoc(digest="sha256:" + "0" * 64, media_type=m.media_type, text=m.text)
        )
    elif flaw == "layers":
        other = upstream_of(fake_image("other:1"), index=False)
        up = UpstreamManifest(manifest=other.manifest)
    else:
        other = upstream_of(fake_image("other:1"))
        up = UpstreamManifest(manifest=up.manifest, index=other.index)
    record = msgspec.structs.replace(image.record, upstream=up)
    r = await start(tmp_path, upstreams=UPSTREAMS)
    try:
        async with AdminClient(r.url, ADMIN) as admin:
            origin = await enroll(r.url, "origin", roles=["origin"])
            try:
                with pytest.raises(ApiError) as e:
                    await ingest_from_registry(
                        admin,
                        origin,
                        "app:1",
                        f"{REGISTRY}/team/app:v1",
                        IngestDone(image=record, manifests=image.manifests),
                    )
                assert e.value.status == 400 and "upstream" in e.value.message
                view = await admin.image("app:1")
                assert view.state == "failed" and "upstream" in view.error
                assert view.digest == ""
            finally:
                await origin.close()
        assert r.store.execute("SELECT count(*) FROM image_manifests").fetchone()[0] == 0
    finally:
        await r.stop()


async def test_a_stored_manifest_that_rotted_costs_the_image_only_its_upstream_manifest(
    tmp_path: Path,
) -> None:
    image = fake_image("app:1")
    up = upstream_of(image, index=False)
    r = await start(tmp_path, upstreams=UPSTREAMS)
    async with AdminClient(r.url, ADMIN) as admin:
        origin = await enroll(r.url, "origin", roles=["origin"])
        try:
            await ingest_from_registry(
                admin,
                origin,
                "app:1",
                f"{REGISTRY}/team/app:v1",
                IngestDone(
                    image=msgspec.structs.replace(image.record, upstream=up),
                    manifests=image.manifests,
                ),
            )
        finally:
            await origin.close()
    r.store.execute("UPDATE image_manifests SET body = body || ' '")
    await r.stop()
    r2 = await start(tmp_path, upstreams=UPSTREAMS)
    try:
        loaded = r2.coordinator.images["app:1"]
        assert loaded.state == "ready" and loaded.record is not None
        assert loaded.record.upstream is None  # served under rbd's built manifest now
        view = r2.coordinator.image_view("app:1")
        assert (view.digest, view.upstream) == (manifest_for(loaded.record).digest, False)
        assert [t for t, _, _ in r2.store.set_aside()] == ["image_manifests"]
        async with AgentClient(r2.url) as c:
            await c.register(register_request("t1"))
            with pytest.raises(ApiError) as e:
                await c.resolve_tag(
                    ResolveTag(registry=REGISTRY, repository="team/app", tag="v1"), timeout=5
                )
            assert e.value.status == 404
    finally:
        await r2.stop()


async def test_a_front_door_without_an_engine_is_sent_the_record_to_catalog(
    tmp_path: Path,
) -> None:
    """A node with mirror_listen and neither Docker nor containerd: a catalog-only load.

    Without it, such a node would hold every layer and never the manifest its
    front door needs; a node with neither engine nor front door is done at once.
    """
    image = fake_image("app:1")
    record = msgspec.structs.replace(image.record, upstream=upstream_of(image))
    r = await start(tmp_path, upstreams=UPSTREAMS)
    try:
        async with AdminClient(r.url, ADMIN) as admin:
            origin = await enroll(r.url, "origin", roles=["origin"])
            mirror = await enroll(r.url, "m1", mirror=True)
            bare = await enroll(r.url, "b1")
            try:
                await ingest_from_registry(
                    admin,
                    origin,
                    "app:1",
                    f"{REGISTRY}/team/app:v1",
                    IngestDone(image=record, manifests=image.manifests),
                )
                await origin.heartbeat(Heartbeat(holdings=image.digests))
                job = await admin.create_job(CreateJob(image="app:1", targets=["m1", "b1"]))
                for node in (mirror, bare):
                    await node.heartbeat(Heartbeat(holdings=image.digests))
                loads = [
                    a
                    for a in (await mirror.assignments(0, 10**9, 0.0)).assignments
                    if isinstance(a, LoadAssignment)
                ]
                assert len(loads) == 1 and loads[0].catalog_only
                assert loads[0].image.upstream == record.upstream
                assert not [
                    a
                    for a in (await bare.assignments(0, 10**9, 0.0)).assignments
                    if isinstance(a, LoadAssignment)
                ]
                states = {n.node_id: n.state for n in (await admin.job(job.job_id)).nodes}
                assert states == {"m1": "loading", "b1": "done"}
                await mirror.load_done(loads[0].load_id, LoadDone(seconds=0.0, layers_sent=0))
                assert (await admin.job(job.job_id)).state == "done"
                assert {n.node_id: n.mirror for n in (await admin.nodes()).nodes}["m1"]
            finally:
                for c in (origin, mirror, bare):
                    await c.close()
    finally:
        await r.stop()


def test_a_schema_4_database_gets_the_image_manifests_table(tmp_path: Path) -> None:
    """4 -> 5 on either backend: the table appears, the images already there load."""
    store = open_state(tmp_path)
    try:
        store.execute("DROP TABLE image_manifests")  # the database as schema 4 left it
        store.execute(
            "INSERT INTO images(ref, body) VALUES (?, ?)",
            (
                "old:1",
                json.dumps(
                    {
                        "ref": "old:1",
                        "state": "ingesting",
                        "source": {"kind": "archive", "path": "/srv/old.tar"},
                        "origin": "origin",
                        "ingest_id": "i-1",
                        "created_at": 1.0,
                    }
                ),
            ),
        )
        store.set_meta("schema", "4")
    finally:
        store.close()
    again = open_state(tmp_path)
    try:
        assert again.get_meta("schema") == str(SCHEMA_VERSION) == "5"
        assert again.execute("SELECT count(*) FROM image_manifests").fetchone()[0] == 0
        assert [i.ref for i in again.load_images()] == ["old:1"]
    finally:
        again.close()


@pytest.mark.backends("sqlite")
def test_upstreams_in_the_config_are_checked() -> None:
    # hosts compare as rbd compares them: lowercase, Docker Hub's names as docker.io
    assert parse_upstreams({"Index.Docker.io": "Mirror.local:5000"}) == {
        "docker.io": Upstream(host="mirror.local:5000")
    }
    assert parse_upstreams(None) == {}
    cfg = build({"state_dir": "/tmp/x", "upstreams": {"docker.io": "127.0.0.1:5000"}}, {})
    assert cfg.upstreams == {"docker.io": Upstream(host="127.0.0.1:5000")}
    table = {"upstream": "lab:5000", "insecure": True, "credentials_file": "/etc/rbd/lab"}
    cfg = build({"state_dir": "/tmp/x", "upstreams": {"lab:5000": table}}, {})
    assert cfg.upstreams == {
        "lab:5000": Upstream(host="lab:5000", insecure=True, credentials_file="/etc/rbd/lab")
    }
    for bad in (
        {"docker.io": "http://x"},
        {"a b": "x"},
        {"docker.io": 5},
        "docker.io",
        {"docker.io": {"upstream": "x", "insecure": "yes"}},
        {"docker.io": {"upstream": "x", "password": "p"}},
        {"docker.io": {"insecure": True}},
    ):
        with pytest.raises(ConfigError, match="upstreams"):
            build({"state_dir": "/tmp/x", "upstreams": bad}, {})
