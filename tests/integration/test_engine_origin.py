"""The Docker engine origin against a real, private dockerd."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from rainbowd.agent.docker.loader import DockerLoader
from rainbowd.agent.origin.engine import ingest_docker_engine
from rainbowd.core.digest import Digest
from rainbowd.core.messages import DockerEngineSource
from rainbowd.devcluster.dockerd import PrivateDockerd
from rainbowd.lib.image import ImageError, ingest_docker_archive
from rainbowd.lib.store import LayerStore

pytestmark = [pytest.mark.docker, pytest.mark.integration]

CHUNK = 256 * 1024
ENGINE_REF = "rbd-engine-origin:1"


def snapshot(store: LayerStore) -> tuple[list[str], list[str], list[str]]:
    return (
        sorted(p.name for p in store.blob_dir.iterdir()),
        sorted(p.name for p in store.partial_dir.iterdir()),
        sorted(p.name for p in store.tmp_dir.iterdir()),
    )


async def test_ingest_from_engine(
    dockerd: PrivateDockerd, demo_image: Path, tmp_path: Path
) -> None:
    scratch = LayerStore(tmp_path / "scratch")
    archived, _ = await asyncio.to_thread(
        ingest_docker_archive, demo_image, scratch, ref=ENGINE_REF, chunk_size=CHUNK
    )
    async with DockerLoader(dockerd.url) as loader:
        await loader.load(archived, scratch)

    store = LayerStore(tmp_path / "store")
    image, manifests = await ingest_docker_engine(
        DockerEngineSource(image=ENGINE_REF),
        store,
        ref="rbd-from-engine:1",
        chunk_size=CHUNK,
        compression="off",
        docker_url=dockerd.url,
    )
    assert image.ref == "rbd-from-engine:1"
    assert image.config_digest == archived.config_digest
    assert [la.diff_id for la in image.layers] == [la.diff_id for la in archived.layers]
    assert [la.uncompressed_size for la in image.layers] == [la.size for la in archived.layers]
    for layer, manifest in zip(image.layers, manifests, strict=True):
        assert store.has(Digest(layer.digest))
        data = store.path(Digest(layer.digest)).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == layer.digest == manifest.digest
    assert snapshot(store)[1:] == ([], [])  # the export's temp file is gone

    # the source's own docker_url wins; zstd gives the digests an archive origin gets
    zstd, _ = await ingest_docker_engine(
        DockerEngineSource(image=ENGINE_REF, docker_url=dockerd.url),
        LayerStore(tmp_path / "z"),
        ref="z:1",
        chunk_size=CHUNK,
        compression="zstd",
        docker_url="unix:///nonexistent/docker.sock",
    )
    from_archive, _ = await asyncio.to_thread(
        ingest_docker_archive, demo_image, LayerStore(tmp_path / "za"), compression="zstd"
    )
    assert [la.digest for la in zstd.layers] == [la.digest for la in from_archive.layers]


async def test_unknown_image(dockerd: PrivateDockerd, tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    with pytest.raises(ImageError, match=r"no-such-image:1: image not found in the engine"):
        await ingest_docker_engine(
            DockerEngineSource(image="no-such-image:1"),
            store,
            ref="x:1",
            chunk_size=CHUNK,
            compression="off",
            docker_url=dockerd.url,
        )
    assert snapshot(store) == ([], [], [])


async def test_engine_unreachable_or_missing(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    bogus = f"unix://{tmp_path}/no-docker.sock"
    with pytest.raises(ImageError, match=rf"Docker engine {bogus} image a:1: engine unreachable"):
        await ingest_docker_engine(
            DockerEngineSource(image="a:1"),
            store,
            ref="x:1",
            chunk_size=CHUNK,
            compression="off",
            docker_url=bogus,
        )
    with pytest.raises(ImageError, match="no Docker engine configured on the origin"):
        await ingest_docker_engine(
            DockerEngineSource(image="a:1"),
            store,
            ref="x:1",
            chunk_size=CHUNK,
            compression="off",
            docker_url="",
        )
    assert snapshot(store) == ([], [], [])
