"""Layer compression: recognise, inflate and (deterministically) compress layer blobs.

The paper's compression option: an origin that reads uncompressed layers
(a ``docker save`` tarball, an OCI layout with tar layers, a Docker engine
export) may compress them on ingest, so every transfer in the cluster moves
fewer bytes. The stored, chunked and moved blob is then the compressed one;
Docker still knows the layer by its diff_id, the sha256 of the tar inside.

Two origins that ingest the same archive must produce the same blob digests,
or the coordinator would treat one layer as two. So compression here is
deterministic: gzip is raw zlib deflate at a fixed level with a fixed header
(mtime 0, no file name, zlib's OS byte), zstd is single-threaded libzstd at a
fixed level with no content size or checksum. The same library versions give
the same bytes; the digests are of what was actually produced and are always
verified, so a different zlib build can only cost deduplication, never
correctness.

Everything streams in bounded pieces: inflating never returns more than the
asked-for amount (a decompression bomb costs CPU, not memory) and compression
goes to a temp file while hashing. Truncated or trailing-garbage streams are
errors: a layer is either exactly a complete gzip/zstd stream or it is refused.

No dependency on the image formats: callers turn :class:`CompressionError`
into their own error naming the image and layer.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import structlog
import zstandard

from rainbowd.core.messages import Compression

log = structlog.get_logger(__name__)

#: what a layer blob is, judged by its first bytes
BlobKind = Literal["tar", "gzip", "zstd"]

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

#: fixed levels: part of the determinism contract, changing them changes digests
GZIP_LEVEL = 6  # Docker's and Go's default
ZSTD_LEVEL = 3  # libzstd's default

MEDIA_DOCKER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
MEDIA_DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

#: read size while hashing and compressing
PIECE = 1024 * 1024


class CompressionError(ValueError):
    """A compressed stream is corrupt or truncated, or a mode is unknown."""


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def sniff(head: bytes) -> BlobKind:
    """Kind of a layer blob from its first 4 bytes (a tar has no magic at offset 0)."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "tar"


def media_type(kind: BlobKind, *, oci: bool) -> str:
    """Media type of a layer of ``kind`` in a Docker (``oci=False``) or OCI manifest.

    Docker's schema has no zstd layer type, so zstd is always the OCI one.
    """
    if kind == "zstd":
        return MEDIA_OCI_ZSTD
    if kind == "gzip":
        return MEDIA_OCI_GZIP if oci else MEDIA_DOCKER_GZIP
    return MEDIA_OCI_TAR if oci else MEDIA_DOCKER_TAR


# --------------------------------------------------------------------------
# inflate
# --------------------------------------------------------------------------
class _GzipDecoder:
    """One gzip member after another (concatenated members are a valid gzip stream)."""

    def __init__(self) -> None:
        self.d = zlib.decompressobj(16 + zlib.MAX_WBITS)

    @property
    def eof(self) -> bool:
        return self.d.eof

    @property
    def pending(self) -> bytes:
        return self.d.unconsumed_tail

    def feed(self, data: bytes, max_length: int) -> bytes:
        return self.d.decompress(data, max_length)

    def next_member(self) -> bytes:
        """Start the next member; return the bytes left over after the finished one."""
        rest = self.d.unused_data
        self.d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        return rest


class _ZstdDecoder:
    """One zstd frame after another, fed in slices sized to keep each output near the limit.

    libzstd's streaming object returns everything a piece of input decodes to,
    and a few bytes of RLE blocks decode to 128 KiB, so a large slice of a
    crafted stream could decode to gigabytes at once. The slice shrinks when
    the ratio is high (a bomb costs many small calls, not memory) and grows
    back for ordinary data.
    """

    MIN_SLICE = 256
    MAX_SLICE = 64 * 1024

    def __init__(self) -> None:
        self.d = zstandard.ZstdDecompressor().decompressobj()
        self.tail = b""
        self.slice = 512

    @property
    def eof(self) -> bool:
        return self.d.eof

    @property
    def pending(self) -> bytes:
        return self.tail

    def feed(self, data: bytes, max_length: int) -> bytes:
        piece, self.tail = data[: self.slice], data[self.slice :]
        out = self.d.decompress(piece)
        wanted = max_length * len(piece) // max(len(out), 1)
        self.slice = max(self.MIN_SLICE, min(self.MAX_SLICE, wanted))
        return out

    def next_member(self) -> bytes:
        rest = self.d.unused_data + self.tail
        self.d = zstandard.ZstdDecompressor().decompressobj()
        self.tail = b""
        return rest


class Inflater:
    """A read-only stream of the tar inside a gzip or zstd stream ``src``.

    ``read(n)`` returns at most ``n`` bytes for gzip and about that for zstd
    (a piece when ``n`` < 0); ``b""`` only at the end. Raises
    CompressionError when the stream is corrupt, ends inside a member or frame
    (truncated), or is followed by bytes that are not another member.
    Also counts and hashes what went in and what came out, for verification.
    """

    def __init__(self, src: Readable, kind: Literal["gzip", "zstd"]) -> None:
        self.src = src
        self.kind = kind
        self.dec: _GzipDecoder | _ZstdDecoder = _GzipDecoder() if kind == "gzip" else _ZstdDecoder()
        self.buf = b""  # compressed input not yet given to the decoder
        self.src_eof = False
        self.done = False
        self.in_hash = hashlib.sha256()
        self.out_hash = hashlib.sha256()
        self.in_size = 0
        self.out_size = 0

    def _fill(self) -> None:
        if not self.buf and not self.src_eof:
            data = self.src.read(PIECE)
            if data:
                self.in_hash.update(data)
                self.in_size += len(data)
                self.buf = data
            else:
                self.src_eof = True

    def read(self, n: int = -1, /) -> bytes:
        limit = PIECE if n is None or n < 0 else n
        while not self.done and limit > 0:
            if self.dec.eof:
                # a member (frame) ended: another may follow, or the end of the stream
                self.buf = self.dec.next_member() + self.buf
                if not self.buf:
                    self._fill()
                if not self.buf:
                    self.done = True
                    break
                if self.kind == "gzip" and not self.buf.startswith(GZIP_MAGIC):
                    self._only_padding_left()
                    break
                continue
            data = self.dec.pending
            if not data:
                if not self.buf:
                    self._fill()
                if not self.buf:
                    what = "member" if self.kind == "gzip" else "frame"
                    raise CompressionError(
                        f"{self.kind} stream is truncated (ends inside a {what})"
                    )
                data, self.buf = self.buf, b""
            try:
                out = self.dec.feed(data, limit)
            except (zlib.error, zstandard.ZstdError) as e:
                raise CompressionError(f"{self.kind} stream is corrupt ({e})") from None
            if out:
                self.out_hash.update(out)
                self.out_size += len(out)
                return out
        return b""

    def _only_padding_left(self) -> None:
        """Accept zero padding after the last gzip member (tar tools pad to a block)."""
        while True:
            if self.buf.strip(b"\0"):
                raise CompressionError(
                    f"{self.kind} stream is followed by {len(self.buf)}+ bytes that are "
                    "not another member"
                )
            self.buf = b""
            self._fill()
            if not self.buf:
                self.done = True
                return

    @property
    def digest(self) -> str:
        """sha256 of the compressed bytes read so far."""
        return "sha256:" + self.in_hash.hexdigest()

    @property
    def diff_id(self) -> str:
        """sha256 of the uncompressed bytes produced so far."""
        return "sha256:" + self.out_hash.hexdigest()


def inflate(src: Readable, kind: Literal["gzip", "zstd"]) -> Inflater:
    """The uncompressed view of ``src`` (see :class:`Inflater`)."""
    return Inflater(src, kind)


@dataclass
class Digests:
    """The two digests of a layer and the two sizes behind them."""

    digest: str  # sha256 of the blob
    size: int
    diff_id: str  # sha256 of the tar
    uncompressed_size: int


def hash_layer(src: Readable, kind: BlobKind) -> Digests:
    """Digest of a blob and of the tar inside it, in one streaming pass."""
    if kind == "tar":
        h = hashlib.sha256()
        size = 0
        while data := src.read(PIECE):
            h.update(data)
            size += len(data)
        d = "sha256:" + h.hexdigest()
        return Digests(d, size, d, size)
    inf = Inflater(src, kind)
    while inf.read(PIECE):
        pass
    return Digests(inf.digest, inf.in_size, inf.diff_id, inf.out_size)


# --------------------------------------------------------------------------
# compress
# --------------------------------------------------------------------------
class _Compressor(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...
    def flush(self) -> bytes: ...


def _compressor(mode: Literal["gzip", "zstd"]) -> _Compressor:
    if mode == "gzip":
        # wbits 31: gzip wrapper, header with mtime 0 and no name; memLevel fixed too
        return zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS, 8)
    cctx = zstandard.ZstdCompressor(
        level=ZSTD_LEVEL, write_checksum=False, write_content_size=False, threads=0
    )
    return cctx.compressobj()


@dataclass
class CompressedLayer(Digests):
    """A compressed copy of a tar layer in a temp file (removed when the context exits)."""

    path: Path
    kind: BlobKind


@contextmanager
def compressed_copy(src: Readable, mode: Compression, tmp_dir: Path) -> Iterator[CompressedLayer]:
    """Compress the tar ``src`` into a temp file under ``tmp_dir``, hashing both sides.

    Yields the copy with its digests; the caller checks ``diff_id`` against
    what the image declares and ingests ``path`` under ``digest``. The temp
    file is removed when the context exits, whatever happens.
    """
    if mode not in ("gzip", "zstd"):
        raise CompressionError(f"unknown compression {mode!r}: expected gzip or zstd")
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix=f"compress-{mode}-")
    path = Path(name)
    try:
        comp = _compressor(mode)
        tar_hash = hashlib.sha256()
        out_hash = hashlib.sha256()
        tar_size = 0
        out_size = 0
        with os.fdopen(fd, "wb") as out:
            while True:
                data = src.read(PIECE)
                if data:
                    tar_hash.update(data)
                    tar_size += len(data)
                    packed = comp.compress(data)
                else:
                    packed = comp.flush()
                if packed:
                    out_hash.update(packed)
                    out_size += len(packed)
                    out.write(packed)
                if not data:
                    break
        layer = CompressedLayer(
            digest="sha256:" + out_hash.hexdigest(),
            size=out_size,
            diff_id="sha256:" + tar_hash.hexdigest(),
            uncompressed_size=tar_size,
            path=path,
            kind=mode,
        )
        log.debug(
            "layer compressed",
            mode=mode,
            diff_id=layer.diff_id,
            tar_size=tar_size,
            size=out_size,
            ratio=round(out_size / tar_size, 4) if tar_size else None,
        )
        yield layer
    finally:
        path.unlink(missing_ok=True)
