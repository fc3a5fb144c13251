"""The simulator's regression gate (issue 13, item 6) and the suite runner behind it.

The gate re-runs the whole suite of bench/profiles (plus the drawn shapes the
record names) at the record's sizes with the coordinator's default policy,
and fails if any shape's x T* or p90 slowdown is more than 10 % worse than
in bench/sim/gate.json, or a shape has no record. Simulated time and seeded
shapes make it deterministic: it cannot flake, and it runs in seconds.
Re-record after a deliberate change: ``python -m bench.sim suite --record``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import early_sim_gate

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.measures import Measures
from bench.sim.drawn import drawn_profile
from bench.sim.gate import GATE, GateError, check, make_record, read_record
from bench.sim.same import IGNORED
from bench.sim.suite import SuiteRun, main, run_suite, suite_profiles, table_row
from rainbowd.core.sched.pieces import REPORT_COST_S
from rainbowd.core.sched.scheduler import DEFAULT_POLICY
from rainbowd.devcluster.profile import load_profile

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "bench" / "profiles"


@pytest.fixture
def gate_runs(request: pytest.FixtureRequest) -> list[SuiteRun]:
    """Every suite shape at the record's sizes: computed by the process the session started
    (tests/support/early_sim_gate.py), as many at once as the machine has cores."""
    return early_sim_gate.runs_for(request.config)


def test_no_shape_is_worse_than_its_record(gate_runs: list[SuiteRun]) -> None:
    record = read_record(GATE)
    profiles = suite_profiles(record["random"], record["seeds_from"])
    runs = gate_runs
    assert len(runs) == len(profiles) * len(record["nodes"]) >= 16
    problems = check(runs, record)
    assert not problems, (
        f"the simulator's gate (policy {DEFAULT_POLICY} against the record of "
        f"{record['policy']}):\n" + "\n".join(problems)
    )


def test_runs_in_worker_processes_are_the_runs_one_after_the_other() -> None:
    profiles = [load_profile(PROFILES / f"{name}.toml") for name in ("ci", "straggler")]
    alone = run_suite(profiles, [8, 12])
    together = run_suite(profiles, [8, 12], workers=2)
    key = [(r.shape, r.nodes, r.measures) for r in alone]
    assert key == [(r.shape, r.nodes, r.measures) for r in together]
    assert [r.shape for r in together] == ["ci", "ci", "straggler", "straggler"]


def test_a_run_says_how_long_the_coordinator_was_busy_a_floor_under_its_time() -> None:
    """Busy seconds are the done reports times their charge: never more than the job took."""
    (ci,) = run_suite([load_profile(PROFILES / "ci.toml")], [12])
    m = ci.measures
    assert m.completion is not None and m.ratio is not None
    assert 0 < ci.coordinator_busy_s <= m.completion
    assert ci.coordinator_floor == pytest.approx(ci.coordinator_busy_s / m.t_star)
    assert ci.coordinator_floor <= m.ratio
    row = ci.as_dict()
    assert row["coordinator_busy_s"] == ci.coordinator_busy_s
    assert row["coordinator_floor"] == ci.coordinator_floor


def test_a_run_measures_the_schedulers_own_cpu_per_done_report() -> None:
    """Charged per report (1.1 ms), measured apart: the two side by side in every row."""
    (ci,) = run_suite([load_profile(PROFILES / "ci.toml")], [12])
    assert ci.reports >= 12 * 3  # a done report per demander and layer at least
    assert ci.coordinator_busy_s == pytest.approx(ci.reports * REPORT_COST_S)
    assert ci.scheduler_cpu_s > 0
    assert ci.scheduler_ms_per_report == pytest.approx(1000 * ci.scheduler_cpu_s / ci.reports)
    row = ci.as_dict()
    assert row["scheduler_ms_per_report"] == ci.scheduler_ms_per_report
    assert row["reports"] == ci.reports
    assert f"{ci.scheduler_ms_per_report:>5.2f}" in table_row(ci)
    # no report, no ratio (a made-up run)
    assert run("ci", 1.1, 2.0).scheduler_ms_per_report == 0.0


# -- check() on made-up runs -----------------------------------------------------------
def run(shape: str, ratio: float | None, p90: float | None, nodes: int = 100) -> SuiteRun:
    m = Measures(20.0, None if ratio is None else 20 * ratio, ratio, 1.5, p90, 10, 1.0)
    return SuiteRun(shape, nodes, "relay", 10, 1, "slowest download", m, 0, 0.1)


def record(**shapes: tuple[float, float]) -> dict[str, object]:
    runs = [run(s.replace("_", "-"), r, p) for s, (r, p) in shapes.items()]
    return make_record(runs, {"policy": "relay", "nodes": [100], "random": 0, "seeds_from": 1})


def test_check_fails_on_more_than_ten_percent_worse_and_passes_within() -> None:
    rec = record(paper=(1.0, 2.0), bimodal=(2.0, 3.0))
    assert check([run("paper", 1.09, 2.19), run("bimodal", 1.5, 1.0)], rec) == []
    (problem,) = check([run("paper", 1.11, 2.0), run("bimodal", 2.0, 3.0)], rec)
    assert "paper@100: ratio 1.110 is +11.0% against the recorded 1.000" in problem
    (problem,) = check([run("paper", 1.0, 2.0), run("bimodal", 2.0, 3.4)], rec)
    assert problem.startswith("bimodal@100: slowdown_p90 3.400 is +13.3%")


def test_check_fails_loudly_on_missing_shapes_and_lost_nodes() -> None:
    rec = record(paper=(1.0, 2.0))
    problems = check([run("paper", 1.0, 2.0), run("straggler", 1.0, 2.0)], rec)
    assert problems == [
        "straggler@100: no record in the gate (a new shape or size?); "
        "record it with: python -m bench.sim suite --record"
    ]
    assert "paper@1000: no record" in check([run("paper", 1.0, 2.0, nodes=1000)], rec)[0]
    stale = check([run("other", 1.0, 2.0)], record(other=(1.0, 2.0), paper=(1.0, 2.0)))
    assert stale == [
        "paper@100: recorded but not in the suite any more; "
        "record it with: python -m bench.sim suite --record"
    ]
    assert (
        check([run("other", 1.0, 2.0)], record(other=(1, 2), paper=(1, 2)), whole_suite=False) == []
    )
    (lost, lost_p90) = check([run("paper", None, None)], rec)
    assert "paper@100: ratio missing" in lost and "slowdown_p90 missing" in lost_p90


def test_a_bad_record_is_refused_with_the_way_to_write_one(tmp_path: Path) -> None:
    with pytest.raises(GateError, match=r"python -m bench\.sim suite --record"):
        read_record(tmp_path / "absent.json")
    bad = tmp_path / "gate.json"
    for text, word in [
        ("{", "not JSON"),
        ("[]", "not a JSON object"),
        ('{"nodes": [], "random": 0, "seeds_from": 1, "shapes": {}}', "'nodes'"),
        ('{"nodes": [100], "random": -1, "seeds_from": 1, "shapes": {}}', "'random'"),
        ('{"nodes": [100], "random": 0, "seeds_from": 1, "shapes": {}}', "'shapes'"),
        ('{"nodes": [100], "random": 0, "seeds_from": 1, "shapes": {"a@1": {}}}', "a@1"),
    ]:
        bad.write_text(text)
        with pytest.raises(GateError, match=word):
            read_record(bad)


def test_the_recorded_gate_covers_every_shape_of_the_suite() -> None:
    rec = read_record(GATE)
    shapes = {k.rsplit("@", 1)[0] for k in rec["shapes"]}
    assert {p.stem for p in PROFILES.glob("*.toml")} <= shapes
    assert {f"drawn-{rec['seeds_from'] + i}" for i in range(rec["random"])} <= shapes
    assert rec["random"] >= 1  # drawn shapes are gated too


# -- determinism -----------------------------------------------------------------------
def _numbers(path: Path) -> list[dict[str, object]]:
    return [
        {k: v for k, v in r.items() if k not in IGNORED}  # (measured, not simulated)
        for r in json.loads(path.read_text())["runs"]
    ]


@pytest.fixture
def hash_seed_outputs(request: pytest.FixtureRequest, tmp_path: Path) -> list[Path]:
    """``python -m bench.sim`` + early_sim_gate.SAME_SEED_ARGS once per PYTHONHASHSEED (1, 2),
    at once, started by the session (tests/support/early_sim_gate.py): each run's JSON."""
    return early_sim_gate.hash_seed_outputs(request.config, tmp_path)


def test_the_same_seed_gives_the_same_numbers_in_another_process(
    hash_seed_outputs: list[Path],
) -> None:
    """Not even Python's per-process string hashing may move a number."""
    assert early_sim_gate.HASH_SEEDS == ("1", "2")
    outs = [_numbers(out) for out in hash_seed_outputs]
    assert outs[0] == outs[1] and len(outs[0]) == 3


def test_drawn_shapes_are_stable_and_varied() -> None:
    assert drawn_profile(5) == drawn_profile(5)
    shapes = [drawn_profile(s) for s in range(1, 13)]
    assert len({p.random.up.dist for p in shapes if p.random}) == 4  # every distribution drawn
    assert any(p.random and p.random.down is not None for p in shapes)  # asymmetric links
    assert any(p.random and p.random.down is None for p in shapes)
    assert len(drawn_profile(5).scaled(500).nodes) == 500
    with pytest.raises(ValueError, match="seed"):
        drawn_profile(-1)


# -- the command line ------------------------------------------------------------------
def test_the_suite_prints_one_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "suite.json"
    # big-layer and ci: two of the suite's cheapest shapes to simulate (bimodal@20 took 4 s)
    assert main(["--nodes", "10,20", "--only", "big-layer,ci", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("shape"))
    for col in ("nodes", "T*", "completion", "x T*", "slow med", "slow p90", "origin/S",
                "coord", "wall", "<=1.25", "med<=2", "p90<=3"):  # fmt: skip
        assert col in header
    doc = json.loads(out.read_text())
    assert doc["policy"] == DEFAULT_POLICY and doc["nodes"] == [10, 20]
    assert [(r["shape"], r["nodes"]) for r in doc["runs"]] == [
        ("big-layer", 10), ("big-layer", 20), ("ci", 10), ("ci", 20)
    ]  # fmt: skip
    big = doc["runs"][0]
    assert big["image_bytes"] == sum(load_profile(PROFILES / "big-layer.toml").layers)
    assert big["ratio"] == pytest.approx(big["completion"] / big["t_star"])
    assert big["goals"]["ratio"] == (big["ratio"] <= 1.25)
    row = next(line for line in printed.splitlines() if line.startswith("big-layer"))
    assert f"{big['ratio']:.2f}" in row and f"{big['slowdown_p90']:.2f}" in row


def test_record_then_check_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "ci.toml").write_text((PROFILES / "ci.toml").read_text())  # cheap to simulate
    gate, out = tmp_path / "gate.json", tmp_path / "o.json"
    args = ["--profiles", str(profiles), "--nodes", "8", "--random", "1", "--out", str(out)]
    assert main([*args, "--record", str(gate)]) == 0
    assert set(read_record(gate)["shapes"]) == {"ci@8", "drawn-1@8"}
    assert main([*args, "--check", str(gate)]) == 0
    assert "gate: no shape worse than its record" in capsys.readouterr().out
    doc = json.loads(gate.read_text())
    doc["shapes"]["ci@8"]["ratio"] /= 2  # as if it had been twice as good
    gate.write_text(json.dumps(doc))
    assert main([*args, "--check", str(gate)]) == 1
    assert "ci@8: ratio" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["--nodes", "0"],
        ["--nodes", "ten"],
        ["--policy", "nope"],
        ["--only", "nope"],
        ["--random", "-1"],
        ["--only", "ci", "--record"],
        ["--check", "/nonexistent/gate.json"],
    ],
)
def test_bad_suite_arguments_exit_2(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--nodes", "10", "--out", str(tmp_path / "o.json"), *argv]) == 2
    assert "bench.sim suite:" in capsys.readouterr().err
