"""bench/sim/same.py: two suite outputs agree unless a measure (not wall time) moved."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.sim.same import differences, main


def suite(*runs: tuple[str, float, float]) -> dict[str, Any]:
    return {
        "runs": [
            {"shape": s, "nodes": 100, "ratio": r, "failed": 0, "wall_seconds": w}
            for s, r, w in runs
        ]
    }


def test_wall_time_may_move_measures_may_not(tmp_path: Path) -> None:
    before = suite(("paper", 1.2, 3.0), ("ci", 1.3, 1.0))
    assert differences(before, suite(("paper", 1.2, 9.0), ("ci", 1.3, 0.1))) == []
    moved = suite(("paper", 1.2012, 3.0), ("bimodal", 1.1, 1.0))
    assert differences(before, moved) == [
        "bimodal@100: only in one of the two",
        "ci@100: only in one of the two",
        "paper@100 ratio: 1.2 -> 1.2012 (+0.100%)",
    ]
    assert differences(suite(("paper", 1.2, 3.0)), suite(("paper", 1.2012, 3.0)), tol=0.005) == []
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(before))
    b.write_text(json.dumps(before))
    assert main([str(a), str(b)]) == 0
    b.write_text(json.dumps(moved))
    assert main([str(a), str(b)]) == 1
