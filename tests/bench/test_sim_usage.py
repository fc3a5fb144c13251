"""bench/sim/usage.py: where a traced run's upload went, bucket by bucket.

The buckets must account for every byte the trace moved, never show more upload
moved than the cluster's line rate, and count every demander done by the end.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.sim.engine import SimResult, Simulation
from bench.sim.suite import profile_layers, suite_profiles
from bench.sim.usage import faster_half, main, upload_use
from rainbowd.devcluster.profile import ClusterProfile


def _traced(name: str, nodes: int) -> tuple[ClusterProfile, int, SimResult]:
    (profile,) = [p for p in suite_profiles(0) if p.name == name]
    layers = profile_layers(profile)
    scaled = profile.scaled(nodes)
    result = Simulation(scaled, layers, policy="swarm", trace=True).run()
    return scaled, sum(s for _, s in layers), result


def test_the_buckets_account_for_every_byte_within_the_line_rate() -> None:
    profile, image_bytes, result = _traced("ci", 12)
    buckets = upload_use(profile, image_bytes, result, 0.5)
    traced = sum(t.size for t in result.trace if t.started >= 0 and t.ended > t.started)
    moved = sum(b.moved_Bps * b.seconds for b in buckets)
    assert moved == pytest.approx(traced, rel=1e-9)
    line = sum(n.up_Bps for n in profile.nodes) + profile.origin.up_Bps
    for b in buckets:
        assert 0.0 <= b.to_fast_Bps <= b.moved_Bps <= line * (1 + 1e-9)
        assert b.moved_Bps + b.idle_Bps >= line * (1 - 1e-9)  # idle: what was not sent
    dones = [(b.fast_done, b.rest_done) for b in buckets]
    assert dones == sorted(dones)  # never fewer done later
    fast = faster_half(profile, image_bytes)
    assert dones[-1] == (len(fast), len(profile.nodes) - len(fast))


def test_the_faster_half_is_the_nodes_with_the_least_own_bounds() -> None:
    profile, image_bytes, _ = _traced("ci", 12)
    bounds = profile.node_bounds(image_bytes)
    fast = faster_half(profile, image_bytes)
    assert len(fast) >= len(bounds) // 2
    assert max(bounds[n] for n in fast) <= min(bounds[n] for n in bounds if n not in fast)


def test_it_prints_a_row_per_bucket(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--profile", "ci", "--nodes", "6", "--bucket", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ci@6: 6 demanders")
    rows = [line for line in out.splitlines() if line[:8].strip().replace(".", "").isdigit()]
    assert rows and rows[0].split()[0] == "0.0"


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (["--profile", "nope"], "no shape 'nope'"),
        (["--profile", "ci", "--bucket", "0"], "--bucket must be > 0"),
        (["--profile", "ci", "--nodes", "5,6"], "one count"),
        (["--profile", "ci", "--policy", "nope"], "no policy 'nope'"),
    ],
)
def test_bad_arguments_exit_2_and_say_what(
    bad: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(bad) == 2
    assert says in capsys.readouterr().err
