"""Issue 13's measures (bench/measures.py) and where they are reported.

x T*, each node's slowdown over max(S/d_i, S/u_origin) as median and p90,
the origin's bytes: computed the same way for the simulator (bench/sim/report.py,
the per-seeder byte count of bench/sim/engine.py) and the lab
(bench/lab/result.py, the origin's interface counter of bench/lab/egress.py).
The lab image of a layers-only profile (bench/lab/image.py) has those sizes.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.lab.egress import parse_tx_bytes
from bench.lab.image import build_lab_image
from bench.lab.result import LabReport, SystemResult, layer_sizes
from bench.measures import measure, quantile, slowdowns
from bench.sim import IDEAL, Simulation
from bench.sim.report import to_json
from rainbowd.devcluster.profile import parse_profile

MBIT = 1e6 / 8


def test_quantiles_interpolate_between_ranks_and_respect_infinity() -> None:
    xs = [float(x) for x in range(1, 11)]  # 1..10
    assert quantile(xs, 0.5) == 5.5
    assert quantile(xs, 0.9) == pytest.approx(9.1)
    assert quantile([3.0], 0.9) == 3.0
    assert quantile([1.0, 2.0, math.inf], 0.5) == 2.0
    assert quantile([1.0, 2.0, math.inf], 0.9) == math.inf  # never a flattering number
    with pytest.raises(ValueError, match="no values"):
        quantile([], 0.5)
    with pytest.raises(ValueError, match=r"0 \.\. 1"):
        quantile([1.0], 1.5)


def test_slowdown_is_time_over_the_nodes_own_bound() -> None:
    p = parse_profile(
        {
            "name": "m",
            "origin": {"up_mbit": 16, "down_mbit": 16},
            "groups": [
                {"name": "fast", "count": 1, "up_mbit": 32, "down_mbit": 32},
                {"name": "slow", "count": 1, "up_mbit": 4, "down_mbit": 4},
            ],
        }
    )
    s = 4_000_000  # 2 s from the origin at 16 Mbit/s; 8 s into the slow node
    sd = slowdowns(p, s, {"fast-001": 4.0, "slow-001": 8.0})
    assert sd == {"fast-001": pytest.approx(2.0), "slow-001": pytest.approx(1.0)}
    m = measure(p, s, {"fast-001": 4.0, "slow-001": 8.0}, complete=True, origin_bytes=2 * s)
    assert m.ratio == pytest.approx(1.0) and m.completion == 8.0
    assert m.slowdown_median == pytest.approx(1.5) and m.slowdown_p90 == pytest.approx(1.9)
    assert m.origin_copies == 2.0
    assert m.goals() == {"ratio": True, "median": True, "p90": True}
    lost = measure(p, s, {"fast-001": 4.0}, complete=False, origin_bytes=None)
    assert lost.ratio is None and lost.slowdown_p90 is None and lost.origin_copies is None
    assert lost.slowdown_median is None  # half the nodes infinitely slow: no finite median
    assert lost.goals() == {"ratio": False, "median": False, "p90": False}


def test_the_simulator_counts_bytes_per_seeder_and_reports_the_measures() -> None:
    # origin -> a (paper policy: one upload each), then a and the origin feed b, c
    p = parse_profile(
        {
            "name": "m",
            "origin": {"up_mbit": 8, "down_mbit": 8},
            "groups": [{"name": "n", "count": 3, "up_mbit": 8, "down_mbit": 8}],
        }
    )
    layers = [("l1", 1_000_000), ("l2", 500_000)]
    r = Simulation(p, layers, IDEAL, policy="paper").run()
    assert sum(r.sent_bytes.values()) == 3 * 1_500_000  # every copy came from someone
    assert r.sent_bytes["origin"] >= 1_500_000
    doc = to_json(p, layers, r, IDEAL)
    (sim,) = doc["systems"].values()
    assert sim["origin_bytes"] == r.sent_bytes["origin"]
    assert sim["origin_copies"] == pytest.approx(r.sent_bytes["origin"] / 1_500_000)
    assert sim["seeder_bytes"] == dict(sorted(r.sent_bytes.items()))
    bound = 1_500_000 / (8 * MBIT)  # every node's own bound: 8 Mbit/s down, origin 8 up
    times = sorted(t / bound for t in r.node_seconds.values())
    assert sim["slowdown_median"] == pytest.approx(times[1])
    assert sim["slowdown_p90"] == pytest.approx(times[1] + (times[2] - times[1]) * 0.8)


def test_the_lab_report_has_the_same_measures(tmp_path: Path) -> None:
    p = parse_profile(
        {
            "name": "m",
            "origin": {"up_mbit": 8, "down_mbit": 8},
            "groups": [{"name": "n", "count": 2, "up_mbit": 8, "down_mbit": 8}],
        }
    )
    s = 1_000_000  # 1 s per node
    rep = LabReport(p, s, [("sha256:" + "a" * 64, s)])
    rep.results.append(SystemResult("rbd", {"n-001": 2.0, "n-002": 3.0}, origin_bytes=1_100_000))
    rep.results.append(SystemResult("bittorrent", {"n-001": 1.5}, {"n-002": "timeout"}))
    doc = rep.to_json()
    rbd, bt = doc["systems"]["rbd"], doc["systems"]["bittorrent"]
    assert rbd["slowdown_median"] == pytest.approx(2.5)
    assert rbd["slowdown_p90"] == pytest.approx(2.9)
    assert rbd["origin_bytes"] == 1_100_000 and rbd["origin_copies"] == pytest.approx(1.1)
    assert bt["slowdown_p90"] is None and bt["origin_bytes"] is None
    table = rep.table()
    assert "slow med" in table and "slow p90" in table and "origin/S" in table
    rbd_line = next(line for line in table.splitlines() if line.startswith("rbd"))
    assert "2.50" in rbd_line and "2.90" in rbd_line and "1.10" in rbd_line
    json.dumps(doc)  # JSON-clean


def test_origin_egress_is_read_from_ips_counters() -> None:
    out = json.dumps([{"ifname": "eth0", "stats64": {"rx": {"bytes": 5}, "tx": {"bytes": 123456}}}])
    assert parse_tx_bytes(out) == 123456
    for bad in ("", "[]", '[{"ifname": "eth0"}]', '[{"ifname": "eth0", "stats64": '
                '{"tx": {"bytes": -1}}}]', json.dumps([{"ifname": "lo"}])):  # fmt: skip
        with pytest.raises(ValueError, match="eth0"):
            parse_tx_bytes(bad)


def test_a_layers_only_profile_gets_a_lab_image_of_those_sizes(tmp_path: Path) -> None:
    p = parse_profile(
        {
            "name": "m",
            "image": {"layers": [300_000, 2_000_000, 5_000]},
            "origin": {"up_mbit": 8, "down_mbit": 8},
            "groups": [{"name": "n", "count": 1, "up_mbit": 8, "down_mbit": 8}],
        }
    )
    sizes = [s for _, s in layer_sizes(build_lab_image(p, tmp_path / "i.tar"))]
    assert len(sizes) == 3
    for got, want in zip(sizes, p.layers, strict=True):
        assert want <= got < want + 10240  # tar pads to 10 KiB records
    again = layer_sizes(build_lab_image(p, tmp_path / "j.tar"))
    assert again == layer_sizes(tmp_path / "i.tar")  # deterministic digests
    assert len({d for d, _ in again}) == 3  # distinct layers
