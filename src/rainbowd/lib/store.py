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

Shared partials (several pulls of one layer at once, each fetching another
run of chunks from another seeder): :meth:`LayerStore.share_partial` hands
every pull of a layer the same :class:`PartialLayer`, counted, and
:meth:`LayerStore.release_partial` flushes it and closes it when the last
user lets go. A PartialLayer is safe to use from several threads: each chunk
is written once (a chunk present or being written is skipped), bitmap updates
and flushes are serialized, and :meth:`PartialLayer.commit` checks the whole
digest and installs the layer exactly once (a second caller gets the path).
A partial in use (pulled here, or pinned while its chunks are served) is
never deleted by :meth:`LayerStore.discard_partial`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import msgpack
import msgspec

from rainbowd.core.chunks import (
    DEFAULT_CHUNK_SIZE,
    ChunkBitmap,
    ChunkManifest,
    ManifestError,
    build_manifest,
)
from rainbowd.core.digest import Digest, hex_part, is_digest, parse_digest
from rainbowd.lib.atomicfile import write_atomic

#: persisted partial bitmaps kept in memory for serving (a stat tells when one changed)
MAX_CACHED_BITMAPS = 256
#: manifests of complete layers kept in memory for serving (a complete layer never changes;
#: past this many the cache starts over)
MAX_CACHED_MANIFESTS = 256


class StoreError(Exception):
    """A store operation failed; the message names the layer and the cause."""


class ChunkRejected(StoreError):
    """Bytes offered for a chunk do not match the manifest."""


class LayerMissing(StoreError):
    """The store does not hold the layer asked for."""


class CorruptBlob(StoreError):
    """A chunk read for serving does not match its layer's manifest (the copy on disk rotted)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PartialLayer:
    """A layer being received chunk by chunk; resumable across restarts.

    Thread safety: ``put_chunk``/``write_chunk``, ``flush``, ``commit`` and
    ``close`` may be called from several threads at once (one per pull of a
    shared partial); see the module docstring.

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
        #: guards the bitmap, the chunks being written and the state below
        self._lock = threading.Lock()
        #: held for a whole flush, commit or close (fdatasync + bitmap file, or install)
        self._io_lock = threading.Lock()
        self._writing: set[int] = set()
        #: where the layer was installed (commit done), or why the commit failed
        self.installed: Path | None = None
        self._failed = ""
        #: users of a shared partial (LayerStore.share_partial); 0 for a private one
        self.users = 0
        #: the last user let go and it is being closed; set when that is over
        self.closing = False
        self.closed = threading.Event()
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
            write_atomic(self.manifest_path, msgpack.packb(msgspec.to_builtins(self.manifest)))
        elif self.bitmap_path.exists():
            try:
                self.bitmap = ChunkBitmap(self.manifest.count, self.bitmap_path.read_bytes())
            except ManifestError:
                self.bitmap = ChunkBitmap(self.manifest.count)
        self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o640)
        if os.fstat(self._fd).st_size != self.manifest.size:
            os.ftruncate(self._fd, self.manifest.size)

    def missing(self) -> list[int]:
        with self._lock:
            return self.bitmap.missing()

    def missing_in(self, first: int, end: int) -> list[int]:
        """Chunks of [first, end) not present (being written by another pull counts as missing)."""
        with self._lock:
            return [i for i in range(first, end) if i not in self.bitmap]

    def has_chunk(self, index: int) -> bool:
        """Whether chunk ``index`` is verified and written (its bit is set)."""
        with self._lock:
            return 0 <= index < self.manifest.count and index in self.bitmap

    def complete(self) -> bool:
        """Every chunk present and none being written: ready to :meth:`commit`."""
        with self._lock:
            return not self._writing and self.bitmap.complete()

    @property
    def usable(self) -> bool:
        """Still open for chunks: not closed, committed or discarded."""
        return self._fd is not None and self.installed is None and not self._failed

    @property
    def bytes_present(self) -> int:
        """Bytes of chunks marked present (verified) in the bitmap."""
        return sum(self.manifest.chunk_length(i) for i in self.bitmap.present())

    @property
    def bytes_missing(self) -> int:
        """Bytes still to fetch: what the pull needs in free space, at most."""
        return self.manifest.size - self.bytes_present

    def write_chunk(self, index: int, data: bytes) -> bool:
        """Check ``data`` against the manifest and write it; raise ChunkRejected if bad.

        Persists the bitmap when due (see the class docstring), so this may wait
        on the disk: an event loop calls :meth:`put_chunk` and, when
        :meth:`flush_due`, :meth:`flush` in a thread. False: the chunk was
        already there (or being written by another pull), nothing was written.
        """
        wrote = self.put_chunk(index, data)
        if self.flush_due():
            self.flush()
        return wrote

    def put_chunk(self, index: int, data: bytes) -> bool:
        """:meth:`write_chunk` without the flush: a hash and a ``pwrite`` into the page cache.

        Each chunk is written once: one already present, or being written by
        another thread, is skipped (False). Raises StoreError if the partial
        was closed, committed or discarded meanwhile.
        """
        if not self.manifest.verify_chunk(index, data):
            raise ChunkRejected(
                f"layer {self.digest} chunk {index}: {len(data)} bytes do not match the manifest"
            )
        with self._lock:
            if index in self.bitmap or index in self._writing:
                return False
            fd = self._fd
            if fd is None or self.installed is not None or self._failed:
                raise StoreError(
                    f"layer {self.digest}: partial is no longer open for chunks "
                    f"({self._failed or 'closed or installed'})"
                )
            self._writing.add(index)
        try:
            # outside the lock: other pulls write other chunks meanwhile. The fd stays
            # open: close() and commit() wait while a chunk is being written.
            os.pwrite(fd, data, self.manifest.chunk_offset(index))
        finally:
            with self._lock:
                self._writing.discard(index)
        with self._lock:
            self.bitmap.add(index)
            if self._unflushed == 0:
                self._unflushed_since = time.monotonic()
            self._unflushed += 1
        return True

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
        with self._io_lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        # the snapshot covers only chunks whose pwrite finished (a bit is set after
        # its write), and those are what the fdatasync below makes durable
        with self._lock:
            if self._fd is None or self._unflushed == 0:
                return
            fd, snapshot, count = self._fd, self.bitmap.to_bytes(), self._unflushed
            self._unflushed = 0
        try:
            os.fdatasync(fd)
            write_atomic(self.bitmap_path, snapshot)
        except BaseException:
            with self._lock:
                self._unflushed += count  # not persisted: the next flush tries again
            raise

    def _wait_writes(self) -> None:
        """Wait (briefly: a pwrite) until no chunk is being written into the file."""
        while True:
            with self._lock:
                if not self._writing:
                    return
            time.sleep(0.001)

    def close(self) -> None:
        with self._io_lock:
            if self._fd is None:
                return
            self._wait_writes()
            self._flush_locked()
            with self._lock:
                fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)

    def commit(self) -> Path:
        """Check the whole digest and move the layer into place; return its path.

        Exactly once: a second call (another pull of a shared partial) waits for
        the first and returns the same path, or raises the same error.
        """
        with self._io_lock:
            if self.installed is not None:
                return self.installed
            if self._failed:
                raise StoreError(self._failed)
            with self._lock:
                missing = 0 if self._writing else self.manifest.count - self.bitmap.have()
                fd = self._fd
            if missing or self._writing:
                raise StoreError(
                    f"layer {self.digest}: cannot commit, "
                    f"{missing or len(self._writing)} chunks missing"
                )
            assert fd is not None, "partial layer is closed"
            os.fsync(fd)
            h = hashlib.sha256()
            with open(self.data_path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            actual = "sha256:" + h.hexdigest()
            if actual != self.digest:
                # every chunk matched yet the whole does not: the manifest itself was wrong
                self._failed = f"layer {self.digest}: assembled content is {actual}; discarded"
                with self._lock:
                    self._fd = None
                os.close(fd)
                self.store._discard_partial_files(self.digest)
                raise StoreError(self._failed)
            with self._lock:
                self._fd = None
            os.close(fd)
            self.installed = self.store._install(self.digest, self.data_path, self.manifest)
            return self.installed


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
        #: guards the two maps below (pulls open partials from worker threads)
        self._partials_lock = threading.Lock()
        #: digest -> the partial every pull of that layer shares (share_partial)
        self._shared: dict[str, PartialLayer] = {}
        #: digest -> requests serving chunks of its partial right now (pin_partial)
        self._partial_pins: dict[str, int] = {}
        #: digest -> (bitmap file identity, manifest, bitmap) of a partial no pull has open
        self._stored_bitmaps: dict[str, tuple[tuple[int, int], ChunkManifest, ChunkBitmap]] = {}
        #: digest -> manifest of a complete layer a chunk was served from (read_blob_chunk)
        self._served_manifests: dict[Digest, ChunkManifest] = {}
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

    # -- serving peers ---------------------------------------------------
    def cached_manifest(self, digest: Digest) -> ChunkManifest | None:
        """The manifest :meth:`read_blob_chunk` holds in memory for ``digest`` (None: not yet).

        Lets a caller on an event loop tell a read that touches only the blob
        (cheap when the chunk is small) from one that must read the manifest
        file first (never on the loop).
        """
        return self._served_manifests.get(digest)

    def read_blob_chunk(
        self, digest: Digest, index: int, *, node: str, verify: bool = True
    ) -> bytes:
        """Chunk ``index`` of the complete layer ``digest``, checked before it is served.

        Blocking: a ``pread``, and the manifest file the first time a layer is
        served. ``node`` names this host in the errors, which a peer reads:
        LayerMissing (not held, or removed meanwhile), IndexError (no such
        chunk), StoreError (short read), CorruptBlob (``verify`` and the bytes
        do not match the manifest: the blob rotted on disk; better refuse than
        send bad bytes a demander would only reject).
        """
        if not self.has(digest):
            self._served_manifests.pop(digest, None)
            raise LayerMissing(f"node {node} does not hold layer {digest}")
        m = self._served_manifests.get(digest)
        if m is None:
            m = self.manifest(digest)
            if len(self._served_manifests) > MAX_CACHED_MANIFESTS:
                self._served_manifests.clear()
            self._served_manifests[digest] = m
        return self._read_checked(
            digest,
            index,
            m,
            self._blob_path(digest),
            verify,
            f"node {node}: stored layer",
            " (the blob on disk is corrupt)",
        )

    def read_partial_chunk(
        self,
        digest: Digest,
        index: int,
        manifest: ChunkManifest,
        path: os.PathLike[str] | str,
        *,
        node: str,
        verify: bool = True,
    ) -> bytes:
        """Chunk ``index`` of a partial of ``digest`` (its bit is set), checked before serving.

        ``manifest`` and ``path`` are what :meth:`stored_partial_chunk` or the
        shared partial named. Blocking; raises like :meth:`read_blob_chunk`,
        and FileNotFoundError when the partial was installed (renamed into
        place) meanwhile: read the blob then.
        """
        return self._read_checked(
            digest, index, manifest, path, verify, f"node {node}: partial layer"
        )

    @staticmethod
    def _read_checked(
        digest: Digest,
        index: int,
        m: ChunkManifest,
        path: os.PathLike[str] | str,
        verify: bool,
        what: str,
        why: str = "",
    ) -> bytes:
        """Chunk ``index`` of the file at ``path``, checked against ``m`` when ``verify``."""
        if not 0 <= index < m.count:
            raise IndexError(f"layer {digest} has chunks 0..{m.count - 1}, not {index}")
        length = m.chunk_length(index)
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.pread(fd, length, m.chunk_offset(index))
        finally:
            os.close(fd)
        if len(data) != length:
            raise StoreError(f"layer {digest} chunk {index}: short read ({len(data)}/{length})")
        if verify and not m.verify_chunk(index, data):
            raise CorruptBlob(
                f"{what} {digest} chunk {index} does not match its manifest{why}; not serving it"
            )
        return data

    def remove(self, digest: Digest) -> None:
        self._served_manifests.pop(digest, None)
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
        write_atomic(
            dest.with_name(dest.name + ".chunks"), msgpack.packb(msgspec.to_builtins(manifest))
        )
        os.replace(src, dest)
        os.chmod(dest, 0o440)
        _fsync_dir(self.blob_dir)
        self._discard_partial_files(digest)
        return dest

    # -- partial layers --------------------------------------------------
    def open_partial(self, manifest: ChunkManifest) -> PartialLayer:
        """A private PartialLayer of ``manifest`` (one user; see :meth:`share_partial`)."""
        return PartialLayer(self, manifest)

    def share_partial(self, manifest: ChunkManifest) -> PartialLayer:
        """The PartialLayer all pulls of this layer share; give it back: :meth:`release_partial`.

        Opened (and created) by the first caller; later callers with the same
        manifest get the same object while it is open. A caller with another
        manifest of the same layer (other chunk boundaries) while it is open is
        refused: restarting the partial would pull the file from under the
        pulls running on it.
        """
        while True:
            with self._partials_lock:
                p = self._shared.get(manifest.digest)
                if p is None or (not p.closing and not p.usable):  # none, or committed
                    p = PartialLayer(self, manifest)
                    p.users = 1
                    self._shared[manifest.digest] = p
                    self._stored_bitmaps.pop(manifest.digest, None)
                    return p
                if not p.closing:
                    if p.manifest != manifest:
                        raise StoreError(
                            f"layer {manifest.digest}: a pull with other chunk boundaries "
                            f"({p.manifest.chunk_size} bytes) is running here; try again after it"
                        )
                    p.users += 1
                    return p
            # its last user is closing it (flushing the bitmap): reopen from disk after that
            p.closed.wait()

    def release_partial(self, partial: PartialLayer) -> None:
        """One user is done with a shared partial: flush it; close it after the last one.

        Always flushes, so a pull that reports its chunks done has them on disk.
        """
        with self._partials_lock:
            partial.users -= 1
            last = partial.users <= 0
            partial.closing = last
        if not last:
            partial.flush()
            return
        try:
            partial.close()
        finally:
            with self._partials_lock:
                if self._shared.get(partial.manifest.digest) is partial:
                    del self._shared[partial.manifest.digest]
            partial.closed.set()

    def shared_partial(self, digest: str) -> PartialLayer | None:
        """The open shared partial of ``digest`` (a pull of it runs here), if any."""
        p = self._shared.get(digest)
        return p if p is not None and p.usable and not p.closing else None

    def pin_partial(self, digest: str) -> None:
        """Keep the partial of ``digest`` while its chunks are served (:meth:`discard_partial`)."""
        with self._partials_lock:
            self._partial_pins[digest] = self._partial_pins.get(digest, 0) + 1

    def unpin_partial(self, digest: str) -> None:
        with self._partials_lock:
            left = self._partial_pins.pop(digest, 1) - 1
            if left > 0:
                self._partial_pins[digest] = left

    def partial_in_use(self, digest: str) -> bool:
        """Whether a pull has the partial of ``digest`` open or a peer is being served from it."""
        with self._partials_lock:
            return digest in self._shared or self._partial_pins.get(digest, 0) > 0

    def has_partial(self, digest: str) -> bool:
        """Whether some chunks of ``digest`` are here in a partial (open, or persisted)."""
        p = self.shared_partial(digest)
        if p is not None:
            return p.bitmap.have() > 0
        try:
            bits = (self.partial_dir / f"{hex_part(Digest(digest))}.bitmap").read_bytes()
        except OSError:
            return False
        return any(bits)

    def stored_partial_chunk(self, digest: str, index: int) -> tuple[ChunkManifest, Path] | None:
        """(manifest, data file) if chunk ``index`` of a partial no pull has open is on disk.

        Read from the persisted bitmap, so only chunks whose data was fsynced
        count. Raises IndexError for a chunk the layer does not have. Blocking
        (a stat, and the manifest and bitmap files when they changed): call it
        from a worker thread.
        """
        h = hex_part(Digest(digest))
        bitmap_path = self.partial_dir / f"{h}.bitmap"
        try:
            st = os.stat(bitmap_path)
        except (FileNotFoundError, NotADirectoryError):
            self._stored_bitmaps.pop(digest, None)
            return None
        ident = (st.st_ino, st.st_mtime_ns)
        cached = self._stored_bitmaps.get(digest)
        if cached is None or cached[0] != ident:
            try:
                m = msgspec.convert(
                    msgpack.unpackb((self.partial_dir / f"{h}.chunks").read_bytes()), ChunkManifest
                )
                bm = ChunkBitmap(m.count, bitmap_path.read_bytes())
            except (OSError, ValueError, msgspec.ValidationError, ManifestError):
                return None
            if m.digest != digest:
                return None
            if len(self._stored_bitmaps) >= MAX_CACHED_BITMAPS:
                self._stored_bitmaps.clear()
            cached = self._stored_bitmaps[digest] = (ident, m, bm)
        _ident, m, bm = cached
        if not 0 <= index < m.count:
            raise IndexError(f"layer {digest} has chunks 0..{m.count - 1}, not {index}")
        if index not in bm:
            return None
        return m, self.partial_dir / f"{h}.part"

    def discard_partial(self, digest: Digest) -> bool:
        """Delete the partial of ``digest`` unless it is in use; True if it is gone.

        A partial being pulled or served (:meth:`partial_in_use`) is kept: the
        pulls writing it and the peers reading it would lose their file.
        """
        if self.partial_in_use(digest):
            return False
        self._discard_partial_files(digest)
        return True

    def _discard_partial_files(self, digest: Digest) -> None:
        h = hex_part(digest)
        self._stored_bitmaps.pop(digest, None)
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

    def partial_missing(self, manifest: ChunkManifest, first: int, end: int) -> list[int]:
        """Chunks of [first, end) a persisted partial of ``manifest`` lacks (all, if none).

        Like :meth:`partial_bytes`: reads without opening (and so creating) the partial.
        """
        h = hex_part(Digest(manifest.digest))
        try:
            saved = msgspec.convert(
                msgpack.unpackb((self.partial_dir / f"{h}.chunks").read_bytes()), ChunkManifest
            )
            if saved != manifest:
                return list(range(first, end))
            bm = ChunkBitmap(manifest.count, (self.partial_dir / f"{h}.bitmap").read_bytes())
        except (OSError, ValueError, msgspec.ValidationError, ManifestError):
            return list(range(first, end))
        return [i for i in range(first, end) if i not in bm]

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
