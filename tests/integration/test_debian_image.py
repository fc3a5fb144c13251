"""A real Debian base image, built here with debootstrap, end to end.

debootstrap (minbase) makes a Debian root file system from the machine's own
apt mirror; rbd turns it into an image, skopeo pushes it into a real
``docker-registry``, the origin reads it from there, rbd distributes it, and
a container from it runs in a real dockerd.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from early_debootstrap import EARLY, Debootstrap
from rainbowd.agent.docker.loader import DockerLoader
from rainbowd.core import messages as m
from rainbowd.devcluster.dockerd import PrivateDockerd
from rainbowd.devcluster.imagebuild import build_rootfs_image
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from registry_fixtures import RegistryProcess
from testdeps import missing_dependency

pytestmark = pytest.mark.integration

REF = "debian-min:test"


@pytest.fixture(scope="module")
def debian_archive(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The session's debootstrap (tests/support/early_debootstrap.py) as an image."""
    run = request.config.stash.get(EARLY, None) or Debootstrap()
    failed = run.wait()
    if failed:
        run.remove()  # only a tree that was never made: a failed run's stays, to look at
        missing_dependency(failed)
    tmp = tmp_path_factory.mktemp("debian")
    archive = build_rootfs_image(
        run.root, tmp / "debian.tar", ref=REF, cmd=["/bin/sh", "-c", "cat /etc/debian_version"]
    )
    run.remove()
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
