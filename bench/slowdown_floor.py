"""The least median (or p90) slowdown any schedule could reach on a cluster: a floor.

Why: the slowdown goals (median <= 2, p90 <= 3; bench/measures.py) say how long a
node waited over its own bound t_i* = max(S/d_i, S/u_origin), but a node's own bound
ignores the others: where the cluster's whole upload cannot feed many nodes at their
own download at once, no scheduler gets the median near 1. The floor says how far a
run's quantile is from what was possible, and whether a failing goal could be met at
all.

The bound relaxes every limit but one: the cluster's summed upload U (the origin's
and every demander's, as if each could send from the first second; no efficiency,
no fixed costs). A quantile q of N slowdowns (linear between closest ranks) is at
least the k-th smallest, k = floor((N - 1) q) + 1, so some k nodes end within s x
their own bounds. Every byte a node receives someone sent, so by time t at most U t
bytes have arrived: with those k nodes' bounds b_(1) <= ... <= b_(k),

    S x i <= U x s x b_(i)   for i = 1 .. k,   i.e.   s >= S i / (U b_(i))

and the k nodes with the largest own bounds make this loosest (the i-th smallest of
any k bounds is at most theirs). So::

    floor(q) = max(1, max_i  S i / (U b_(i)))   over the k largest own bounds

A run's quantile is never below it (tests/bench/test_slowdown_floor.py checks the
arithmetic and the simulator against it). It is a floor, not a target: the ramp
(only the origin holds anything at first) and the per-node downloads are left out,
so a schedule may not reach it.
"""

from __future__ import annotations

import math

from rainbowd.devcluster.profile import ClusterProfile


def slowdown_floor(profile: ClusterProfile, image_bytes: int, q: float) -> float:
    """The least ``q`` quantile of the slowdowns any schedule of ``profile`` could give."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in 0 .. 1, got {q}")
    bounds = sorted(profile.node_bounds(image_bytes).values())
    if not bounds or image_bytes <= 0:
        return 1.0
    upload = profile.origin.up_Bps + sum(n.up_Bps for n in profile.nodes)
    k = math.floor((len(bounds) - 1) * q) + 1
    latest = bounds[-k:]  # the k largest own bounds, ascending
    worst = max(image_bytes * i / (upload * b) for i, b in enumerate(latest, start=1))
    return max(1.0, worst)
