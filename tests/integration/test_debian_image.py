"""A real Debian base image, built here with debootstrap, end to end.

debootstrap (minbase) makes a Debian root file system from the machine's own
apt mirror; rbd turns it into an image, skopeo pushes it into a real
``docker-registry``, the origin reads it from there, rbd distributes it, and
a container from it runs in a real dockerd.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from rainbowd.agent.docker.loader import DockerLoader
from rainbowd.core import messages as m
from rainbowd.devcluster.dockerd import PrivateDockerd
from rainbowd.devcluster.imagebuild import build_rootfs_image
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from registry_fixtures import RegistryProcess
from testdeps import missing_dependency

pytestmark = pytest.mark.integration

REF = "debian-min:test"


def _apt_mirror_and_suite() -> tuple[str, str]:
    """The Debian mirror and release this machine's apt uses (no host is hardcoded)."""
    suite = ""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            suite = line.split("=", 1)[1].strip('"')
    mirror = ""
    for src in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")):
        for line in src.read_text().splitlines():
            if line.startswith("URIs:"):
                uri = line.split(":", 1)[1].split()[0]
                if uri.rstrip("/").endswith("/debian"):
                    mirror = mirror or uri
    legacy = Path("/etc/apt/sources.list")
    if not mirror and legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[1].rstrip("/").endswith("/debian"):
                mirror = mirror or parts[1]
    return mirror, suite


@pytest.fixture(scope="module")
def debian_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("debootstrap") is None:
        missing_dependency("debootstrap is not installed (apt-get install debootstrap)")
    mirror, suite = _apt_mirror_and_suite()
    if not suite:
        missing_dependency("cannot tell the Debian release from /etc/os-release")
    tmp = tmp_path_factory.mktemp("debian")
    root = tmp / "root"
    cmd = ["debootstrap", "--variant=minbase", suite, str(root), *([mirror] if mirror else [])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        missing_dependency(f"{' '.join(cmd)} failed: {done.stdout[-800:]}{done.stderr[-800:]}")
    archive = build_rootfs_image(
        root, tmp / "debian.tar", ref=REF, cmd=["/bin/sh", "-c", "cat /etc/debian_version"]
    )
    shutil.rmtree(root, ignore_errors=True)
    return archive


@pytest.fixture
async def cluster(tmp_path: Path, dockerd: PrivateDockerd) -> AsyncIterator[LocalCluster]:
    specs = [
        NodeSpec("origin", roles=["origin"]),
        NodeSpec("n1"),
        NodeSpec("n2", docker_url=dockerd.url),
    ]
    async with LocalCluster(tmp_path / "c", specs) as c:
        yield c


async def test_debootstrapped_debian_distributes_and_runs(
    cluster: LocalCluster,
    registry: RegistryProcess,
    push_image: Callable[..., str],
    debian_archive: Path,
    dockerd: PrivateDockerd,
) -> None:
    reference = push_image(debian_archive, f"{registry.host}/base/debian:min")
    async with cluster.admin() as admin:
        source = m.RegistrySource(reference=reference, insecure=True)
        view = await admin.ingest(m.CreateImage(ref=REF, source=source), timeout=180)
        assert view.state == "ready", view.error
        assert view.uncompressed_size > 50 * 1024 * 1024  # a real Debian userland
        assert view.size < view.uncompressed_size  # gzip blobs from the registry, unchanged
        job = await admin.distribute(m.CreateJob(image=REF, targets=["all"]), timeout=240)
    assert job.state == "done", job.error
    loader = DockerLoader(dockerd.url)
    try:
        code, output = await loader.run(REF)
    finally:
        await loader.close()
    assert code == 0, output
    assert re.search(r"^\d+(\.\d+)?\s*$", output.strip()), output  # e.g. "12.10"
