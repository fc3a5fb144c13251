"""Compression on ingest: modes round-trip, are deterministic, and zstd reaches Docker as tar."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from imagetest import add, layer_tar, sha, store_snapshot
from rainbowd.core.digest import Digest
from rainbowd.core.messages import Compression, ImageRecord
from rainbowd.lib.compression import (
    MEDIA_DOCKER_GZIP,
    MEDIA_DOCKER_TAR,
    MEDIA_OCI_ZSTD,
    CompressionError,
    Inflater,
    compressed_copy,
    hash_layer,
    sniff,
)
from rainbowd.lib.image import ImageError, docker_archive_stream, ingest_docker_archive
from rainbowd.lib.store import LayerStore

CHUNK = 256 * 1024
MODES: list[Compression] = ["off", "gzip", "zstd"]


def archive(path: Path, blobs: list[bytes], diff_ids: list[str], ref: str = "t:1") -> Path:
    """A legacy docker-archive with the given layer blobs (any compression)."""
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    ).encode()
    names = [f"{i}/layer.tar" for i in range(len(blobs))]
    with tarfile.open(path, "w") as tf:
        add(tf, sha(config)[7:] + ".json", config)
        for name, blob in zip(names, blobs, strict=True):
            add(tf, name, blob)
        manifest = [{"Config": sha(config)[7:] + ".json", "RepoTags": [ref], "Layers": names}]
        add(tf, "manifest.json", json.dumps(manifest).encode())
    return path


def streamed_layers(image: ImageRecord, store: LayerStore, **kw: bool) -> list[bytes]:
    """The layer members of the docker-archive stream, in manifest order."""
    data = b"".join(docker_archive_stream(image, store, **kw))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        manifest = json.loads(tf.extractfile("manifest.json").read())  # type: ignore[union-attr]
        out = []
        for name in manifest[0]["Layers"]:
            f = tf.extractfile(name)
            assert f is not None
            out.append(f.read())
    return out


# --------------------------------------------------------------------------
# the streaming primitives
# --------------------------------------------------------------------------
def test_sniff() -> None:
    assert sniff(gzip.compress(b"x")[:4]) == "gzip"
    assert sniff(zstandard.ZstdCompressor().compress(b"x")[:4]) == "zstd"
    assert sniff(layer_tar({"a": b"b"})[:4]) == "tar"
    assert sniff(b"") == "tar"


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_inflater_members_truncation_and_garbage(kind: str) -> None:
    raw = os.urandom(200_000) + b"a" * 3_000_000

    def pack(data: bytes) -> bytes:
        if kind == "gzip":
            return gzip.compress(data, mtime=0)
        return zstandard.ZstdCompressor().compress(data)

    for blob in (pack(raw), pack(raw[:1000]) + pack(raw[1000:])):  # one or two members
        got = hash_layer(io.BytesIO(blob), kind)  # type: ignore[arg-type]
        assert (got.digest, got.size) == (sha(blob), len(blob))
        assert (got.diff_id, got.uncompressed_size) == (sha(raw), len(raw))
    blob = pack(raw)
    with pytest.raises(CompressionError, match="truncated"):
        hash_layer(io.BytesIO(blob[:-20]), kind)  # type: ignore[arg-type]
    with pytest.raises(CompressionError):
        hash_layer(io.BytesIO(blob + b"garbage!"), kind)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_inflater_output_is_bounded(kind: str) -> None:
    """A tiny stream that inflates to 64 MiB comes out in bounded pieces, not at once."""
    zeros = b"\0" * (64 << 20)
    if kind == "gzip":
        blob = gzip.compress(zeros, compresslevel=9, mtime=0)
    else:
        blob = zstandard.ZstdCompressor(level=19).compress(zeros)
    inf = Inflater(io.BytesIO(blob), kind)  # type: ignore[arg-type]
    biggest = 0
    while piece := inf.read(1 << 20):
        biggest = max(biggest, len(piece))
    assert inf.out_size == len(zeros)
    assert biggest <= 16 << 20


@pytest.mark.parametrize("mode", ["gzip", "zstd"])
def test_compressed_copy_is_deterministic_and_cleans_up(mode: Compression, tmp_path: Path) -> None:
    tar = layer_tar({"f": b"some text " * 50_000})
    digests = []
    for _ in range(2):
        with compressed_copy(io.BytesIO(tar), mode, tmp_path) as c:
            blob = c.path.read_bytes()
            assert sha(blob) == c.digest and len(blob) == c.size
            assert (c.diff_id, c.uncompressed_size) == (sha(tar), len(tar))
            assert sniff(blob[:4]) == mode
            digests.append(c.digest)
            path = c.path
        assert not path.exists()
    assert digests[0] == digests[1]
    if mode == "gzip":
        assert gzip.decompress(blob) == tar
        assert blob[4:8] == b"\0\0\0\0"  # mtime 0: the same tar always gives the same blob
    else:
        assert zstandard.ZstdDecompressor().decompressobj().decompress(blob) == tar


def test_compressed_copy_removes_temp_on_error(tmp_path: Path) -> None:
    class Broken:
        def read(self, n: int = -1) -> bytes:
            raise OSError("disk went away")

    with pytest.raises(OSError), compressed_copy(Broken(), "gzip", tmp_path):
        pass
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CompressionError, match="unknown compression"):
        with compressed_copy(io.BytesIO(b""), "lz4", tmp_path):  # type: ignore[arg-type]
            pass


# --------------------------------------------------------------------------
# ingest of the demo image in each mode
# --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_round_trips(mode: Compression, demo_image: Path, tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    image, manifests = ingest_docker_archive(demo_image, store, chunk_size=CHUNK, compression=mode)
    plain, _ = ingest_docker_archive(demo_image, LayerStore(tmp_path / "plain"), chunk_size=CHUNK)
    assert image.config_digest == plain.config_digest
    assert [la.diff_id for la in image.layers] == [la.diff_id for la in plain.layers]
    for layer, manifest, ref in zip(image.layers, manifests, plain.layers, strict=True):
        blob = store.path(Digest(layer.digest)).read_bytes()
        assert sha(blob) == layer.digest == manifest.digest
        assert len(blob) == layer.size == manifest.size
        assert layer.uncompressed_size == ref.size  # the tar's size, in every mode
        if mode == "off":
            assert layer.digest == layer.diff_id
            assert layer.media_type == MEDIA_DOCKER_TAR
        else:
            assert layer.digest != layer.diff_id
            assert sniff(blob[:4]) == mode
            assert layer.media_type == {"gzip": MEDIA_DOCKER_GZIP, "zstd": MEDIA_OCI_ZSTD}[mode]
    # what Docker would get: tar (or gzip, which Docker inflates) matching each diff_id
    for layer, member in zip(image.layers, streamed_layers(image, store), strict=True):
        if mode == "gzip":
            member = gzip.decompress(member)
        assert sniff(member[:4]) == "tar"  # zstd was inflated on the way out
        assert sha(member) == layer.diff_id
        assert len(member) == layer.uncompressed_size
    assert store_snapshot(store)[1:] == ([], [])


@pytest.mark.parametrize("mode", ["gzip", "zstd"])
def test_two_origins_agree_on_digests(mode: Compression, demo_image: Path, tmp_path: Path) -> None:
    a, _ = ingest_docker_archive(demo_image, LayerStore(tmp_path / "a"), compression=mode)
    b, _ = ingest_docker_archive(demo_image, LayerStore(tmp_path / "b"), compression=mode)
    assert a == b


def test_compression_shrinks_compressible_layers(demo_image: Path, tmp_path: Path) -> None:
    """busybox and the small files layer shrink; the random payload layer cannot."""
    plain, _ = ingest_docker_archive(demo_image, LayerStore(tmp_path / "p"))
    ratios: dict[str, list[float]] = {}
    for mode in ("gzip", "zstd"):
        image, _ = ingest_docker_archive(demo_image, LayerStore(tmp_path / mode), compression=mode)
        ratios[mode] = [c.size / p.size for c, p in zip(image.layers, plain.layers, strict=True)]
    print("compressed/uncompressed per layer (busybox, payload, files):", ratios)
    for r in ratios.values():
        assert r[0] < 0.75  # busybox: a static binary compresses well
        assert r[1] > 0.95  # 2 MiB of random bytes: incompressible (a bit of tar overhead)
        assert r[2] < 0.5  # a few small text files padded to tar blocks


def test_compressed_layers_pass_unchanged(tmp_path: Path) -> None:
    """gzip and zstd layers are kept as they are, whatever compression is asked."""
    tar_a = layer_tar({"a.txt": b"a" * 100_000})
    tar_b = layer_tar({"b.txt": b"b" * 100_000})
    gz = gzip.compress(tar_a, mtime=0)
    zs = zstandard.ZstdCompressor().compress(tar_b)
    p = archive(tmp_path / "mixed.tar", [gz, zs], [sha(tar_a), sha(tar_b)])
    for mode in MODES:
        store = LayerStore(tmp_path / f"s-{mode}")
        image, _ = ingest_docker_archive(p, store, compression=mode)
        assert [la.digest for la in image.layers] == [sha(gz), sha(zs)]
        assert [la.media_type for la in image.layers] == [MEDIA_DOCKER_GZIP, MEDIA_OCI_ZSTD]
        assert [la.uncompressed_size for la in image.layers] == [len(tar_a), len(tar_b)]
        gz_out, zs_out = streamed_layers(image, store)
        assert gz_out == gz
        assert zs_out == tar_b  # inflated for Docker
        assert streamed_layers(image, store, inflate_zstd=False)[1] == zs


def test_zstd_layer_streams_without_recorded_size(tmp_path: Path) -> None:
    """An image record from elsewhere may not know the tar size: a first pass learns it."""
    tar = layer_tar({"z.txt": b"zz" * 70_000})
    zs = zstandard.ZstdCompressor().compress(tar)
    store = LayerStore(tmp_path / "store")
    image, _ = ingest_docker_archive(archive(tmp_path / "z.tar", [zs], [sha(tar)]), store)
    image.layers[0].uncompressed_size = 0
    assert streamed_layers(image, store) == [tar]


def test_corrupt_zstd_blob_breaks_the_stream(tmp_path: Path) -> None:
    tar = layer_tar({"z.txt": os.urandom(100_000)})
    zs = zstandard.ZstdCompressor().compress(tar)
    store = LayerStore(tmp_path / "store")
    image, _ = ingest_docker_archive(archive(tmp_path / "z.tar", [zs], [sha(tar)]), store)
    path = store.path(Digest(image.layers[0].digest))
    path.chmod(0o640)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=r"corrupt|inflates to"):
        b"".join(docker_archive_stream(image, store))


@pytest.mark.parametrize("mode", ["gzip", "zstd"])
def test_wrong_diff_id_rolls_back(mode: Compression, tmp_path: Path) -> None:
    good = layer_tar({"good": b"g" * 10_000})
    bad = layer_tar({"bad": b"b" * 10_000})
    p = archive(tmp_path / "bad.tar", [good, bad], [sha(good), sha(good + b"x")])
    store = LayerStore(tmp_path / "store")
    with pytest.raises(ImageError, match=r"bad\.tar: layer 1/layer\.tar digest mismatch"):
        ingest_docker_archive(p, store, compression=mode)
    assert store_snapshot(store) == ([], [], [])  # layer 0 removed again, no temp file left
