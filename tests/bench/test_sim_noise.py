"""bench/sim/noise.py: each shape run several times under a change that means nothing.

The first run of a shape is the suite's own (``efficiency`` unchanged), so its
numbers are the suite's; the others differ only by ``efficiency`` x (1 + k x 1e-12).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.sim.noise import main, offsets, spread
from bench.sim.suite import run_suite, suite_profiles
from rainbowd.core.sched.scheduler import DEFAULT_POLICY


def test_offsets_start_unperturbed_and_alternate_sides() -> None:
    assert offsets(1) == [0]
    assert offsets(3) == [0, 1, -1]
    assert offsets(6) == [0, 1, -1, 2, -2, 3]
    assert spread([3.0, 1.0, 2.0]) == (1.0, 2.0, 3.0)


def test_the_first_run_of_each_shape_is_the_suites_own(tmp_path: Path) -> None:
    out = tmp_path / "noise.json"
    args = ["--only", "ci,paper", "--nodes", "12", "--random", "0", "--runs", "3"]
    assert main([*args, "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["offsets"] == [0, 1, -1]
    profiles = [p for p in suite_profiles(0) if p.name in {"ci", "paper"}]
    for run in run_suite(profiles, [12], DEFAULT_POLICY):
        got = doc["shapes"][run.key]
        assert [len(v) for v in got.values()] == [3, 3, 3]
        assert got["ratio"][0] == run.measures.ratio
        assert got["slowdown_p90"][0] == run.measures.slowdown_p90
        low, mid, high = spread(got["ratio"])
        assert low <= mid <= high and mid == statistics.median(got["ratio"])


@pytest.mark.parametrize(
    "bad", [["--runs", "0"], ["--nodes", "0"], ["--policy", "nope"], ["--only", "nope"]]
)
def test_bad_arguments_exit_2(bad: list[str], tmp_path: Path) -> None:
    assert main([*bad, "--out", str(tmp_path / "x.json")]) == 2
