"""LayerStore: the content-addressed layer store on one host.

Layout under ``root``::

    blobs/sha256/<hex>            complete layer, immutable, verified
    blobs/sha256/<hex>.chunks     its ChunkManifest (msgpack)
    partial/<hex>.part            a layer being received (sparse, preallocated)
    partial/<hex>.bitmap          verified chunks of the .part (msgpack), durable
    partial/<hex>.chunks          the manifest the partial is checked against
    tmp/                          scratch for ingest; emptied on open

A blob under ``blobs/`` is the only thing that counts as held. It gets there by
an atomic rename after its full digest was checked, and its manifest is written
first, so a crash at any point leaves either a complete layer or a partial one,
never a half layer that looks whole. A partial's bitmap is only persisted after
the chunk data it covers is fsynced, so on restart every bit set is a chunk on
disk that matched its sha256.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import msgpack
import msgspec

from rainbowd.chunks import (
    DEFAULT_CHUNK_SIZE,
    ChunkBitmap,
    ChunkManifest,
    ManifestError,
    build_manifest,
)
from rainbowd.digest import Digest, hex_part, is_digest, parse_digest


class StoreError(Exception):
    """A store operation failed; the message names the layer and the cause."""


class ChunkRejected(StoreError):
    """Bytes offered for a chunk do not match the manifest."""


class LayerMissing(StoreError):
    """The store does not hold the layer asked for."""


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PartialLayer:
    """A layer being received chunk by chunk; resumable across restarts.

    Durability bound: the bitmap is persisted (data fdatasync'd first) after
    ``FLUSH_EVERY`` new chunks or ``FLUSH_SECONDS`` since the last flush,
    whichever comes first, so a SIGKILL or power cut re-fetches at most that
    much: chunks written but not yet covered by a persisted bitmap are simply
    fetched again on resume (their bits were never set on disk).
    """

    #: persist the bitmap after this many newly written chunks
    FLUSH_EVERY = 4
    #: ... or when the oldest unflushed chunk is this old (a slow link must not
    #: leave minutes of progress unpersisted just because chunks trickle in)
    FLUSH_SECONDS = 0.5

    def __init__(self, store: LayerStore, manifest: ChunkManifest) -> None:
        self.store = store
        self.manifest = manifest
        self.digest = Digest(manifest.digest)
        h = hex_part(self.digest)
        self.data_path = store.partial_dir / f"{h}.part"
        self.bitmap_path = store.partial_dir / f"{h}.bitmap"
        self.manifest_path = store.partial_dir / f"{h}.chunks"
        self.bitmap = ChunkBitmap(manifest.count)
        self._unflushed = 0
        self._unflushed_since = 0.0
        self._fd: int | None = None
        self._open()

    def _open(self) -> None:
        saved: ChunkManifest | None = None
        if self.manifest_path.exists():
            try:
                saved = msgspec.convert(
                    msgpack.unpackb(self.manifest_path.read_bytes()), ChunkManifest
                )
            except (ValueError, msgspec.ValidationError, ManifestError):
                saved = None
        if saved != self.manifest:
            # no partial, or one cut with other chunk boundaries: start clean
            self.data_path.unlink(missing_ok=True)
            self.bitmap_path.unlink(missing_ok=True)
            _atomic_write(self.manifest_path, msgpack.packb(msgspec.to_builtins(self.manifest)))
        elif self.bitmap_path.exists():
            try:
                self.bitmap = ChunkBitmap(self.manifest.count, self.bitmap_path.read_bytes())
            except ManifestError:
                self.bitmap = ChunkBitmap(self.manifest.count)
        self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o640)
        if os.fstat(self._fd).st_size != self.manifest.size:
            os.ftruncate(self._fd, self.manifest.size)

    def missing(self) -> list[int]:
        return self.bitmap.missing()

    @property
    def bytes_present(self) -> int:
        """Bytes of chunks marked present (verified) in the bitmap."""
        return sum(self.manifest.chunk_length(i) for i in self.bitmap.present())

    @property
    def bytes_missing(self) -> int:
        """Bytes still to fetch: what the pull needs in free space, at most."""
        return self.manifest.size - self.bytes_present

    def write_chunk(self, index: int, data: bytes) -> None:
        """Check ``data`` against the manifest and write it; raise ChunkRejected if bad.

        Persists the bitmap when due (see the class docstring), so this may wait
        on the disk: an event loop calls :meth:`put_chunk` and, when
        :meth:`flush_due`, :meth:`flush` in a thread.
        """
        self.put_chunk(index, data)
        if self.flush_due():
            self.flush()

    def put_chunk(self, index: int, data: bytes) -> None:
        """:meth:`write_chunk` without the flush: a hash and a ``pwrite`` into the page cache."""
        if not self.manifest.verify_chunk(index, data):
            raise ChunkRejected(
                f"layer {self.digest} chunk {index}: {len(data)} bytes do not match the manifest"
            )
        assert self._fd is not None, "partial layer is closed"
        os.pwrite(self._fd, data, self.manifest.chunk_offset(index))
        self.bitmap.add(index)
        now = time.monotonic()
        if self._unflushed == 0:
            self._unflushed_since = now
        self._unflushed += 1

    def flush_due(self) -> bool:
        """True when chunks written since the last flush are too many or too old to leave."""
        if self._unflushed == 0:
            return False
        return (
            self._unflushed >= self.FLUSH_EVERY
            or time.monotonic() - self._unflushed_since >= self.FLUSH_SECONDS
        )

    def flush(self) -> None:
        """Make every chunk marked present durable, then persist the bitmap."""
        if self._fd is None or self._unflushed == 0:
            return
        os.fdatasync(self._fd)
        _atomic_write(self.bitmap_path, self.bitmap.to_bytes())
        self._unflushed = 0

    def close(self) -> None:
        if self._fd is not None:
            self.flush()
            os.close(self._fd)
            self._fd = None

    def commit(self) -> Path:
        """Check the whole digest and move the layer into place; return its path."""
        if not self.bitmap.complete():
            raise StoreError(
                f"layer {self.digest}: cannot commit, {len(self.missing())} chunks missing"
            )
        assert self._fd is not None
        os.fsync(self._fd)
        h = hashlib.sha256()
        with open(self.data_path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        actual = "sha256:" + h.hexdigest()
        if actual != self.digest:
            # every chunk matched yet the whole does not: the manifest itself was wrong
            self.close()
            self.store.discard_partial(self.digest)
            raise StoreError(f"layer {self.digest}: assembled content is {actual}; discarded")
        os.close(self._fd)
        self._fd = None
        return self.store._install(self.digest, self.data_path, self.manifest)


class LayerStore:
    """Complete and partial layers of one host, addressed by digest."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blob_dir = self.root / "blobs" / "sha256"
        self._blob_dir_s = os.fspath(self.blob_dir)
        self.partial_dir = self.root / "partial"
        self.tmp_dir = self.root / "tmp"
        for d in (self.blob_dir, self.partial_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp_dir.iterdir():
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    # -- complete layers -------------------------------------------------
    def path(self, digest: Digest) -> Path:
        return Path(self._blob_path(digest))

    def _blob_path(self, digest: Digest) -> str:
        return os.path.join(self._blob_dir_s, hex_part(parse_digest(digest)))

    def has(self, digest: Digest) -> bool:
        """The blob and its manifest are both in place (checked per chunk served: no pathlib)."""
        p = self._blob_path(digest)
        return os.path.isfile(p) and os.path.isfile(p + ".chunks")

    def holdings(self) -> list[Digest]:
        out = []
        for p in self.blob_dir.iterdir():
            if "." in p.name:
                continue
            d = "sha256:" + p.name
            if is_digest(d) and p.with_name(p.name + ".chunks").is_file():
                out.append(Digest(d))
        return sorted(out)

    def manifest(self, digest: Digest) -> ChunkManifest:
        p = self.path(digest)
        try:
            raw = p.with_name(p.name + ".chunks").read_bytes()
        except FileNotFoundError:
            raise LayerMissing(f"layer {digest} is not in the store at {self.root}") from None
        return msgspec.convert(msgpack.unpackb(raw), ChunkManifest)

    def size(self, digest: Digest) -> int:
        return self.manifest(digest).size

    def open_blob(self, digest: Digest) -> BinaryIO:
        if not self.has(digest):
            raise LayerMissing(f"layer {digest} is not in the store at {self.root}")
        return open(self.path(digest), "rb")

    def read_chunk(
        self, digest: Digest, index: int, manifest: ChunkManifest | None = None
    ) -> bytes:
        """Read chunk ``index`` of a complete layer (for serving peers)."""
        m = manifest or self.manifest(digest)
        length = m.chunk_length(index)
        with self.open_blob(digest) as f:
            f.seek(m.chunk_offset(index))
            return f.read(length)

    def remove(self, digest: Digest) -> None:
        p = self.path(digest)
        p.unlink(missing_ok=True)
        p.with_name(p.name + ".chunks").unlink(missing_ok=True)

    # -- ingest (origin) -------------------------------------------------
    def ingest(
        self, stream: BinaryIO, expected: Digest, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> ChunkManifest:
        """Copy ``stream`` into the store if it hashes to ``expected``.

        The copy goes to tmp/ while hashing; only a verified copy is installed.
        """
        parse_digest(expected)
        if self.has(expected):
            return self.manifest(expected)
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix="ingest-")
        try:
            with os.fdopen(fd, "w+b") as out:
                manifest = build_manifest(_Tee(stream, out), expected, chunk_size)
                out.flush()
                os.fsync(out.fileno())
            self._install(expected, Path(tmp), manifest)
            return manifest
        except ManifestError as e:
            raise StoreError(f"layer {expected}: {e}") from None
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _install(self, digest: Digest, src: Path, manifest: ChunkManifest) -> Path:
        dest = self.path(digest)
        _atomic_write(
            dest.with_name(dest.name + ".chunks"), msgpack.packb(msgspec.to_builtins(manifest))
        )
        os.replace(src, dest)
        os.chmod(dest, 0o440)
        _fsync_dir(self.blob_dir)
        self.discard_partial(digest)
        return dest

    # -- partial layers --------------------------------------------------
    def open_partial(self, manifest: ChunkManifest) -> PartialLayer:
        return PartialLayer(self, manifest)

    def discard_partial(self, digest: Digest) -> None:
        h = hex_part(digest)
        for suffix in (".part", ".bitmap", ".chunks"):
            (self.partial_dir / f"{h}{suffix}").unlink(missing_ok=True)

    def partial_bytes(self, manifest: ChunkManifest) -> int:
        """Verified bytes a persisted partial of ``manifest`` already has (0 if none).

        Reads the bitmap without opening (and so creating) the partial, so a
        pull can check free space before it writes anything.
        """
        h = hex_part(Digest(manifest.digest))
        try:
            saved = msgspec.convert(
                msgpack.unpackb((self.partial_dir / f"{h}.chunks").read_bytes()), ChunkManifest
            )
            if saved != manifest:
                return 0
            bm = ChunkBitmap(manifest.count, (self.partial_dir / f"{h}.bitmap").read_bytes())
        except (OSError, ValueError, msgspec.ValidationError, ManifestError):
            return 0
        return sum(manifest.chunk_length(i) for i in bm.present())

    def partials(self) -> Iterator[tuple[Digest, int, int]]:
        """(digest, chunks present, chunk count) for each partial layer."""
        # A partial may be committed or discarded (by a pull running in a
        # worker thread) between the directory listing and the reads below:
        # a file gone missing means "no longer partial", never an error.
        for p in self.partial_dir.glob("*.chunks"):
            try:
                m = msgspec.convert(msgpack.unpackb(p.read_bytes()), ChunkManifest)
            except (FileNotFoundError, ValueError, msgspec.ValidationError, ManifestError):
                continue
            try:
                have = ChunkBitmap(m.count, p.with_suffix(".bitmap").read_bytes()).have()
            except (FileNotFoundError, ManifestError):
                have = 0
            yield Digest(m.digest), have, m.count

    # -- space -----------------------------------------------------------
    def bytes_used(self) -> int:
        total = 0
        for d in (self.blob_dir, self.partial_dir):
            for p in d.iterdir():
                try:
                    total += p.stat().st_blocks * 512
                except FileNotFoundError:
                    pass
        return total

    def bytes_free(self) -> int:
        return shutil.disk_usage(self.root).free


class _Tee:
    """A read-only stream that copies what is read into ``sink``."""

    def __init__(self, src: BinaryIO, sink: BinaryIO) -> None:
        self.src = src
        self.sink = sink

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        if data:
            self.sink.write(data)
        return data
