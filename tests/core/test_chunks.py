"""Chunk manifests, chunk bitmaps and ranges()."""

from __future__ import annotations

import hashlib
import io
import random

import pytest

from rainbowd.core.chunks import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    MIN_LAYER_CHUNKS,
    ChunkBitmap,
    ChunkManifest,
    ManifestError,
    build_manifest,
    chunk_count,
    layer_chunk_size,
    ranges,
)
from rainbowd.core.digest import Digest, sha256_digest

C = MIN_CHUNK_SIZE
ZERO = "sha256:" + "0" * 64


def blob(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def digests(data: bytes, chunk_size: int = C) -> list[str]:
    return [sha256_digest(data[i : i + chunk_size]) for i in range(0, len(data), chunk_size)]


class Trickle:
    """A stream that returns at most ``step`` bytes per read (like a socket)."""

    def __init__(self, data: bytes, step: int) -> None:
        self.buf = io.BytesIO(data)
        self.step = step

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self.step
        return self.buf.read(min(n, self.step))


# -- ChunkManifest validation --------------------------------------------------
def test_valid_manifest() -> None:
    data = blob(2 * C + 10)
    m = ChunkManifest(sha256_digest(data), len(data), C, digests(data))
    assert m.count == 3
    assert [m.chunk_length(i) for i in range(3)] == [C, C, 10]
    assert [m.chunk_offset(i) for i in range(3)] == [0, C, 2 * C]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "sha256:",
        "sha256:" + "A" * 64,  # uppercase hex
        "sha256:" + "0" * 63,  # too short
        "sha256:" + "0" * 65,  # too long
        "sha512:" + "0" * 64,
        "0" * 64,  # no algorithm
        "sha256:" + "0" * 63 + "g",
        "sha256:../../" + "0" * 58,
    ],
)
def test_bad_blob_digest_is_refused(bad: str) -> None:
    with pytest.raises(ManifestError, match="not a sha256 digest"):
        ChunkManifest(bad, 1, C, [ZERO])


def test_bad_chunk_digest_is_refused() -> None:
    with pytest.raises(ManifestError, match="not a sha256 digest"):
        ChunkManifest(ZERO, 2 * C, C, [ZERO, "sha256:xyz"])


@pytest.mark.parametrize(
    ("size", "n"),
    [(C, 0), (C, 2), (C + 1, 1), (2 * C, 3), (0, 1), (1, 0), (-1, 0)],
)
def test_chunk_count_must_fit_size(size: int, n: int) -> None:
    with pytest.raises(ManifestError):
        ChunkManifest(ZERO, size, C, [ZERO] * n)


@pytest.mark.parametrize(("size", "n"), [(0, 0), (1, 1), (C, 1), (C + 1, 2), (3 * C, 3)])
def test_chunk_count_that_fits_is_accepted(size: int, n: int) -> None:
    assert ChunkManifest(ZERO, size, C, [ZERO] * n).count == n
    assert chunk_count(size, C) == n


@pytest.mark.parametrize("cs", [0, 1, MIN_CHUNK_SIZE - 1, MAX_CHUNK_SIZE + 1, -C])
def test_chunk_size_out_of_bounds_is_refused(cs: int) -> None:
    with pytest.raises(ManifestError, match="chunk_size"):
        ChunkManifest(ZERO, 0, cs, [])


@pytest.mark.parametrize("cs", [MIN_CHUNK_SIZE, MAX_CHUNK_SIZE])
def test_chunk_size_bounds_are_inclusive(cs: int) -> None:
    assert ChunkManifest(ZERO, 1, cs, [ZERO]).chunk_size == cs


def test_chunk_length_out_of_range() -> None:
    m = ChunkManifest(ZERO, C + 1, C, [ZERO, ZERO])
    with pytest.raises(IndexError):
        m.chunk_length(2)
    with pytest.raises(IndexError):
        m.chunk_length(-1)


# -- build_manifest ------------------------------------------------------------
def test_build_manifest_of_empty_blob() -> None:
    m = build_manifest(io.BytesIO(b""))
    assert m.size == 0
    assert m.chunks == []
    assert m.count == 0
    assert m.digest == "sha256:" + hashlib.sha256(b"").hexdigest()


def test_build_manifest_exact_multiple() -> None:
    data = blob(3 * C)
    m = build_manifest(io.BytesIO(data), sha256_digest(data), chunk_size=C)
    assert m.size == 3 * C
    assert m.chunk_size == C
    assert m.chunks == digests(data)
    assert m.count == 3
    assert all(m.chunk_length(i) == C for i in range(3))


def test_build_manifest_short_last_chunk() -> None:
    data = blob(2 * C + 100)
    m = build_manifest(io.BytesIO(data), chunk_size=C)
    assert m.digest == sha256_digest(data)
    assert m.size == len(data)
    assert m.count == 3
    assert m.chunk_length(2) == 100
    assert m.chunks == digests(data)


def test_build_manifest_smaller_than_one_chunk() -> None:
    data = b"hello"
    m = build_manifest(io.BytesIO(data), chunk_size=C)
    assert (m.size, m.count, m.chunks) == (5, 1, [sha256_digest(data)])


def test_build_manifest_reads_past_short_reads() -> None:
    data = blob(2 * C + 7)
    whole = build_manifest(io.BytesIO(data), chunk_size=C)
    trickled = build_manifest(Trickle(data, 1000), chunk_size=C)
    assert trickled == whole


def test_build_manifest_expected_mismatch() -> None:
    data = blob(C + 1)
    wrong = Digest("sha256:" + "f" * 64)
    with pytest.raises(ManifestError, match=f"expected {wrong}"):
        build_manifest(io.BytesIO(data), wrong, chunk_size=C)


def test_build_manifest_of_tampered_data_fails_expected_check() -> None:
    data = blob(C + 1)
    expected = sha256_digest(data)
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(ManifestError):
        build_manifest(io.BytesIO(tampered), expected, chunk_size=C)


# -- verify_chunk ----------------------------------------------------------------
def test_verify_chunk() -> None:
    data = blob(2 * C + 50)
    m = build_manifest(io.BytesIO(data), chunk_size=C)
    parts = [data[0:C], data[C : 2 * C], data[2 * C :]]
    for i, part in enumerate(parts):
        assert m.verify_chunk(i, part)
    # wrong length
    assert not m.verify_chunk(0, parts[0][:-1])
    assert not m.verify_chunk(0, parts[0] + b"\0")
    assert not m.verify_chunk(2, parts[2] + b"\0")
    assert not m.verify_chunk(0, b"")
    # right length, wrong bytes
    flipped = bytearray(parts[1])
    flipped[C // 2] ^= 0x80
    assert not m.verify_chunk(1, bytes(flipped))
    # another chunk's (valid) bytes at the wrong index
    assert not m.verify_chunk(0, parts[1])


def test_verify_chunk_index_out_of_range() -> None:
    m = build_manifest(io.BytesIO(b"abc"), chunk_size=C)
    with pytest.raises(IndexError):
        m.verify_chunk(1, b"abc")


# -- ChunkBitmap -----------------------------------------------------------------
def test_bitmap_add_missing_have_complete() -> None:
    bm = ChunkBitmap(10)
    assert bm.have() == 0
    assert bm.missing() == list(range(10))
    assert not bm.complete()
    for i in (0, 3, 9):
        bm.add(i)
    bm.add(3)  # adding twice changes nothing
    assert bm.have() == 3
    assert 3 in bm and 9 in bm and 4 not in bm
    assert list(bm.present()) == [0, 3, 9]
    assert bm.missing() == [1, 2, 4, 5, 6, 7, 8]
    for i in bm.missing():
        bm.add(i)
    assert bm.complete()
    assert bm.missing() == []


def test_bitmap_discard() -> None:
    bm = ChunkBitmap.full(5)
    bm.discard(2)
    assert bm.missing() == [2]
    assert bm.have() == 4
    assert not bm.complete()


def test_bitmap_add_out_of_range() -> None:
    bm = ChunkBitmap(3)
    with pytest.raises(IndexError):
        bm.add(3)
    with pytest.raises(IndexError):
        bm.add(-1)
    assert bm.have() == 0


def test_bitmap_round_trip() -> None:
    bm = ChunkBitmap(13)
    for i in (0, 7, 8, 12):
        bm.add(i)
    raw = bm.to_bytes()
    assert len(raw) == 2
    again = ChunkBitmap(13, raw)
    assert list(again.present()) == [0, 7, 8, 12]
    assert again.to_bytes() == raw
    # the copy is independent of the bytes it came from
    again.add(1)
    assert 1 not in ChunkBitmap(13, raw)


@pytest.mark.parametrize(("count", "nbytes"), [(0, 1), (1, 0), (8, 2), (9, 1), (9, 3)])
def test_bitmap_wrong_size_bytes_rejected(count: int, nbytes: int) -> None:
    with pytest.raises(ManifestError, match="bitmap"):
        ChunkBitmap(count, b"\0" * nbytes)


def test_bitmap_empty_and_full() -> None:
    assert ChunkBitmap(0).complete()
    assert ChunkBitmap(0).to_bytes() == b""
    full = ChunkBitmap.full(9)
    assert full.complete()
    assert full.to_bytes() == b"\xff\x01"


def test_bitmap_padding_bits_do_not_break_complete() -> None:
    # all 3 chunks present, plus stray bits in the unused high bits of the byte
    try:
        bm = ChunkBitmap(3, b"\xff")
    except ManifestError:
        return  # refusing such bytes would be fine too
    assert bm.missing() == []
    assert bm.have() == 3
    assert bm.complete()


# -- ranges ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("indices", "expected"),
    [
        ([], []),
        ([4], [(4, 4)]),
        ([0, 1, 2], [(0, 2)]),
        ([0, 1, 2, 5, 7, 8], [(0, 2), (5, 5), (7, 8)]),
        ([8, 7, 0, 2, 1, 5], [(0, 2), (5, 5), (7, 8)]),
        ({3, 1, 2}, [(1, 3)]),
    ],
)
def test_ranges(indices: list[int], expected: list[tuple[int, int]]) -> None:
    assert ranges(indices) == expected


def test_ranges_of_bitmap_missing() -> None:
    bm = ChunkBitmap(10)
    for i in (2, 3, 4, 8):
        bm.add(i)
    assert ranges(bm.missing()) == [(0, 1), (5, 7), (9, 9)]


# -- a layer's chunk size --------------------------------------------------------
MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("size", "largest", "chunk"),
    [
        (0, DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_SIZE),  # size unknown: as configured
        (10_000, DEFAULT_CHUNK_SIZE, MIN_CHUNK_SIZE),  # never under 64 KiB
        (2 * MiB, DEFAULT_CHUNK_SIZE, MIN_CHUNK_SIZE),  # 32 KiB would be under the floor
        (30_000_000, DEFAULT_CHUNK_SIZE, 448 * 1024),  # 468,750 B rounded down to 64 KiB steps
        (64 * 4 * MiB, DEFAULT_CHUNK_SIZE, 4 * MiB),  # 64 chunks of the configured size
        (64 * 4 * MiB - 1, DEFAULT_CHUNK_SIZE, 4 * MiB - MIN_CHUNK_SIZE),
        (1 << 40, DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_SIZE),  # big layers keep it
        (30_000_000, 256 * 1024, 256 * 1024),  # never above the configured size
        (30_000_000, MIN_CHUNK_SIZE, MIN_CHUNK_SIZE),
    ],
)
def test_a_small_layer_is_cut_into_at_least_min_layer_chunks(
    size: int, largest: int, chunk: int
) -> None:
    assert layer_chunk_size(size, largest) == chunk


@pytest.mark.parametrize("size", [1, 65_537, 3_000_000, 30_000_000, 50_000_000, 300_000_000])
def test_layer_chunk_size_is_a_valid_manifest_chunk_size(size: int) -> None:
    c = layer_chunk_size(size)
    assert MIN_CHUNK_SIZE <= c <= MAX_CHUNK_SIZE and c % MIN_CHUNK_SIZE == 0
    assert chunk_count(size, c) >= MIN_LAYER_CHUNKS or c == MIN_CHUNK_SIZE
