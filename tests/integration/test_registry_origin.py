"""The registry origin against real ``docker-registry`` processes and real skopeo pushes.

Images are rbd's demo image (busybox + 1 MiB payload + files), pushed with
skopeo (which gzips the layers) as Docker schema 2 and as OCI; manifest lists,
arm64 variants and uncompressed-layer images are PUT by hand through the
registry API. Every failure case also checks that the store is left as it was:
no layer held and nothing in tmp/.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from rainbowd.agent.origin.registry import ingest_registry
from rainbowd.agent.origin.registry_names import (
    ACCEPT,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    RegistryError,
    host_platform,
    parse_platform,
    parse_reference,
)
from rainbowd.core.chunks import ChunkManifest, layer_chunk_size
from rainbowd.core.messages import ImageRecord, RegistrySource
from rainbowd.devcluster.imagebuild import build_demo_image
from rainbowd.lib.image import ImageError, ingest_docker_archive
from rainbowd.lib.store import LayerStore
from registry_fixtures import RegistryProcess, TlsFiles, TokenServer, free_port, make_tls

CHUNK = 256 * 1024
REPO = "rbd/demo"
USER, PASSWORD = "origin", "pw-Xq7-very-secret"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def assert_untouched(store: LayerStore) -> None:
    assert store.holdings() == []
    assert list(store.tmp_dir.iterdir()) == []
    assert list(store.partial_dir.iterdir()) == []


@pytest.fixture
def store(tmp_path: Path) -> LayerStore:
    return LayerStore(tmp_path / "store")


# --------------------------------------------------------------------------
# module fixtures: one archive, pushed in several shapes
# --------------------------------------------------------------------------
class Pushed:
    """What the module pushed, and what the archive says the image is."""

    def __init__(self, archive: Path, expected: ImageRecord) -> None:
        self.archive = archive
        self.expected = expected  # from the archive: diff_ids and uncompressed sizes
        self.digests: dict[str, str] = {}  # tag -> manifest digest


def _arm64_variant(reg: RegistryProcess, tag: str, new_tag: str, media: str) -> str:
    """Push a copy of ``tag`` whose config says arm64 (same layers); return its digest."""
    body, _ = reg.get_manifest(REPO, tag, media)
    manifest = json.loads(body)
    with urllib.request.urlopen(
        f"{reg.url}/v2/{REPO}/blobs/{manifest['config']['digest']}", timeout=10
    ) as resp:
        config = json.loads(resp.read())
    config["architecture"] = "arm64"
    config["variant"] = "v8"
    cfg = json.dumps(config, separators=(",", ":")).encode()
    manifest["config"]["digest"] = reg.push_blob(REPO, cfg)
    manifest["config"]["size"] = len(cfg)
    return reg.put_manifest(REPO, new_tag, json.dumps(manifest).encode(), media)


def _index(reg: RegistryProcess, tag: str, media: str, child_media: str, children: dict) -> str:
    entries = []
    for (arch, variant), digest in children.items():
        body, _ = reg.get_manifest(REPO, digest, child_media)
        plat = {"os": "linux", "architecture": arch, **({"variant": variant} if variant else {})}
        entries.append(
            {"mediaType": child_media, "digest": digest, "size": len(body), "platform": plat}
        )
    index = {"schemaVersion": 2, "mediaType": media, "manifests": entries}
    return reg.put_manifest(REPO, tag, json.dumps(index).encode(), media)


@pytest.fixture(scope="module")
def pushed(
    registry: RegistryProcess,
    push_image: Callable[..., str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Pushed:
    d = tmp_path_factory.mktemp("registry-origin")
    try:
        archive = build_demo_image(d / "demo.tar", payload_mib=1)
    except Exception as e:  # busybox-static missing
        pytest.skip(str(e))
    expected, _ = ingest_docker_archive(archive, LayerStore(d / "ref-store"), ref="ref")
    # uncompressed sizes of the archive's (plain tar) layers are their sizes
    for layer in expected.layers:
        layer.uncompressed_size = layer.size
    p = Pushed(archive, expected)
    push_image(archive, f"{registry.host}/{REPO}:v1")
    push_image(archive, f"{registry.host}/{REPO}:oci", oci=True)
    for tag, media in (("v1", DOCKER_MANIFEST), ("oci", OCI_MANIFEST)):
        body, _ = registry.get_manifest(REPO, tag, media)
        p.digests[tag] = sha(body)
    p.digests["v1-arm64"] = _arm64_variant(registry, "v1", "v1-arm64", DOCKER_MANIFEST)
    p.digests["oci-arm64"] = _arm64_variant(registry, "oci", "oci-arm64", OCI_MANIFEST)
    host = host_platform()
    p.digests["list"] = _index(
        registry,
        "list",
        DOCKER_LIST,
        DOCKER_MANIFEST,
        {
            (host.architecture, host.variant): p.digests["v1"],
            ("arm64", "v8"): p.digests["v1-arm64"],
        },
    )
    p.digests["index"] = _index(
        registry,
        "index",
        OCI_INDEX,
        OCI_MANIFEST,
        {
            (host.architecture, host.variant): p.digests["oci"],
            ("arm64", "v8"): p.digests["oci-arm64"],
        },
    )
    # an OCI image with uncompressed tar layers (skopeo always compresses for registries)
    layers = []
    for layer in expected.layers:
        data = ingest_store_blob(d / "ref-store", layer.digest)
        layers.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": registry.push_blob(REPO, data),
                "size": len(data),
            }
        )
    cfg = expected.config.encode()
    raw_manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": registry.push_blob(REPO, cfg),
            "size": len(cfg),
        },
        "layers": layers,
    }
    p.digests["raw"] = registry.put_manifest(
        REPO, "raw", json.dumps(raw_manifest).encode(), OCI_MANIFEST
    )
    return p


def ingest_store_blob(root: Path, digest: str) -> bytes:
    return LayerStore(root).path(digest).read_bytes()  # type: ignore[arg-type]


def check_record(
    record: ImageRecord, pushed: Pushed, store: LayerStore, manifests: list[ChunkManifest]
) -> None:
    exp = pushed.expected
    assert record.ref == "rbd-demo:test"
    assert json.loads(record.config)["rootfs"]["diff_ids"] == [x.diff_id for x in exp.layers]
    assert sha(record.config.encode()) == record.config_digest
    assert [x.diff_id for x in record.layers] == [x.diff_id for x in exp.layers]
    assert [x.uncompressed_size for x in record.layers] == [x.size for x in exp.layers]
    assert len(manifests) == len(record.layers) == 3
    for layer, manifest in zip(record.layers, manifests, strict=True):
        assert store.has(layer.digest)  # type: ignore[arg-type]
        assert store.manifest(layer.digest) == manifest  # type: ignore[arg-type]
        assert manifest.digest == layer.digest and manifest.size == layer.size
        assert manifest.chunk_size == layer_chunk_size(layer.size, CHUNK)  # small: cut finer
        assert sha(store.path(layer.digest).read_bytes()) == layer.digest  # type: ignore[arg-type]
    assert list(store.tmp_dir.iterdir()) == []


async def ingest(
    source: RegistrySource, store: LayerStore
) -> tuple[ImageRecord, list[ChunkManifest]]:
    return await ingest_registry(source, store, ref="rbd-demo:test", chunk_size=CHUNK, timeout=10)


# --------------------------------------------------------------------------
# happy paths
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tag", "media"),
    [
        ("v1", "application/vnd.docker.image.rootfs.diff.tar.gzip"),
        ("oci", "application/vnd.oci.image.layer.v1.tar+gzip"),
    ],
)
@pytest.mark.parametrize("by_digest", [False, True])
async def test_ingest_by_tag_and_digest(
    registry: RegistryProcess,
    pushed: Pushed,
    store: LayerStore,
    tag: str,
    media: str,
    by_digest: bool,
) -> None:
    ref = f"{registry.host}/{REPO}" + (f"@{pushed.digests[tag]}" if by_digest else f":{tag}")
    record, manifests = await ingest(RegistrySource(reference=ref, insecure=True), store)
    check_record(record, pushed, store, manifests)
    assert {x.media_type for x in record.layers} == {media}
    # gzip blobs are kept as the registry sent them: smaller than their tars
    assert all(x.size < x.uncompressed_size for x in record.layers)
    # and so is the registry's manifest: its bytes, its digest (what front doors serve)
    assert record.upstream is not None and record.upstream.index is None
    body, _ = registry.get_manifest(REPO, pushed.digests[tag], ACCEPT)
    assert record.upstream.manifest.text.encode() == body
    assert record.upstream.manifest.digest == pushed.digests[tag]


async def test_uncompressed_layers(
    registry: RegistryProcess, pushed: Pushed, store: LayerStore
) -> None:
    src = RegistrySource(reference=f"{registry.host}/{REPO}:raw", insecure=True)
    record, manifests = await ingest(src, store)
    check_record(record, pushed, store, manifests)
    assert [x.digest for x in record.layers] == [x.diff_id for x in record.layers]
    assert all(x.size == x.uncompressed_size for x in record.layers)
    assert {x.media_type for x in record.layers} == {"application/vnd.oci.image.layer.v1.tar"}


async def test_held_layers_are_not_downloaded_again(
    tmp_path: Path, pushed: Pushed, push_image: Callable[..., str]
) -> None:
    """Second ingest succeeds although the registry's copy is now corrupt: it was not fetched."""
    reg = RegistryProcess(tmp_path / "reg").start()
    try:
        push_image(pushed.archive, f"{reg.host}/{REPO}:v1")
        store = LayerStore(tmp_path / "store")
        src = RegistrySource(reference=f"{reg.host}/{REPO}:v1", insecure=True)
        first, _ = await ingest(src, store)
        for layer in first.layers:
            blob = reg.blob_data_path(layer.digest)
            blob.write_bytes(b"\0" * blob.stat().st_size)
        with structlog.testing.capture_logs() as logs:
            second, manifests = await ingest(src, store)
        assert second == first
        check_record(second, pushed, store, manifests)
        held = [e for e in logs if e["event"] == "layer already held"]
        assert len(held) == len(first.layers)
        # each was cut as this origin cuts it now (small layers finer): nothing to note
        assert not [e for e in logs if e["event"] == "held layer keeps its chunk size"]
    finally:
        reg.stop()


@pytest.mark.parametrize("tag", ["list", "index"])
async def test_index_picks_platform(
    registry: RegistryProcess, pushed: Pushed, store: LayerStore, tag: str
) -> None:
    ref = f"{registry.host}/{REPO}:{tag}"
    host = host_platform()
    # default: the host's platform
    record, manifests = await ingest(RegistrySource(reference=ref, insecure=True), store)
    check_record(record, pushed, store, manifests)
    assert json.loads(record.config)["architecture"] == host.architecture
    # the list the tag names and the manifest chosen from it, as the registry has them
    child = pushed.digests["v1" if tag == "list" else "oci"]
    assert record.upstream is not None and record.upstream.index is not None
    assert record.upstream.index.digest == pushed.digests[tag]
    assert record.upstream.index.media_type == (DOCKER_LIST if tag == "list" else OCI_INDEX)
    assert record.upstream.manifest.digest == child
    assert sha(record.upstream.index.text.encode()) == pushed.digests[tag]
    # explicitly arm64: the other config, same layers
    arm, _ = await ingest(
        RegistrySource(reference=ref, insecure=True, platform="linux/arm64"), store
    )
    assert json.loads(arm.config)["architecture"] == "arm64"
    assert arm.config_digest != record.config_digest
    assert [x.digest for x in arm.layers] == [x.digest for x in record.layers]


async def test_index_wrong_platform(
    registry: RegistryProcess, pushed: Pushed, store: LayerStore
) -> None:
    src = RegistrySource(
        reference=f"{registry.host}/{REPO}:index", insecure=True, platform="linux/s390x"
    )
    with pytest.raises(ImageError) as e:
        await ingest(src, store)
    msg = str(e.value)
    assert f"{REPO}:index" in msg and "linux/s390x" in msg
    assert "linux/arm64/v8" in msg and f"linux/{host_platform().architecture}" in msg
    assert_untouched(store)


# --------------------------------------------------------------------------
# TLS and auth
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_registry(
    registry: RegistryProcess,
    tls_files: TlsFiles,
    pushed: Pushed,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RegistryProcess]:
    reg = RegistryProcess(
        tmp_path_factory.mktemp("tls-registry"), storage=registry.storage, tls=tls_files
    ).start()
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    srv = TokenServer(tmp_path_factory.mktemp("token"), user=USER, password=PASSWORD)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def token_registry(
    registry: RegistryProcess,
    token_server: TokenServer,
    pushed: Pushed,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RegistryProcess]:
    reg = RegistryProcess(
        tmp_path_factory.mktemp("token-registry"), storage=registry.storage, token=token_server
    ).start()
    yield reg
    reg.stop()


async def test_https_with_ca_file(
    tls_registry: RegistryProcess, tls_files: TlsFiles, pushed: Pushed, store: LayerStore
) -> None:
    src = RegistrySource(reference=f"{tls_registry.host}/{REPO}:v1", ca_file=str(tls_files.ca))
    record, manifests = await ingest(src, store)
    check_record(record, pushed, store, manifests)


async def test_https_without_ca_file_fails(
    tls_registry: RegistryProcess, store: LayerStore
) -> None:
    src = RegistrySource(reference=f"{tls_registry.host}/{REPO}:v1")
    with pytest.raises(ImageError, match=r"TLS certificate of 127\.0\.0\.1:.* not trusted"):
        await ingest(src, store)
    assert_untouched(store)


async def test_bearer_token_auth(
    token_registry: RegistryProcess,
    token_server: TokenServer,
    pushed: Pushed,
    store: LayerStore,
    tmp_path: Path,
) -> None:
    creds = tmp_path / "creds"
    creds.write_text(f"{USER}:{PASSWORD}\n")
    src = RegistrySource(
        reference=f"{token_registry.host}/{REPO}:v1", insecure=True, credentials_file=str(creds)
    )
    before = len(token_server.requests)
    record, manifests = await ingest(src, store)
    check_record(record, pushed, store, manifests)
    asked = token_server.requests[before:]
    assert asked and all(r["basic"] for r in asked)
    assert asked[0]["query"]["scope"] == [f"repository:{REPO}:pull"]
    assert asked[0]["query"]["service"] == [token_server.service]


async def test_bearer_wrong_credentials(
    token_registry: RegistryProcess, store: LayerStore, tmp_path: Path
) -> None:
    creds = tmp_path / "creds"
    creds.write_text(f"{USER}:not-the-password\n")
    src = RegistrySource(
        reference=f"{token_registry.host}/{REPO}:v1", insecure=True, credentials_file=str(creds)
    )
    with pytest.raises(ImageError) as e:
        await ingest(src, store)
    msg = str(e.value)
    assert str(creds) in msg and "refused" in msg and f"{REPO}:v1" in msg
    assert "not-the-password" not in msg and PASSWORD not in msg
    assert_untouched(store)


async def test_anonymous_on_private_registry(
    token_registry: RegistryProcess, store: LayerStore
) -> None:
    src = RegistrySource(reference=f"{token_registry.host}/{REPO}:v1", insecure=True)
    with pytest.raises(ImageError, match="anonymously"):
        await ingest(src, store)
    assert_untouched(store)


# --------------------------------------------------------------------------
# bad sources
# --------------------------------------------------------------------------
async def test_registry_down(store: LayerStore) -> None:
    port = free_port()
    src = RegistrySource(reference=f"127.0.0.1:{port}/{REPO}:v1", insecure=True)
    with pytest.raises(ImageError, match=f"registry 127.0.0.1:{port} unreachable"):
        await ingest(src, store)
    assert_untouched(store)


async def test_missing_tag(registry: RegistryProcess, pushed: Pushed, store: LayerStore) -> None:
    src = RegistrySource(reference=f"{registry.host}/{REPO}:nope", insecure=True)
    with pytest.raises(ImageError, match=f"tag nope not found in repo {REPO}"):
        await ingest(src, store)
    assert_untouched(store)


async def test_unknown_digest(registry: RegistryProcess, pushed: Pushed, store: LayerStore) -> None:
    wrong = sha(b"no such manifest")
    src = RegistrySource(reference=f"{registry.host}/{REPO}@{wrong}", insecure=True)
    with pytest.raises(ImageError, match=f"{wrong} not found"):
        await ingest(src, store)
    assert_untouched(store)


@pytest.fixture
def scratch(
    tmp_path: Path, pushed: Pushed, push_image: Callable[..., str]
) -> Iterator[RegistryProcess]:
    """A registry of its own (its storage gets corrupted), holding the demo image as :v1."""
    reg = RegistryProcess(tmp_path / "scratch", allow_foreign_urls=True).start()
    push_image(pushed.archive, f"{reg.host}/{REPO}:v1")
    yield reg
    reg.stop()


def _layers(reg: RegistryProcess) -> list[dict]:
    body, _ = reg.get_manifest(REPO, "v1", DOCKER_MANIFEST)
    return list(json.loads(body)["layers"])


async def test_manifest_digest_mismatch(scratch: RegistryProcess, store: LayerStore) -> None:
    body, _ = scratch.get_manifest(REPO, "v1", DOCKER_MANIFEST)
    digest = sha(body)
    # same JSON, other bytes: what a tampering registry or a bit flip on its disk gives
    scratch.blob_data_path(digest).write_bytes(body + b"\n")
    src = RegistrySource(reference=f"{scratch.host}/{REPO}@{digest}", insecure=True)
    with pytest.raises(ImageError, match="manifest digest mismatch"):
        await ingest(src, store)
    assert_untouched(store)


async def test_corrupt_blob(scratch: RegistryProcess, store: LayerStore) -> None:
    layers = _layers(scratch)
    victim = layers[0]  # the biggest layers finish last; others are rolled back
    blob = scratch.blob_data_path(victim["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    src = RegistrySource(reference=f"{scratch.host}/{REPO}:v1", insecure=True)
    with pytest.raises(ImageError, match=r"mismatch|not valid gzip") as e:
        await ingest(src, store)
    assert victim["digest"][7:19] in str(e.value)
    assert_untouched(store)


async def test_truncated_blob(scratch: RegistryProcess, store: LayerStore) -> None:
    victim = _layers(scratch)[1]
    blob = scratch.blob_data_path(victim["digest"])
    blob.write_bytes(blob.read_bytes()[: victim["size"] // 2])
    src = RegistrySource(reference=f"{scratch.host}/{REPO}:v1", insecure=True)
    with pytest.raises(ImageError, match="truncated"):
        await ingest(src, store)
    assert_untouched(store)


async def test_foreign_layer_refused(scratch: RegistryProcess, store: LayerStore) -> None:
    body, _ = scratch.get_manifest(REPO, "v1", DOCKER_MANIFEST)
    manifest = json.loads(body)
    manifest["layers"][2]["mediaType"] = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    manifest["layers"][2]["urls"] = ["https://example.invalid/layer.tar.gz"]
    scratch.put_manifest(REPO, "foreign", json.dumps(manifest).encode(), DOCKER_MANIFEST)
    src = RegistrySource(reference=f"{scratch.host}/{REPO}:foreign", insecure=True)
    with pytest.raises(ImageError, match="foreign/non-distributable layer"):
        await ingest(src, store)
    assert_untouched(store)


async def test_bad_reference(store: LayerStore) -> None:
    with pytest.raises(RegistryError, match="not a valid repository"):
        await ingest(RegistrySource(reference="127.0.0.1:5000/Bad_Repo:v1", insecure=True), store)
    assert_untouched(store)


def test_parse_reference() -> None:
    r = parse_reference("127.0.0.1:5000/team/app")
    assert (r.api_host, r.repository, r.tag, r.digest) == (
        "127.0.0.1:5000",
        "team/app",
        "latest",
        "",
    )
    digest = sha(b"x")
    r = parse_reference(f"reg.example.com/app:1.0@{digest}")
    assert (r.repository, r.tag, r.digest, r.target) == ("app", "1.0", digest, digest)
    r = parse_reference("docker.io/busybox")
    assert (r.api_host, r.repository) == ("registry-1.docker.io", "library/busybox")
    assert parse_platform("linux/x86_64") == parse_platform("linux/amd64")
    with pytest.raises(RegistryError, match="digest must be sha256"):
        parse_reference("reg:5000/app@sha256:abc")
    with pytest.raises(RegistryError, match="os/arch"):
        parse_platform("amd64")
