"""Bad image sources, through the operator's CLI against a live cluster.

Each must fail visibly (non-zero exit, a message naming the image and the
cause, the image marked failed, no job possible) and leave nothing half
written in any store.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from test_cli import run

from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from registry_fixtures import RegistryProcess

pytestmark = pytest.mark.integration

RBD = str(Path(sys.executable).parent / "rbd")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    specs = [NodeSpec("origin", roles=["origin"]), NodeSpec("n1")]
    async with LocalCluster(tmp_path / "c", specs) as c:
        yield c


def _store_is_clean(cluster: LocalCluster, node: str) -> None:
    store = cluster.agent_dir(node) / "store"
    for sub in ("tmp", "partial"):
        assert list((store / sub).iterdir()) == [], f"{node}: leftovers in {sub}/"
    assert list((store / "blobs" / "sha256").iterdir()) == [], f"{node}: layers were kept"


async def test_bad_sources_fail_visibly_and_leave_nothing(
    cluster: LocalCluster,
    registry: RegistryProcess,
    push_image: Callable[..., str],
    demo_image: Path,
    tmp_path: Path,
) -> None:
    env = {**os.environ, "RBD_COORDINATOR": cluster.url}
    env["RBD_ADMIN_TOKEN_FILE"] = str(cluster.admin_token_file)
    push_image(demo_image, f"{registry.host}/team/app:1")
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(demo_image.read_bytes()[: demo_image.stat().st_size // 2])

    cases = [
        # (ref, --from and options, words the error must contain)
        ("down:1", ["--from", "registry:127.0.0.1:9/team/app:1", "--insecure"], ["unreachable"]),
        ("notag:1", ["--from", f"registry:{registry.host}/team/app:nope", "--insecure"],
         ["nope", "not found"]),
        ("baddigest:1",
         ["--from", f"registry:{registry.host}/team/app@sha256:{'0' * 64}", "--insecure"],
         ["sha256:" + "0" * 12]),
        ("arm:1", ["--from", f"registry:{registry.host}/team/app:1", "--insecure",
                   "--platform", "linux/arm64"], ["arm64"]),
        ("trunc:1", ["--from", f"archive:{truncated}"], ["truncated"]),
    ]  # fmt: skip
    for ref, source, words in cases:
        code, _, err = await run(RBD, "images", "add", ref, *source, env=env)
        assert code == 1, (ref, err)
        assert ref in err, (ref, err)
        for word in words:
            assert word in err, (ref, word, err)
        code, out, _ = await run(RBD, "images", env=env)
        assert any(line.startswith(ref) and "failed" in line for line in out.splitlines()), out
        code, _, err = await run(RBD, "distribute", ref, "--to", "all", env=env)
        assert code == 1 and ref in err, err
    for node in cluster.nodes:
        _store_is_clean(cluster, node)
