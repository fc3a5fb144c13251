"""Compressed ingests reach a real Docker 20.10 engine and run.

gzip layers go to ``docker load`` as they are stored; zstd layers are inflated
to tar on the way out, because Docker 20.10's load refuses zstd ("archive/tar:
invalid tar header"). Each image gets a unique base layer so that no layer is
already in the (session-wide) engine: every layer is really sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from rainbowd.agent.docker.loader import DockerLoader
from rainbowd.core.digest import Digest
from rainbowd.core.messages import Compression
from rainbowd.devcluster.dockerd import PrivateDockerd
from rainbowd.lib.compression import MEDIA_DOCKER_GZIP, MEDIA_OCI_ZSTD, sniff
from rainbowd.lib.image import ingest_docker_archive
from rainbowd.lib.store import LayerStore

pytestmark = [pytest.mark.docker, pytest.mark.integration]

CHUNK = 256 * 1024


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def with_unique_base(demo: Path, out: Path, ref: str, marker: str) -> Path:
    """The demo image with one more layer at the bottom (a file naming ``marker``)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        data = f"{marker}\n".encode()
        info = tarfile.TarInfo("rbd-marker")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    base = buf.getvalue()
    with tarfile.open(demo) as src, tarfile.open(out, "w") as dst:
        manifest = json.loads(src.extractfile("manifest.json").read())  # type: ignore[union-attr]
        config = json.loads(src.extractfile(manifest[0]["Config"]).read())  # type: ignore[union-attr]
        config["rootfs"]["diff_ids"].insert(0, sha(base))
        config["history"].insert(0, {"created_by": f"ADD marker {marker}"})
        config_bytes = json.dumps(config).encode()
        config_name = sha(config_bytes)[7:] + ".json"
        layers = [f"{sha(base)[7:]}/layer.tar", *manifest[0]["Layers"]]
        for name, data in (
            (config_name, config_bytes),
            (layers[0], base),
            (
                "manifest.json",
                json.dumps([{"Config": config_name, "RepoTags": [ref], "Layers": layers}]).encode(),
            ),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
        for name in manifest[0]["Layers"]:
            member = src.getmember(name)
            dst.addfile(member, src.extractfile(member))
    return out


@pytest.mark.parametrize("mode", ["gzip", "zstd"])
async def test_compressed_image_loads_and_runs(
    mode: Compression, dockerd: PrivateDockerd, demo_image: Path, tmp_path: Path
) -> None:
    ref = f"rbd-compressed-{mode}:1"
    archive = await asyncio.to_thread(
        with_unique_base, demo_image, tmp_path / "img.tar", ref, f"{mode}-{tmp_path.name}"
    )
    store = LayerStore(tmp_path / "store")
    image, _ = await asyncio.to_thread(
        ingest_docker_archive, archive, store, chunk_size=CHUNK, compression=mode
    )
    for layer in image.layers:
        with store.open_blob(Digest(layer.digest)) as f:
            assert sniff(f.read(4)) == mode  # what rbd stores and moves is compressed
        assert layer.media_type == (MEDIA_DOCKER_GZIP if mode == "gzip" else MEDIA_OCI_ZSTD)
    async with DockerLoader(dockerd.url) as loader:
        result = await loader.load(image, store)
        assert result.layers_sent == 4  # nothing was in the engine already
        assert result.image_id == image.config_digest
        code, out = await loader.run(image.ref)
    assert code == 0, out
    assert "hello from rbd" in out
    if mode == "zstd":  # inflated for Docker: the tars went over the socket
        assert result.bytes_sent > image.uncompressed_size
    else:
        assert result.bytes_sent < image.uncompressed_size
