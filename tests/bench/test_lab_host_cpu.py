"""Whether a lab run measured the emulated network or the host's CPUs (bench/lab/hostcpu.py).

Every emulated node shares the host's CPUs; a timed phase that kept them
saturated is marked in the report and the table, and ``--rate-scale`` runs the
same cluster slower (rainbowd.devcluster.profile.ClusterProfile.rates_scaled), in the lab
and in the simulator alike.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.lab.__main__ import parser as lab_parser
from bench.lab.hostcpu import (
    CPU_BOUND_BUSY,
    CpuTimes,
    busy_fraction,
    cpu_bound,
    parse_proc_stat,
    read_cpu_times,
)
from bench.lab.result import LabReport, SystemResult
from rainbowd.devcluster.profile import ProfileError, load_profile, parse_profile

PROFILES = Path(__file__).resolve().parents[2] / "bench" / "profiles"

STAT = """cpu  100 5 50 800 20 0 10 15 7 0
cpu0 50 2 25 400 10 0 5 8 0 0
intr 12345
"""


def test_busy_is_everything_but_idle_and_iowait_with_steal_counted_busy() -> None:
    t = parse_proc_stat(STAT)
    # user nice system idle iowait irq softirq steal; guest (7) is inside user already
    assert t == CpuTimes(busy=100 + 5 + 50 + 0 + 10 + 15, total=1000)


def test_busy_fraction_between_two_readings() -> None:
    a = CpuTimes(busy=100, total=1000)
    assert busy_fraction(a, CpuTimes(busy=190, total=1100)) == pytest.approx(0.9)
    assert busy_fraction(a, a) is None  # no tick passed: no claim either way
    assert cpu_bound(0.95) and cpu_bound(CPU_BOUND_BUSY)
    assert not cpu_bound(0.5) and not cpu_bound(None)


def test_a_proc_stat_without_the_cpu_line_is_an_error() -> None:
    with pytest.raises(ValueError, match="no aggregate 'cpu' line"):
        parse_proc_stat("cpu0 1 2 3 4 5\n")
    with pytest.raises(ValueError, match="too short"):
        parse_proc_stat("cpu 1 2 3\n")


def test_this_hosts_proc_stat_reads() -> None:
    a = read_cpu_times()
    assert 0 <= a.busy <= a.total


def test_a_cpu_bound_run_is_marked_in_the_report_and_the_table() -> None:
    p = parse_profile(
        {
            "name": "m",
            "origin": {"up_mbit": 8, "down_mbit": 8},
            "groups": [{"name": "n", "count": 2, "up_mbit": 8, "down_mbit": 8}],
        }
    )
    rep = LabReport(p, 1_000_000, [("sha256:" + "a" * 64, 1_000_000)])
    rep.results.append(SystemResult("rbd", {"n-001": 2.0, "n-002": 3.0}, host_cpu_busy=0.97))
    rep.results.append(SystemResult("bittorrent", {"n-001": 2.0, "n-002": 2.5}, host_cpu_busy=0.4))
    doc = rep.to_json()
    assert doc["systems"]["rbd"]["cpu_bound"] is True
    assert doc["systems"]["bittorrent"]["cpu_bound"] is False
    assert doc["systems"]["rbd"]["host_cpu_busy"] == pytest.approx(0.97)
    assert doc["rate_scale"] == 1.0
    json.dumps(doc)
    lines = rep.table().splitlines()
    rbd = next(x for x in lines if x.startswith("rbd"))
    bt = next(x for x in lines if x.startswith("bittorrent"))
    assert rbd.rstrip().endswith("97 % !") and bt.rstrip().endswith("40 %")
    warning = next(x for x in lines if x.startswith("!"))
    assert "rbd" in warning and "bittorrent" not in warning and "--rate-scale" in warning


def test_rates_scaled_slows_every_link_and_the_bound_by_the_same_factor() -> None:
    paper = load_profile(PROFILES / "paper.toml")
    slow = paper.rates_scaled(0.25)
    assert slow.name == "paper-x0.25" and slow.rate_scale == 0.25
    assert slow.origin.up_mbit == paper.origin.up_mbit / 4
    for a, b in zip(paper.nodes, slow.nodes, strict=True):
        assert (b.up_mbit, b.down_mbit) == (a.up_mbit / 4, a.down_mbit / 4)
    size = 10_000_000
    assert slow.bound(size).t_star == pytest.approx(4 * paper.bound(size).t_star)
    assert paper.rates_scaled(1.0) is paper
    # scaling the node count afterwards keeps the rates scaled, drawn profiles included
    assert slow.scaled(200).bound(size).t_star == pytest.approx(
        4 * paper.scaled(200).bound(size).t_star
    )
    drawn = load_profile(PROFILES / "random-pareto.toml")
    assert drawn.rates_scaled(0.5).scaled(50).nodes[0].up_mbit == pytest.approx(
        drawn.scaled(50).nodes[0].up_mbit / 2
    )


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_a_rate_scale_must_be_a_finite_positive_number(bad: float) -> None:
    with pytest.raises(ProfileError, match="rate scale must be a finite number > 0"):
        load_profile(PROFILES / "paper.toml").rates_scaled(bad)


def test_the_lab_takes_a_rate_scale_for_run_and_bound() -> None:
    args = lab_parser().parse_args(["run", "--profile", "paper", "--rate-scale", "0.25"])
    assert args.rate_scale == 0.25
    assert lab_parser().parse_args(["bound"]).rate_scale == 1.0
