"""Load complete images from the layer store into the local Docker engine.

The sink of the pipeline: once every layer of an image is held (and so
verified), the agent streams a docker-archive built on the fly from the store
to ``POST /images/load``. Layers the engine already has are left out of the
tar (manifest.json still names them), which is where most of the time goes
for a second image on the same base.

Streaming: :func:`rainbowd.lib.image.docker_archive_stream` is a blocking
generator of 1 MiB pieces; :class:`~rainbowd.agent.loadstream.Pieces` pulls one piece at a time in
a worker thread and hands it to aiohttp as a chunked request body (aiodocker's
``images.import_image`` passes ``data`` straight to aiohttp with
``chunked=True``). At most a couple of pieces are in memory at any time; the
tar never exists whole, neither in memory nor on disk.

What is left out is decided by chain ID, not diff ID: Docker reuses a layer
only when the whole stack below it matches, so the same diff on another base
still has to be sent.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any

import aiodocker
import structlog

from rainbowd.agent.loadstream import LoadResult, Pieces, close_quietly
from rainbowd.core.digest import Digest, short
from rainbowd.core.messages import ImageRecord
from rainbowd.lib.image import ImageError, chain_ids, docker_archive_stream
from rainbowd.lib.store import LayerStore

log = structlog.get_logger(__name__)


class DockerLoadError(RuntimeError):
    """Loading an image into Docker failed; the message names the image and Docker's reason."""


class DockerLoader:
    """A client of one Docker engine, for loading images and running test containers."""

    def __init__(self, docker_url: str | None = None) -> None:
        # None: aiodocker's default (DOCKER_HOST, else unix:///var/run/docker.sock)
        self.docker_url = docker_url
        self._docker: aiodocker.Docker | None = None

    @property
    def docker(self) -> aiodocker.Docker:
        if self._docker is None:
            self._docker = aiodocker.Docker(url=self.docker_url)
        return self._docker

    async def close(self) -> None:
        if self._docker is not None:
            await self._docker.close()
            self._docker = None

    async def __aenter__(self) -> DockerLoader:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- queries ---------------------------------------------------------
    async def available(self) -> bool:
        """True when the engine answers a ping (the agent reports ``docker: true``)."""
        try:
            async with self.docker._query("_ping", versioned_api=False) as resp:
                return bool(resp.status == 200)
        except (TimeoutError, aiodocker.DockerError, OSError) as e:
            log.debug("docker not available", url=self.docker_url, error=str(e))
            return False

    async def _rootfs_of_all(self) -> list[list[str]]:
        images: list[dict[str, Any]] = await self.docker.images.list(all=True)
        stacks: list[list[str]] = []
        for img in images:
            try:
                info = await self.docker.images.inspect(img["Id"])
            except aiodocker.DockerError:
                continue  # removed between list and inspect
            layers = (info.get("RootFS") or {}).get("Layers") or []
            stacks.append([str(d) for d in layers])
        return stacks

    async def known_diff_ids(self) -> set[str]:
        """Diff IDs of every layer of every local image."""
        return {d for stack in await self._rootfs_of_all() for d in stack}

    async def known_chain_ids(self) -> set[str]:
        """Chain IDs of every layer stack the engine holds (what load can skip)."""
        return {c for stack in await self._rootfs_of_all() for c in chain_ids(stack)}

    # -- load ------------------------------------------------------------
    async def load(self, image: ImageRecord, store: LayerStore) -> LoadResult:
        """Stream ``image`` from ``store`` into Docker, leaving out layers it already has.

        Raises DockerLoadError (nothing is sent if a needed layer is not
        complete in the store) and checks that the loaded image's ID is the
        config digest, i.e. Docker got exactly the image we verified.
        """
        start = time.monotonic()
        diff_ids = [layer.diff_id for layer in image.layers]
        try:
            known_chains = await self.known_chain_ids()
        except aiodocker.DockerError as e:
            raise DockerLoadError(f"load {image.ref}: cannot list Docker's images: {e}") from e
        chains = chain_ids(diff_ids)
        # a diff id may appear at several depths; skip it only if Docker has every one
        skip = {d for d in diff_ids} - {
            d for d, c in zip(diff_ids, chains, strict=True) if c not in known_chains
        }
        try:
            pieces = await asyncio.to_thread(
                docker_archive_stream, image, store, skip_diff_ids=skip
            )
        except ImageError as e:
            raise DockerLoadError(f"load {image.ref}: {e}") from e
        sent_layers = len({layer.digest for layer in image.layers if layer.diff_id not in skip})
        body = Pieces(pieces)
        messages: list[str] = []
        try:
            stream = self.docker.images.import_image(data=body.stream(), stream=True)
            async for item in stream:
                if isinstance(item, dict):
                    if item.get("error") or item.get("errorDetail"):
                        detail = item.get("errorDetail") or {}
                        msg = item.get("error") or detail.get("message") or str(item)
                        raise DockerLoadError(f"load {image.ref}: Docker refused it: {msg}")
                    if item.get("stream"):
                        messages.append(str(item["stream"]).strip())
        except ImageError as e:
            raise DockerLoadError(f"load {image.ref}: {e}") from e
        except aiodocker.DockerError as e:
            if body.error is not None:  # our side broke the stream (corrupt blob, I/O error)
                raise DockerLoadError(f"load {image.ref}: {body.error}") from body.error
            raise DockerLoadError(f"load {image.ref}: Docker refused it: {e.message}") from e
        finally:
            await asyncio.to_thread(close_quietly, pieces)
        try:
            info = await self.docker.images.inspect(image.ref)
        except aiodocker.DockerError as e:
            raise DockerLoadError(
                f"load {image.ref}: Docker reported {messages or 'nothing'} but the image "
                f"is not there: {e.message}"
            ) from e
        image_id = str(info.get("Id", ""))
        if image_id != image.config_digest:
            raise DockerLoadError(
                f"load {image.ref}: Docker's image ID {image_id} is not the config digest "
                f"{image.config_digest}"
            )
        seconds = time.monotonic() - start
        log.info(
            "image loaded into docker",
            ref=image.ref,
            image=short(image.config_digest),
            layers=len(image.layers),
            layers_sent=sent_layers,
            bytes_sent=body.bytes,
            seconds=round(seconds, 3),
        )
        return LoadResult(
            layers_sent=sent_layers, seconds=seconds, image_id=image_id, bytes_sent=body.bytes
        )

    async def has_image(self, ref: str, config_digest: str | None = None) -> bool:
        """True if ``ref`` exists (and, when given, has image ID ``config_digest``)."""
        try:
            info = await self.docker.images.inspect(ref)
        except aiodocker.DockerError:
            return False
        return config_digest is None or info.get("Id") == Digest(config_digest)

    # -- run (demo and tests) --------------------------------------------
    async def run(
        self, ref: str, cmd: list[str] | None = None, *, timeout: float = 120.0
    ) -> tuple[int, str]:
        """Run ``ref`` once without network; return (exit code, output). Always removes it."""
        config: dict[str, Any] = {
            "Image": ref,
            "HostConfig": {"NetworkMode": "none"},
            "AttachStdout": False,
            "AttachStderr": False,
        }
        if cmd is not None:
            config["Cmd"] = cmd
        container = await self.docker.containers.create(config=config)
        try:
            await container.start()
            async with asyncio.timeout(timeout):
                result = await container.wait()
            lines = await container.log(stdout=True, stderr=True)
            return int(result.get("StatusCode", -1)), "".join(lines)
        finally:
            try:
                await container.delete(force=True)
            except aiodocker.DockerError as e:
                log.warning("could not remove container", container=container.id, error=str(e))
