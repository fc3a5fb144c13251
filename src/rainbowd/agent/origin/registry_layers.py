"""A layer from the registry into the store: HTTP stream -> worker thread -> ``store.ingest``.

Layers stream from the HTTP response into ``store.ingest`` through a small
bounded queue read by a worker thread (the store is synchronous), so a layer is
never held whole in memory and never written to disk twice; the same thread
inflates gzip layers to count and hash the tar, and checks size, blob digest
and diff_id before the store installs the layer. Split from registry.py
(issue 15: one concern per file).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import queue
import zlib

import aiohttp
import structlog

from rainbowd.core.chunks import ChunkManifest, layer_chunk_size
from rainbowd.core.digest import Digest, parse_digest, short
from rainbowd.core.messages import LayerRef
from rainbowd.lib.store import LayerStore

from .registry_http import PIECE, RegistryClient
from .registry_names import LAYER_GZIP, RegistryError

log = structlog.get_logger(__name__)

#: how many pieces read from the HTTP stream may wait for the store thread
QUEUE_PIECES = 16


class _Abort(Exception):
    """Put into the queue to make the store thread stop (the producer failed)."""


_EOF = b""


class _LayerReader:
    """The readable ``store.ingest`` consumes, fed piece by piece from the event loop.

    Runs in the store's worker thread: it hashes the blob, inflates gzip layers
    to hash and count the tar, and at end of stream checks size, blob digest and
    diff_id. Raising there (before ``read`` returns EOF) makes ``store.ingest``
    drop its tmp copy, so an unverified layer is never installed.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        credits: asyncio.Semaphore,
        *,
        where: str,
        digest: str,
        size: int,
        diff_id: str,
        gzipped: bool,
    ) -> None:
        self.q: queue.Queue[bytes | BaseException] = queue.Queue()
        self.loop = loop
        self.credits = credits
        self.where = where
        self.digest = digest
        self.size = size
        self.diff_id = diff_id
        self.gzipped = gzipped
        self.blob_hash = hashlib.sha256()
        self.tar_hash = hashlib.sha256()
        self.received = 0
        self.uncompressed = 0
        self.inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None
        self._buf = b""
        self._eof = False

    def _inflate(self, data: bytes) -> None:
        """Feed compressed bytes; handles concatenated gzip members (valid gzip)."""
        while data and self.inflater is not None:
            try:
                out = self.inflater.decompress(data)
            except zlib.error as e:
                raise RegistryError(
                    f"{self.where}: layer {short(self.digest)} is not valid gzip ({e})"
                ) from None
            self.tar_hash.update(out)
            self.uncompressed += len(out)
            if not self.inflater.eof:
                return
            data = self.inflater.unused_data
            if data:
                self.inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def _finish(self) -> None:
        layer = f"layer {short(self.digest)}"
        if self.received != self.size:
            raise RegistryError(
                f"{self.where}: {layer} is truncated: got {self.received} of {self.size} bytes"
            )
        actual = "sha256:" + self.blob_hash.hexdigest()
        if actual != self.digest:
            raise RegistryError(
                f"{self.where}: {layer} blob digest mismatch: content is {actual}, "
                f"manifest says {self.digest}"
            )
        if self.inflater is not None:
            if not self.inflater.eof:
                raise RegistryError(f"{self.where}: {layer} gzip stream is truncated")
            tail = self.inflater.flush()
            self.tar_hash.update(tail)
            self.uncompressed += len(tail)
            tar_digest = "sha256:" + self.tar_hash.hexdigest()
        else:
            tar_digest = actual
            self.uncompressed = self.received
        if tar_digest != self.diff_id:
            raise RegistryError(
                f"{self.where}: {layer} diff_id mismatch: uncompressed content is "
                f"{tar_digest}, config says {self.diff_id}"
            )

    def _release(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.credits.release)
        except RuntimeError:  # loop closed: nobody is waiting any more
            pass

    def read(self, n: int = -1) -> bytes:
        while not self._buf and not self._eof:
            item = self.q.get()
            if isinstance(item, BaseException):
                raise item
            self._release()
            if item is _EOF or not item:
                self._finish()
                self._eof = True
                break
            self.received += len(item)
            if self.received > self.size:
                raise RegistryError(
                    f"{self.where}: layer {short(self.digest)} is longer than the "
                    f"{self.size} bytes the manifest says"
                )
            self.blob_hash.update(item)
            self._inflate(item)
            self._buf = item
        if n < 0 or n >= len(self._buf):
            data, self._buf = self._buf, b""
        else:
            data, self._buf = self._buf[:n], self._buf[n:]
        return data


def _inspect_stored(
    store: LayerStore, digest: Digest, diff_id: str, gzipped: bool, where: str
) -> int:
    """Uncompressed size of a layer already held (re-checking its diff_id), without a download."""
    h = hashlib.sha256()
    total = 0
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None
    with store.open_blob(digest) as f:
        while data := f.read(1024 * 1024):
            while data and inflater is not None:
                try:
                    out = inflater.decompress(data)
                except zlib.error as e:
                    raise RegistryError(
                        f"{where}: layer {short(digest)} held in the store is not gzip ({e})"
                    ) from None
                h.update(out)
                total += len(out)
                if not inflater.eof:
                    break
                data = inflater.unused_data
                if data:
                    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            if inflater is None:
                h.update(data)
                total += len(data)
    if "sha256:" + h.hexdigest() != diff_id:
        raise RegistryError(
            f"{where}: layer {short(digest)} held in the store does not match diff_id {diff_id}"
        )
    return total


async def ingest_layer(
    client: RegistryClient,
    store: LayerStore,
    *,
    digest: str,
    size: int,
    media: str,
    diff_id: str,
    chunk_size: int,
    added: list[Digest],
) -> tuple[LayerRef, ChunkManifest]:
    where = client.where
    d = parse_digest(digest)
    gzipped = media in LAYER_GZIP
    llog = log.bind(image=str(client.ref), layer=short(digest))
    if not gzipped and digest != diff_id:
        raise RegistryError(
            f"{where}: uncompressed layer {short(digest)} does not match the config's "
            f"diff_id {diff_id}"
        )
    if store.has(d):
        manifest = store.manifest(d)
        if manifest.size != size:
            raise RegistryError(
                f"{where}: layer {short(digest)} is {manifest.size} bytes in the store, "
                f"manifest says {size}"
            )
        usize = await asyncio.to_thread(_inspect_stored, store, d, diff_id, gzipped, where)
        llog.info("layer already held", size=size)
        if manifest.chunk_size != layer_chunk_size(size, chunk_size):
            llog.info("held layer keeps its chunk size", chunk_size=manifest.chunk_size)
        ref = LayerRef(
            digest=digest, size=size, media_type=media, diff_id=diff_id, uncompressed_size=usize
        )
        return ref, manifest

    loop = asyncio.get_running_loop()
    credits = asyncio.Semaphore(QUEUE_PIECES)
    reader = _LayerReader(
        loop, credits, where=where, digest=digest, size=size, diff_id=diff_id, gzipped=gzipped
    )
    llog.info("layer download", size=size, media_type=media)
    chunk = layer_chunk_size(size, chunk_size)  # a small layer is cut finer
    consumer = asyncio.ensure_future(
        asyncio.to_thread(store.ingest, reader, d, chunk)  # type: ignore[arg-type]
    )
    # a store thread that stopped early must not leave the producer waiting for credit
    consumer.add_done_callback(lambda _: credits.release())
    try:
        resp = await client.get(f"/blobs/{digest}")
        async with resp:
            if resp.status == 404:
                raise RegistryError(f"{where}: layer blob {digest} not found in the registry")
            if resp.status != 200:
                raise RegistryError(f"{where}: layer blob {short(digest)} answered {resp.status}")
            if resp.content_length is not None and resp.content_length != size:
                raise RegistryError(
                    f"{where}: layer {short(digest)} is truncated or corrupt in the registry: "
                    f"it sends {resp.content_length} bytes, manifest says {size}"
                )
            try:
                async for piece in resp.content.iter_chunked(PIECE):
                    await credits.acquire()
                    if consumer.done():
                        break
                    reader.q.put(piece)
            except TimeoutError:
                raise RegistryError(f"{where}: layer {short(digest)} download timed out") from None
            except (aiohttp.ClientError, OSError) as e:
                raise RegistryError(
                    f"{where}: layer {short(digest)} download broke off (truncated blob): {e}"
                ) from None
        reader.q.put(_EOF)
        manifest = await asyncio.shield(consumer)
    except BaseException as e:
        # stop the store thread and wait for it: its tmp copy must be gone before we return
        reader.q.put(e if isinstance(e, Exception) else _Abort("cancelled"))
        with contextlib.suppress(BaseException):
            await asyncio.shield(consumer)
        if consumer.done() and not consumer.cancelled() and consumer.exception() is None:
            added.append(d)  # installed just as we were cancelled: the rollback must see it
        raise
    added.append(d)
    llog.info(
        "layer stored",
        size=size,
        uncompressed=reader.uncompressed,
        chunks=manifest.count,
    )
    ref = LayerRef(
        digest=digest,
        size=size,
        media_type=media,
        diff_id=diff_id,
        uncompressed_size=reader.uncompressed,
    )
    return ref, manifest
