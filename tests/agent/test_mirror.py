"""The registry front door on a real LayerStore holding the demo image, pulled by real clients.

The server runs on loopback with an ephemeral port; the image is the demo
image (busybox, a payload, files) read into the store the way an origin
ingests it, and catalogued the way the agent does on ingest or load. skopeo
copies it by digest; aiohttp asks the corner cases (HEAD, Range, bad names
and digests, misses) and reads the spec's error bodies.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from clients import copy_by_digest
from clients import run as run_client
from clients import skopeo as skopeo_path
from containerd_fixtures import ContainerdError, ContainerdProcess, hosts_dir
from rainbowd.agent.metrics import AgentMetrics
from rainbowd.agent.mirror.catalog import CatalogError, ImageCatalog
from rainbowd.agent.mirror.clientconfig import docker_daemon_json
from rainbowd.agent.mirror.server import MirrorServer
from rainbowd.core.digest import Digest, hex_part
from rainbowd.core.imagemanifest import DOCKER_MANIFEST, BuiltManifest
from rainbowd.core.messages import ImageRecord
from rainbowd.devcluster.dockerd import DockerdError, PrivateDockerd
from rainbowd.lib.image import ingest_docker_archive
from rainbowd.lib.store import LayerStore
from registry_fixtures import RegistryProcess
from testdeps import missing_dependency

#: small chunks, so a range crosses several of them and every chunk check runs
CHUNK = 64 * 1024
ABSENT = "sha256:" + "0" * 64


class Served:
    """A front door over a store holding the demo image."""

    def __init__(
        self,
        server: MirrorServer,
        store: LayerStore,
        catalog: ImageCatalog,
        image: ImageRecord,
        built: BuiltManifest,
        metrics: AgentMetrics,
    ) -> None:
        self.server = server
        self.store = store
        self.catalog = catalog
        self.image = image
        self.built = built
        self.metrics = metrics
        host, port = server.bound or ("", 0)
        self.hostport = f"{host}:{port}"
        self.url = server.url
        self.corrupt: list[str] = []


@pytest.fixture
async def served(demo_image: Path, tmp_path: Path) -> AsyncIterator[Served]:
    store = LayerStore(tmp_path / "store")
    image, _ = ingest_docker_archive(demo_image, store, chunk_size=CHUNK, compression="gzip")
    catalog = ImageCatalog(tmp_path / "mirror")
    built = catalog.record(image)
    metrics = AgentMetrics()
    corrupt: list[str] = []
    server = MirrorServer(
        store,
        catalog,
        "127.0.0.1",
        0,
        node_id="n1",
        hooks=metrics,
        on_corrupt=lambda layer, why: corrupt.append(layer),
    )
    await server.start()
    s = Served(server, store, catalog, image, built, metrics)
    s.corrupt = corrupt
    try:
        yield s
    finally:
        await server.close()


async def get(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDict[str], bytes]:
    """Status, headers (case-insensitive, as HTTP has them) and body of one request."""
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, headers=headers or {}) as resp:
            return resp.status, CIMultiDict(resp.headers), await resp.read()


def error_code(body: bytes) -> str:
    errors = json.loads(body)["errors"]
    assert len(errors) == 1 and errors[0]["message"]
    return str(errors[0]["code"])


def sample(metrics: AgentMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


# --------------------------------------------------------------------------
# the API, asked directly
# --------------------------------------------------------------------------
async def test_version_check(served: Served) -> None:
    for method in ("GET", "HEAD"):
        status, headers, _ = await get(f"{served.url}/v2/", method)
        assert status == 200
        assert headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_manifest_by_digest_get_and_head(served: Served) -> None:
    url = f"{served.url}/v2/rbd-demo/manifests/{served.built.digest}"
    status, headers, body = await get(url)
    assert status == 200 and body == served.built.data
    assert "sha256:" + hashlib.sha256(body).hexdigest() == served.built.digest
    assert headers["Content-Type"] == DOCKER_MANIFEST  # the demo image's layers are Docker's
    assert headers["Docker-Content-Digest"] == served.built.digest
    assert headers["ETag"] == f'"{served.built.digest}"'
    assert int(headers["Content-Length"]) == len(body)
    status, head, body = await get(url, "HEAD")
    assert status == 200 and body == b""
    assert head["Content-Length"] == str(len(served.built.data))
    assert head["Docker-Content-Digest"] == served.built.digest
    assert head["Content-Type"] == DOCKER_MANIFEST
    # the config and every layer the manifest names are served under its digest
    doc = json.loads(served.built.data)
    for desc in [doc["config"], *doc["layers"]]:
        status, headers, blob = await get(f"{served.url}/v2/rbd-demo/blobs/{desc['digest']}")
        assert status == 200 and len(blob) == desc["size"]
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == desc["digest"]
        assert headers["Content-Type"] == "application/octet-stream"
        assert headers["Docker-Content-Digest"] == desc["digest"]
        assert headers["Accept-Ranges"] == "bytes"
    assert (
        sample(served.metrics, "rbd_agent_mirror_requests_total", kind="blob", outcome="hit") == 4
    )
    assert sample(served.metrics, "rbd_agent_mirror_bytes_served_total") == len(
        served.built.data
    ) + sum(d["size"] for d in [doc["config"], *doc["layers"]])


async def test_blob_head_and_ranges(served: Served) -> None:
    layer = max(served.image.layers, key=lambda x: x.size)  # the payload: many chunks
    whole = served.store.path(Digest(layer.digest)).read_bytes()
    url = f"{served.url}/v2/rbd-demo/blobs/{layer.digest}"
    status, headers, body = await get(url, "HEAD")
    assert status == 200 and body == b"" and headers["Content-Length"] == str(layer.size)
    # a range across chunk boundaries, an open range, a suffix: 206 and exactly those bytes
    start, end = CHUNK - 10, 3 * CHUNK + 5
    for header, lo, hi in [
        (f"bytes={start}-{end}", start, end),
        (f"bytes={layer.size - 100}-", layer.size - 100, layer.size - 1),
        ("bytes=-7", layer.size - 7, layer.size - 1),
        (f"bytes=0-{layer.size * 2}", 0, layer.size - 1),
    ]:
        status, headers, body = await get(url, headers={"Range": header})
        assert status == 206, header
        assert body == whole[lo : hi + 1], header
        assert headers["Content-Range"] == f"bytes {lo}-{hi}/{layer.size}"
        assert headers["Content-Length"] == str(hi - lo + 1)
    status, headers, body = await get(url, "HEAD", {"Range": f"bytes={start}-{end}"})
    assert status == 206 and body == b"" and headers["Content-Length"] == str(end - start + 1)
    # several ranges are not taken: the whole blob, 200
    status, _, body = await get(url, headers={"Range": "bytes=0-1,4-5"})
    assert status == 200 and body == whole
    # past the end: 416 with the size
    status, headers, body = await get(url, headers={"Range": f"bytes={layer.size}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{layer.size}"
    assert error_code(body) == "RANGE_INVALID"
    # a range of the (small) config blob too
    config = served.image.config.encode()
    status, _, body = await get(
        f"{served.url}/v2/x/blobs/{served.image.config_digest}", headers={"Range": "bytes=2-5"}
    )
    assert status == 206 and body == config[2:6]


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        (f"/v2/Bad_Name/blobs/{ABSENT}", 400, "NAME_INVALID"),
        ("/v2/rbd-demo/blobs/sha256:abc", 400, "DIGEST_INVALID"),
        ("/v2/rbd-demo/blobs/sha512:" + "a" * 128, 400, "DIGEST_INVALID"),
        (f"/v2/rbd-demo/blobs/{ABSENT}", 404, "BLOB_UNKNOWN"),
        (f"/v2/rbd-demo/manifests/{ABSENT}", 404, "MANIFEST_UNKNOWN"),
        # a tag: resolved only through the coordinator (issue 17 item 3), so a miss here
        ("/v2/rbd-demo/manifests/latest", 404, "MANIFEST_UNKNOWN"),
        ("/v2/_catalog", 405, "UNSUPPORTED"),
    ],
)
async def test_errors_carry_the_spec_body(
    served: Served, path: str, status: int, code: str
) -> None:
    got, headers, body = await get(served.url + path)
    assert got == status and error_code(body) == code
    assert headers["Content-Type"].startswith("application/json")
    got, _, body = await get(served.url + path, "HEAD")
    assert got == status and body == b""


async def test_writes_are_unsupported(served: Served) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{served.url}/v2/rbd-demo/blobs/uploads/") as resp:
            assert resp.status == 405 and error_code(await resp.read()) == "UNSUPPORTED"


async def test_a_partial_layer_is_never_served(served: Served) -> None:
    """A layer present only as a partial (chunks verified, not all there) is a miss."""
    layer = max(served.image.layers, key=lambda x: x.size)
    digest = Digest(layer.digest)
    data = served.store.path(digest).read_bytes()
    manifest = served.store.manifest(digest)
    served.store.remove(digest)
    partial = served.store.open_partial(manifest)
    partial.write_chunk(0, data[:CHUNK])
    partial.close()
    assert served.store.has_partial(digest) and not served.store.has(digest)
    status, _, body = await get(f"{served.url}/v2/rbd-demo/blobs/{digest}")
    assert status == 404 and error_code(body) == "BLOB_UNKNOWN"
    # and the manifest naming it is a miss too, so the client falls back before any blob
    status, _, body = await get(f"{served.url}/v2/rbd-demo/manifests/{served.built.digest}")
    assert status == 404 and error_code(body) == "MANIFEST_UNKNOWN"
    assert (
        sample(served.metrics, "rbd_agent_mirror_requests_total", kind="manifest", outcome="miss")
        == 1
    )


async def test_a_rotted_layer_is_not_served(served: Served) -> None:
    """A stored layer whose bytes no longer match its chunks: no bad byte goes out, and reported.

    Rot in the first chunk is a clean 404 (the client falls back); rot further
    in cuts the stream after the good chunks, so the client never holds a
    whole blob that is wrong.
    """
    layer = max(served.image.layers, key=lambda x: x.size)
    path = served.store.path(Digest(layer.digest))
    good = path.read_bytes()
    path.chmod(0o640)

    def rot(offset: int) -> None:
        data = bytearray(good)
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))

    url = f"{served.url}/v2/rbd-demo/blobs/{layer.digest}"
    rot(5)
    status, _, body = await get(url)
    assert status == 404 and error_code(body) == "BLOB_UNKNOWN"
    assert served.corrupt == [layer.digest]
    rot(2 * CHUNK + 1)
    got = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as resp:
                assert resp.status == 200
                async for piece in resp.content.iter_any():
                    got += piece
    assert len(got) <= 2 * CHUNK and good.startswith(got)
    assert served.corrupt == [layer.digest, layer.digest]
    counted = {
        outcome: sample(
            served.metrics, "rbd_agent_mirror_requests_total", kind="blob", outcome=outcome
        )
        for outcome in ("error", "miss", "hit")
    }
    assert counted == {"error": 2, "miss": 0, "hit": 0}  # each request counted once


async def test_a_rotted_manifest_file_is_not_served(served: Served) -> None:
    path = served.catalog.manifest_dir / hex_part(served.built.digest)
    path.write_bytes(path.read_bytes() + b" ")
    status, _, body = await get(f"{served.url}/v2/rbd-demo/manifests/{served.built.digest}")
    assert status == 404 and error_code(body) == "MANIFEST_UNKNOWN"


def test_the_catalog_refuses_a_config_that_does_not_match(served: Served) -> None:
    bad = ImageRecord(
        ref="bad:1",
        config_digest=served.image.config_digest,
        config=served.image.config + " ",
        layers=served.image.layers,
    )
    with pytest.raises(CatalogError, match="hashes to"):
        served.catalog.record(bad)


# --------------------------------------------------------------------------
# real clients
# --------------------------------------------------------------------------
async def test_skopeo_copies_the_image_by_digest(served: Served, tmp_path: Path) -> None:
    skopeo = skopeo_path()
    ref = f"docker://{served.hostport}/rbd-demo@{served.built.digest}"
    # dir: keeps the manifest as served: its digest is the one asked for
    doc = await copy_by_digest(served.hostport, "rbd-demo", served.built.digest, tmp_path / "copy")
    assert doc["config"]["digest"] == served.image.config_digest
    assert [x["digest"] for x in doc["layers"]] == [x.digest for x in served.image.layers]
    # skopeo's own view of the image: the same config digest, the same layers
    proc = await run_client([skopeo, "inspect", "--no-tags", "--tls-verify=false", ref])
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["Digest"] == served.built.digest
    assert info["Layers"] == [x.digest for x in served.image.layers]


async def test_skopeo_by_tag_is_a_miss(served: Served, tmp_path: Path) -> None:
    skopeo = skopeo_path()
    proc = await run_client(
        [
            skopeo,
            "copy",
            "-q",
            "--src-tls-verify=false",
            f"docker://{served.hostport}/rbd-demo:latest",
            f"dir:{tmp_path / 'x'}",
        ]
    )
    assert proc.returncode != 0 and "manifest unknown" in proc.stderr.lower()


# --------------------------------------------------------------------------
# containerd (Debian's package, its own root), through a hosts.toml
# --------------------------------------------------------------------------
@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[ContainerdProcess]:
    reason = ContainerdProcess.available()
    if reason:
        missing_dependency(reason)
    proc = ContainerdProcess(tmp_path / "containerd")
    try:
        proc.start()
    except ContainerdError as e:
        missing_dependency(f"containerd did not start: {e}")
    try:
        yield proc
    finally:
        proc.stop()


def image_digests(containerd: ContainerdProcess) -> dict[str, str]:
    """Image name -> the manifest digest containerd recorded for it."""
    out = containerd.ctr("images", "ls").stdout.splitlines()
    digests = {}
    for line in out[1:]:
        cols = line.split()
        if len(cols) >= 3:
            digests[cols[0]] = cols[2]
    return digests


async def test_containerd_pulls_through_the_mirror(
    served: Served, containerd: ContainerdProcess, tmp_path: Path
) -> None:
    """A pull of an image the node holds is served whole by the front door.

    The upstream named in hosts.toml does not exist (an .invalid name): had
    containerd gone to it for anything, the pull would have failed.
    """
    hosts = hosts_dir(
        tmp_path / "certs.d", "upstream.invalid", "https://upstream.invalid", served.url
    )
    ref = f"upstream.invalid/rbd-demo@{served.built.digest}"
    done = await asyncio.to_thread(
        containerd.ctr, "images", "pull", "--hosts-dir", str(hosts), "--snapshotter", "native", ref
    )
    assert done.returncode == 0
    assert image_digests(containerd)[ref] == served.built.digest
    # every blob is in containerd's content store under the source's digest
    content = containerd.ctr("content", "ls", "-q").stdout.split()
    for digest in [served.image.config_digest, *(x.digest for x in served.image.layers)]:
        assert digest in content
    hits = sample(served.metrics, "rbd_agent_mirror_requests_total", kind="blob", outcome="hit")
    assert hits >= 1 + len(served.image.layers)


async def test_containerd_falls_back_to_the_upstream_on_a_miss(
    served: Served,
    containerd: ContainerdProcess,
    registry: RegistryProcess,
    push_image: Callable[..., str],
    demo_image: Path,
    tmp_path: Path,
) -> None:
    """A tag (never resolved here yet) is a 404 at the front door; containerd goes upstream."""
    ref = push_image(demo_image, f"{registry.host}/rbd-demo:fallback")
    hosts = hosts_dir(tmp_path / "certs.d", registry.host, registry.url, served.url)
    done = await asyncio.to_thread(
        containerd.ctr, "images", "pull", "--hosts-dir", str(hosts), "--snapshotter", "native", ref
    )
    assert done.returncode == 0
    upstream = await run_client(
        ["skopeo", "inspect", "--no-tags", "--tls-verify=false", f"docker://{ref}"]
    )
    assert image_digests(containerd)[ref] == json.loads(upstream.stdout)["Digest"]
    misses = sample(
        served.metrics, "rbd_agent_mirror_requests_total", kind="manifest", outcome="miss"
    )
    assert misses >= 1


# --------------------------------------------------------------------------
# Docker: a pull from the front door by name, and through registry-mirrors
# --------------------------------------------------------------------------
def docker_cli(engine: PrivateDockerd, *args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("docker") is None:
        missing_dependency("docker CLI missing: apt-get install docker.io")
    return subprocess.run(
        ["docker", "-H", engine.url, *args], capture_output=True, text=True, timeout=180
    )


async def test_docker_pulls_from_the_front_door_by_digest(
    served: Served, dockerd: PrivateDockerd
) -> None:
    """``docker pull 127.0.0.1:PORT/repo@sha256:...``: the image ID is the source's config."""
    ref = f"{served.hostport}/rbd-demo@{served.built.digest}"
    done = await asyncio.to_thread(docker_cli, dockerd, "pull", ref)
    try:
        assert done.returncode == 0, done.stderr
        info = await asyncio.to_thread(docker_cli, dockerd, "image", "inspect", ref)
        assert info.returncode == 0, info.stderr
        image = json.loads(info.stdout)[0]
        assert image["Id"] == served.image.config_digest
        assert image["RootFS"]["Layers"] == [x.diff_id for x in served.image.layers]
    finally:
        await asyncio.to_thread(docker_cli, dockerd, "image", "rm", "-f", ref)


async def test_docker_hub_names_go_through_registry_mirrors(served: Served, tmp_path: Path) -> None:
    """A dockerd whose daemon.json is what ``mirror-config docker`` writes pulls a Docker Hub
    name from the front door; this host reaches no Hub, so nothing else could have served it."""
    try:
        PrivateDockerd.check_prerequisites()
    except DockerdError as e:
        missing_dependency(str(e))
    config = json.loads(docker_daemon_json(served.url))
    engine = PrivateDockerd(tmp_path / "dockerd", daemon_config=config)
    try:
        await asyncio.to_thread(engine.start)
    except DockerdError as e:
        missing_dependency(f"private dockerd did not start: {e}")
    try:
        ref = f"docker.io/library/rbd-demo@{served.built.digest}"
        done = await asyncio.to_thread(docker_cli, engine, "pull", ref)
        assert done.returncode == 0, done.stderr
        info = await asyncio.to_thread(docker_cli, engine, "image", "inspect", ref)
        assert json.loads(info.stdout)[0]["Id"] == served.image.config_digest
        hits = sample(
            served.metrics, "rbd_agent_mirror_requests_total", kind="manifest", outcome="hit"
        )
        assert hits >= 1
    finally:
        await asyncio.to_thread(engine.stop)


def test_the_catalog_remembers_what_it_recorded(served: Served) -> None:
    again = ImageCatalog(served.catalog.root)
    assert again.recorded == {served.image.ref: served.built.digest}
    assert again.manifest(served.built.digest) is not None
    again.refs_path.write_text("{not json")
    assert ImageCatalog(served.catalog.root).recorded == {}  # status only: never fatal
