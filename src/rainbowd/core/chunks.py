"""Chunk manifests and chunk bitmaps: the bookkeeping of incremental transfer.

A layer is cut into fixed-size chunks; the :class:`ChunkManifest` lists the
sha256 of each one. The node that first ingests a layer computes the manifest
after checking the layer's digest, and the coordinator hands it to every
demander, so a demander checks each chunk against data it got from the
coordinator, never from the peer that sent the bytes.

:class:`ChunkBitmap` records which chunks of a partial layer are on disk and
verified; it is persisted beside the partial file so a transfer resumes after a
break, a restart or a change of seeder, moving only what is missing.

Pure code: no I/O except through the file-like objects handed in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Protocol

import msgspec

from rainbowd.core.digest import Digest, DigestError, parse_digest

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MIN_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024

#: A layer is cut into at least this many chunks where the configured chunk size would
#: give fewer (``layer_chunk_size``). A chunk is the unit a node can pass on once it has
#: verified it, so a layer of a few chunks moves hop by hop in whole-layer steps: with
#: 4 MiB chunks upload-bound's 30 and 50 MB layers had 8 and 12 chunks, and the upload
#: in use could at best double every 4.4 s. Measured in the simulator (session 15, 100
#: nodes, x T* / median slowdown; bench/RESULTS.md "Session 15"): at least 16 / 64 / 128
#: chunks took upload-bound from 1.45 / 2.27 to 1.41 / 2.05, 1.21 / 1.91, 1.19 / 1.85,
#: bimodal's p90 1.59 -> 1.46 / 1.33 / 1.34, drawn-1's median 3.33 -> 2.19 / 2.13 /
#: 2.13, big-layer 1.13 -> 1.13 / 1.09 / 1.07; 128 doubles the chunks (requests, hashes,
#: reports where pieces are one chunk) for little more. A floor of 256 KiB instead of
#: ``MIN_CHUNK_SIZE`` lost drawn-1 (1.14 -> 1.40 x T*) and homogeneous (1.48 -> 1.52).
#: The whole suite with 64: 11 of 16 shapes meet every goal (10 before); upload-bound
#: 1.21 x T*, random-asymmetric 1.24 -> 1.08, drawn-2 1.33 -> 1.21.
MIN_LAYER_CHUNKS = 64


def layer_chunk_size(size: int, largest: int = DEFAULT_CHUNK_SIZE) -> int:
    """The chunk size for a layer of ``size`` bytes, ``largest`` the configured one.

    chunk = min(largest, max(MIN_CHUNK_SIZE, floor64K(size / MIN_LAYER_CHUNKS))), where
    floor64K rounds down to a multiple of ``MIN_CHUNK_SIZE``: big layers keep the configured
    size; a small one gets at least ``MIN_LAYER_CHUNKS`` chunks, none under 64 KiB. The
    chunk size travels in each layer's manifest, so every node of a cluster agrees on it
    whatever its own configuration, and a layer once held keeps the chunks it has.
    """
    if size <= 0:
        return largest
    rounded = size // MIN_LAYER_CHUNKS // MIN_CHUNK_SIZE * MIN_CHUNK_SIZE
    return min(largest, max(MIN_CHUNK_SIZE, rounded))


class ManifestError(ValueError):
    """A chunk manifest is inconsistent with itself or with the data."""


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class ChunkManifest(msgspec.Struct, frozen=True):
    """The per-chunk sha256 list of one layer blob."""

    digest: str
    size: int
    chunk_size: int
    chunks: list[str]

    def __post_init__(self) -> None:
        try:
            parse_digest(self.digest)
            for c in self.chunks:
                parse_digest(c)
        except DigestError as e:
            raise ManifestError(f"chunk manifest: {e}") from None
        if not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise ManifestError(
                f"chunk manifest for {self.digest}: chunk_size {self.chunk_size} outside "
                f"{MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}"
            )
        if self.size < 0 or len(self.chunks) != chunk_count(self.size, self.chunk_size):
            raise ManifestError(
                f"chunk manifest for {self.digest}: {len(self.chunks)} chunks does not fit "
                f"size {self.size} with chunk_size {self.chunk_size}"
            )

    @property
    def count(self) -> int:
        return len(self.chunks)

    def chunk_length(self, index: int) -> int:
        """Length in bytes of chunk ``index`` (the last one may be short)."""
        if not 0 <= index < self.count:
            raise IndexError(f"chunk {index} out of range 0..{self.count - 1} of {self.digest}")
        start = index * self.chunk_size
        return min(self.chunk_size, self.size - start)

    def chunk_offset(self, index: int) -> int:
        return index * self.chunk_size

    def verify_chunk(self, index: int, data: bytes) -> bool:
        """True when ``data`` is exactly chunk ``index``."""
        if len(data) != self.chunk_length(index):
            return False
        return "sha256:" + hashlib.sha256(data).hexdigest() == self.chunks[index]


def chunk_count(size: int, chunk_size: int) -> int:
    return max(0, -(-size // chunk_size))


def build_manifest(
    stream: Readable, expected: Digest | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> ChunkManifest:
    """Hash ``stream`` into a manifest; raise ManifestError if it is not ``expected``.

    The whole-blob digest and the chunk digests come from the same single read.
    """
    whole = hashlib.sha256()
    chunks: list[str] = []
    size = 0
    while True:
        data = _read_exact(stream, chunk_size)
        if not data:
            break
        whole.update(data)
        chunks.append("sha256:" + hashlib.sha256(data).hexdigest())
        size += len(data)
        if len(data) < chunk_size:
            break
    digest = Digest("sha256:" + whole.hexdigest())
    if expected is not None and digest != expected:
        raise ManifestError(f"content is {digest}, expected {expected}")
    return ChunkManifest(digest=digest, size=size, chunk_size=chunk_size, chunks=chunks)


def _read_exact(stream: Readable, n: int) -> bytes:
    parts: list[bytes] = []
    left = n
    while left:
        data = stream.read(left)
        if not data:
            break
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


class ChunkBitmap:
    """Which chunks of a layer are present and verified."""

    def __init__(self, count: int, present: bytes | None = None) -> None:
        self.count = count
        nbytes = (count + 7) // 8
        if present is None:
            self._bits = bytearray(nbytes)
        else:
            if len(present) != nbytes:
                raise ManifestError(f"bitmap of {len(present)} bytes for {count} chunks")
            self._bits = bytearray(present)
            if count % 8 and self._bits[-1] >> (count % 8):
                raise ManifestError(f"bitmap has bits set past chunk {count - 1}")

    def __contains__(self, index: int) -> bool:
        return bool(self._bits[index // 8] & (1 << (index % 8)))

    def add(self, index: int) -> None:
        if not 0 <= index < self.count:
            raise IndexError(index)
        self._bits[index // 8] |= 1 << (index % 8)

    def discard(self, index: int) -> None:
        self._bits[index // 8] &= ~(1 << (index % 8)) & 0xFF

    def present(self) -> Iterator[int]:
        return (i for i in range(self.count) if i in self)

    def missing(self) -> list[int]:
        return [i for i in range(self.count) if i not in self]

    def have(self) -> int:
        return sum(bin(b).count("1") for b in self._bits)

    def complete(self) -> bool:
        return self.have() == self.count

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    @classmethod
    def full(cls, count: int) -> ChunkBitmap:
        bm = cls(count)
        for i in range(count):
            bm.add(i)
        return bm


def ranges(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Compress sorted chunk indices into inclusive (first, last) runs, for logs."""
    out: list[tuple[int, int]] = []
    for i in sorted(indices):
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out
