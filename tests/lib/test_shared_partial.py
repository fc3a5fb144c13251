"""Shared partials (rainbowd.lib.store): several pulls of one layer write one partial at once.

Real files and real threads: each chunk is written once, the bitmap stays
consistent, the layer is committed once, and a partial in use is not deleted.
"""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rainbowd.core.chunks import ChunkManifest, build_manifest
from rainbowd.core.digest import Digest, sha256_digest
from rainbowd.lib.store import LayerStore, StoreError

CHUNK = 64 * 1024
COUNT = 40


@pytest.fixture
def data() -> bytes:
    return os.urandom(COUNT * CHUNK - 1000)  # the last chunk short


@pytest.fixture
def manifest(data: bytes) -> ChunkManifest:
    return build_manifest(io.BytesIO(data), sha256_digest(data), CHUNK)


def chunk(data: bytes, i: int) -> bytes:
    return data[i * CHUNK : (i + 1) * CHUNK]


def test_pulls_of_one_layer_share_one_partial_until_the_last_lets_go(
    tmp_path: Path, data: bytes, manifest: ChunkManifest
) -> None:
    store = LayerStore(tmp_path)
    a = store.share_partial(manifest)
    b = store.share_partial(manifest)
    assert a is b and a.users == 2
    assert store.shared_partial(manifest.digest) is a
    assert a.write_chunk(3, chunk(data, 3))
    store.release_partial(a)  # one user left: flushed, still open
    assert a.usable and store.partial_bytes(manifest) == CHUNK
    store.release_partial(b)
    assert not a.usable and store.shared_partial(manifest.digest) is None
    c = store.share_partial(manifest)  # a new pull resumes from what is on disk
    assert c is not a and c.has_chunk(3) and c.missing_in(0, 5) == [0, 1, 2, 4]
    store.release_partial(c)


def test_concurrent_writers_write_each_chunk_once_and_commit_once(
    tmp_path: Path, data: bytes, manifest: ChunkManifest
) -> None:
    store = LayerStore(tmp_path)
    partial = store.share_partial(manifest)
    partial.FLUSH_EVERY = 3  # many flushes racing the writes
    installs: list[Path] = []
    real_install = store._install

    def counting_install(*args: object) -> Path:
        path = real_install(*args)  # type: ignore[arg-type]
        installs.append(path)
        return path

    store._install = counting_install  # type: ignore[method-assign]
    start = threading.Barrier(4)

    def writer(order: list[int]) -> int:
        start.wait()
        return sum(partial.write_chunk(i, chunk(data, i)) for i in order)

    # four threads, every chunk offered twice (two ranges overlap completely)
    orders = [list(range(COUNT)), list(range(COUNT))[::-1], list(range(0, COUNT, 2)),
              list(range(1, COUNT, 2))]  # fmt: skip
    with ThreadPoolExecutor(4) as pool:
        written = sum(pool.map(writer, orders))
    assert written == COUNT  # each chunk written exactly once
    assert partial.complete() and partial.missing() == []
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: partial.commit(), range(2)))
    assert paths[0] == paths[1] == store.path(Digest(manifest.digest))
    assert len(installs) == 1
    assert store.path(Digest(manifest.digest)).read_bytes() == data
    assert not partial.write_chunk(0, chunk(data, 0))  # installed: nothing more is written
    store.release_partial(partial)
    assert list(store.partials()) == []


def test_a_write_after_the_partial_was_discarded_is_refused(
    tmp_path: Path, data: bytes, manifest: ChunkManifest
) -> None:
    store = LayerStore(tmp_path)
    partial = store.share_partial(manifest)
    partial.close()
    with pytest.raises(StoreError, match="no longer open"):
        partial.write_chunk(0, chunk(data, 0))


def test_a_partial_in_use_is_not_discarded(
    tmp_path: Path, data: bytes, manifest: ChunkManifest
) -> None:
    store = LayerStore(tmp_path)
    digest = Digest(manifest.digest)
    partial = store.share_partial(manifest)
    partial.write_chunk(0, chunk(data, 0))
    assert store.partial_in_use(digest) and not store.discard_partial(digest)
    store.release_partial(partial)
    store.pin_partial(digest)  # a peer is being served from it
    assert not store.discard_partial(digest)
    assert list(store.partials()) == [(digest, 1, manifest.count)]
    store.unpin_partial(digest)
    assert store.discard_partial(digest) and list(store.partials()) == []


def test_stored_partial_chunk_serves_only_persisted_bits(
    tmp_path: Path, data: bytes, manifest: ChunkManifest
) -> None:
    store = LayerStore(tmp_path)
    digest = manifest.digest
    assert store.stored_partial_chunk(digest, 0) is None  # no partial at all
    p = store.open_partial(manifest)
    p.FLUSH_EVERY = 100
    p.write_chunk(0, chunk(data, 0))
    assert store.stored_partial_chunk(digest, 0) is None  # written, not yet durable
    p.flush()
    where = store.stored_partial_chunk(digest, 0)
    assert where is not None and where[0] == manifest and where[1] == p.data_path
    assert store.stored_partial_chunk(digest, 1) is None
    p.write_chunk(1, chunk(data, 1))
    p.close()  # a new bitmap file: the cached one is read again
    assert store.stored_partial_chunk(digest, 1) is not None
    with pytest.raises(IndexError, match=f"0..{COUNT - 1}, not {COUNT}"):
        store.stored_partial_chunk(digest, COUNT)


def test_share_refuses_other_chunk_boundaries_while_a_pull_runs(
    tmp_path: Path, data: bytes, manifest: ChunkManifest
) -> None:
    store = LayerStore(tmp_path)
    other = build_manifest(io.BytesIO(data), sha256_digest(data), 2 * CHUNK)
    partial = store.share_partial(manifest)
    with pytest.raises(StoreError, match="other chunk boundaries"):
        store.share_partial(other)
    store.release_partial(partial)
    store.release_partial(store.share_partial(other))  # once it ended: starts clean


def test_a_pull_starting_while_the_last_one_closes_resumes_after_its_flush(
    tmp_path: Path, data: bytes, manifest: ChunkManifest
) -> None:
    """No chunk is lost (nor fetched again) when a pull comes as the previous one lets go."""
    store = LayerStore(tmp_path)
    old = store.share_partial(manifest)
    old.FLUSH_EVERY = 100
    old.write_chunk(5, chunk(data, 5))  # in the page cache; not in the bitmap file yet
    closing, go_on = threading.Event(), threading.Event()
    real_close = old.close

    def slow_close() -> None:
        closing.set()
        go_on.wait(10)
        real_close()

    old.close = slow_close  # type: ignore[method-assign]
    with ThreadPoolExecutor(2) as pool:
        released = pool.submit(store.release_partial, old)
        assert closing.wait(10)
        assert store.shared_partial(manifest.digest) is None  # closing: not handed out
        shared = pool.submit(store.share_partial, manifest)
        with pytest.raises(TimeoutError):
            shared.result(timeout=0.2)  # waits for the close (and its flush)
        go_on.set()
        released.result(10)
        new = shared.result(10)
    assert new is not old and new.has_chunk(5)
    store.release_partial(new)


def test_the_bitmaps_kept_for_serving_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rainbowd.lib.store

    monkeypatch.setattr(rainbowd.lib.store, "MAX_CACHED_BITMAPS", 2)
    store = LayerStore(tmp_path)
    for _ in range(5):
        data = os.urandom(CHUNK)
        m = build_manifest(io.BytesIO(data), sha256_digest(data), CHUNK)
        p = store.open_partial(m)
        p.write_chunk(0, data)
        p.close()
        assert store.stored_partial_chunk(m.digest, 0) is not None
        assert len(store._stored_bitmaps) <= 2
