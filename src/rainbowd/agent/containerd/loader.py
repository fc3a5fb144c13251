"""Load complete images from the layer store into containerd (its content store and image table).

The mechanism is ``ctr images import`` of an OCI image layout tar streamed to
its standard input (:func:`rainbowd.lib.ociarchive.oci_archive_stream`), and
not containerd's gRPC API: that API needs containerd's protobufs and a gRPC
stack in the agent for three calls (write content, create image, unpack),
while ``ctr`` comes in the same Debian package as containerd, speaks the
same socket, and does the import the way containerd's own tools do it (blobs
committed by digest, garbage-collection labels set from the manifest down,
the image unpacked into the snapshotter so ``ctr run`` and the CRI start it
without a pull). ``ctr content ingest`` plus an image create would be the
other path, but ctr has no command that creates an image record from a
digest, so it would still need the import or gRPC.

Why an OCI layout and not the docker-archive the Docker loader streams:
containerd converts a docker-archive into a manifest of its own making, with
a digest of its own. The OCI layout carries the manifest the registry front
door serves (``rainbowd.core.imagemanifest``), so ``ctr images ls``, the
front door and ``rbd-agent status`` name the image by one digest, and the
load is checked against it: after the import, containerd must list the image
under :func:`~rainbowd.agent.containerd.names.containerd_name` of the ref
with exactly that manifest digest, or the load fails.

Layers containerd's content store already holds (another image on the same
base) are left out of the tar; ``index.json`` goes last, so a stream cut
short (a corrupt blob, the agent stopping) creates no image record.

Each call of ``ctr`` is a child process of the agent, waited for and killed
by its own PID when it outlives its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from typing import Final

import structlog

from rainbowd.agent.containerd.names import containerd_name
from rainbowd.agent.loadstream import LoadResult, Pieces, close_quietly
from rainbowd.core.digest import short
from rainbowd.core.messages import ImageRecord
from rainbowd.lib.image import ImageError
from rainbowd.lib.ociarchive import oci_archive_stream
from rainbowd.lib.store import LayerStore

log = structlog.get_logger(__name__)

#: the client that ships with containerd (Debian's ``containerd`` package)
CTR_BIN: Final = "ctr"
#: seconds a short ctr call (version, content ls, images ls) may take: each is one
#: listing over a local socket; a containerd that takes longer is not answering
CTR_CALL_SECONDS: Final = 60.0
#: an import may take this long at the least, plus IMPORT_SECONDS_PER_BYTE for what
#: it is sent: unpacking writes every layer's files to disk, so the deadline grows
#: with the image; 10 MB/s is far below any disk, so only a stuck containerd hits it
IMPORT_MIN_SECONDS: Final = 300.0
IMPORT_SECONDS_PER_BYTE: Final = 1 / 10e6
#: seconds ctr waits to connect to the socket (its own default waits 10 s, and a
#: registration asks once whether containerd answers: a local socket connects at once)
CTR_CONNECT_SECONDS: Final = 3
#: most bytes of ctr's error output kept for a failed load's reason
MAX_ERROR_BYTES: Final = 4000


class ContainerdLoadError(RuntimeError):
    """Loading an image into containerd failed; the message names the image and the reason."""


class ContainerdLoader:
    """One containerd (a socket and a namespace), driven with ``ctr``."""

    def __init__(
        self, address: str, namespace: str, *, snapshotter: str = "", ctr: str = CTR_BIN
    ) -> None:
        self.address = address
        self.namespace = namespace
        #: "" = containerd's default (overlayfs); the CRI unpacks into that one too
        self.snapshotter = snapshotter
        self.ctr = ctr

    def where(self) -> str:
        return f"containerd at {self.address} (namespace {self.namespace})"

    # -- queries ---------------------------------------------------------
    async def available(self) -> bool:
        """True when ctr exists and containerd answers (the agent reports ``containerd: true``)."""
        if shutil.which(self.ctr) is None:
            log.warning("containerd configured but ctr is missing", ctr=self.ctr)
            return False
        try:
            await self._call("version")
        except ContainerdLoadError as e:
            log.warning("containerd not available", address=self.address, error=str(e))
            return False
        return True

    async def content_digests(self) -> set[str]:
        """Digests of every blob in the content store (what an import can leave out)."""
        return set((await self._call("content", "ls", "--quiet")).split())

    async def image_digests(self) -> dict[str, str]:
        """Image name -> the manifest digest containerd records for it, in this namespace."""
        lines = (await self._call("images", "ls")).splitlines()
        out: dict[str, str] = {}
        for line in lines[1:]:  # a header line, then: REF TYPE DIGEST SIZE ...
            cols = line.split()
            if len(cols) >= 3 and cols[2].startswith("sha256:"):
                out[cols[0]] = cols[2]
        return out

    async def has_image(self, ref: str, manifest_digest: str | None = None) -> bool:
        """True if ``ref`` is in the image table (and, when given, with that manifest digest)."""
        got = (await self.image_digests()).get(containerd_name(ref))
        return got is not None and (manifest_digest is None or got == manifest_digest)

    # -- load ------------------------------------------------------------
    async def load(self, image: ImageRecord, store: LayerStore) -> LoadResult:
        """Import ``image`` from ``store``, leaving out blobs containerd already has.

        Raises ContainerdLoadError naming the image and containerd's (or the
        store's) reason; nothing is sent if a needed layer is not complete in
        the store.
        """
        start = time.monotonic()
        name = containerd_name(image.ref)
        what = f"load {image.ref} into {self.where()}"
        try:
            have = await self.content_digests()
        except ContainerdLoadError as e:
            raise ContainerdLoadError(f"{what}: cannot list its content: {e}") from e
        skip = {layer.digest for layer in image.layers if layer.digest in have}
        try:
            built, pieces = await asyncio.to_thread(
                oci_archive_stream, image, store, name, skip=skip
            )
        except ImageError as e:
            raise ContainerdLoadError(f"{what}: {e}") from e
        body = Pieces(pieces)
        argv = ["images", "import"]
        if self.snapshotter:
            argv += ["--snapshotter", self.snapshotter]
        deadline = IMPORT_MIN_SECONDS + IMPORT_SECONDS_PER_BYTE * image.size
        try:
            await self._call(*argv, "-", stdin=body, timeout=deadline)
        except ContainerdLoadError as e:
            if body.error is not None:  # our side broke the stream (corrupt blob, I/O error)
                raise ContainerdLoadError(f"{what}: {body.error}") from body.error
            raise ContainerdLoadError(f"{what}: containerd refused it: {e}") from e
        finally:
            await asyncio.to_thread(close_quietly, pieces)
        try:
            got = (await self.image_digests()).get(name)
        except ContainerdLoadError as e:
            raise ContainerdLoadError(f"{what}: cannot list its images: {e}") from e
        if got != built.digest:
            raise ContainerdLoadError(
                f"{what}: containerd lists {name} as {got or 'absent'}, not as the manifest "
                f"digest {built.digest} the import carried"
            )
        seconds = time.monotonic() - start
        sent = len({layer.digest for layer in image.layers} - skip)
        log.info(
            "image loaded into containerd",
            ref=image.ref,
            name=name,
            namespace=self.namespace,
            manifest=short(built.digest),
            layers=len(image.layers),
            layers_sent=sent,
            bytes_sent=body.bytes,
            seconds=round(seconds, 3),
        )
        return LoadResult(
            layers_sent=sent, seconds=seconds, image_id=built.digest, bytes_sent=body.bytes
        )

    # -- ctr ---------------------------------------------------------------
    async def _call(
        self, *args: str, stdin: Pieces | None = None, timeout: float = CTR_CALL_SECONDS
    ) -> str:
        """Run ``ctr`` against this containerd; its stdout, or ContainerdLoadError with stderr."""
        argv = [
            self.ctr,
            "--address",
            self.address,
            "--namespace",
            self.namespace,
            "--connect-timeout",
            f"{CTR_CONNECT_SECONDS}s",
            *args,
        ]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as e:
            raise ContainerdLoadError(f"cannot run {self.ctr}: {e}") from e
        try:
            async with asyncio.timeout(timeout):
                out, err, _ = await asyncio.gather(
                    _read_all(proc.stdout), _read_all(proc.stderr), _feed(proc, stdin)
                )
                code = await proc.wait()
        except TimeoutError:
            raise ContainerdLoadError(
                f"ctr {' '.join(args)} did not finish within {timeout:.0f} s"
            ) from None
        finally:
            if proc.returncode is None:  # a deadline, a broken stream or a cancel
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if stdin is not None and stdin.error is not None:
            raise ContainerdLoadError(f"the archive broke off: {stdin.error}")
        if code != 0:
            reason = err.decode(errors="replace").strip()[-MAX_ERROR_BYTES:]
            raise ContainerdLoadError(f"ctr {' '.join(args)} exited {code}: {reason}")
        return out.decode(errors="replace")


async def _read_all(stream: asyncio.StreamReader | None) -> bytes:
    return b"" if stream is None else await stream.read()


async def _feed(proc: asyncio.subprocess.Process, body: Pieces | None) -> None:
    """Write ``body`` to ``proc``'s stdin, then close it; a ctr that quit early ends the feed.

    A broken archive (a corrupt blob) stops the feed with the pipe closed
    mid-tar: ctr sees a truncated archive and fails, and the error is kept on
    ``body`` for the caller.
    """
    if body is None or proc.stdin is None:
        return
    try:
        async for piece in body.stream():
            proc.stdin.write(piece)
            await proc.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        return  # ctr stopped reading: its exit code and stderr say why
    except Exception:  # the archive broke (kept on body.error): ctr gets a cut tar
        if body.error is None:
            raise
    finally:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.close()
            await proc.stdin.wait_closed()
