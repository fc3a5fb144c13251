"""A node's front door serves the upstream registry's own manifest, and resolves tags only
through the coordinator (issue 17 items 3 and 5).

Real parts: a ``docker-registry`` as the upstream (the demo image pushed by
skopeo, and a manifest list of it PUT by hand), rbd-coordinator and rbd-agent
processes (LocalCluster; the coordinator's ``[upstreams]`` maps ``docker.io``
and ``upstream.invalid`` to that registry), a dockerd for the target's load,
skopeo, containerd's ``ctr`` and dockerd (by name, and a Docker Hub name
through ``registry-mirrors``) as clients. The origin ingests the image
from the registry and keeps its manifest bytes; ``rbd distribute`` moves the
image to n1; every pull from n1's front door -- by the upstream's digest, and
by tag -- gets the manifest whose digest ``skopeo inspect`` of the upstream
reports. containerd pulls a name whose upstream does not exist
(``upstream.invalid``): it succeeds only if the front door served everything.
A registry the coordinator does not map, and a coordinator that is gone, are
404s (the client's cue to go upstream itself), while content named by digest
is still served.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from clients import run, skopeo
from containerd_fixtures import ContainerdProcess, hosts_dir, start_or_missing
from rainbowd.agent.mirror.clientconfig import docker_daemon_json
from rainbowd.agent.origin.registry_names import DOCKER_LIST, DOCKER_MANIFEST, host_platform
from rainbowd.core import messages as m
from rainbowd.devcluster.dockerd import DockerdError, PrivateDockerd
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from registry_fixtures import RegistryProcess, skopeo_push
from testdeps import missing_dependency

# the tests share one event loop: the module's cluster was started in it
pytestmark = [
    pytest.mark.integration,
    pytest.mark.docker,
    pytest.mark.asyncio(loop_scope="module"),
]

CHUNK = 256 * 1024
MIRROR = {"mirror_listen": "127.0.0.1:0"}
REPO = "rbd/upstream"
#: a registry name nobody can reach: a pull of it succeeds only through the front door
NOWHERE = "upstream.invalid"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Upstream:
    """What the registry holds: the image's manifest and a manifest list naming it."""

    registry: RegistryProcess
    manifest: bytes  # as the registry serves it for tag v1
    index: bytes  # the manifest list under tag multi


@pytest.fixture(scope="module")
def upstream(registry: RegistryProcess, demo_image: Path) -> Upstream:
    skopeo_push(demo_image, f"{registry.host}/{REPO}:v1")
    manifest, media = registry.get_manifest(REPO, "v1", DOCKER_MANIFEST)
    assert media == DOCKER_MANIFEST
    other = _other_platform(registry, manifest)
    here = host_platform()
    platform = {"architecture": here.architecture, "os": here.os}
    if here.variant:
        platform["variant"] = here.variant
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_LIST,
            "manifests": [
                {
                    "mediaType": DOCKER_MANIFEST,
                    "digest": sha(manifest),
                    "size": len(manifest),
                    "platform": platform,
                },
                {  # another platform: nobody ingests it, so n1 does not hold it
                    "mediaType": DOCKER_MANIFEST,
                    "digest": sha(other),
                    "size": len(other),
                    "platform": {"architecture": "s390x", "os": "linux"},
                },
            ],
        },
        indent=2,
    ).encode()
    registry.put_manifest(REPO, "multi", index, DOCKER_LIST)
    return Upstream(registry, manifest, index)


def _other_platform(registry: RegistryProcess, manifest: bytes) -> bytes:
    """Push a copy of ``manifest`` whose config says s390x (same layers); return its bytes."""
    doc = json.loads(manifest)
    with urllib.request.urlopen(
        f"{registry.url}/v2/{REPO}/blobs/{doc['config']['digest']}", timeout=10
    ) as resp:
        config = json.loads(resp.read())
    config["architecture"] = "s390x"
    data = json.dumps(config).encode()
    doc["config"] = {**doc["config"], "digest": registry.push_blob(REPO, data), "size": len(data)}
    body = json.dumps(doc).encode()
    registry.put_manifest(REPO, "s390x", body, DOCKER_MANIFEST)
    return body


@contextlib.asynccontextmanager
async def started_cluster(
    root: Path, dockerd: PrivateDockerd, upstream: Upstream
) -> AsyncIterator[LocalCluster]:
    """The cluster of these tests: both tags ingested and distributed to n1 and n2."""
    host = upstream.registry.host
    specs = [
        NodeSpec("origin", roles=["origin"], speed_hint_mbps=1000, config=MIRROR),
        NodeSpec("n1", speed_hint_mbps=1000, docker_url=dockerd.url, config=MIRROR),
        # no engine at all: a front door only (sent a catalog-only load)
        NodeSpec("n2", speed_hint_mbps=1000, config=MIRROR),
    ]
    c = LocalCluster(
        root,
        specs,
        chunk_size=CHUNK,
        heartbeat_interval=1.0,
        coordinator_config={"upstreams": {"docker.io": host, NOWHERE: host}},
    )
    await c.start()
    try:
        async with c.admin() as admin:
            for ref, tag in (("app:v1", "v1"), ("app:multi", "multi")):
                source = m.RegistrySource(reference=f"{host}/{REPO}:{tag}", insecure=True)
                view = await admin.ingest(m.CreateImage(ref=ref, source=source), timeout=120)
                assert view.state == "ready", view.error
                job = await admin.distribute(
                    m.CreateJob(image=ref, targets=["n1", "n2"]), timeout=120
                )
                assert job.state == "done", job
        yield c
    finally:
        await c.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(
    tmp_path_factory: pytest.TempPathFactory, dockerd: PrivateDockerd, upstream: Upstream
) -> AsyncIterator[LocalCluster]:
    """One cluster for the tests that only pull from it (they add and change nothing in rbd)."""
    async with started_cluster(tmp_path_factory.mktemp("cluster"), dockerd, upstream) as c:
        yield c


@pytest_asyncio.fixture(loop_scope="module")
async def own_cluster(
    tmp_path: Path, dockerd: PrivateDockerd, upstream: Upstream
) -> AsyncIterator[LocalCluster]:
    """A cluster of the test's own: for a test that stops its coordinator."""
    async with started_cluster(tmp_path / "cluster", dockerd, upstream) as c:
        yield c


async def fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.request(method, url) as resp:
            return resp.status, dict(resp.headers), await resp.read()


async def test_pulls_from_the_front_door_get_the_upstreams_digest(
    cluster: LocalCluster, upstream: Upstream, tmp_path: Path
) -> None:
    tool = skopeo()
    n1 = await cluster.agent_status("n1")
    mirror = n1["mirror_url"].removeprefix("http://")
    want = sha(upstream.manifest)
    inspected = await run(
        [tool, "inspect", "--tls-verify=false", f"docker://{upstream.registry.host}/{REPO}:v1"]
    )
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["Digest"] == want
    # every node knows the image by the upstream's digest (status, rbd-agent mirror list)
    origin = await cluster.agent_status("origin")
    assert n1["mirror_images"]["app:v1"] == origin["mirror_images"]["app:v1"] == want
    assert n1["mirror_images"]["app:multi"] == sha(upstream.index)

    # by the upstream's digest, and by tag (resolved by the coordinator: docker.io -> upstream)
    for source in (f"{REPO}@{want}", f"{REPO}:v1"):
        out = tmp_path / source.replace("/", "_").replace(":", "_").replace("@", "_")
        done = await run(
            [
                tool,
                "copy",
                "-q",
                "--src-tls-verify=false",
                f"docker://{mirror}/{source}",
                f"dir:{out}",
            ]
        )
        assert done.returncode == 0, done.stderr
        assert (out / "manifest.json").read_bytes() == upstream.manifest
    through = await run(
        [tool, "inspect", "--no-tags", "--tls-verify=false", f"docker://{mirror}/{REPO}:v1"]
    )
    assert through.returncode == 0, through.stderr
    assert json.loads(through.stdout)["Digest"] == want

    # HEAD and GET by tag: the upstream's bytes, digest and media type
    for method in ("HEAD", "GET"):
        status, headers, body = await fetch(f"{n1['mirror_url']}/v2/{REPO}/manifests/v1", method)
        assert status == 200
        assert headers["Docker-Content-Digest"] == want
        assert headers["Content-Type"] == DOCKER_MANIFEST
        assert int(headers["Content-Length"]) == len(upstream.manifest)
        assert body == (upstream.manifest if method == "GET" else b"")
    # the manifest list by its tag: the list itself, as the upstream has it
    status, headers, body = await fetch(f"{n1['mirror_url']}/v2/{REPO}/manifests/multi")
    assert status == 200 and body == upstream.index
    assert headers["Docker-Content-Digest"] == sha(upstream.index)
    assert headers["Content-Type"] == DOCKER_LIST


async def test_a_node_with_no_engine_serves_the_image_too(
    cluster: LocalCluster, upstream: Upstream, tmp_path: Path
) -> None:
    """n2 has neither Docker nor containerd: the job sent it the record to catalog."""
    tool = skopeo()
    n2 = await cluster.agent_status("n2")
    assert n2["mirror_images"]["app:v1"] == sha(upstream.manifest)
    out = tmp_path / "from-n2"
    mirror = n2["mirror_url"].removeprefix("http://")
    done = await run(
        [tool, "copy", "-q", "--src-tls-verify=false", f"docker://{mirror}/{REPO}:v1", f"dir:{out}"]
    )
    assert done.returncode == 0, done.stderr
    assert (out / "manifest.json").read_bytes() == upstream.manifest


async def test_containerd_pulls_a_tag_through_the_front_door_alone(
    cluster: LocalCluster, upstream: Upstream, tmp_path: Path
) -> None:
    """``upstream.invalid`` cannot be reached: the pull works only if the mirror served it all."""
    n1 = await cluster.agent_status("n1")
    containerd: ContainerdProcess = start_or_missing(tmp_path / "containerd")
    try:
        hosts = hosts_dir(tmp_path / "certs.d", NOWHERE, f"https://{NOWHERE}", n1["mirror_url"])
        ref = f"{NOWHERE}/{REPO}:multi"
        done = await asyncio.to_thread(
            containerd.ctr,
            "images",
            "pull",
            "--hosts-dir",
            str(hosts),
            "--snapshotter",
            "native",
            ref,
        )
        assert done.returncode == 0
        listed = containerd.ctr("images", "ls").stdout.splitlines()[1:]
        digests = {cols[0]: cols[2] for cols in (line.split() for line in listed) if cols}
        assert digests[ref] == sha(upstream.index)  # the upstream's digest for the tag
        by_digest = f"{NOWHERE}/{REPO}@{sha(upstream.manifest)}"
        done = await asyncio.to_thread(
            containerd.ctr,
            "images",
            "pull",
            "--hosts-dir",
            str(hosts),
            "--snapshotter",
            "native",
            by_digest,
        )
        assert done.returncode == 0
    finally:
        containerd.stop()


async def test_no_upstream_or_no_coordinator_is_a_miss_and_digests_still_serve(
    own_cluster: LocalCluster, upstream: Upstream
) -> None:
    cluster = own_cluster
    n1 = await cluster.agent_status("n1")
    url = n1["mirror_url"]
    # a registry the coordinator maps to no upstream
    status, _, body = await fetch(f"{url}/v2/{REPO}/manifests/v1?ns=elsewhere.example:5000")
    assert status == 404
    assert json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    # a tag no image has
    status, _, _ = await fetch(f"{url}/v2/{REPO}/manifests/v2")
    assert status == 404
    # the coordinator gone: a tag is a miss (no hang: mirror_resolve_timeout bounds the
    # wait); what is named by its digest is still served, checked, from the node alone
    await asyncio.to_thread(cluster.kill, "coordinator", signal.SIGTERM)
    status, _, body = await fetch(f"{url}/v2/{REPO}/manifests/v1")
    assert status == 404
    assert json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    status, headers, body = await fetch(f"{url}/v2/{REPO}/manifests/{sha(upstream.manifest)}")
    assert status == 200 and body == upstream.manifest
    assert headers["Docker-Content-Digest"] == sha(upstream.manifest)


def docker_cli(engine: PrivateDockerd, *args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("docker") is None:
        missing_dependency("docker CLI missing: apt-get install docker.io")
    return subprocess.run(
        ["docker", "-H", engine.url, *args], capture_output=True, text=True, timeout=180
    )


async def test_docker_pulls_a_tag_by_name_and_through_registry_mirrors(
    cluster: LocalCluster, upstream: Upstream, dockerd: PrivateDockerd, tmp_path: Path
) -> None:
    """``docker pull localhost:PORT/repo:tag``, and a Docker Hub name via ``registry-mirrors``.

    Docker names no registry: the front door assumes docker.io, which the
    coordinator maps to the upstream. This host reaches no Docker Hub, so the
    mirrored pull was served by the front door alone. Docker records the
    manifest digest it pulled (RepoDigests): the upstream's.
    """
    n1 = await cluster.agent_status("n1")
    want = sha(upstream.manifest)
    direct = f"{n1['mirror_url'].removeprefix('http://')}/{REPO}:v1"
    done = await asyncio.to_thread(docker_cli, dockerd, "pull", direct)
    assert done.returncode == 0, done.stderr
    info = json.loads((await asyncio.to_thread(docker_cli, dockerd, "inspect", direct)).stdout)
    assert f"{direct.rsplit(':', 1)[0]}@{want}" in info[0]["RepoDigests"]
    await asyncio.to_thread(docker_cli, dockerd, "image", "rm", "-f", direct)

    config = json.loads(docker_daemon_json(n1["mirror_url"]))
    engine = PrivateDockerd(tmp_path / "dockerd", daemon_config=config)
    try:
        await asyncio.to_thread(engine.start)
    except DockerdError as e:
        missing_dependency(f"private dockerd did not start: {e}")
    try:
        hub = f"docker.io/{REPO}:v1"
        done = await asyncio.to_thread(docker_cli, engine, "pull", hub)
        assert done.returncode == 0, done.stderr
        info = json.loads((await asyncio.to_thread(docker_cli, engine, "inspect", hub)).stdout)
        assert info[0]["RepoDigests"] == [f"{REPO}@{want}"]
    finally:
        await asyncio.to_thread(engine.stop)
