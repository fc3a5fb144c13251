"""The origin's part of an ingest: read an image from its source into the layer store.

One entry point, :func:`ingest`, dispatching on the kind of source named in
the :class:`~rainbowd.core.messages.IngestAssignment`:

* ``archive:`` -- a ``docker save`` tarball (:func:`rainbowd.lib.image.ingest_docker_archive`);
* ``oci:`` -- an OCI image layout directory (:mod:`rainbowd.lib.ocilayout`);
* ``registry:`` -- an OCI/Docker registry (:mod:`rainbowd.agent.origin.registry`); the
  registry's blobs pass unchanged, so the assignment's compression is ignored;
* ``docker:`` -- an image in a Docker engine (:mod:`rainbowd.agent.origin.engine`).

File-based readers block, so they run in a worker thread; the network readers
are async. Every reader raises :class:`rainbowd.lib.image.ImageError` (or a
subclass) naming the image and the cause; the modules are imported only when
their kind of source is used.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.messages import (
    ArchiveSource,
    DockerEngineSource,
    ImageRecord,
    IngestAssignment,
    OciLayoutSource,
    RegistrySource,
)
from rainbowd.lib.image import ImageError, ingest_docker_archive
from rainbowd.lib.store import LayerStore


async def ingest(
    a: IngestAssignment, store: LayerStore, *, docker_url: str
) -> tuple[ImageRecord, list[ChunkManifest]]:
    """Read the image ``a`` names into ``store``; return its record and layer manifests.

    ``docker_url`` is the origin agent's own Docker engine (used for a
    ``docker:`` source that names no engine of its own).
    """
    src = a.source
    if isinstance(src, ArchiveSource):
        return await asyncio.to_thread(
            ingest_docker_archive,
            Path(src.path),
            store,
            ref=a.ref,
            chunk_size=a.chunk_size,
            compression=a.compression,
        )
    if isinstance(src, OciLayoutSource):
        from rainbowd.lib.ocilayout import ingest_oci_layout

        return await asyncio.to_thread(
            ingest_oci_layout,
            Path(src.path),
            store,
            ref=a.ref,
            tag=src.tag,
            chunk_size=a.chunk_size,
            compression=a.compression,
        )
    if isinstance(src, RegistrySource):
        from rainbowd.agent.origin.registry import ingest_registry

        return await ingest_registry(src, store, ref=a.ref, chunk_size=a.chunk_size)
    if isinstance(src, DockerEngineSource):
        url = src.docker_url or docker_url
        if not url:
            raise ImageError(
                f"image {a.ref}: source docker:{src.image} names no Docker engine and this "
                "origin has none configured (docker_url)"
            )
        from rainbowd.agent.origin.engine import ingest_docker_engine

        return await ingest_docker_engine(
            src,
            store,
            ref=a.ref,
            chunk_size=a.chunk_size,
            compression=a.compression,
            docker_url=url,
        )
    raise ImageError(f"image {a.ref}: unknown kind of source {type(src).__name__}")
