"""The two baselines of the emulated-cluster lab, for real, on the ci profile.

The registry-only pull (docker-registry on the origin, skopeo on every node)
and the BitTorrent swarm (opentracker, mktorrent, aria2c) run one after the
other in one shaped LabEnv, as ``python -m bench.lab run`` runs them. Each must
get the image to every demander, verified, no faster than physics allows
(T*, with a little slack for tbf's 128 kb burst), and leave nothing running in
the lab; afterwards no namespace of the lab may be left.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from bench.lab.bittorrent_system import (
    BitTorrentSystem,
    bdecode,
    info_hash,
    layers_done,
    piece_length,
    scrape_counts,
)
from bench.lab.env import LabEnv
from bench.lab.registry_system import RegistrySystem
from bench.lab.result import SystemResult, layer_sizes
from rainbowd.imagebuild import BUSYBOX, build_demo_image
from rainbowd.netlab import NetLab, list_netns
from rainbowd.profile import load_profile
from testdeps import missing_dependency

PROFILE = Path(__file__).resolve().parents[2] / "bench" / "profiles" / "ci.toml"
#: per system, timed phase only; the ci profile needs ~4-10 s
TIMEOUT = 45.0
#: tbf lets a burst (128 kb) through at line rate, so a node may beat T* by a hair
TOLERANCE = 0.9
TOOLS = ("docker-registry", "skopeo", "opentracker", "mktorrent", "aria2c", "sha256sum")


def _lab_pids(env: LabEnv) -> dict[str, list[str]]:
    """Processes still inside any namespace of the lab (``ip netns pids``), by namespace."""
    out = {}
    for ns in [n.netns for n in env.lab.nodes.values()] + [env.lab.hub_netns]:
        r = subprocess.run(
            ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10, check=False
        )
        if r.stdout.split():
            out[ns] = r.stdout.split()
    return out


def _check(result: SystemResult, env: LabEnv, t_star: float) -> None:
    assert not result.failed, f"{result.system}: nodes failed: {result.failed}"
    assert set(result.node_seconds) == set(env.demanders), result.node_seconds
    assert all(t > 0 for t in result.node_seconds.values()), result.node_seconds
    assert result.total >= TOLERANCE * t_star, (
        f"{result.system}: all nodes done in {result.total:.2f} s, faster than "
        f"T* = {t_star:.2f} s allows: the links are not shaped as the profile says"
    )


@pytest.mark.integration
async def test_registry_and_bittorrent_on_the_ci_profile(tmp_path: Path) -> None:
    reason = NetLab.prerequisites_missing()
    if reason:
        missing_dependency(reason)
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        missing_dependency(
            f"{', '.join(missing)} not installed: "
            "apt-get install docker-registry skopeo opentracker mktorrent aria2"
        )
    if not BUSYBOX.is_file():
        missing_dependency(f"{BUSYBOX} missing: apt-get install busybox-static")

    profile = load_profile(PROFILE)
    image = build_demo_image(tmp_path / "rbd-demo.tar", payload_mib=profile.payload_mib)
    t_star = profile.bound(sum(size for _, size in layer_sizes(image))).t_star
    env = LabEnv(profile, tmp_path / "lab", image)
    prefix = env.lab.prefix
    began = time.monotonic()
    with env:
        registry = await RegistrySystem().run(env, timeout=TIMEOUT)
        assert _lab_pids(env) == {}, "the registry system left processes in the lab"
        bittorrent = await BitTorrentSystem().run(env, timeout=TIMEOUT)
        assert _lab_pids(env) == {}, "the BitTorrent system left processes in the lab"
    assert [ns for ns in list_netns() if ns.startswith(prefix + "-")] == []

    _check(registry, env, t_star)
    _check(bittorrent, env, t_star)
    assert "skopeo" in registry.notes and "aria2c" in bittorrent.notes
    # the swarm was one: every node (origin + demanders) announced itself from its own
    # address and ended up a seeder, and the demanders served part of the bytes
    swarm = bittorrent.notes["swarm"]
    n_peers = len(env.demanders) + 1
    assert set(swarm["tracker_seeders_per_layer"].values()) == {n_peers}, swarm
    assert set(swarm["uploaded_bytes"]) == {env.origin, *env.demanders}, swarm
    assert swarm["origin_uploaded_bytes"] < swarm["total_uploaded_bytes"], swarm
    assert time.monotonic() - began < 90, "the lab baselines got slow"


# -- the pure helpers of the BitTorrent system -----------------------------------
def test_piece_length_is_256k_for_small_layers_and_grows_for_big_ones() -> None:
    assert piece_length(10_000) == 256 * 1024
    assert piece_length(400 << 20) == 256 * 1024
    assert piece_length(1 << 30) == 512 * 1024  # 2048 pieces, not 4096
    assert piece_length(1 << 40) == 16 << 20  # capped


def test_info_hash_is_sha1_of_the_info_dict_as_written() -> None:
    info = b"d6:lengthi5e4:name3:abc12:piece lengthi32768e6:pieces20:" + b"x" * 20 + b"e"
    torrent = b"d8:announce9:http://t/4:info" + info + b"e"
    assert info_hash(torrent) == hashlib.sha1(info).digest()
    assert bdecode(torrent)[0][b"info"][b"name"] == b"abc"


def test_scrape_counts() -> None:
    ih = b"\x01" * 20
    body = b"d5:filesd20:" + ih + b"d8:completei3e10:downloadedi0e10:incompletei2eeee"
    assert scrape_counts(body, ih) == (3, 2)
    assert scrape_counts(body, b"\x02" * 20) == (0, 0)
    assert scrape_counts(b"garbage", ih) == (0, 0)


def test_layers_done_needs_every_layer_and_reports_a_bad_digest(tmp_path: Path) -> None:
    (tmp_path / "aa.ok").write_text("105.5\n")
    assert layers_done(tmp_path, ["aa", "bb"], 100.0) is None
    (tmp_path / "bb.ok").write_text("107.25\n")
    assert layers_done(tmp_path, ["aa", "bb"], 100.0) == pytest.approx(7.25)
    (tmp_path / "bb.bad").write_text("sha256 of the downloaded file is cc\n")
    assert "sha256:bb failed its digest check" in str(layers_done(tmp_path, ["aa", "bb"], 100.0))
