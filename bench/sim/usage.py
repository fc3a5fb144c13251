"""``python -m bench.sim.usage``: where one run's upload went, bucket by bucket.

::

    .venv/bin/python -m bench.sim.usage --profile random-pareto [--nodes 100]
        [--policy swarm] [--bucket 2] [--random 3]

Why: the suite's three numbers say that a shape misses a goal, not why. This runs
one shape of the suite (a profile file or a drawn shape, ``drawn-N`` with
``--random`` >= N) traced and prints, per bucket of simulated seconds:

* the upload the cluster moved (MB/s) and the upload it left idle (each seeder's
  line rate less what it sent: the simulator's efficiency keeps ~5 % idle on a
  busy link);
* how much of what it moved went into the *faster half* of the demanders (own
  bound t_i* = max(S/d_i, S/u_origin) at most the median's: the nodes the
  median slowdown is about) and how many of each half held the image by then;
* how many uploads a seeder ran at once, on average over the bucket.

A transfer's bytes are spread evenly from its flow's start to its done report
(bench/sim/engine.py ``Traced``), so a bucket's rates are means over it. Session
25 found with this that on random-pareto the cluster moves 85.7 of its 90.3 MB/s
from 2 s to 24 s but only 51 of them into the fast half, each seeder running ~4
uploads at once (bench/RESULTS.md). Exit 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from rainbowd.core.sched.scheduler import DEFAULT_POLICY
from rainbowd.devcluster.profile import ORIGIN, ClusterProfile
from rainbowd.lib.log import configure as configure_logging

from .engine import SimResult, Simulation
from .suite import _nodes, _policy, profile_layers, suite_profiles

MB = 1e6


@dataclass(frozen=True)
class Bucket:
    """One bucket of a traced run: ``start`` to ``start + seconds``, rates in bytes/s."""

    start: float
    seconds: float
    moved_Bps: float  # upload moved, all seeders
    idle_Bps: float  # upload left idle: each seeder's line rate less what it sent
    to_fast_Bps: float  # of ``moved_Bps``, into the faster half of the demanders
    uploads_per_seeder: float  # uploads in flight per seeder, mean over the bucket
    fast_done: int  # demanders of the faster half holding the image by the bucket's end
    rest_done: int  # the others holding it by then


def faster_half(profile: ClusterProfile, image_bytes: int) -> set[str]:
    """The demanders whose own bound is at most the median's (ties all count)."""
    bounds = profile.node_bounds(image_bytes)
    median = statistics.median(bounds.values())
    return {n for n, b in bounds.items() if b <= median}


def upload_use(
    profile: ClusterProfile, image_bytes: int, result: SimResult, bucket_s: float
) -> list[Bucket]:
    """The buckets of ``result`` (a traced run of ``profile``, already scaled)."""
    if bucket_s <= 0:
        raise ValueError(f"a bucket must be > 0 s, got {bucket_s}")
    line = {n.name: n.up_Bps for n in profile.nodes}
    line[ORIGIN] = profile.origin.up_Bps
    fast = faster_half(profile, image_bytes)
    flows = [t for t in result.trace if t.started >= 0 and t.ended > t.started]
    end = max([t.ended for t in flows] + list(result.node_seconds.values()), default=0.0)
    count = max(1, int(end // bucket_s) + 1)
    to_fast = [0.0] * count
    busy = [0.0] * count  # upload-seconds in flight
    sent: list[dict[str, float]] = [{} for _ in range(count)]  # seeder -> bytes, per bucket
    for t in flows:
        rate = t.size / (t.ended - t.started)
        i = int(t.started // bucket_s)
        while i < count and i * bucket_s < t.ended:
            lo, hi = max(i * bucket_s, t.started), min((i + 1) * bucket_s, t.ended)
            part = rate * (hi - lo)
            busy[i] += hi - lo
            if t.demander in fast:
                to_fast[i] += part
            sent[i][t.seeder] = sent[i].get(t.seeder, 0.0) + part
            i += 1
    out = []
    for i in range(count):
        start = i * bucket_s
        idle = sum(max(0.0, rate * bucket_s - sent[i].get(n, 0.0)) for n, rate in line.items())
        by = start + bucket_s
        done = [n for n, s in result.node_seconds.items() if s <= by]
        out.append(
            Bucket(
                start=start,
                seconds=bucket_s,
                moved_Bps=sum(sent[i].values()) / bucket_s,
                idle_Bps=idle / bucket_s,
                to_fast_Bps=to_fast[i] / bucket_s,
                uploads_per_seeder=busy[i] / bucket_s / len(line),
                fast_done=sum(1 for n in done if n in fast),
                rest_done=sum(1 for n in done if n not in fast),
            )
        )
    return out


def render(profile: ClusterProfile, image_bytes: int, buckets: Sequence[Bucket]) -> str:
    """The table ``main`` prints, with the cluster's upload and the two halves' sizes."""
    fast = faster_half(profile, image_bytes)
    line = sum(n.up_Bps for n in profile.nodes) + profile.origin.up_Bps
    rest = len(profile.nodes) - len(fast)
    lines = [
        f"{profile.name}: {len(profile.nodes)} demanders, upload {line / MB:.1f} MB/s in all; "
        f"faster half {len(fast)} (own bound <= the median's), rest {rest}",
        f"{'from s':>8} {'moved':>8} {'idle':>8} {'to fast':>8} {'up/seeder':>9} "
        f"{'fast done':>9} {'rest done':>9}",
    ]
    for b in buckets:
        lines.append(
            f"{b.start:8.1f} {b.moved_Bps / MB:8.1f} {b.idle_Bps / MB:8.1f} "
            f"{b.to_fast_Bps / MB:8.1f} {b.uploads_per_seeder:9.2f} "
            f"{b.fast_done:9d} {b.rest_done:9d}"
        )
    lines.append("(MB/s; idle = line rate less what was sent)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.sim.usage",
        description="One shape of the suite, traced: where its upload went, bucket by bucket.",
    )
    p.add_argument("--profile", required=True, help="a shape of the suite (drawn-N: --random)")
    p.add_argument("--nodes", default="100", help="demanders (default 100)")
    p.add_argument("--random", type=int, default=3, metavar="N", help="drawn shapes (default 3)")
    p.add_argument("--policy", default=DEFAULT_POLICY, help=f"default {DEFAULT_POLICY}")
    p.add_argument("--bucket", type=float, default=2.0, help="seconds per bucket (default 2)")
    args = p.parse_args(argv)
    configure_logging("warning")
    try:
        counts = _nodes(args.nodes)
        if len(counts) != 1:
            raise ValueError(f"--nodes wants one count, got {args.nodes!r}")
        _policy(args.policy)
        if args.bucket <= 0:
            raise ValueError(f"--bucket must be > 0 s, got {args.bucket}")
        suite = suite_profiles(args.random)
        shapes = [p for p in suite if p.name == args.profile]
        if not shapes:
            known = ", ".join(p.name for p in suite)
            raise ValueError(f"--profile: no shape {args.profile!r} in the suite (known: {known})")
    except ValueError as e:  # (ProfileError is one)
        print(f"bench.sim.usage: {e}", file=sys.stderr)
        return 2
    layers = profile_layers(shapes[0])
    image_bytes = sum(s for _, s in layers)
    scaled = shapes[0].scaled(counts[0])
    result = Simulation(scaled, layers, policy=args.policy, trace=True).run()
    print(render(scaled, image_bytes, upload_use(scaled, image_bytes, result, args.bucket)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
