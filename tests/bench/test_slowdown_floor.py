"""The slowdown floor: the least median / p90 slowdown any schedule could give a cluster."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bench.measures import quantile
from bench.sim.overheads import Overheads
from bench.sim.suite import run_suite, summary, table_row
from bench.slowdown_floor import completion_floor, slowdown_floor
from rainbowd.devcluster.profile import ClusterProfile, ProfileNode, load_profile

PROFILES = Path(__file__).resolve().parents[2] / "bench" / "profiles"
MBIT = 1e6 / 8


def cluster(origin_mbit: float, nodes: list[tuple[float, float]]) -> ClusterProfile:
    """An origin and demanders of (up, down) Mbit/s."""
    base = load_profile(PROFILES / "ci.toml")
    return dataclasses.replace(
        base,
        origin=ProfileNode("origin", "origin", origin_mbit, origin_mbit),
        nodes=tuple(
            ProfileNode(f"n{i}", "n", up, down) for i, (up, down) in enumerate(nodes, start=1)
        ),
        random=None,
    )


def test_where_the_upload_is_ample_every_node_can_meet_its_own_bound() -> None:
    p = cluster(100.0, [(100.0, 10.0)] * 10)
    assert slowdown_floor(p, 10_000_000, 0.5) == 1.0
    assert slowdown_floor(p, 10_000_000, 0.9) == 1.0


def test_three_nodes_fed_by_the_origin_alone() -> None:
    # uploads of almost nothing: the origin's 8 Mbit/s (1 MB/s) feeds everyone; each
    # node's own bound is the origin's 10 s for the 10 MB image. The p90 of three is
    # at least the second smallest slowdown: two images take the origin 20 s = 2 x 10 s
    p = cluster(8.0, [(1e-9, 100.0)] * 3)
    assert slowdown_floor(p, 10_000_000, 0.9) == pytest.approx(2.0)
    # the median of three is the second smallest too: the same floor
    assert slowdown_floor(p, 10_000_000, 0.5) == pytest.approx(2.0)
    # the smallest needs one image only: its own bound
    assert slowdown_floor(p, 10_000_000, 0.0) == pytest.approx(1.0)


def test_the_nodes_with_the_latest_bounds_are_the_ones_counted() -> None:
    # two fast downloaders (bound 1 s) and two slow ones (bound 10 s), 1 MB image, the
    # summed upload 1 MB/s. Half of four is the 2nd smallest (k = 2): the two slow nodes
    # can both be done by 2 s <= 10 s, so the median's floor is 1 even though the two
    # fast ones cannot be done within 2 x 1 s together with the others
    p = cluster(8.0 - 4e-9, [(1e-9, 8.0), (1e-9, 8.0), (1e-9, 0.8), (1e-9, 0.8)])
    assert slowdown_floor(p, 1_000_000, 0.5) == 1.0
    # all four (q = 1): the two fast ones need 2 MB by s x 1 s, so s >= 2
    assert slowdown_floor(p, 1_000_000, 1.0) == pytest.approx(2.0)


def test_a_bad_quantile_is_refused() -> None:
    p = cluster(8.0, [(1.0, 1.0)])
    with pytest.raises(ValueError, match=r"quantile q must be in 0 \.\. 1"):
        slowdown_floor(p, 1_000, 1.5)


def test_the_coordinator_is_a_second_server_every_node_waits_for() -> None:
    # ample upload (800 Mbit/s for a 1 MB image: 0.01 s a node); four nodes downloading at
    # 8 Mbit/s, each node's own bound 1 s. With 0.5 s of done reports a node, the i-th node
    # to end has waited for i x 0.5 s of the coordinator: all four (q = 1) need 2 s
    p = cluster(800.0, [(1e-9, 8.0)] * 4)
    assert slowdown_floor(p, 1_000_000, 1.0) == 1.0  # the upload alone: no floor
    assert slowdown_floor(p, 1_000_000, 1.0, reports_s=0.5) == pytest.approx(2.0)
    # the median of four is the 2nd smallest (k = 2): 2 x 0.5 s within 1 x 1 s
    assert slowdown_floor(p, 1_000_000, 0.5, reports_s=0.5) == pytest.approx(1.0)
    # where the upload's share a node is the larger, it binds, not their sum
    slow = cluster(8.0 - 4e-9, [(1e-9, 8.0)] * 4)  # 1 s of upload a node
    assert slowdown_floor(slow, 1_000_000, 1.0, reports_s=0.5) == pytest.approx(4.0)


def test_the_completion_floor_is_every_node_s_reports_over_t_star() -> None:
    p = cluster(800.0, [(1e-9, 8.0)] * 4)  # T* = 1 s: the slowest download
    assert p.bound(1_000_000).t_star == pytest.approx(1.0)
    assert completion_floor(p, 1_000_000, 0.0) == 1.0
    assert completion_floor(p, 1_000_000, 0.1) == 1.0  # 0.4 s of reports: T* binds
    assert completion_floor(p, 1_000_000, 0.5) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="reports_s must be >= 0"):
        completion_floor(p, 1_000_000, -0.1)
    with pytest.raises(ValueError, match="reports_s must be >= 0"):
        slowdown_floor(p, 1_000_000, 0.5, reports_s=-0.1)


def test_a_simulated_run_on_a_slow_coordinator_stays_above_its_floors() -> None:
    """With 0.2 s a report the coordinator, not the network, binds: the suite says so."""
    ci = load_profile(PROFILES / "ci.toml")
    (run,) = run_suite([ci], [12], overheads=Overheads(coordinator_s=0.2))
    m = run.measures
    assert m.ratio is not None and m.slowdown_median is not None and m.slowdown_p90 is not None
    # 12 nodes x 3 layers x 0.2 s = 7.2 s of reports against a T* of ~4.1 s
    assert run.floor_ratio == pytest.approx(12 * 3 * 0.2 / m.t_star)
    assert 1.25 < run.floor_ratio <= m.ratio
    assert run.floor_median <= m.slowdown_median
    assert run.floor_p90 <= m.slowdown_p90
    assert "ratio" in run.out_of_reach
    assert run.as_dict()["ratio_floor"] == run.floor_ratio
    assert run.as_dict()["out_of_reach"] == run.out_of_reach
    assert f"{run.floor_ratio:.2f}/" in table_row(run)
    assert "1 have a goal no schedule meets" in summary([run])


def test_no_simulated_run_goes_below_its_floor() -> None:
    """The simulator's quantiles stand at or above the floor the suite prints beside them."""
    profiles = [load_profile(PROFILES / f"{name}.toml") for name in ("upload-bound", "ci")]
    runs = run_suite(profiles, [12])
    for r in runs:
        m = r.measures
        assert m.slowdown_median is not None and m.slowdown_p90 is not None
        assert 1.0 <= r.floor_median <= m.slowdown_median, r.key
        assert 1.0 <= r.floor_p90 <= m.slowdown_p90, r.key
        row = r.as_dict()
        assert (row["slowdown_floor_median"], row["slowdown_floor_p90"]) == (
            r.floor_median,
            r.floor_p90,
        )
    # upload-bound's uploads are capped below its downloads: its p90 has a floor above 1
    upload_bound = next(r for r in runs if r.shape == "upload-bound")
    assert upload_bound.floor_p90 > 1.0


def test_quantile_and_floor_count_ranks_alike() -> None:
    """The floor's k is the rank the quantile cannot go below (linear between ranks)."""
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    for q in (0.0, 0.5, 0.9, 1.0):
        k = int((len(xs) - 1) * q) + 1
        assert quantile(xs, q) >= xs[k - 1]
