"""The front door serves the upstream's own manifest bytes, and asks only its resolver for tags.

A real LayerStore holds the demo image; its record carries an upstream
manifest (the same config and layers, serialized as another client would, so
another digest than rbd's built one) and a manifest list naming it. The
resolver is the front door's interface to the coordinator (agent/mirror/
resolver.py sends the real call; tests/integration/test_mirror_upstream.py
runs it against a real coordinator): here a small table, a resolver that
never answers, and none at all.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest

from rainbowd.agent.mirror.catalog import ImageCatalog
from rainbowd.agent.mirror.server import MirrorServer
from rainbowd.core.digest import Digest, hex_part
from rainbowd.core.messages import ImageRecord, UpstreamManifest
from rainbowd.core.upstreammanifest import DOCKER_LIST, DOCKER_MANIFEST
from rainbowd.lib.image import ingest_docker_archive
from rainbowd.lib.store import LayerStore
from upstream_docs import upstream_manifest

CHUNK = 64 * 1024


def upstream_for(image: ImageRecord) -> UpstreamManifest:
    """The image's manifest in a list with a platform this node does not hold."""
    return upstream_manifest(image)


class Tags:
    """A resolver: (registry, repository, tag) -> digest from a table; records each question."""

    def __init__(self, table: dict[tuple[str, str, str], Digest]) -> None:
        self.table = table
        self.asked: list[tuple[str, str, str]] = []

    async def __call__(self, registry: str, repository: str, tag: str) -> Digest | None:
        self.asked.append((registry, repository, tag))
        return self.table.get((registry, repository, tag))


class Setup:
    def __init__(
        self, store: LayerStore, catalog: ImageCatalog, image: ImageRecord, tags: Tags
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.image = image
        self.tags = tags
        assert image.upstream is not None and image.upstream.index is not None
        self.up = image.upstream
        self.index = image.upstream.index


@pytest.fixture
async def setup(demo_image: Path, tmp_path: Path) -> Setup:
    store = LayerStore(tmp_path / "store")
    image, _ = ingest_docker_archive(demo_image, store, chunk_size=CHUNK, compression="gzip")
    image = msgspec.structs.replace(image, upstream=upstream_for(image))
    catalog = ImageCatalog(tmp_path / "mirror")
    built = catalog.record(image)
    assert image.upstream is not None and image.upstream.index is not None
    assert catalog.recorded[image.ref] == image.upstream.index.digest != built.digest
    tags = Tags({("docker.io", "team/app", "v1"): Digest(image.upstream.index.digest)})
    return Setup(store, catalog, image, tags)


@pytest.fixture
async def url(setup: Setup) -> AsyncIterator[str]:
    server = MirrorServer(
        setup.store, setup.catalog, "127.0.0.1", 0, node_id="n1", resolve=setup.tags
    )
    await server.start()
    try:
        yield server.url
    finally:
        await server.close()


async def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.request(method, url) as resp:
            return resp.status, dict(resp.headers), await resp.read()


async def test_the_upstreams_bytes_by_digest_and_by_tag(setup: Setup, url: str) -> None:
    for digest, doc, media in (
        (setup.up.manifest.digest, setup.up.manifest, DOCKER_MANIFEST),
        (setup.index.digest, setup.index, DOCKER_LIST),
    ):
        for method in ("GET", "HEAD"):
            status, headers, body = await get(f"{url}/v2/team/app/manifests/{digest}", method)
            assert status == 200
            assert headers["Docker-Content-Digest"] == digest
            assert headers["Content-Type"] == media
            assert int(headers["Content-Length"]) == len(doc.text.encode())
            assert body == (doc.text.encode() if method == "GET" else b"")
    # a tag: the registry the client named none of, so the default (docker.io)
    status, headers, body = await get(f"{url}/v2/team/app/manifests/v1")
    assert status == 200 and body == setup.index.text.encode()
    assert headers["Docker-Content-Digest"] == setup.index.digest
    # containerd names the registry (?ns=): asked as it said
    status, _, _ = await get(f"{url}/v2/team/app/manifests/v1?ns=registry.example.com:5000")
    assert status == 404
    assert setup.tags.asked == [
        ("docker.io", "team/app", "v1"),
        ("registry.example.com:5000", "team/app", "v1"),
    ]
    # the platform this node does not hold is a miss (the client goes upstream for it)
    status, _, _ = await get(f"{url}/v2/team/app/manifests/sha256:{'5' * 64}")
    assert status == 404


async def test_a_manifest_whose_bytes_are_not_its_digest_is_not_served(
    setup: Setup, url: str
) -> None:
    """The coordinator said the digest; the file must hash to it, else a miss."""
    for doc in (setup.index, setup.up.manifest):
        path = setup.catalog.manifest_dir / hex_part(Digest(doc.digest))
        path.write_bytes(path.read_bytes().replace(b"2", b"3", 1))
    for ref in ("v1", setup.index.digest, setup.up.manifest.digest):
        status, _, body = await get(f"{url}/v2/team/app/manifests/{ref}")
        assert status == 404
        assert json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"


async def test_an_index_is_served_only_with_its_platform_manifest_whole(
    setup: Setup, url: str
) -> None:
    layer = Digest(setup.image.layers[0].digest)
    setup.store.remove(layer)
    for ref in ("v1", setup.index.digest, setup.up.manifest.digest):
        status, _, _ = await get(f"{url}/v2/team/app/manifests/{ref}")
        assert status == 404, ref


async def test_an_upstream_manifest_that_is_not_the_images_is_not_catalogued(
    setup: Setup, tmp_path: Path
) -> None:
    """The built manifest still is: the image stays servable, under rbd's digest."""
    other = upstream_for(msgspec.structs.replace(setup.image, layers=setup.image.layers[:1]))
    image = msgspec.structs.replace(setup.image, ref="other:1", upstream=other)
    catalog = ImageCatalog(tmp_path / "other-mirror")
    built = catalog.record(image)
    assert catalog.recorded["other:1"] == built.digest
    assert catalog.manifest(Digest(other.manifest.digest)) is None
    assert catalog.manifest(built.digest) is not None


async def test_no_resolver_or_one_that_never_answers_is_a_quick_miss(setup: Setup) -> None:
    never = asyncio.Event()

    async def hangs(registry: str, repository: str, tag: str) -> Digest | None:
        await never.wait()
        return None

    for resolve in (None, hangs):
        server = MirrorServer(
            setup.store,
            setup.catalog,
            "127.0.0.1",
            0,
            node_id="n1",
            resolve=resolve,
            resolve_timeout=0.2,
        )
        await server.start()
        try:
            status, _, body = await get(f"{server.url}/v2/team/app/manifests/v1")
            assert status == 404
            assert json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
            # what is named by digest does not need the coordinator
            status, _, _ = await get(f"{server.url}/v2/team/app/manifests/{setup.index.digest}")
            assert status == 200
        finally:
            await server.close()
