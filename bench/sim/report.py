"""A simulation's result as the lab's JSON, a short table, and a comparison with a lab run.

The JSON has the shape bench/lab writes (bench/lab/result.py), with the
system named ``sim:<policy>``, so one reader handles both and the two can be
put side by side::

    {"profile": "paper", "nodes": 100, "image_bytes": 10403840,
     "layers": [[digest, size], ...], "t_star": 20.8,
     "bound": {"origin_upload": 2.6, "slowest_download": 20.8, "aggregate_upload": 5.2,
               "binding": "slowest download"},
     "systems": {"sim:paper": {"total": 118.2, "ratio": 5.68, "median": 60.1,
                               "slowdown_median": 2.1, "slowdown_p90": 4.0,
                               "origin_bytes": 52019200, "origin_copies": 5.0,
                               "seeder_bytes": {"origin": 52019200, "fast-001": ...},
                               "node_seconds": {"fast-001": 3.2, ...}, "failed": {},
                               "notes": {"wall_seconds": ..., "overheads": {...}, ...}}}}

The slowdowns and origin bytes are bench/measures.py's, as the lab reports them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from rainbowd.devcluster.profile import ORIGIN, ClusterProfile

from ..measures import measure
from .engine import SimResult
from .overheads import Overheads


def system_name(policy: str) -> str:
    return f"sim:{policy}"


def to_json(
    profile: ClusterProfile,
    layers: Sequence[tuple[str, int]],
    result: SimResult,
    overheads: Overheads,
) -> dict[str, Any]:
    image_bytes = sum(size for _, size in layers)
    b = profile.bound(image_bytes)
    done = not result.failed and bool(result.node_seconds)
    m = measure(
        profile,
        image_bytes,
        result.node_seconds,
        complete=done,
        origin_bytes=result.sent_bytes.get(ORIGIN, 0),
    )
    return {
        "profile": profile.name,
        "nodes": len(profile.nodes),
        "image_bytes": image_bytes,
        "layers": [[name, size] for name, size in layers],
        "t_star": b.t_star,
        "bound": {
            "origin_upload": b.origin_upload,
            "slowest_download": b.slowest_download,
            "aggregate_upload": b.aggregate_upload,
            "binding": b.binding,
        },
        "systems": {
            system_name(result.policy): {
                "total": result.total if done else None,
                "ratio": result.total / b.t_star if done else None,
                "median": statistics.median(result.node_seconds.values())
                if result.node_seconds
                else None,
                "slowdown_median": m.slowdown_median,
                "slowdown_p90": m.slowdown_p90,
                "origin_bytes": m.origin_bytes,
                "origin_copies": m.origin_copies,
                "seeder_bytes": dict(sorted(result.sent_bytes.items())),
                "node_seconds": dict(sorted(result.node_seconds.items())),
                "failed": result.failed,
                "notes": {
                    "wall_seconds": result.wall_seconds,
                    "speedup": result.speedup if done else None,
                    "events": result.events,
                    "transfers": result.transfers,
                    "new_connections": result.new_connections,
                    "coordinator_busy_s": result.coordinator_busy_s,
                    "reports": result.reports,
                    "scheduler_cpu_s": result.scheduler_cpu_s,
                    "overheads": overheads.as_dict(),
                    "chunk_size": profile.chunk_size,
                    **_fault_notes(result),
                },
            }
        },
    }


def _fault_notes(result: SimResult) -> dict[str, Any]:
    """What injected faults did (bench/sim/faults.py); nothing for a run without any."""
    if not (result.dead or result.failures or result.adopted):
        return {}
    return {
        "dead": dict(sorted(result.dead.items())),
        "quarantined": dict(sorted(result.quarantined.items())),
        "failure_reports": dict(sorted(result.failures.items())),
        "suspected": result.suspected,
        "adopted": result.adopted,
    }


def table(doc: Mapping[str, Any]) -> str:
    """The human summary of a result document (ours or the lab's)."""
    b = doc["bound"]
    lines = [
        f"profile {doc['profile']}: {doc.get('nodes', '?')} nodes + origin; "
        f"image {doc['image_bytes'] / 1e6:.2f} MB in {len(doc['layers'])} layers",
        f"T* = {doc['t_star']:.2f} s (origin upload {b['origin_upload']:.2f} s, slowest download "
        f"{b['slowest_download']:.2f} s, aggregate upload {b['aggregate_upload']:.2f} s)",
        "",
        f"{'system':<12} {'all nodes':>10} {'x T*':>7} {'median':>8} {'slow med':>8} "
        f"{'slow p90':>8} {'origin x':>8} {'failed':>7} {'wall':>8} {'speed-up':>9}",
    ]
    for name, s in doc["systems"].items():
        notes = s.get("notes") or {}
        total = f"{s['total']:9.2f}s" if s["total"] is not None else "       -- "
        ratio = f"{s['ratio']:6.2f}x" if s["ratio"] is not None else "     --"
        med = f"{s['median']:7.2f}s" if s.get("median") is not None else "     -- "
        wall = f"{notes['wall_seconds']:7.2f}s" if "wall_seconds" in notes else "     -- "
        speedup = f"{notes['speedup']:8.0f}x" if notes.get("speedup") else "       --"
        lines.append(
            f"{name:<12} {total:>10} {ratio:>7} {med:>8} {_num(s.get('slowdown_median'))} "
            f"{_num(s.get('slowdown_p90'))} {_num(s.get('origin_copies'))} "
            f"{len(s['failed']):>7} {wall} {speedup}"
        )
        for node, why in sorted(s["failed"].items())[:5]:
            lines.append(f"  {node} failed: {why}")
    return "\n".join(lines)


def _num(x: float | None, width: int = 8) -> str:
    """``x`` with two decimals right-aligned in ``width``, or ``--`` when there is none."""
    return f"{x:{width}.2f}" if x is not None else f"{'--':>{width}}"


def compare(lab: Mapping[str, Any], sim: Mapping[str, Any], lab_system: str = "rbd") -> str:
    """Lab total vs simulated total (and per node) for ``lab_system``; raises if it is missing."""
    systems = lab.get("systems") or {}
    if lab_system not in systems:
        raise ValueError(
            f"the lab result has no system {lab_system!r} (it has: {', '.join(systems) or 'none'})"
        )
    ls = systems[lab_system]
    (sim_name, ss), *_ = sim["systems"].items()
    lines: list[str] = []
    for key in ("profile", "nodes", "image_bytes"):
        if key in lab and lab[key] != sim[key]:
            lines.append(f"warning: lab {key} {lab[key]!r} != sim {key} {sim[key]!r}")
    if ls.get("total") is None or ss.get("total") is None:
        lines.append(f"no total to compare (lab {ls.get('total')}, sim {ss.get('total')})")
        return "\n".join(lines)
    lab_total, sim_total = float(ls["total"]), float(ss["total"])
    err = relative_error(sim_total, lab_total)
    lines.append(
        f"{lab_system} (lab) {lab_total:.2f} s vs {sim_name} {sim_total:.2f} s: "
        f"error {err:+.1%} {'(within 15 %)' if abs(err) <= 0.15 else '(off by more than 15 %)'}"
    )
    common = sorted(set(ls.get("node_seconds", {})) & set(ss["node_seconds"]))
    if common:
        errs = [
            (relative_error(ss["node_seconds"][n], ls["node_seconds"][n]), n)
            for n in common
            if ls["node_seconds"][n] > 0
        ]
        if errs:
            worst = max(errs, key=lambda e: abs(e[0]))
            med = statistics.median(abs(e) for e, _ in errs)
            lines.append(
                f"per node ({len(errs)} in both): median |error| {med:.1%}, "
                f"worst {worst[0]:+.1%} ({worst[1]})"
            )
    return "\n".join(lines)


def relative_error(sim: float, lab: float) -> float:
    """(sim - lab) / lab; inf when the lab value is 0 and the sim's is not."""
    if lab == 0:
        return 0.0 if sim == 0 else math.inf
    return (sim - lab) / lab
