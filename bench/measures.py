"""The measures every run reports, simulator and lab alike (issue 13, item 2).

* **x T*** -- completion (the last node holding the image) over the cluster's
  bound T* (rainbowd.devcluster.profile.lower_bound).
* **slowdown** -- per node, its completion time t_i over its own bound
  t_i* = max(S/d_i, S/u_origin) (rainbowd.devcluster.profile.node_bound): how much longer
  than its own link and the origin allow it waited. Reported as the median and
  the p90 over all demanders; a node that never got the image counts as an
  infinite slowdown (so the p90 of a run that lost nodes is inf, never a
  flattering number).
* **origin bytes** -- what the origin sent, also as copies of the image
  (origin bytes / S): a scheduler that keeps the origin feeding slow nodes
  shows up here.

Quantiles are linear interpolation between closest ranks (the "inclusive"
method of :func:`statistics.quantiles`), so the p90 of 40 nodes lies between
the 36th and 37th smallest.

The goals (issue 13, item 5) are named constants here so the suite's
pass/fail columns and the docs use the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from rainbowd.devcluster.profile import ClusterProfile

#: completion within this many T* (issue 13, item 5)
GOAL_RATIO = 1.25
#: median node within this many times its own bound
GOAL_MEDIAN_SLOWDOWN = 2.0
#: 90 % of nodes within this many times their own bound
GOAL_P90_SLOWDOWN = 3.0
#: each goal by its name (:meth:`Measures.goals`) with its limit: a measure at most this
GOAL_LIMITS = {"ratio": GOAL_RATIO, "median": GOAL_MEDIAN_SLOWDOWN, "p90": GOAL_P90_SLOWDOWN}


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, linear between closest ranks; inf-safe."""
    if not values:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in 0 .. 1, got {q}")
    xs = sorted(values)
    h = (len(xs) - 1) * q
    lo, hi = math.floor(h), math.ceil(h)
    if lo == hi or math.isinf(xs[hi]):  # a rank, or an interpolation towards inf
        return xs[hi]
    return xs[lo] + (xs[hi] - xs[lo]) * (h - lo)


def slowdowns(
    profile: ClusterProfile, image_bytes: int, node_seconds: Mapping[str, float]
) -> dict[str, float]:
    """t_i / t_i* for every demander of ``profile`` (inf for one missing from ``node_seconds``)."""
    bounds = profile.node_bounds(image_bytes)
    return {n: node_seconds[n] / b if n in node_seconds else math.inf for n, b in bounds.items()}


@dataclass(frozen=True)
class Measures:
    """One run's measures; None where the run did not finish (see the module docstring)."""

    t_star: float
    completion: float | None
    ratio: float | None
    slowdown_median: float | None
    slowdown_p90: float | None
    origin_bytes: int | None
    origin_copies: float | None

    def goals(self) -> dict[str, bool]:
        """Issue 13's three goals, each met or not (a missing measure is not met)."""
        values = {"ratio": self.ratio, "median": self.slowdown_median, "p90": self.slowdown_p90}
        return {
            goal: (value := values[goal]) is not None and value <= limit
            for goal, limit in GOAL_LIMITS.items()
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(
    profile: ClusterProfile,
    image_bytes: int,
    node_seconds: Mapping[str, float],
    *,
    complete: bool,
    origin_bytes: int | None,
) -> Measures:
    """The measures of a run that gave ``node_seconds`` (``complete``: every node got it)."""
    t_star = profile.bound(image_bytes).t_star
    done = complete and bool(node_seconds)
    completion = max(node_seconds.values()) if done else None
    slow = list(slowdowns(profile, image_bytes, node_seconds).values())

    def finite(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return Measures(
        t_star=t_star,
        completion=completion,
        ratio=completion / t_star if completion is not None else None,
        slowdown_median=finite(quantile(slow, 0.5)),
        slowdown_p90=finite(quantile(slow, 0.9)),
        origin_bytes=origin_bytes,
        origin_copies=origin_bytes / image_bytes if origin_bytes is not None else None,
    )
