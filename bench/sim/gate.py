"""The regression gate: the suite's ratios must not worsen against those recorded.

``python -m bench.sim suite --record`` writes ``bench/sim/gate.json``::

    {"policy": "relay", "nodes": [100], "random": 2, "seeds_from": 1,
     "tolerance": 0.1,
     "shapes": {"bimodal@100": {"ratio": 2.05, "slowdown_p90": 23.9,
                                "slowdown_median": 1.69, "origin_copies": 20.8}, ...}}

tests/bench/test_sim_gate.py re-runs the suite with the record's sizes and
seeds and the coordinator's default policy, and :func:`check` fails it when

* a run's x T* or p90 slowdown is more than ``TOLERANCE`` (10 %) above its
  record (the median slowdown and origin copies are recorded for reading,
  not gated);
* a run left a node without the image (no ratio);
* a shape of the suite has no record (a new profile: record it), or, when
  the whole suite ran, the record names a shape the suite no longer has.

The simulator is deterministic (simulated time, seeded shapes, no wall-clock
input), so the gate cannot flake: the same code gives the same numbers. A
scheduler change that moves ratios on purpose is recorded again with
``--record`` in the same commit, so the record shows what it moved.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .suite import SuiteRun

GATE = Path(__file__).resolve().parent / "gate.json"
#: how much worse than its record a gated ratio may be (issue 13, item 6)
TOLERANCE = 0.10
#: the measures the gate fails on
GATED = ("ratio", "slowdown_p90")
#: measures recorded for reading only
RECORDED = (*GATED, "slowdown_median", "origin_copies")


class GateError(ValueError):
    """A gate record that cannot be used; says which file and what is wrong."""


def make_record(runs: Sequence[SuiteRun], params: Mapping[str, Any]) -> dict[str, Any]:
    """The record of ``runs`` (every measure in ``RECORDED``) with the suite's ``params``."""
    shapes: dict[str, dict[str, float | None]] = {}
    for r in runs:
        m = r.measures.as_dict()
        shapes[r.key] = {k: m[k] for k in RECORDED}
    return {**params, "tolerance": TOLERANCE, "shapes": shapes}


def read_record(path: Path) -> dict[str, Any]:
    """The gate record at ``path``, checked for the fields the gate reads."""
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise GateError(
            f"cannot read the gate record {path}: {e.strerror or e} "
            "(write it with: python -m bench.sim suite --record)"
        ) from None
    except json.JSONDecodeError as e:
        raise GateError(f"the gate record {path} is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise GateError(f"the gate record {path} is not a JSON object")
    nodes, shapes = doc.get("nodes"), doc.get("shapes")
    if not isinstance(nodes, list) or not nodes or not all(isinstance(n, int) for n in nodes):
        raise GateError(f"the gate record {path}: 'nodes' must be a list of node counts")
    for key in ("random", "seeds_from"):
        if not isinstance(doc.get(key), int) or doc[key] < 0:
            raise GateError(f"the gate record {path}: {key!r} must be an integer >= 0")
    if not isinstance(shapes, dict) or not shapes:
        raise GateError(f"the gate record {path}: 'shapes' must map <shape>@<nodes> to ratios")
    for key, rec in shapes.items():
        if not isinstance(rec, dict) or any(
            k not in rec or (rec[k] is not None and not isinstance(rec[k], int | float))
            for k in GATED
        ):
            raise GateError(f"the gate record {path}: {key} must give {', '.join(GATED)}")
    return doc


def check(
    runs: Sequence[SuiteRun], record: Mapping[str, Any], *, whole_suite: bool = True
) -> list[str]:
    """What is wrong with ``runs`` against ``record``: one line per problem; [] passes."""
    shapes: Mapping[str, Mapping[str, float | None]] = record["shapes"]
    problems: list[str] = []
    hint = "record it with: python -m bench.sim suite --record"
    for r in runs:
        rec = shapes.get(r.key)
        if rec is None:
            problems.append(f"{r.key}: no record in the gate (a new shape or size?); {hint}")
            continue
        now = r.measures.as_dict()
        for k in GATED:
            new, old = now[k], rec[k]
            if new is None:
                problems.append(f"{r.key}: {k} missing ({r.failed} nodes without the image)")
            elif old is not None and not math.isfinite(new):
                problems.append(f"{r.key}: {k} is {new}")
            elif old is not None and new > old * (1 + TOLERANCE):
                problems.append(
                    f"{r.key}: {k} {new:.3f} is {new / old - 1:+.1%} against the recorded "
                    f"{old:.3f} (policy {record.get('policy')}); more than {TOLERANCE:.0%} worse"
                )
    if whole_suite:
        ran = {r.key for r in runs}
        for key in sorted(set(shapes) - ran):
            problems.append(f"{key}: recorded but not in the suite any more; {hint}")
    return problems
