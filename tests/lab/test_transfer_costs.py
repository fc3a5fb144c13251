"""bench/lab/transfer_costs.py: a lab run's per-transfer costs, read from its JSON logs."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bench.lab.transfer_costs import MIN_PULLS, measure

T0 = 1_800_000_000.0


def line(event: str, t: float, **fields: Any) -> str:
    stamp = datetime.fromtimestamp(T0 + t, UTC).isoformat().replace("+00:00", "Z")
    return json.dumps({**fields, "event": event, "level": "info", "timestamp": stamp}) + "\n"


def write_run(logs: Path, pulls: int) -> None:
    """``pulls`` transfers to node a from seeders s0, s1 (alternating), 1 s apart.

    Each is assigned at t, reaches the agent 0.1 s later, is pulled, and its done
    report is applied 0.3 s after the pull ends. The first pull from each seeder
    opens the connection (0.8 s); later ones reuse it.
    """
    logs.mkdir()
    coordinator, agent = [], ["not json: a traceback line\n"]
    for i in range(pulls):
        t, tid, seeder = float(i), f"t-{i}", f"s{i % 2}"
        coordinator.append(line("transfer assigned", t, transfer=tid, demander="a"))
        agent.append(line("pulling layer", t + 0.1, transfer=tid, seeder=seeder))
        agent.append(line("pull_started", t + 0.1, transfer=tid, seeder=seeder))
        connected = 0.0
        if i < 2:
            connected = 0.8
            agent.append(line("seeder_connected", t + 0.1 + connected, seeder=seeder))
        agent.append(line("pull_done", t + 0.2 + connected, transfer=tid, seeder=seeder))
        coordinator.append(line("transfer done", t + 0.5 + connected, transfer=tid))
    (logs / "coordinator.log").write_text("".join(coordinator))
    (logs / "a.log").write_text("".join(agent))


def test_medians_of_assignment_connection_and_report(tmp_path: Path) -> None:
    write_run(tmp_path / "logs", pulls=MIN_PULLS + 10)
    costs = measure(tmp_path / "logs")
    assert costs is not None
    assert (costs.pulls, costs.new_connections) == (MIN_PULLS + 10, 2)
    assert costs.assign_s == pytest.approx(0.1, abs=1e-3)
    assert costs.connect_s == pytest.approx(0.8, abs=1e-3)
    assert costs.finish_s == pytest.approx(0.3, abs=1e-3)
    assert costs.as_notes()["connect_s"] == pytest.approx(0.8, abs=1e-3)


def test_too_few_pulls_or_no_coordinator_log_measure_nothing(tmp_path: Path) -> None:
    write_run(tmp_path / "few", pulls=MIN_PULLS - 1)
    assert measure(tmp_path / "few") is None  # e.g. logs below info level list none
    write_run(tmp_path / "many", pulls=MIN_PULLS)
    (tmp_path / "many" / "coordinator.log").unlink()
    assert measure(tmp_path / "many") is None
    assert measure(tmp_path / "absent") is None
