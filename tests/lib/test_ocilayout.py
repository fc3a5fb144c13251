"""The OCI image layout origin, on real layouts written by skopeo from the demo image."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from rainbowd.core.chunks import layer_chunk_size
from rainbowd.core.digest import Digest
from rainbowd.core.messages import ImageRecord
from rainbowd.lib.compression import MEDIA_OCI_GZIP, MEDIA_OCI_TAR, MEDIA_OCI_ZSTD, sniff
from rainbowd.lib.hostplatform import host_architecture
from rainbowd.lib.image import ImageError, docker_archive_stream, ingest_docker_archive
from rainbowd.lib.ocilayout import ingest_oci_layout
from rainbowd.lib.store import LayerStore
from testdeps import missing_dependency

CHUNK = 256 * 1024


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def snapshot(store: LayerStore) -> tuple[list[str], list[str], list[str]]:
    return (
        sorted(p.name for p in store.blob_dir.iterdir()),
        sorted(p.name for p in store.partial_dir.iterdir()),
        sorted(p.name for p in store.tmp_dir.iterdir()),
    )


def skopeo(*args: str) -> None:
    subprocess.run(["skopeo", "copy", "-q", *args], check=True, timeout=60)


@pytest.fixture(scope="module")
def layouts(demo_image: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``multi``: tags "gz" (gzip layers) and "raw" (tar layers); ``zstd``: tag "z"."""
    if shutil.which("skopeo") is None:
        missing_dependency("skopeo missing: apt-get install skopeo")
    base = tmp_path_factory.mktemp("oci")
    src = f"docker-archive:{demo_image}"
    skopeo(src, f"oci:{base / 'multi'}:gz")
    skopeo("--dest-oci-accept-uncompressed-layers", src, f"oci:{base / 'multi'}:raw")
    skopeo("--dest-compress-format", "zstd", src, f"oci:{base / 'zstd'}:z")
    return {"multi": base / "multi", "zstd": base / "zstd"}


@pytest.fixture(scope="module")
def archive_image(demo_image: Path, tmp_path_factory: pytest.TempPathFactory) -> ImageRecord:
    store = LayerStore(tmp_path_factory.mktemp("archive-store"))
    image, _ = ingest_docker_archive(demo_image, store, chunk_size=CHUNK)
    return image


def copy_layout(layouts: dict[str, Path], name: str, tmp_path: Path) -> Path:
    dest = tmp_path / name
    shutil.copytree(layouts[name], dest)
    return dest


def manifest_of(layout: Path, tag: str) -> dict:  # type: ignore[type-arg]
    index = json.loads((layout / "index.json").read_text())
    entry = next(
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    )
    return json.loads((layout / "blobs/sha256" / entry["digest"][7:]).read_text())  # type: ignore[no-any-return]


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs/sha256" / digest[7:]


def stream_diff_ids(image: ImageRecord, store: LayerStore) -> list[str]:
    data = b"".join(docker_archive_stream(image, store))
    out = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        manifest = json.loads(tf.extractfile("manifest.json").read())  # type: ignore[union-attr]
        for name in manifest[0]["Layers"]:
            member = tf.extractfile(name).read()  # type: ignore[union-attr]
            if sniff(member[:4]) == "gzip":
                member = gzip.decompress(member)
            out.append(sha(member))
    return out


# --------------------------------------------------------------------------
# good layouts
# --------------------------------------------------------------------------
def test_gzip_layout_matches_archive(
    layouts: dict[str, Path], archive_image: ImageRecord, tmp_path: Path
) -> None:
    store = LayerStore(tmp_path / "store")
    image, manifests = ingest_oci_layout(
        layouts["multi"], store, ref="demo:oci", tag="gz", chunk_size=CHUNK
    )
    diff_ids = [la.diff_id for la in archive_image.layers]
    assert image.ref == "demo:oci"
    assert [la.diff_id for la in image.layers] == diff_ids
    assert json.loads(image.config)["rootfs"]["diff_ids"] == diff_ids
    assert image.config_digest == sha(image.config.encode())
    descs = manifest_of(layouts["multi"], "gz")["layers"]
    for layer, desc, cm, plain in zip(
        image.layers, descs, manifests, archive_image.layers, strict=True
    ):
        assert (layer.digest, layer.size) == (desc["digest"], desc["size"])  # passed unchanged
        assert layer.media_type == MEDIA_OCI_GZIP
        assert layer.uncompressed_size == plain.size
        assert cm.digest == layer.digest
        assert cm.chunk_size == layer_chunk_size(layer.size, CHUNK)
        assert store.has(Digest(layer.digest))
        assert sha(store.path(Digest(layer.digest)).read_bytes()) == layer.digest
    assert stream_diff_ids(image, store) == diff_ids
    assert snapshot(store)[1:] == ([], [])


def test_tar_layout_off_gives_the_archive_digests(
    layouts: dict[str, Path], archive_image: ImageRecord, tmp_path: Path
) -> None:
    image, _ = ingest_oci_layout(
        layouts["multi"], LayerStore(tmp_path / "s"), ref="demo:raw", tag="raw"
    )
    assert [la.digest for la in image.layers] == [la.digest for la in archive_image.layers]
    assert [la.diff_id for la in image.layers] == [la.diff_id for la in image.layers]
    # skopeo labels these tars "+gzip"; rbd goes by the bytes
    assert {la.media_type for la in image.layers} == {MEDIA_OCI_TAR}


@pytest.mark.parametrize("mode", ["gzip", "zstd"])
def test_tar_layout_compressed_like_the_archive(
    mode: str, layouts: dict[str, Path], demo_image: Path, tmp_path: Path
) -> None:
    """Two origins (archive and OCI layout) compressing the same tars agree on digests."""
    store = LayerStore(tmp_path / "s")
    image, _ = ingest_oci_layout(
        layouts["multi"],
        store,
        ref="demo:raw",
        tag="raw",
        compression=mode,  # type: ignore[arg-type]
    )
    from_archive, _ = ingest_docker_archive(
        demo_image,
        LayerStore(tmp_path / "a"),
        compression=mode,  # type: ignore[arg-type]
    )
    assert [la.digest for la in image.layers] == [la.digest for la in from_archive.layers]
    assert all(la.digest != la.diff_id for la in image.layers)
    assert {la.media_type for la in image.layers} == {
        MEDIA_OCI_GZIP if mode == "gzip" else MEDIA_OCI_ZSTD
    }
    assert stream_diff_ids(image, store) == [la.diff_id for la in image.layers]
    assert snapshot(store)[2] == []


def test_zstd_layout_passes_unchanged(
    layouts: dict[str, Path], archive_image: ImageRecord, tmp_path: Path
) -> None:
    store = LayerStore(tmp_path / "s")
    image, _ = ingest_oci_layout(layouts["zstd"], store, ref="demo:z", compression="gzip")
    descs = manifest_of(layouts["zstd"], "z")["layers"]
    assert [la.digest for la in image.layers] == [d["digest"] for d in descs]
    assert {la.media_type for la in image.layers} == {MEDIA_OCI_ZSTD}
    assert [la.diff_id for la in image.layers] == [la.diff_id for la in archive_image.layers]
    assert [la.uncompressed_size for la in image.layers] == [la.size for la in archive_image.layers]
    assert stream_diff_ids(image, store) == [la.diff_id for la in image.layers]


def test_nested_index_picks_the_platform(layouts: dict[str, Path], tmp_path: Path) -> None:
    layout = copy_layout(layouts, "zstd", tmp_path)
    index = json.loads((layout / "index.json").read_text())
    real = index["manifests"][0]
    host = {"os": "linux", "architecture": host_architecture()}
    other = {**real, "digest": "sha256:" + "e" * 64}  # absent: must not be read
    nested = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {**other, "platform": {"os": "linux", "architecture": "s390x"}},
                {**real, "platform": host},
            ],
        }
    ).encode()
    blob_path(layout, sha(nested)).write_bytes(nested)
    index["manifests"] = [
        {
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": sha(nested),
            "size": len(nested),
            "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }
    ]
    (layout / "index.json").write_text(json.dumps(index))
    image, _ = ingest_oci_layout(layout, LayerStore(tmp_path / "s"), ref="m:1", tag="multi")
    assert len(image.layers) == 3
    # the tag names the index: it and the manifest chosen from it are kept as they are
    assert image.upstream is not None and image.upstream.index is not None
    assert image.upstream.index.text.encode() == nested
    assert image.upstream.manifest.digest == real["digest"]
    store = LayerStore(tmp_path / "s2")
    with pytest.raises(ImageError, match=r"no manifest for platform linux/arm64.*s390x"):
        ingest_oci_layout(layout, store, ref="m:1", tag="multi", platform="linux/arm64")
    with pytest.raises(ImageError, match="missing"):  # the s390x manifest is not there
        ingest_oci_layout(layout, store, ref="m:1", tag="multi", platform="linux/s390x")
    assert snapshot(store) == ([], [], [])


def test_the_layouts_own_manifest_is_kept_when_it_lists_the_blobs_rbd_holds(
    layouts: dict[str, Path], tmp_path: Path
) -> None:
    """Kept (to be served byte for byte) only when the layers pass unchanged."""
    index = json.loads((layouts["multi"] / "index.json").read_text())
    by_tag = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in index["manifests"]}
    gz, _ = ingest_oci_layout(layouts["multi"], LayerStore(tmp_path / "a"), ref="a:1", tag="gz")
    assert gz.upstream is not None and gz.upstream.index is None
    assert gz.upstream.manifest.digest == by_tag["gz"]["digest"]
    kept = blob_path(layouts["multi"], by_tag["gz"]["digest"]).read_bytes()
    assert gz.upstream.manifest.text.encode() == kept
    # recompressed layers are other blobs than the manifest names; and skopeo labels these
    # tars "+gzip", which rbd does not believe: the image is served under rbd's manifest
    for mode in ("gzip", "off"):
        raw, _ = ingest_oci_layout(
            layouts["multi"],
            LayerStore(tmp_path / mode),
            ref="r:1",
            tag="raw",
            compression=mode,  # type: ignore[arg-type]
        )
        assert raw.upstream is None, mode


# --------------------------------------------------------------------------
# choosing the image
# --------------------------------------------------------------------------
def test_two_tags_one_layout(layouts: dict[str, Path], tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "s")
    gz, _ = ingest_oci_layout(layouts["multi"], store, ref="a:1", tag="gz")
    raw, _ = ingest_oci_layout(layouts["multi"], store, ref="b:1", tag="raw")
    assert [la.diff_id for la in gz.layers] == [la.diff_id for la in raw.layers]
    assert {la.digest for la in gz.layers}.isdisjoint({la.digest for la in raw.layers})
    assert len(store.holdings()) == 6


def test_tag_not_found_lists_tags(layouts: dict[str, Path], tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "s")
    with pytest.raises(ImageError, match=r"multi image 'nope': tag not found; available: gz, raw"):
        ingest_oci_layout(layouts["multi"], store, ref="x:1", tag="nope")
    with pytest.raises(ImageError, match=r"holds 2 images; name one of: gz, raw"):
        ingest_oci_layout(layouts["multi"], store, ref="x:1")
    assert snapshot(store) == ([], [], [])


# --------------------------------------------------------------------------
# broken layouts: clear errors, store unchanged
# --------------------------------------------------------------------------
def last_layer(layout: Path, tag: str) -> Path:
    return blob_path(layout, manifest_of(layout, tag)["layers"][-1]["digest"])


@pytest.mark.parametrize("mode", ["off", "gzip"])
def test_tampered_layer(mode: str, layouts: dict[str, Path], tmp_path: Path) -> None:
    layout = copy_layout(layouts, "multi", tmp_path)
    victim = last_layer(layout, "raw")  # earlier layers are ingested first, then rolled back
    data = bytearray(victim.read_bytes())
    data[600] ^= 0xFF
    victim.chmod(0o644)
    victim.write_bytes(bytes(data))
    store = LayerStore(tmp_path / "s")
    with pytest.raises(ImageError, match=rf"OCI layout {layout} image 'raw': layer 2 .*mismatch"):
        ingest_oci_layout(layout, store, ref="x:1", tag="raw", compression=mode)  # type: ignore[arg-type]
    assert snapshot(store) == ([], [], [])


def test_tampered_gzip_layer(layouts: dict[str, Path], tmp_path: Path) -> None:
    layout = copy_layout(layouts, "multi", tmp_path)
    victim = last_layer(layout, "gz")
    data = bytearray(victim.read_bytes())
    data[-12] ^= 0xFF  # in the last deflate block
    victim.write_bytes(bytes(data))
    store = LayerStore(tmp_path / "s")
    with pytest.raises(
        ImageError, match=r"'gz': layer 2 sha256:\w+(: gzip stream is corrupt| digest mismatch)"
    ):
        ingest_oci_layout(layout, store, ref="x:1", tag="gz")
    assert snapshot(store) == ([], [], [])


def test_tampered_manifest_and_config(layouts: dict[str, Path], tmp_path: Path) -> None:
    layout = copy_layout(layouts, "multi", tmp_path)
    config = blob_path(layout, manifest_of(layout, "gz")["config"]["digest"])
    config.write_bytes(config.read_bytes().replace(b"amd64", b"AMD64"))
    store = LayerStore(tmp_path / "s")
    with pytest.raises(ImageError, match="config digest mismatch"):
        ingest_oci_layout(layout, store, ref="x:1", tag="gz")
    index = json.loads((layout / "index.json").read_text())
    manifest = blob_path(layout, index["manifests"][1]["digest"])
    manifest.write_bytes(manifest.read_bytes().replace(b'"size"', b'"Size"'))
    with pytest.raises(ImageError, match=r"manifest sha256:\w+ digest mismatch"):
        ingest_oci_layout(layout, store, ref="x:1", tag="raw")
    assert snapshot(store) == ([], [], [])


def test_missing_and_truncated_blob(layouts: dict[str, Path], tmp_path: Path) -> None:
    layout = copy_layout(layouts, "multi", tmp_path)
    store = LayerStore(tmp_path / "s")
    # a layer held before the failed ingest stays held
    held, _ = ingest_oci_layout(layouts["zstd"], store, ref="held:1")
    before = snapshot(store)
    victim = last_layer(layout, "gz")
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"layer 2 sha256:\w+ is truncated"):
        ingest_oci_layout(layout, store, ref="x:1", tag="gz")
    assert snapshot(store) == before
    victim.unlink()
    with pytest.raises(ImageError, match=r"layer 2 sha256:\w+ is missing"):
        ingest_oci_layout(layout, store, ref="x:1", tag="gz")
    assert snapshot(store) == before
    assert all(store.has(Digest(la.digest)) for la in held.layers)


def test_not_a_layout(tmp_path: Path, demo_image: Path) -> None:
    store = LayerStore(tmp_path / "s")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match=r"empty: not an OCI image layout \(no oci-layout"):
        ingest_oci_layout(tmp_path / "empty", store, ref="x:1")
    with pytest.raises(ImageError, match="no such directory"):
        ingest_oci_layout(tmp_path / "nowhere", store, ref="x:1")
    with pytest.raises(ImageError, match="no such directory"):
        ingest_oci_layout(demo_image, store, ref="x:1")
    (tmp_path / "empty" / "oci-layout").write_text('{"imageLayoutVersion": "2.0.0"}')
    with pytest.raises(ImageError, match="unsupported imageLayoutVersion"):
        ingest_oci_layout(tmp_path / "empty", store, ref="x:1")
    (tmp_path / "empty" / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    with pytest.raises(ImageError, match=r"no index\.json"):
        ingest_oci_layout(tmp_path / "empty", store, ref="x:1")
    with pytest.raises(ImageError, match="not os/arch"):
        ingest_oci_layout(tmp_path / "empty", store, ref="x:1", platform="amd64")
    assert snapshot(store) == ([], [], [])
