"""DockerLoader against a real, private dockerd: load from the store, run, share layers."""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path

import pytest

from rainbowd.agent.docker.loader import DockerLoader, DockerLoadError
from rainbowd.core.digest import Digest
from rainbowd.devcluster.dockerd import PrivateDockerd
from rainbowd.devcluster.imagebuild import build_demo_image
from rainbowd.lib.image import ingest_docker_archive
from rainbowd.lib.store import LayerStore

pytestmark = [pytest.mark.docker, pytest.mark.integration]

CHUNK = 1024 * 1024


def corrupt_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\0")


async def test_available(dockerd: PrivateDockerd, tmp_path: Path) -> None:
    async with DockerLoader(dockerd.url) as loader:
        assert await loader.available()
    async with DockerLoader(f"unix://{tmp_path}/no.sock") as loader:
        assert not await loader.available()


async def test_load_run_and_share_layers(
    dockerd: PrivateDockerd, demo_image: Path, tmp_path: Path
) -> None:
    store = LayerStore(tmp_path / "store")
    image, _ = await asyncio.to_thread(ingest_docker_archive, demo_image, store, chunk_size=CHUNK)
    async with DockerLoader(dockerd.url) as loader:
        result = await loader.load(image, store)
        assert result.image_id == image.config_digest
        assert result.layers_sent <= 3
        assert await loader.has_image(image.ref, image.config_digest)
        assert image.layers[0].diff_id in await loader.known_diff_ids()

        code, out = await loader.run(image.ref)
        assert code == 0, out
        assert "hello from rbd" in out
        assert f"{2 * 1024 * 1024} /data/payload.bin" in out

        # a second image on the same busybox layer: only what Docker lacks moves.
        # Layer 3 has the same diff id as image 1's but sits on another base, so
        # Docker needs it again: 2 layers, not 1.
        other = tmp_path / "other.tar"
        await asyncio.to_thread(
            build_demo_image, other, ref="rbd-demo-other:1", payload_mib=1, seed=42
        )
        image2, _ = await asyncio.to_thread(ingest_docker_archive, other, store, chunk_size=CHUNK)
        assert image2.layers[0] == image.layers[0]
        result2 = await loader.load(image2, store)
        assert result2.layers_sent == 2
        assert result2.bytes_sent < sum(layer.size for layer in image2.layers)
        code, out = await loader.run(image2.ref, ["/usr/local/bin/rbd-demo"])
        assert code == 0, out
        assert f"{1024 * 1024} /data/payload.bin" in out
        assert "built by rbd" in out

        # loading again sends no layer at all
        again = await loader.load(image2, store)
        assert again.layers_sent == 0


async def test_missing_layer_loads_nothing(dockerd: PrivateDockerd, tmp_path: Path) -> None:
    archive = build_demo_image(tmp_path / "m.tar", ref="rbd-missing:1", payload_mib=1, seed=99)
    store = LayerStore(tmp_path / "store")
    image, _ = ingest_docker_archive(archive, store, chunk_size=CHUNK)
    store.remove(Digest(image.layers[1].digest))
    async with DockerLoader(dockerd.url) as loader:
        with pytest.raises(DockerLoadError, match=r"rbd-missing:1.*not complete in the store"):
            await loader.load(image, store)
        assert not await loader.has_image("rbd-missing:1")
        assert image.layers[1].diff_id not in await loader.known_diff_ids()


async def test_corrupt_blob_is_refused_mid_stream(dockerd: PrivateDockerd, tmp_path: Path) -> None:
    archive = build_demo_image(tmp_path / "c.tar", ref="rbd-corrupt:1", payload_mib=3, seed=5)
    store = LayerStore(tmp_path / "store")
    image, _ = ingest_docker_archive(archive, store, chunk_size=CHUNK)
    blob = store.path(Digest(image.layers[1].digest))
    blob.chmod(0o640)
    corrupt_byte(blob, 2 * 1024 * 1024 + 17)
    async with DockerLoader(dockerd.url) as loader:
        with pytest.raises(DockerLoadError, match=r"rbd-corrupt:1.*corrupt in the store"):
            await loader.load(image, store)
        assert not await loader.has_image("rbd-corrupt:1")


async def test_load_streams_without_buffering(dockerd: PrivateDockerd, tmp_path: Path) -> None:
    """Peak Python memory during a 48 MiB load stays far below the image size."""
    archive = build_demo_image(tmp_path / "big.tar", ref="rbd-big:1", payload_mib=48, seed=3)
    store = LayerStore(tmp_path / "store")
    image, _ = ingest_docker_archive(archive, store, chunk_size=4 * CHUNK)
    archive.unlink()
    async with DockerLoader(dockerd.url) as loader:
        await loader.available()  # connect and negotiate the API version first
        tracemalloc.start()
        try:
            result = await loader.load(image, store)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert result.bytes_sent > 48 * 1024 * 1024
        assert peak < 12 * 1024 * 1024, f"peak {peak} bytes: the tar was buffered"
        code, out = await loader.run(image.ref)
        assert code == 0 and f"{48 * 1024 * 1024} /data/payload.bin" in out
