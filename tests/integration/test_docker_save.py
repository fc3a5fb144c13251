"""Ingest what a real ``docker save`` writes (its own layout, symlinked shared layers)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from rainbowd.agent.docker.loader import DockerLoader
from rainbowd.devcluster.dockerd import PrivateDockerd
from rainbowd.devcluster.imagebuild import build_demo_image
from rainbowd.lib.image import ImageError, ingest_docker_archive
from rainbowd.lib.store import LayerStore

pytestmark = [pytest.mark.docker, pytest.mark.integration]

CHUNK = 256 * 1024


def _docker_save(url: str, refs: list[str], out: Path) -> None:
    """``docker save`` with the real docker CLI (what users hand to ``rbd images add``)."""
    assert shutil.which("docker"), "docker CLI missing: apt-get install docker.io"
    subprocess.run(["docker", "-H", url, "save", "-o", str(out), *refs], check=True)


async def test_ingest_docker_save_output(dockerd: PrivateDockerd, tmp_path: Path) -> None:
    a = build_demo_image(tmp_path / "a.tar", ref="rbd-save-a:1", payload_mib=1, seed=11)
    b = build_demo_image(tmp_path / "b.tar", ref="rbd-save-b:1", payload_mib=1, seed=12)
    origin = LayerStore(tmp_path / "origin")
    ia, _ = ingest_docker_archive(a, origin, chunk_size=CHUNK)
    ib, _ = ingest_docker_archive(b, origin, chunk_size=CHUNK)
    async with DockerLoader(dockerd.url) as loader:
        await loader.load(ia, origin)
        await loader.load(ib, origin)
    saved = tmp_path / "saved.tar"
    await asyncio.to_thread(_docker_save, dockerd.url, ["rbd-save-a:1", "rbd-save-b:1"], saved)

    store = LayerStore(tmp_path / "store")
    with pytest.raises(ImageError, match="holds 2 images"):
        ingest_docker_archive(saved, store)
    got_a, _ = await asyncio.to_thread(
        ingest_docker_archive, saved, store, ref="rbd-save-a:1", chunk_size=CHUNK
    )
    got_b, _ = await asyncio.to_thread(
        ingest_docker_archive, saved, store, ref="rbd-save-b:1", chunk_size=CHUNK
    )
    # Docker kept the config bytes and the (uncompressed) layers exactly
    assert got_a == ia
    assert got_b == ib
