"""``python -m bench.sim.noise``: how far each shape moves under a change that means nothing.

::

    .venv/bin/python -m bench.sim.noise [--nodes 100] [--random 3] [--runs 3]
        [--policy swarm] [--only ci,paper] [--jobs N] [--out bench/out/sim-noise.json]

Why: at 100 nodes the simulator is chaotic. Rates that differ in their last
bits make a tie in the planner go the other way and the run diverges: with
``efficiency`` 0.95 x (1 +- 1e-12) instead of 0.95, slow-origin's p90 slowdown
ranges over 1.27-1.66 and drawn-2's x T* over 1.40-1.56 (bench/RESULTS.md,
session 12). A rule that gains a few % on one run of one shape may have gained
nothing. This runs every shape of the suite ``--runs`` times, run k with
``efficiency`` x (1 + k x 1e-12) for k = 0, 1, -1, 2, -2, ... (k = 0 is the
suite's own run), and prints per shape the median and the range of x T* and of
the median and p90 slowdowns, the geometric mean of the x T* medians, and how
many shapes meet every goal at their medians. Judge a rule by its medians and
ranges against the current policy's, both from here.

``--out`` gets every run's x T* and slowdowns per shape as JSON. Exit 1 if a
run left a node without the image, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from rainbowd.core.sched.scheduler import DEFAULT_POLICY
from rainbowd.lib.log import configure as configure_logging

from ..measures import GOAL_MEDIAN_SLOWDOWN, GOAL_P90_SLOWDOWN, GOAL_RATIO
from .overheads import Overheads
from .suite import (
    PROFILES,
    SuiteRun,
    _nodes,
    _policy,
    only_shapes,
    run_suite,
    suite_profiles,
)

#: relative step of ``efficiency`` between two runs of a shape: far below anything a
#: link or a rule could mean, only enough to move rates in their last bits
STEP = 1e-12
#: the default runs per shape (the unperturbed one and one either side)
RUNS = 3
OUT = Path(__file__).resolve().parents[1] / "out" / "sim-noise.json"


def offsets(runs: int) -> list[int]:
    """k of each run: 0, 1, -1, 2, -2, ... (``runs`` of them)."""
    return [0] + [s * (i // 2 + 1) for i, s in zip(range(runs - 1), [1, -1] * runs, strict=False)]


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(least, median, most) of ``values``."""
    return min(values), statistics.median(values), max(values)


def _cell(values: Sequence[float]) -> str:
    low, mid, high = spread(values)
    return f"{mid:5.2f} ({low:.2f}-{high:.2f})"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.sim.noise",
        description="Every shape of the suite run several times, efficiency moved by 1e-12.",
    )
    p.add_argument("--nodes", default="100", help="demander counts, comma-separated (default 100)")
    p.add_argument("--random", type=int, default=3, metavar="N", help="drawn shapes (default 3)")
    p.add_argument("--seeds-from", type=int, default=1, help="first seed of --random (default 1)")
    p.add_argument("--runs", type=int, default=RUNS, help=f"runs per shape (default {RUNS})")
    p.add_argument("--policy", default=DEFAULT_POLICY, help=f"default {DEFAULT_POLICY}")
    p.add_argument("--only", help="comma-separated shape names (default: all)")
    p.add_argument("--jobs", type=int, default=1, help="simulations at once (default 1)")
    p.add_argument("--out", default=str(OUT), help="JSON of every run (default %(default)s)")
    args = p.parse_args(argv)
    configure_logging("warning")
    try:
        nodes = _nodes(args.nodes)
        if not 1 <= args.runs <= 99:
            raise ValueError(f"--runs wants 1 .. 99, got {args.runs}")
        if args.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
        _policy(args.policy)
        profiles = only_shapes(
            suite_profiles(args.random, args.seeds_from, directory=PROFILES), args.only
        )
    except ValueError as e:
        print(f"bench.sim noise: {e}", file=sys.stderr)
        return 2
    base = Overheads().efficiency
    by_key: dict[str, list[SuiteRun]] = {}
    for k in offsets(args.runs):
        overheads = Overheads(efficiency=base * (1 + k * STEP))
        for r in run_suite(profiles, nodes, args.policy, overheads, workers=args.jobs):
            by_key.setdefault(r.key, []).append(r)
    print(f"policy {args.policy}; {args.runs} runs per shape, efficiency x (1 + k x {STEP:g})")
    print(f"{'shape@nodes':<24} {'x T*':>17} {'slow med':>17} {'slow p90':>17}  every goal")
    shapes: dict[str, dict[str, list[float]]] = {}
    met = 0
    for key, runs in by_key.items():
        ms = [r.measures for r in runs]
        cols = {
            "ratio": [m.ratio for m in ms if m.ratio is not None],
            "slowdown_median": [m.slowdown_median for m in ms if m.slowdown_median is not None],
            "slowdown_p90": [m.slowdown_p90 for m in ms if m.slowdown_p90 is not None],
        }
        shapes[key] = cols
        if not all(cols.values()):
            print(f"{key:<24} (a run left a node without the image)")
            continue
        ok = (
            statistics.median(cols["ratio"]) <= GOAL_RATIO
            and statistics.median(cols["slowdown_median"]) <= GOAL_MEDIAN_SLOWDOWN
            and statistics.median(cols["slowdown_p90"]) <= GOAL_P90_SLOWDOWN
        )
        met += ok
        print(
            f"{key:<24} {_cell(cols['ratio']):>17} {_cell(cols['slowdown_median']):>17} "
            f"{_cell(cols['slowdown_p90']):>17}  {'pass' if ok else 'FAIL'}"
        )
    medians = [statistics.median(c["ratio"]) for c in shapes.values() if c["ratio"]]
    geomean = math.exp(sum(map(math.log, medians)) / len(medians)) if medians else float("nan")
    print(f"geometric mean of the x T* medians {geomean:.4f}; {met} of {len(shapes)} shapes "
          f"meet every goal at their medians")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"policy": args.policy, "runs": args.runs, "step": STEP, "offsets": offsets(args.runs),
           "geomean_ratio": geomean, "shapes": shapes}  # fmt: skip
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")
    failed = any(r.failed for runs in by_key.values() for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
