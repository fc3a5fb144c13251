"""``python -m bench.sim.same BEFORE.json AFTER.json [--tol 0.005]``: did a change move the numbers?

For changes meant to make the simulator faster without changing what it
says: run the suite before and after (``python -m bench.sim suite --nodes 100
--random 3 --out ...``) and compare the two ``--out`` files. Every run of one
must be in the other, and every measure of a run (completion, x T*, median and
p90 slowdown, origin bytes, failed nodes...) must agree within ``--tol``
(relative; default 0: bit for bit). Wall seconds are the one field left out.

Exit status: 0 when they agree, 1 with one line per difference otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: fields that say how long the simulator (and the scheduler in it) took, not what it found
IGNORED = frozenset({"wall_seconds", "scheduler_cpu_s", "scheduler_ms_per_report"})


def differences(before: dict[str, Any], after: dict[str, Any], tol: float = 0.0) -> list[str]:
    """One line per run missing from either side or per measure that moved by more than ``tol``."""
    runs_a = {f"{r['shape']}@{r['nodes']}": r for r in before["runs"]}
    runs_b = {f"{r['shape']}@{r['nodes']}": r for r in after["runs"]}
    out = [f"{k}: only in one of the two" for k in sorted(runs_a.keys() ^ runs_b.keys())]
    for key in sorted(runs_a.keys() & runs_b.keys()):
        a, b = runs_a[key], runs_b[key]
        for field in sorted((a.keys() | b.keys()) - IGNORED):
            va, vb = a.get(field), b.get(field)
            numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (va, vb))
            if numbers:
                assert isinstance(va, int | float) and isinstance(vb, int | float)
                rel = abs(vb - va) / max(abs(va), 1e-12)
                if rel > tol:
                    out.append(f"{key} {field}: {va} -> {vb} ({rel:+.3%})")
            elif va != vb:
                out.append(f"{key} {field}: {va!r} -> {vb!r}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sim.same", description=__doc__.split("\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--tol", type=float, default=0.0, help="relative tolerance (default 0)")
    args = p.parse_args(argv)
    before, after = (json.loads(f.read_text()) for f in (args.before, args.after))
    problems = differences(before, after, args.tol)
    for line in problems:
        print(line)
    n_a, n_b = len(before["runs"]), len(after["runs"])
    print(f"{n_a} runs before, {n_b} after: {len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
