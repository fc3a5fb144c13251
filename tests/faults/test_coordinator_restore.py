"""The coordinator's disk is lost; its SQLite backup brings the cluster back (issue 16, item 7).

Real processes (LocalCluster): an origin and two nodes enroll and an image is
ingested; ``rbd-coordinator backup`` copies the state while the coordinator
runs. Then the coordinator stops and its state directory is gone. The backup
is restored into a fresh state directory with ``rbd-coordinator restore``
and the coordinator started on it: every agent comes back up with the
credential it already has -- nobody enrolls again, no credential file
changes -- and the restored cluster distributes the image it knew.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from faultkit import add_image, log_events

from rainbowd.core import messages as m
from rainbowd.devcluster.imagebuild import BUSYBOX, build_demo_image
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from testdeps import missing_dependency

pytestmark = pytest.mark.integration

REF = "rbd-restore:latest"
NODES = ["n1", "n2"]
CLI = (sys.executable, "-m", "rainbowd.coordinator.cli")
#: seconds the agents have to find the restored coordinator (their backoff is capped at 10)
RECONNECT_TIMEOUT_S = 30.0


def coordinator_cli(*args: str) -> str:
    """Run ``rbd-coordinator ARGS`` to its end; its output (it must exit 0)."""
    run = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


async def test_a_restored_backup_brings_every_node_back_with_its_own_credential(
    tmp_path: Path,
) -> None:
    if not BUSYBOX.is_file():
        missing_dependency(f"{BUSYBOX} missing: apt-get install busybox-static")
    image = build_demo_image(tmp_path / "img.tar", payload_mib=1)
    specs = [NodeSpec("origin", roles=["origin"]), *(NodeSpec(n) for n in NODES)]
    all_nodes = ["origin", *NODES]
    async with LocalCluster(tmp_path / "cluster", specs, heartbeat_interval=0.5) as cluster:
        await add_image(cluster, image, REF)
        credentials = {
            n: cluster.agent_dir(n).joinpath("credential").read_text() for n in all_nodes
        }
        backup = tmp_path / "backups" / "coordinator.sqlite"
        backup.parent.mkdir()
        state = cluster.coordinator_dir
        # online: the coordinator runs, the agents heartbeat into it meanwhile
        assert "backed up" in coordinator_cli("backup", str(backup), "--state-dir", str(state))
        assert cluster.running("coordinator")

        cluster.kill("coordinator", signal.SIGTERM)
        shutil.rmtree(state)  # the disk is lost: database, tokens, everything
        coordinator_cli("restore", str(backup), "--state-dir", str(state))
        enrolled_before = len(log_events(cluster, "coordinator", "node enrolled"))
        await cluster.start_coordinator()  # same address; LocalCluster writes its tokens again

        await cluster.wait_nodes_up(all_nodes, timeout=RECONNECT_TIMEOUT_S)
        async with cluster.admin() as admin:
            assert [i.ref for i in (await admin.images()).images] == [REF]
            job = await admin.create_job(m.CreateJob(image=REF, targets=NODES))
            final = await admin.wait_job(job.job_id, timeout=60)
        assert final.state == "done", final.error
        assert all(cluster.running(n) for n in all_nodes)  # a refused agent exits (code 3)

    # nobody enrolled again: the restored trust list knew every node and its credential
    assert len(log_events(cluster, "coordinator", "node enrolled")) == enrolled_before
    for n in all_nodes:
        assert cluster.agent_dir(n).joinpath("credential").read_text() == credentials[n], n
