"""ContainerdLoader against a real containerd (Debian's package, its own root), checked with ctr.

The image is the demo image (busybox, a payload, files) read into a real
LayerStore the way an origin ingests it. After a load, ``ctr images ls``
must list it under its normalized name with the manifest digest the front
door's catalog names it by, ``ctr images check`` must call its content
complete, and ``ctr run`` must run it. The OCI archive and the name rules are
checked without containerd too.
"""

from __future__ import annotations

import io
import json
import socket
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from containerd_fixtures import ContainerdProcess, listed_digests
from rainbowd.agent.containerd.loader import ContainerdLoader, ContainerdLoadError
from rainbowd.agent.containerd.names import containerd_name
from rainbowd.agent.mirror.catalog import ImageCatalog
from rainbowd.core.digest import Digest, hex_part, sha256_digest
from rainbowd.core.imagemanifest import manifest_for
from rainbowd.core.messages import ImageRecord
from rainbowd.devcluster.imagebuild import build_demo_image
from rainbowd.lib.hostplatform import host_architecture
from rainbowd.lib.image import ImageError, ingest_docker_archive
from rainbowd.lib.ociarchive import oci_archive_stream
from rainbowd.lib.ocilayout import CONTAINERD_NAME
from rainbowd.lib.store import LayerStore
from testdeps import missing_dependency
from upstream_docs import upstream_manifest

CHUNK = 256 * 1024
NAME = "docker.io/library/rbd-demo:latest"


@pytest.fixture
def stored(demo_image: Path, tmp_path: Path) -> tuple[LayerStore, ImageRecord]:
    store = LayerStore(tmp_path / "store")
    image, _ = ingest_docker_archive(demo_image, store, chunk_size=CHUNK, compression="gzip")
    return store, image


def loader_for(proc: ContainerdProcess) -> ContainerdLoader:
    from containerd_fixtures import NAMESPACE

    return ContainerdLoader(proc.address, NAMESPACE)


# --------------------------------------------------------------------------
# names and the archive (no containerd)
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ref", "name"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("rbd-demo:latest", "docker.io/library/rbd-demo:latest"),
        ("team/app:1", "docker.io/team/app:1"),
        ("index.docker.io/team/app:1", "docker.io/team/app:1"),
        ("registry.example.com:5000/app", "registry.example.com:5000/app:latest"),
        ("localhost/app:2", "localhost/app:2"),
        ("ghcr.io/o/app@sha256:" + "a" * 64, "ghcr.io/o/app@sha256:" + "a" * 64),
    ],
)
def test_names_are_dockers_normalized_references(ref: str, name: str) -> None:
    assert containerd_name(ref) == name


def untar(pieces: Iterator[bytes]) -> dict[str, bytes]:
    data = b"".join(pieces)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}  # type: ignore[union-attr]


def test_the_archive_carries_the_front_doors_manifest_and_names_the_image(
    stored: tuple[LayerStore, ImageRecord], tmp_path: Path
) -> None:
    store, image = stored
    built, pieces = oci_archive_stream(image, store, NAME)
    members = untar(pieces)
    # the manifest is the catalog's, byte for byte: one digest on the front door and here
    catalogued = ImageCatalog(tmp_path / "mirror").record(image)
    assert built.digest == catalogued.digest == manifest_for(image).digest
    assert members[f"blobs/sha256/{hex_part(built.digest)}"] == built.data
    index = json.loads(members["index.json"])
    (entry,) = index["manifests"]
    assert entry["digest"] == built.digest and entry["mediaType"] == built.media_type
    assert entry["annotations"][CONTAINERD_NAME] == NAME
    assert json.loads(members["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for digest in [image.config_digest, *(x.digest for x in image.layers)]:
        assert sha256_digest(members[f"blobs/sha256/{hex_part(Digest(digest))}"]) == digest


def test_the_archive_leaves_out_what_containerd_has(
    stored: tuple[LayerStore, ImageRecord],
) -> None:
    store, image = stored
    first = image.layers[0].digest
    _, pieces = oci_archive_stream(image, store, NAME, skip={first})
    members = untar(pieces)
    assert f"blobs/sha256/{hex_part(Digest(first))}" not in members
    assert all(f"blobs/sha256/{hex_part(Digest(x.digest))}" in members for x in image.layers[1:])


def test_a_rotten_blob_breaks_the_archive_before_its_index(
    stored: tuple[LayerStore, ImageRecord],
) -> None:
    store, image = stored
    path = store.path(Digest(image.layers[0].digest))
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    _, pieces = oci_archive_stream(image, store, NAME)
    seen = b""
    with pytest.raises(ImageError, match="corrupt"):
        for piece in pieces:
            seen += piece
    assert b"index.json" not in seen  # so containerd can create no image from it


def test_a_missing_layer_fails_before_any_byte(
    stored: tuple[LayerStore, ImageRecord], tmp_path: Path
) -> None:
    _, image = stored
    with pytest.raises(ImageError, match="not complete in the store"):
        oci_archive_stream(image, LayerStore(tmp_path / "empty"), NAME)


# --------------------------------------------------------------------------
# a real containerd
# --------------------------------------------------------------------------
async def test_a_load_puts_the_image_in_containerd_under_the_manifest_digest(
    stored: tuple[LayerStore, ImageRecord], containerd: ContainerdProcess
) -> None:
    store, image = stored
    loader = loader_for(containerd)
    assert await loader.available()
    result = await loader.load(image, store)
    digest = manifest_for(image).digest
    assert result.image_id == digest and result.layers_sent == len(image.layers)
    assert listed_digests(containerd)[NAME] == digest
    assert await loader.has_image(image.ref, digest)
    check = containerd.ctr("images", "check").stdout
    (row,) = [line for line in check.splitlines() if line.startswith(NAME)]
    n = len(image.layers) + 1  # the config and every layer (not the manifest itself)
    assert f"complete ({n}/{n})" in row
    assert row.split()[-1] == "true"  # unpacked: it runs without a pull
    content = containerd.ctr("content", "ls", "--quiet").stdout.split()
    assert {image.config_digest, *(x.digest for x in image.layers)} <= set(content)
    ran = containerd.ctr("run", "--rm", NAME, "rbd-containerd-test")
    assert "hello from rbd" in ran.stdout

    # a second load sends no layer: containerd holds every blob already
    again = await loader.load(image, store)
    assert again.layers_sent == 0
    assert listed_digests(containerd)[NAME] == digest


def with_upstream(image: ImageRecord) -> ImageRecord:
    """``image`` as a registry had it: its own manifest bytes, in a list with another platform.

    The other platform's manifest is named only: the origin chose this host's.
    """
    upstream = upstream_manifest(image, architecture=host_architecture())
    return msgspec.structs.replace(image, upstream=upstream)


async def test_an_image_with_the_upstreams_manifest_list_is_named_by_it_and_runs(
    stored: tuple[LayerStore, ImageRecord], containerd: ContainerdProcess, tmp_path: Path
) -> None:
    """containerd and the front door name it by the upstream's digest (the list's)."""
    store, plain = stored
    image = with_upstream(plain)
    assert image.upstream is not None and image.upstream.index is not None
    catalog = ImageCatalog(tmp_path / "mirror")
    catalog.record(image)
    want = image.upstream.index.digest
    assert catalog.recorded[image.ref] == want
    result = await loader_for(containerd).load(image, store)
    assert result.image_id == want
    assert listed_digests(containerd)[NAME] == want
    ran = containerd.ctr("run", "--rm", NAME, "rbd-containerd-upstream")
    assert "hello from rbd" in ran.stdout


async def test_a_second_image_on_the_same_base_sends_only_its_own_layers(
    stored: tuple[LayerStore, ImageRecord], containerd: ContainerdProcess, tmp_path: Path
) -> None:
    store, image = stored
    other_tar = build_demo_image(tmp_path / "other.tar", ref="rbd-other:1", payload_mib=1, seed=7)
    other, _ = ingest_docker_archive(other_tar, store, chunk_size=CHUNK, compression="gzip")
    loader = loader_for(containerd)
    await loader.load(image, store)
    result = await loader.load(other, store)
    shared = {x.digest for x in image.layers} & {x.digest for x in other.layers}
    assert shared  # the busybox layer
    assert result.layers_sent == len({x.digest for x in other.layers} - shared)
    assert listed_digests(containerd)["docker.io/library/rbd-other:1"] == manifest_for(other).digest


async def test_a_rotten_blob_fails_the_load_and_creates_no_image(
    stored: tuple[LayerStore, ImageRecord], containerd: ContainerdProcess
) -> None:
    store, image = stored
    path = store.path(Digest(image.layers[1].digest))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ContainerdLoadError) as e:
        await loader_for(containerd).load(image, store)
    assert image.ref in str(e.value) and "corrupt" in str(e.value)
    assert containerd.address in str(e.value)
    assert NAME not in listed_digests(containerd)


async def test_an_unreachable_containerd_is_not_available_and_fails_a_load(
    stored: tuple[LayerStore, ImageRecord],
) -> None:
    """A containerd that died: its socket is left, and nothing listens on it.

    ctr is refused at once there; a socket path that does not exist at all makes
    ctr wait out its whole connect timeout (CTR_CONNECT_SECONDS) per call, for the
    same failure, seen the same way by rbd.
    """
    store, image = stored
    if ContainerdProcess.available():  # ctr itself is needed to see it fail
        missing_dependency(ContainerdProcess.available())
    with tempfile.TemporaryDirectory(prefix="rbd-ctrd-") as short:  # a socket path's 107 bytes
        stale = str(Path(short) / "c.sock")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(stale)  # closed without unlinking: the file stays, nobody listens
        loader = ContainerdLoader(stale, "k8s.io")
        assert not await loader.available()
        with pytest.raises(ContainerdLoadError) as e:
            await loader.load(image, store)
    assert image.ref in str(e.value) and stale in str(e.value)


async def test_a_missing_ctr_is_not_available(tmp_path: Path) -> None:
    loader = ContainerdLoader("/run/none.sock", "k8s.io", ctr="rbd-no-such-ctr")
    assert not await loader.available()
