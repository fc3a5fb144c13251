"""The rollout through rbd's front doors, in the namespace lab (bench/lab/rollout_system.py).

The `ci` profile (6 nodes): every node's skopeo asks its own agent's front door
for a tag rbd has never seen, at once. The image is added on demand, the
upstream registry sends one copy (to the origin), one pull job feeds the six,
and every client gets the image; the registry-only baseline beside it (gzipped
layers, the same upstream bytes) sends a copy per node.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench.lab.__main__ import make_system, resolve_profile, run_lab
from rainbowd.devcluster.imagebuild import BUSYBOX
from rainbowd.devcluster.netlab import NetLab
from testdeps import missing_dependency

pytestmark = pytest.mark.integration


async def test_a_rollout_reads_the_upstream_once_and_every_node_gets_the_image(
    tmp_path: Path,
) -> None:
    reason = NetLab.prerequisites_missing()
    if reason:
        missing_dependency(reason)
    for tool, pkg in (("skopeo", "skopeo"), ("docker-registry", "docker-registry")):
        if shutil.which(tool) is None:
            missing_dependency(f"{tool} not found: apt-get install {pkg}")
    if not BUSYBOX.is_file():
        missing_dependency(f"{BUSYBOX} missing: apt-get install busybox-static")
    profile = resolve_profile("ci")
    systems = [make_system("rbd-pull"), make_system("registry:gzip")]
    report = await run_lab(profile, systems, tmp_path / "work", timeout=120, say=False)
    pull, registry = report.results
    for r in report.results:
        assert r.complete, f"{r.system}: {r.failed} {r.notes.get('setup_error', '')}"
        assert set(r.node_seconds) == {n.name for n in profile.nodes}
    notes = pull.notes
    assert notes["images_added"] == ["docker.io/rbd-demo:latest"]  # on demand, once
    [job] = notes["pull_jobs"]
    assert (job["nodes"], job["state"]) == (len(profile.nodes), "done")
    # the upstream sent one copy of each blob, to the origin, for all six nodes
    assert notes["upstream_copies"] == pytest.approx(1.0, abs=0.02)
    # pulling straight from it, every node takes its own copy
    assert registry.origin_bytes is not None and pull.origin_bytes is not None
    assert registry.origin_bytes > 0.9 * len(profile.nodes) * notes["upstream_blob_bytes"]
