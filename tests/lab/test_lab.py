"""The lab on the ``ci`` profile: every system side by side, the bound, and clean teardown.

Real parts throughout: network namespaces shaped with tbf (upload) and
ifb + tbf (download), the real rbd-coordinator and rbd-agent processes, the
real docker-registry with skopeo clients, and a real BitTorrent swarm
(opentracker, mktorrent, aria2c). The CI run is the ``ci`` profile (6 nodes,
a 4 MB image); the ``paper`` profile is the same code with more nodes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.lab.__main__ import make_system, resolve_profile, run_lab
from rainbowd.devcluster.imagebuild import BUSYBOX
from rainbowd.devcluster.netlab import NetLab, list_netns
from testdeps import missing_dependency
from waiting import wait_until_sync

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SYSTEMS = ["rbd", "registry", "bittorrent"]
TOOLS = {
    "docker-registry": "docker-registry",
    "skopeo": "skopeo",
    "opentracker": "opentracker",
    "mktorrent": "mktorrent",
    "aria2c": "aria2",
}


@pytest.fixture(autouse=True)
def _needs_lab() -> None:
    reason = NetLab.prerequisites_missing()
    if reason:
        missing_dependency(reason)
    if not BUSYBOX.is_file():
        missing_dependency(f"{BUSYBOX} missing: apt-get install busybox-static")


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line mentions ``text`` (our work dir): what a run left running."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _lab_namespaces(pid: int) -> list[str]:
    return [ns for ns in list_netns() if ns.startswith(f"rbd{pid}-")]


async def test_ci_profile_runs_every_system_against_the_bound(tmp_path: Path) -> None:
    import shutil

    for tool, pkg in TOOLS.items():
        if shutil.which(tool) is None:
            missing_dependency(f"{tool} not found: apt-get install {pkg}")
    profile = resolve_profile("ci")
    systems = [make_system(s) for s in SYSTEMS]
    report = await run_lab(profile, systems, tmp_path / "work", timeout=120, say=False)

    t_star = report.bound.t_star
    assert t_star > 0
    for r in report.results:
        assert r.complete, f"{r.system}: {r.failed} {r.notes}"
        assert set(r.node_seconds) == {n.name for n in profile.nodes}
        # nobody beats physics (tbf's 128 kB burst lets a node start a hair early)
        assert r.total >= 0.9 * t_star, (r.system, r.total, t_star)
        assert all(s > 0 for s in r.node_seconds.values())

    # the origin's egress, the same kernel counter for every system (bench/lab/egress.py):
    # every layer at least once, at most a copy per node plus framing and control traffic
    for r in report.results:
        assert r.origin_bytes is not None, r.system
        most = 1.2 * len(profile.nodes) * report.image_bytes + 1_000_000
        assert report.image_bytes <= r.origin_bytes <= most, (r.system, r.origin_bytes)

    registry, bittorrent = report.results[1:]
    assert "skopeo" in registry.notes and "aria2c" in bittorrent.notes
    # the swarm was one: every node (origin + demanders) announced itself from its own
    # address and ended up a seeder, and the demanders served part of the bytes
    swarm = bittorrent.notes["swarm"]
    assert set(swarm["tracker_seeders_per_layer"].values()) == {len(profile.nodes) + 1}, swarm
    assert set(swarm["uploaded_bytes"]) == {"origin", *(n.name for n in profile.nodes)}, swarm
    assert swarm["origin_uploaded_bytes"] < swarm["total_uploaded_bytes"], swarm
    # aria2's own count of what the origin uploaded has no framing, so the interface counter
    # is larger, but aria2 counts a piece when it queues it: one still in the socket buffer
    # when the counter is read is in aria2's count only (loaded host: 16,130,486 counted on
    # the interface against 16,340,992 by aria2, 1.3 % less). The two agree within 5 %.
    assert bittorrent.origin_bytes is not None
    assert bittorrent.origin_bytes >= 0.95 * swarm["origin_uploaded_bytes"]
    # rbd: every node became a seeder too, so not every transfer came from the origin
    rbd = report.results[0]
    assert rbd.notes["transfers_from_origin"] < rbd.notes["transfers"]
    # the per-transfer timeline a slow tail is read from: assigned, then done, before
    # its node finished
    timeline = rbd.notes["timeline"]
    assert len(timeline) == rbd.notes["transfers"] >= len(profile.nodes)
    for t in timeline:
        assert 0 <= t["assigned"] <= t["done"] <= rbd.node_seconds[t["demander"]] + 1e-3, t
        assert t["bytes"] > 0 and t["rule"], t

    js, png = report.write(tmp_path / "out")
    doc = json.loads(js.read_text())
    assert doc["profile"] == "ci" and doc["t_star"] == pytest.approx(t_star)
    assert set(doc["systems"]) == set(SYSTEMS)
    for s in doc["systems"].values():
        assert s["ratio"] == pytest.approx(s["total"] / t_star)
        # each node over its own bound max(S/d_i, S/u_origin) (tbf's burst: a hair under 1)
        assert 0.9 <= s["slowdown_median"] <= s["slowdown_p90"], s
        assert s["origin_copies"] == pytest.approx(s["origin_bytes"] / doc["image_bytes"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = report.table()
    assert "T* =" in table and all(s in table for s in SYSTEMS)
    assert "slow p90" in table and "origin/S" in table
    assert not _lab_namespaces(os.getpid())
    assert not _processes_mentioning(str(tmp_path / "work"))


def _start_run(workdir: Path) -> subprocess.Popen[str]:
    """A lab run of ``ci``, returned once its rbd processes are up, Ctrl-C as at a terminal.

    The run starts with SIGINT at its default: a process started in the background
    by a shell without job control (as CI may run the suite) inherits SIGINT
    ignored, Python then installs no KeyboardInterrupt handler, and the SIGINT
    the test sends would be lost (fresh-clone CI, session 14: the run went on to
    its end and exited 0, not 130).
    """
    p = subprocess.Popen(
        [sys.executable, "-m", "bench.lab", "run", "--profile", "ci", "--systems", "rbd",
         "--workdir", str(workdir), "--out", str(workdir / "out"), "--timeout", "120"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_default_sigint,
    )  # fmt: skip
    assert p.stdout is not None
    deadline = time.monotonic() + 60
    seen = []
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        seen.append(line)
        if "running rbd" in line:
            # the agents are starting: the lab is up and has processes in it
            wait_until_sync(
                lambda: set(_processes_mentioning(str(workdir))) - {p.pid},
                timeout=30,
                what="the lab's rbd processes to start",
            )
            return p
        if not line and p.poll() is not None:
            break
    p.kill()
    pytest.fail("lab run did not get to rbd:\n" + "".join(seen))


def _default_sigint() -> None:
    """In the child, before exec: SIGINT back to its default (see :func:`_start_run`)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_tears_the_lab_down(tmp_path: Path) -> None:
    p = _start_run(tmp_path)
    assert _lab_namespaces(p.pid), "the lab should be up while rbd runs"
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 130, out
    assert "torn down" in out
    assert not _lab_namespaces(p.pid)
    assert not _processes_mentioning(str(tmp_path))


def test_a_killed_run_is_removed_by_clean(tmp_path: Path) -> None:
    p = _start_run(tmp_path)
    p.kill()  # SIGKILL: no teardown at all
    p.wait(timeout=10)
    assert _lab_namespaces(p.pid), "a killed run leaves its namespaces"
    r = subprocess.run(
        [sys.executable, "-m", "bench.lab", "clean"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "removed" in r.stdout
    assert not _lab_namespaces(p.pid)
    # its processes died with it (PR_SET_PDEATHSIG) or were killed by clean
    wait_until_sync(
        lambda: not _processes_mentioning(str(tmp_path)),
        timeout=10,
        what="the killed run's processes to be gone",
    )


def test_central_processes_run_at_a_higher_cpu_priority_than_nodes(tmp_path: Path) -> None:
    """The lab's nodes share this machine's cores; a system's central process (rbd's
    coordinator, the tracker, the registry) would have a host of its own, so it runs
    niced up and 100 busy nodes cannot starve it; and a node's processes get CPU weight
    in proportion to its link rate, the slowest node's at nice 0 (bench/lab/env.py)."""
    from bench.lab.env import CENTRAL_NICE, LabEnv

    profile = resolve_profile("ci")  # fast: 64 Mbit/s each way, slow: 8 .. 32
    rate = {n.name: n.up_mbit for n in profile.nodes}
    slowest = min(rate, key=rate.__getitem__)
    fast = max(rate, key=rate.__getitem__)
    with LabEnv(profile, tmp_path, tmp_path / "unused.tar") as env:
        sleep = ["sleep", "30"]
        central = env.spawn(env.hub, "central", sleep, central=True)
        slow_node = env.spawn(slowest, "slow", sleep)
        fast_node = env.spawn(fast, "fast", sleep)

        def nice(pid: int) -> int:
            # ip netns exec, then nice, exec the program in this pid: wait for it
            wait_until_sync(
                lambda: Path(f"/proc/{pid}/comm").read_text().strip() == "sleep",
                timeout=10,
                what=f"{pid} to exec sleep",
            )
            stat = Path(f"/proc/{pid}/stat").read_text()
            return int(stat.rsplit(")", 1)[1].split()[16])  # field 19: nice

        assert nice(central.pid) == CENTRAL_NICE < 0
        assert nice(slow_node.pid) == 0
        # 8x the rate: CFS weight ~1.25x per step, so 9 steps, kept above the central one
        assert CENTRAL_NICE < nice(fast_node.pid) == -9


def test_node_niceness_follows_the_link_rate() -> None:
    from bench.lab.env import CENTRAL_NICE, NICE_STEP, node_nice

    assert node_nice(8, 8) == 0
    assert node_nice(8 * NICE_STEP**3, 8) == -3
    assert node_nice(16, 8) == -3  # twice the rate: ~3 steps (1.25^3 = 1.95)
    assert node_nice(1_000, 8) == CENTRAL_NICE + 1  # never above the central process
