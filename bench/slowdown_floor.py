"""The least median (or p90) slowdown, and x T*, any schedule could reach on a cluster: floors.

Why: the slowdown goals (median <= 2, p90 <= 3; bench/measures.py) say how long a
node waited over its own bound t_i* = max(S/d_i, S/u_origin), but a node's own bound
ignores the others: where the cluster's whole upload cannot feed many nodes at their
own download at once, no scheduler gets the median near 1. The floor says how far a
run's quantile is from what was possible, and whether a failing goal could be met at
all.

The upload's bound relaxes every limit but one: the cluster's summed upload U (the origin's
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

**The one coordinator** (``reports_s``, session 39). It is a second server every node
needs: it applies the done reports one after another, and a node is done when its last
report is applied (so the simulator counts a node's end). rbd's transfer carries a piece
of one layer and ends in one done report, so a node needs at least one report per layer
it lacks: ``reports_s = layers x the coordinator's seconds per report``
(bench/sim/overheads.py ``coordinator_s``). The i-th node to end has waited for i nodes'
reports as well as for i images' bytes, and both servers work at once, so the larger
share binds::

    floor(q) = max(1, max_i  max(S / U, reports_s) i / b_(i))
    completion_floor = max(1, N reports_s / T*)

At 10,000 nodes this is what the small images miss by (ci: 10,000 x 3 x 1.1 ms = 33 s
against a T* of 4.1 s, a completion floor of 8.0 x T*): no order of transfers meets
those goals, only fewer reports a node or more than one coordinator.
"""

from __future__ import annotations

import math

from rainbowd.devcluster.profile import ClusterProfile


def slowdown_floor(
    profile: ClusterProfile, image_bytes: int, q: float, *, reports_s: float = 0.0
) -> float:
    """The least ``q`` quantile of the slowdowns any schedule of ``profile`` could give.

    ``reports_s``: the coordinator's least seconds of done reports a node (module doc;
    0: a coordinator of no cost, the upload alone).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in 0 .. 1, got {q}")
    if reports_s < 0:
        raise ValueError(f"reports_s must be >= 0, got {reports_s}")
    bounds = sorted(profile.node_bounds(image_bytes).values())
    if not bounds or image_bytes <= 0:
        return 1.0
    upload = profile.origin.up_Bps + sum(n.up_Bps for n in profile.nodes)
    per_node = max(image_bytes / upload, reports_s)  # seconds of the busier server a node
    k = math.floor((len(bounds) - 1) * q) + 1
    latest = bounds[-k:]  # the k largest own bounds, ascending
    worst = max(per_node * i / b for i, b in enumerate(latest, start=1))
    return max(1.0, worst)


def completion_floor(profile: ClusterProfile, image_bytes: int, reports_s: float) -> float:
    """The least x T* any schedule of ``profile`` could give, with ``reports_s`` a node.

    T* bounds the network; the one coordinator applies at least ``reports_s`` of done
    reports for every node before the last is done (module doc).
    """
    if reports_s < 0:
        raise ValueError(f"reports_s must be >= 0, got {reports_s}")
    t_star = profile.bound(image_bytes).t_star
    if not profile.nodes or t_star <= 0:
        return 1.0
    return max(1.0, len(profile.nodes) * reports_s / t_star)
