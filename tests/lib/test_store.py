"""LayerStore and PartialLayer on a real directory (tmp_path)."""

from __future__ import annotations

import io
import os
import random
import stat
from pathlib import Path

import msgpack
import pytest

from rainbowd.core.chunks import MIN_CHUNK_SIZE, ChunkManifest, build_manifest
from rainbowd.core.digest import Digest, hex_part, sha256_digest
from rainbowd.lib.store import (
    ChunkRejected,
    CorruptBlob,
    LayerMissing,
    LayerStore,
    PartialLayer,
    StoreError,
)

C = MIN_CHUNK_SIZE


def blob(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def chunk(data: bytes, i: int) -> bytes:
    return data[i * C : (i + 1) * C]


def files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.fixture
def data() -> bytes:
    return blob(5 * C + 123)  # 6 chunks, the last one short


@pytest.fixture
def manifest(data: bytes) -> ChunkManifest:
    return build_manifest(io.BytesIO(data), chunk_size=C)


# -- ingest and complete layers --------------------------------------------------
def test_ingest_installs_a_verified_layer(tmp_path: Path, data: bytes) -> None:
    store = LayerStore(tmp_path)
    d = sha256_digest(data)
    assert not store.has(d)
    assert store.holdings() == []
    m = store.ingest(io.BytesIO(data), d, chunk_size=C)
    assert m.digest == d
    assert m.size == len(data)
    assert m.count == 6
    assert store.has(d)
    assert store.holdings() == [d]
    assert store.manifest(d) == m
    assert store.size(d) == len(data)
    assert store.path(d).read_bytes() == data
    for i in range(m.count):
        assert store.read_blob_chunk(d, i, node="n1") == chunk(data, i)
    assert store.read_blob_chunk(d, 5, node="n1") == data[5 * C :]
    with store.open_blob(d) as f:
        assert f.read() == data
    assert files(tmp_path / "tmp") == []


def test_ingest_of_a_held_layer_is_a_noop(tmp_path: Path, data: bytes) -> None:
    store = LayerStore(tmp_path)
    d = sha256_digest(data)
    m1 = store.ingest(io.BytesIO(data), d, chunk_size=C)
    m2 = store.ingest(io.BytesIO(b"not read"), d, chunk_size=C)
    assert m1 == m2
    assert store.path(d).read_bytes() == data


def test_ingest_digest_mismatch_leaves_nothing(tmp_path: Path, data: bytes) -> None:
    store = LayerStore(tmp_path)
    wrong = sha256_digest(data + b"x")
    with pytest.raises(StoreError, match=f"layer {wrong}"):
        store.ingest(io.BytesIO(data), wrong, chunk_size=C)
    assert not store.has(wrong)
    assert store.holdings() == []
    assert files(tmp_path / "blobs" / "sha256") == []
    assert files(tmp_path / "tmp") == []
    assert files(tmp_path / "partial") == []


def test_ingest_refuses_a_malformed_digest(tmp_path: Path, data: bytes) -> None:
    store = LayerStore(tmp_path)
    with pytest.raises(ValueError, match="not a sha256 digest"):
        store.ingest(io.BytesIO(data), Digest("sha256:../../etc/passwd"))


def test_missing_layer(tmp_path: Path) -> None:
    store = LayerStore(tmp_path)
    d = sha256_digest(b"nope")
    assert not store.has(d)
    with pytest.raises(LayerMissing):
        store.manifest(d)
    with pytest.raises(LayerMissing):
        store.open_blob(d)
    with pytest.raises(LayerMissing):
        store.read_blob_chunk(d, 0, node="n1")


def test_remove(tmp_path: Path, data: bytes) -> None:
    store = LayerStore(tmp_path)
    d = sha256_digest(data)
    store.ingest(io.BytesIO(data), d, chunk_size=C)
    store.remove(d)
    assert not store.has(d)
    assert store.holdings() == []
    assert files(tmp_path / "blobs" / "sha256") == []


# -- chunk reads for serving peers -------------------------------------------------
def test_served_chunks_are_read_and_checked_through_the_store(tmp_path: Path, data: bytes) -> None:
    store = LayerStore(tmp_path)
    d = sha256_digest(data)
    m = store.ingest(io.BytesIO(data), d, chunk_size=C)
    assert store.cached_manifest(d) is None  # the first read loads it from disk
    assert store.read_blob_chunk(d, 0, node="n1") == chunk(data, 0)
    assert store.cached_manifest(d) == m
    assert store.read_blob_chunk(d, 5, node="n1") == data[5 * C :]
    with pytest.raises(IndexError, match=f"layer {d} has chunks 0..5, not 6"):
        store.read_blob_chunk(d, 6, node="n1")
    store.remove(d)
    assert store.cached_manifest(d) is None
    with pytest.raises(LayerMissing, match=f"^node n1 does not hold layer {d}$"):
        store.read_blob_chunk(d, 0, node="n1")


def test_a_rotten_blob_is_refused_unless_reads_are_not_verified(
    tmp_path: Path, data: bytes
) -> None:
    store = LayerStore(tmp_path)
    d = sha256_digest(data)
    store.ingest(io.BytesIO(data), d, chunk_size=C)
    path = store.path(d)
    path.chmod(0o640)
    rotten = bytearray(data)
    rotten[C + 7] ^= 0xFF
    path.write_bytes(bytes(rotten))
    assert store.read_blob_chunk(d, 0, node="n1") == chunk(data, 0)
    with pytest.raises(CorruptBlob) as ei:
        store.read_blob_chunk(d, 1, node="n1")
    assert str(ei.value) == (
        f"node n1: stored layer {d} chunk 1 does not match its manifest "
        "(the blob on disk is corrupt); not serving it"
    )
    assert store.read_blob_chunk(d, 1, node="n1", verify=False) == chunk(bytes(rotten), 1)


def test_a_partial_chunk_is_read_and_checked_through_the_store(
    tmp_path: Path, data: bytes, manifest: ChunkManifest
) -> None:
    store = LayerStore(tmp_path)
    part = store.open_partial(manifest)
    part.write_chunk(2, chunk(data, 2))
    part.close()
    where = store.stored_partial_chunk(manifest.digest, 2)
    assert where is not None
    m, path = where
    d = Digest(manifest.digest)
    assert store.read_partial_chunk(d, 2, m, path, node="n1") == chunk(data, 2)
    with pytest.raises(CorruptBlob, match=f"^node n1: partial layer {d} chunk 3 does not"):
        store.read_partial_chunk(d, 3, m, path, node="n1")  # its bit is not set: zeros
    path.unlink()  # installed meanwhile: the caller reads the blob instead
    with pytest.raises(FileNotFoundError):
        store.read_partial_chunk(d, 2, m, path, node="n1")


def test_blob_without_manifest_is_not_held(tmp_path: Path, data: bytes) -> None:
    store = LayerStore(tmp_path)
    d = sha256_digest(data)
    (tmp_path / "blobs" / "sha256" / hex_part(d)).write_bytes(data)
    assert not store.has(d)
    assert store.holdings() == []
    with pytest.raises(LayerMissing):
        store.open_blob(d)
    # a fresh store on the same root agrees
    assert LayerStore(tmp_path).holdings() == []


def test_stray_files_in_blobs_are_not_holdings(tmp_path: Path, data: bytes) -> None:
    store = LayerStore(tmp_path)
    d = sha256_digest(data)
    store.ingest(io.BytesIO(data), d, chunk_size=C)
    blobs = tmp_path / "blobs" / "sha256"
    (blobs / "not-a-digest").write_bytes(b"x")
    (blobs / "not-a-digest.chunks").write_bytes(b"x")
    (blobs / f".{hex_part(d)}.chunks.tmp123").write_bytes(b"x")
    assert store.holdings() == [d]


def test_leftover_tmp_is_cleaned_on_open(tmp_path: Path) -> None:
    LayerStore(tmp_path)
    tmp = tmp_path / "tmp"
    (tmp / "ingest-leftover").write_bytes(b"half a layer")
    (tmp / "somedir").mkdir()
    (tmp / "somedir" / "f").write_bytes(b"x")
    LayerStore(tmp_path)
    assert files(tmp) == []


# -- partial layers ----------------------------------------------------------------
def test_partial_write_and_commit(tmp_path: Path, data: bytes, manifest: ChunkManifest) -> None:
    store = LayerStore(tmp_path)
    d = Digest(manifest.digest)
    p = store.open_partial(manifest)
    assert p.missing() == list(range(6))
    # out of order, as several seeders might deliver
    for i in (5, 0, 3, 1, 4, 2):
        p.write_chunk(i, chunk(data, i))
    assert p.missing() == []
    assert p.bytes_present == len(data)
    assert not store.has(d)  # not held before commit
    path = p.commit()
    assert path == store.path(d)
    assert store.has(d)
    assert store.holdings() == [d]
    assert path.read_bytes() == data
    assert store.manifest(d) == manifest
    # partial files are gone
    assert files(tmp_path / "partial") == []
    assert list(store.partials()) == []
    # the blob is read-only
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) == 0


def test_bad_chunk_is_rejected_and_not_marked(
    tmp_path: Path, data: bytes, manifest: ChunkManifest
) -> None:
    store = LayerStore(tmp_path)
    p = store.open_partial(manifest)
    p.write_chunk(0, chunk(data, 0))
    bad = bytearray(chunk(data, 1))
    bad[0] ^= 1
    with pytest.raises(ChunkRejected, match="chunk 1"):
        p.write_chunk(1, bytes(bad))
    with pytest.raises(ChunkRejected):
        p.write_chunk(2, chunk(data, 2)[:-1])  # short
    with pytest.raises(ChunkRejected):
        p.write_chunk(3, chunk(data, 4))  # another chunk's bytes
    assert isinstance(ChunkRejected("x"), StoreError)
    assert p.missing() == [1, 2, 3, 4, 5]
    assert p.bytes_present == C
    p.close()
    p2 = store.open_partial(manifest)
    assert p2.missing() == [1, 2, 3, 4, 5]
    p2.close()


def test_partial_resumes_after_reopen(tmp_path: Path, data: bytes, manifest: ChunkManifest) -> None:
    store = LayerStore(tmp_path)
    p = store.open_partial(manifest)
    written = [0, 2, 5]  # fewer than FLUSH_EVERY: only close() persists them
    for i in written:
        p.write_chunk(i, chunk(data, i))
    p.close()

    store2 = LayerStore(tmp_path)  # a restart
    assert list(store2.partials()) == [(manifest.digest, 3, 6)]
    p2 = store2.open_partial(manifest)
    assert p2.missing() == [1, 3, 4]
    for i in p2.missing():
        p2.write_chunk(i, chunk(data, i))
    p2.commit()
    assert store2.has(Digest(manifest.digest))
    assert store2.path(Digest(manifest.digest)).read_bytes() == data


def test_bitmap_is_persisted_every_few_chunks_without_close(
    tmp_path: Path, data: bytes, manifest: ChunkManifest
) -> None:
    store = LayerStore(tmp_path)
    p = store.open_partial(manifest)
    for i in range(PartialLayer.FLUSH_EVERY):
        p.write_chunk(i, chunk(data, i))
    # simulate a crash: no close(); a new store must see the flushed chunks
    fd = p._fd
    p._fd = None
    assert fd is not None
    os.close(fd)
    p2 = LayerStore(tmp_path).open_partial(manifest)
    assert p2.missing() == list(range(PartialLayer.FLUSH_EVERY, 6))
    p2.close()


def test_commit_with_missing_chunks_is_refused(
    tmp_path: Path, data: bytes, manifest: ChunkManifest
) -> None:
    store = LayerStore(tmp_path)
    p = store.open_partial(manifest)
    for i in range(5):
        p.write_chunk(i, chunk(data, i))
    with pytest.raises(StoreError, match="1 chunks missing"):
        p.commit()
    assert not store.has(Digest(manifest.digest))
    assert store.holdings() == []
    # the partial is still usable
    p.write_chunk(5, chunk(data, 5))
    p.commit()
    assert store.has(Digest(manifest.digest))


def test_commit_of_wrong_whole_digest_discards(tmp_path: Path, data: bytes) -> None:
    # every chunk digest is right but the claimed whole digest is not
    real = build_manifest(io.BytesIO(data), chunk_size=C)
    liar = ChunkManifest(sha256_digest(b"other"), real.size, real.chunk_size, real.chunks)
    store = LayerStore(tmp_path)
    p = store.open_partial(liar)
    for i in range(liar.count):
        p.write_chunk(i, chunk(data, i))
    with pytest.raises(StoreError, match="discarded"):
        p.commit()
    assert not store.has(Digest(liar.digest))
    assert store.holdings() == []
    assert files(tmp_path / "partial") == []


def test_partial_with_a_different_manifest_starts_clean(tmp_path: Path, data: bytes) -> None:
    m_small = build_manifest(io.BytesIO(data), chunk_size=C)
    m_big = build_manifest(io.BytesIO(data), chunk_size=2 * C)
    assert m_small.digest == m_big.digest
    store = LayerStore(tmp_path)
    p = store.open_partial(m_small)
    for i in (0, 1, 2):
        p.write_chunk(i, chunk(data, i))
    p.close()
    p2 = store.open_partial(m_big)
    assert p2.missing() == [0, 1, 2]
    assert p2.bytes_present == 0
    for i in range(3):
        p2.write_chunk(i, data[i * 2 * C : (i + 1) * 2 * C])
    p2.commit()
    assert store.manifest(Digest(m_big.digest)) == m_big
    assert store.path(Digest(m_big.digest)).read_bytes() == data


def test_corrupt_partial_files_start_clean(
    tmp_path: Path, data: bytes, manifest: ChunkManifest
) -> None:
    store = LayerStore(tmp_path)
    p = store.open_partial(manifest)
    p.write_chunk(0, chunk(data, 0))
    p.close()
    # a bitmap of the wrong size is ignored, not trusted
    p.bitmap_path.write_bytes(b"\xff\xff\xff")
    p2 = store.open_partial(manifest)
    assert p2.missing() == list(range(6))
    p2.close()
    # an unreadable saved manifest means the partial is not trusted either
    p2.bitmap_path.write_bytes(b"\x01")
    p2.manifest_path.write_bytes(b"\xc1garbage")
    p3 = store.open_partial(manifest)
    assert p3.missing() == list(range(6))
    assert msgpack.unpackb(p3.manifest_path.read_bytes())["digest"] == manifest.digest
    p3.close()


def test_empty_layer_round_trip(tmp_path: Path) -> None:
    m = build_manifest(io.BytesIO(b""), chunk_size=C)
    store = LayerStore(tmp_path)
    p = store.open_partial(m)
    assert p.missing() == []
    p.commit()
    assert store.has(Digest(m.digest))
    assert store.path(Digest(m.digest)).read_bytes() == b""


def test_bitmap_is_persisted_after_flush_seconds_even_below_flush_every(
    tmp_path: Path, data: bytes, manifest: ChunkManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow link must not leave progress unpersisted: time bounds a crash's loss too."""
    store = LayerStore(tmp_path)
    part = store.open_partial(manifest)
    part.FLUSH_EVERY = 1000
    clock = [100.0]
    monkeypatch.setattr("rainbowd.lib.store.time.monotonic", lambda: clock[0])
    part.write_chunk(0, chunk(data, 0))
    part.write_chunk(1, chunk(data, 1))
    # neither the chunk count nor the age reached: a crash now loses both
    assert [have for _, have, _ in LayerStore(tmp_path).partials()] == [0]
    clock[0] += part.FLUSH_SECONDS
    part.write_chunk(2, chunk(data, 2))
    # the oldest unflushed chunk got old enough: all three are durable
    assert [have for _, have, _ in LayerStore(tmp_path).partials()] == [3]
    part.write_chunk(3, chunk(data, 3))  # a fresh window starts at chunk 3
    assert [have for _, have, _ in LayerStore(tmp_path).partials()] == [3]
    part.close()


def test_partial_bytes_reads_progress_without_creating_a_partial(
    tmp_path: Path, data: bytes, manifest: ChunkManifest
) -> None:
    store = LayerStore(tmp_path)
    assert store.partial_bytes(manifest) == 0
    assert files(store.partial_dir) == []  # asking created nothing
    part = store.open_partial(manifest)
    assert part.bytes_missing == len(data)
    part.write_chunk(1, chunk(data, 1))
    part.write_chunk(5, chunk(data, 5))
    part.close()
    assert store.partial_bytes(manifest) == C + 123
    reopened = store.open_partial(manifest)
    assert reopened.bytes_present == C + 123
    assert reopened.bytes_missing == len(data) - C - 123
    reopened.close()
    # a partial cut with other chunk boundaries does not count for this manifest
    other = build_manifest(io.BytesIO(data), chunk_size=2 * C)
    assert store.partial_bytes(other) == 0


def test_partials_skips_a_partial_committed_while_listing(tmp_path: Path) -> None:
    """``rbd-agent status`` lists partials while pulls commit them in worker
    threads: a partial whose files vanish mid-listing is simply no longer
    listed (this raised FileNotFoundError, a 500 from the status socket)."""
    store = LayerStore(tmp_path)
    parts = []
    for seed in (1, 2):
        d = blob(2 * C, seed=seed)
        p = store.open_partial(build_manifest(io.BytesIO(d), chunk_size=C))
        p.write_chunk(0, chunk(d, 0))
        p.flush()
        parts.append(p)
    listing = store.partials()
    first = next(listing)
    for p in parts:
        if p.digest != first[0]:
            store.discard_partial(p.digest)  # committed meanwhile
    assert list(listing) == []
    # and a bitmap gone between the manifest read and its own read counts 0
    other = next(p for p in parts if p.digest == first[0])
    other.bitmap_path.unlink()
    assert list(store.partials()) == [(first[0], 0, 2)]
    for p in parts:
        p.close()
