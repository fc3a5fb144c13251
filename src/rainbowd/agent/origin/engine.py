"""The Docker engine origin: read an image out of a Docker engine into the layer store.

For an image that exists only in an engine (built there, or pulled by hand),
the origin asks the engine for a ``docker save`` tarball (``GET
/images/{name}/get``), streams it to a temp file under the store's tmp/
(never whole in memory) and ingests that like any docker-archive, with the
assignment's compression. The engine's export is trusted no more than a file
on disk: :func:`rainbowd.lib.image.ingest_docker_archive` checks every layer
against the config's diff_ids.

The engine may be the origin agent's own (``docker_url``) or another one the
source names; either way errors name the engine's URL and the image.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

import aiodocker
import aiohttp
import structlog

from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.digest import short
from rainbowd.core.messages import Compression, DockerEngineSource, ImageRecord
from rainbowd.lib.image import ImageError, ingest_docker_archive
from rainbowd.lib.store import LayerStore

log = structlog.get_logger(__name__)

#: read size from the engine's export stream
EXPORT_PIECE = 1024 * 1024
#: how long to wait for the engine to answer at all (the export itself may take long)
CONNECT_TIMEOUT = 30.0
#: the status aiodocker gives a connection failure (it wraps aiohttp's error)
_UNREACHABLE = 900


async def ingest_docker_engine(
    source: DockerEngineSource,
    store: LayerStore,
    *,
    ref: str,
    chunk_size: int,
    compression: Compression,
    docker_url: str,
) -> tuple[ImageRecord, list[ChunkManifest]]:
    """Export ``source.image`` from its engine and ingest it into ``store`` as ``ref``.

    The engine is ``source.docker_url`` or else ``docker_url`` (the origin's
    own). The export goes to a temp file under ``store.tmp_dir``, removed in
    every case. Raises ImageError naming the engine, the image and the cause
    (no engine configured, engine unreachable, image not found, bad export).
    """
    url = source.docker_url or docker_url
    if not url:
        raise ImageError(
            f"image {source.image}: no Docker engine configured on the origin "
            "(the source names none and docker_url is empty)"
        )
    where = f"Docker engine {url} image {source.image}"
    start = time.monotonic()
    fd, name = tempfile.mkstemp(dir=store.tmp_dir, prefix="engine-export-", suffix=".tar")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            exported = await _export(url, source.image, out, where)
        log.info(
            "image exported from engine",
            engine=url,
            image=source.image,
            bytes=exported,
            seconds=round(time.monotonic() - start, 3),
        )
        try:
            record, manifests = await asyncio.to_thread(
                ingest_docker_archive,
                tmp,
                store,
                ref=ref,
                chunk_size=chunk_size,
                compression=compression,
            )
        except ImageError as e:
            raise ImageError(f"{where}: export rejected: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    log.info(
        "image ingested from engine",
        engine=url,
        image=source.image,
        ref=ref,
        config=short(record.config_digest),
        layers=len(record.layers),
        size=record.size,
        compression=compression,
        seconds=round(time.monotonic() - start, 3),
    )
    return record, manifests


async def _export(url: str, image: str, out: BinaryIO, where: str) -> int:
    """Stream the engine's export of ``image`` into the file ``out``; return its size."""
    total = 0
    try:
        docker = aiodocker.Docker(url=url)
    except (ValueError, aiodocker.DockerError) as e:
        raise ImageError(f"{where}: not a usable Docker URL ({_cause(e)})") from None
    try:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await docker.images.inspect(image)
        except aiodocker.DockerError as e:
            if e.status == 404:
                raise ImageError(f"{where}: image not found in the engine") from None
            if e.status == _UNREACHABLE:
                raise ImageError(f"{where}: engine unreachable ({e.message})") from None
            raise ImageError(f"{where}: engine refused: {e.message}") from None
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise ImageError(f"{where}: engine unreachable ({_cause(e)})") from None
        try:
            async with docker.images.export_image(image) as stream:
                while data := await stream.read(EXPORT_PIECE):
                    await asyncio.to_thread(out.write, data)
                    total += len(data)
        except aiodocker.DockerError as e:
            raise ImageError(f"{where}: export failed: {e.message}") from None
        except (aiohttp.ClientError, OSError) as e:
            raise ImageError(f"{where}: export broke off ({_cause(e)})") from None
    finally:
        with contextlib.suppress(Exception):
            await docker.close()
    if total == 0:
        raise ImageError(f"{where}: the engine exported nothing")
    return total


def _cause(e: BaseException) -> str:
    return str(e) or type(e).__name__
