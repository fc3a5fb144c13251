"""docker-archive ingest and streaming, on real archives (the demo image, hand-built ones)."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from imagetest import add, layer_tar, sha, store_snapshot
from rainbowd.core.chunks import MIN_CHUNK_SIZE, MIN_LAYER_CHUNKS, layer_chunk_size
from rainbowd.core.digest import Digest
from rainbowd.devcluster.imagebuild import build_demo_image
from rainbowd.lib.image import (
    MEDIA_TAR,
    MEDIA_TAR_GZIP,
    ImageError,
    chain_ids,
    docker_archive_stream,
    ingest_docker_archive,
    write_docker_archive,
)
from rainbowd.lib.store import LayerStore

CHUNK = 256 * 1024


# --------------------------------------------------------------------------
# the demo image
# --------------------------------------------------------------------------
def test_ingest_demo_archive(demo_image: Path, tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    image, manifests = ingest_docker_archive(demo_image, store, chunk_size=CHUNK)

    assert image.ref == "rbd-demo:latest"
    config = json.loads(image.config)
    assert image.config_digest == sha(image.config.encode())
    assert [layer.diff_id for layer in image.layers] == config["rootfs"]["diff_ids"]
    assert len(image.layers) == 3
    for layer, manifest in zip(image.layers, manifests, strict=True):
        assert layer.media_type == MEDIA_TAR
        assert layer.digest == layer.diff_id  # uncompressed: blob digest is the diff id
        assert manifest.digest == layer.digest
        assert manifest.size == layer.size
        assert manifest.chunk_size == layer_chunk_size(layer.size, CHUNK)  # small: cut finer
        assert store.has(Digest(layer.digest))
        assert sha(store.path(Digest(layer.digest)).read_bytes()) == layer.digest
    payload = image.layers[1]
    assert payload.size > 2 * 1024 * 1024
    # 2 MB in MIN_LAYER_CHUNKS chunks would be 32 KiB each: the 64 KiB floor holds instead
    assert payload.size < MIN_LAYER_CHUNKS * MIN_CHUNK_SIZE < MIN_LAYER_CHUNKS * CHUNK
    assert manifests[1].chunk_size == MIN_CHUNK_SIZE
    assert manifests[1].count == -(-payload.size // MIN_CHUNK_SIZE)
    assert config["config"]["Cmd"][0] == "/bin/sh"
    assert store_snapshot(store)[1:] == ([], [])


def test_ingest_is_idempotent(demo_image: Path, tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    first = ingest_docker_archive(demo_image, store, chunk_size=CHUNK)
    before = store_snapshot(store)
    assert ingest_docker_archive(demo_image, store, chunk_size=CHUNK) == first
    assert store_snapshot(store) == before


def test_demo_build_is_deterministic(tmp_path: Path) -> None:
    a = build_demo_image(tmp_path / "a.tar", payload_mib=1, seed=7)
    b = build_demo_image(tmp_path / "b.tar", payload_mib=1, seed=7)
    c = build_demo_image(tmp_path / "c.tar", payload_mib=1, seed=8, ref="other:1")
    assert a.read_bytes() == b.read_bytes()
    store = LayerStore(tmp_path / "store")
    ia, _ = ingest_docker_archive(a, store, chunk_size=CHUNK)
    ic, _ = ingest_docker_archive(c, store, chunk_size=CHUNK)
    assert ic.ref == "other:1"
    # same busybox layer, different payload, same top-layer content on another base
    assert ia.layers[0] == ic.layers[0]
    assert ia.layers[1].digest != ic.layers[1].digest
    assert ia.layers[2].diff_id == ic.layers[2].diff_id
    ca = chain_ids(layer.diff_id for layer in ia.layers)
    cc = chain_ids(layer.diff_id for layer in ic.layers)
    assert ca[0] == cc[0] and ca[2] != cc[2]


def test_round_trip_through_stream(demo_image: Path, tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    image, manifests = ingest_docker_archive(demo_image, store, chunk_size=CHUNK)
    out = write_docker_archive(image, store, tmp_path / "again.tar")
    with tarfile.open(out) as tf:
        manifest = json.loads(tf.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert manifest[0]["RepoTags"] == ["rbd-demo:latest"]
    assert len(manifest[0]["Layers"]) == 3

    store2 = LayerStore(tmp_path / "store2")
    image2, manifests2 = ingest_docker_archive(out, store2, chunk_size=CHUNK)
    assert image2 == image
    assert manifests2 == manifests


def test_stream_skips_known_layers_but_lists_them(demo_image: Path, tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    image, _ = ingest_docker_archive(demo_image, store, chunk_size=CHUNK)
    skip = {image.layers[0].diff_id, image.layers[1].diff_id}
    data = b"".join(docker_archive_stream(image, store, skip_diff_ids=skip))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        names = tf.getnames()
        manifest = json.loads(tf.extractfile("manifest.json").read())  # type: ignore[union-attr]
    layer_files = [n for n in names if n.endswith("layer.tar")]
    assert len(layer_files) == 1
    assert len(manifest[0]["Layers"]) == 3
    assert len(data) < image.layers[1].size  # the payload was left out


def test_stream_refuses_incomplete_layer(demo_image: Path, tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    image, _ = ingest_docker_archive(demo_image, store, chunk_size=CHUNK)
    store.remove(Digest(image.layers[2].digest))
    with pytest.raises(ImageError, match="not complete in the store"):
        docker_archive_stream(image, store)  # fails before the first byte
    # ...unless Docker already has it
    skip = {image.layers[2].diff_id}
    assert b"".join(docker_archive_stream(image, store, skip_diff_ids=skip))


def test_stream_refuses_corrupt_blob(demo_image: Path, tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    image, _ = ingest_docker_archive(demo_image, store, chunk_size=CHUNK)
    p = store.path(Digest(image.layers[1].digest))
    os.chmod(p, 0o640)
    with open(p, "r+b") as f:
        f.seek(1000)
        f.write(b"X")
    with pytest.raises(ImageError, match="corrupt"):
        b"".join(docker_archive_stream(image, store))


# --------------------------------------------------------------------------
# bad archives: clear errors, nothing left behind
# --------------------------------------------------------------------------
def test_not_a_tar(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar archive\n" * 100)
    store = LayerStore(tmp_path / "store")
    with pytest.raises(ImageError, match=r"bad\.tar.*not a tar"):
        ingest_docker_archive(bad, store)
    assert store_snapshot(store) == ([], [], [])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        ingest_docker_archive(tmp_path / "nope.tar", LayerStore(tmp_path / "store"))


def test_truncated_archive(demo_image: Path, tmp_path: Path) -> None:
    data = demo_image.read_bytes()
    cut = tmp_path / "cut.tar"
    with tarfile.open(demo_image) as tf:
        # cut inside the payload layer's data: earlier layers are whole, this one is not
        payload = max(tf.getmembers(), key=lambda m: m.size)
        cut.write_bytes(data[: payload.offset_data + payload.size // 2])
    store = LayerStore(tmp_path / "store")
    with pytest.raises(ImageError, match=r"cut\.tar.*(truncated|missing)"):
        ingest_docker_archive(cut, store, chunk_size=CHUNK)
    assert store_snapshot(store) == ([], [], [])


def two_image_archive(path: Path) -> None:
    with tarfile.open(path, "w") as tf:
        entries = []
        for tag in ("one:1", "two:2"):
            layer = layer_tar({"f": tag.encode()})
            config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [sha(layer)]}}).encode()
            add(tf, sha(config)[7:] + ".json", config)
            add(tf, f"{sha(layer)[7:]}/layer.tar", layer)
            entries.append(
                {
                    "Config": sha(config)[7:] + ".json",
                    "RepoTags": [tag],
                    "Layers": [f"{sha(layer)[7:]}/layer.tar"],
                }
            )
        add(tf, "manifest.json", json.dumps(entries).encode())


def test_ref_picks_among_images(tmp_path: Path) -> None:
    p = tmp_path / "two.tar"
    two_image_archive(p)
    store = LayerStore(tmp_path / "store")
    with pytest.raises(ImageError, match=r"'nope:1' not found.*one:1, two:2"):
        ingest_docker_archive(p, store, ref="nope:1")
    with pytest.raises(ImageError, match=r"holds 2 images.*one:1, two:2"):
        ingest_docker_archive(p, store)
    assert store_snapshot(store) == ([], [], [])
    image, _ = ingest_docker_archive(p, store, ref="two:2", chunk_size=CHUNK)
    assert image.ref == "two:2"
    assert len(store.holdings()) == 1


def test_single_image_takes_the_given_name(demo_image: Path, tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    image, _ = ingest_docker_archive(demo_image, store, ref="rbd-demo", chunk_size=CHUNK)
    assert image.ref == "rbd-demo"
    image, _ = ingest_docker_archive(demo_image, store, ref="renamed:7", chunk_size=CHUNK)
    assert image.ref == "renamed:7"


def test_missing_manifest(tmp_path: Path) -> None:
    p = tmp_path / "nomanifest.tar"
    with tarfile.open(p, "w") as tf:
        add(tf, "repositories", b"{}")
    with pytest.raises(ImageError, match=r"missing manifest\.json"):
        ingest_docker_archive(p, LayerStore(tmp_path / "store"))


def test_tampered_layer(demo_image: Path, tmp_path: Path) -> None:
    data = bytearray(demo_image.read_bytes())
    with tarfile.open(demo_image) as tf:
        payload = max(tf.getmembers(), key=lambda m: m.size)
    data[payload.offset_data + payload.size // 2] ^= 0xFF
    bad = tmp_path / "tampered.tar"
    bad.write_bytes(bytes(data))
    store = LayerStore(tmp_path / "store")
    with pytest.raises(ImageError, match=r"tampered\.tar.*digest mismatch"):
        ingest_docker_archive(bad, store, chunk_size=CHUNK)
    # the busybox layer was ingested before the payload failed: rolled back
    assert store_snapshot(store) == ([], [], [])


def test_failed_ingest_keeps_layers_held_before(demo_image: Path, tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    image, _ = ingest_docker_archive(demo_image, store, chunk_size=CHUNK)
    store.remove(Digest(image.layers[2].digest))
    before = store_snapshot(store)
    data = bytearray(demo_image.read_bytes())
    with tarfile.open(demo_image) as tf:
        top = next(
            m for m in tf.getmembers() if image.layers[2].diff_id[7:] in m.name and m.isfile()
        )
    data[top.offset_data + 600] ^= 0xFF
    bad = tmp_path / "tampered.tar"
    bad.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="digest mismatch"):
        ingest_docker_archive(bad, store, chunk_size=CHUNK)
    assert store_snapshot(store) == before


def test_config_digest_mismatch(tmp_path: Path) -> None:
    layer = layer_tar({"a.txt": b"a"})
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [sha(layer)]}}).encode()
    p = tmp_path / "badconfig.tar"
    with tarfile.open(p, "w") as tf:
        add(tf, "0" * 64 + ".json", config)
        add(tf, "l/layer.tar", layer)
        add(
            tf,
            "manifest.json",
            json.dumps(
                [{"Config": "0" * 64 + ".json", "RepoTags": ["x:1"], "Layers": ["l/layer.tar"]}]
            ).encode(),
        )
    store = LayerStore(tmp_path / "store")
    with pytest.raises(ImageError, match=r"config .* digest mismatch"):
        ingest_docker_archive(p, store)
    assert store_snapshot(store) == ([], [], [])


# --------------------------------------------------------------------------
# the newer layout (Docker >= 25): blobs/sha256/<hex>, with a gzip layer
# --------------------------------------------------------------------------
def oci_layout_archive(path: Path, *, tamper_gzip: bool = False) -> tuple[list[bytes], bytes]:
    plain = layer_tar({"hello.txt": b"hello\n"})
    inner = layer_tar({"data.bin": os.urandom(300_000)})
    gz = gzip.compress(inner, mtime=0)
    diff_ids = [sha(plain), sha(inner if not tamper_gzip else inner + b"x")]
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    ).encode()
    blobs = [plain, gz]
    with tarfile.open(path, "w") as tf:
        for blob in [config, *blobs]:
            add(tf, "blobs/sha256/" + sha(blob)[7:], blob)
        add(tf, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add(tf, "index.json", b'{"schemaVersion":2,"manifests":[]}')
        add(
            tf,
            "manifest.json",
            json.dumps(
                [
                    {
                        "Config": "blobs/sha256/" + sha(config)[7:],
                        "RepoTags": ["oci:latest"],
                        "Layers": ["blobs/sha256/" + sha(b)[7:] for b in blobs],
                    }
                ]
            ).encode(),
        )
    return blobs, config


def test_blobs_layout_with_gzip_layer(tmp_path: Path) -> None:
    p = tmp_path / "oci.tar"
    blobs, config = oci_layout_archive(p)
    store = LayerStore(tmp_path / "store")
    image, manifests = ingest_docker_archive(p, store, chunk_size=CHUNK)
    assert image.ref == "oci:latest"
    assert image.config_digest == sha(config)
    assert image.config.encode() == config
    assert [layer.digest for layer in image.layers] == [sha(b) for b in blobs]
    assert [layer.media_type for layer in image.layers] == [MEDIA_TAR, MEDIA_TAR_GZIP]
    assert image.layers[1].diff_id == sha(gzip.decompress(blobs[1]))
    assert image.layers[1].digest != image.layers[1].diff_id
    assert [m.size for m in manifests] == [len(b) for b in blobs]
    # round trip keeps the gzip blob as is
    out = write_docker_archive(image, store, tmp_path / "again.tar")
    image2, _ = ingest_docker_archive(out, LayerStore(tmp_path / "s2"), chunk_size=CHUNK)
    assert image2 == image


def test_blobs_layout_gzip_diff_id_mismatch(tmp_path: Path) -> None:
    p = tmp_path / "oci-bad.tar"
    oci_layout_archive(p, tamper_gzip=True)
    store = LayerStore(tmp_path / "store")
    with pytest.raises(ImageError, match="uncompressed content is"):
        ingest_docker_archive(p, store, chunk_size=CHUNK)
    assert store_snapshot(store) == ([], [], [])


def test_untagged_single_image_takes_given_ref(tmp_path: Path) -> None:
    layer = layer_tar({"a": b"1"})
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [sha(layer)]}}).encode()
    p = tmp_path / "untagged.tar"
    with tarfile.open(p, "w") as tf:
        add(tf, sha(config)[7:] + ".json", config)
        add(tf, "x/layer.tar", layer)
        add(
            tf,
            "manifest.json",
            json.dumps(
                [{"Config": sha(config)[7:] + ".json", "RepoTags": None, "Layers": ["x/layer.tar"]}]
            ).encode(),
        )
    image, _ = ingest_docker_archive(p, LayerStore(tmp_path / "s"), ref="mine:2", chunk_size=CHUNK)
    assert image.ref == "mine:2"
    image, _ = ingest_docker_archive(p, LayerStore(tmp_path / "t"), chunk_size=CHUNK)
    assert image.ref == sha(config)
