"""``python -m bench.sim suite``: every profile of bench/profiles at several sizes, one table.

::

    .venv/bin/python -m bench.sim suite [--nodes 100,1000] [--random N] [--seeds-from 1]
        [--policy relay] [--only bimodal,paper] [--out bench/out/sim-suite.json]
        [--record [bench/sim/gate.json]]

Each profile (and ``N`` shapes drawn whole from seeds ``seeds-from ..``, see
bench/sim/drawn.py) is scaled to each ``--nodes`` count
(:meth:`rainbowd.devcluster.profile.ClusterProfile.scaled`) and simulated once with the
policy (default: the coordinator's) and the default overheads. The image is
the profile's ``layers``, else the lab's demo image of its ``payload_mib``.
The table has, per run: T*, completion, x T*, median and p90 slowdown, the
least x T* / median / p90 slowdown any schedule could give with one coordinator at its
cost a report (bench/slowdown_floor.py), the
origin's bytes over the image's (bench/measures.py), the simulator's wall
seconds, and issue 13's goals as pass/fail columns (x T* <= 1.25, median
slowdown <= 2, p90 <= 3). ``--out`` gets the same as JSON. ``--record``
writes the regression gate's record, ``--check`` compares with it
(bench/sim/gate.py). The simulator is deterministic: the same profiles and
seeds give the same numbers on every run.

Exit status: 0, or 1 if a run left a node without the image, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rainbowd.core.sched.scheduler import DEFAULT_POLICY, POLICIES
from rainbowd.devcluster.profile import (
    MAX_NODES,
    ORIGIN,
    ClusterProfile,
    ProfileError,
    load_profile,
)
from rainbowd.lib.log import configure as configure_logging

from ..measures import (
    GOAL_LIMITS,
    GOAL_MEDIAN_SLOWDOWN,
    GOAL_P90_SLOWDOWN,
    GOAL_RATIO,
    Measures,
    measure,
)
from ..slowdown_floor import completion_floor, slowdown_floor
from .drawn import drawn_profile
from .engine import Simulation
from .gate import GATE, check, make_record, read_record
from .image import demo_layers
from .overheads import Overheads

PROFILES = Path(__file__).resolve().parents[1] / "profiles"
OUT = Path(__file__).resolve().parents[1] / "out" / "sim-suite.json"
#: the default sizes: 10,000 is opt-in (--nodes 100,1000,10000) because some
#: policies take minutes per shape there
DEFAULT_NODES = (100, 1000)


@dataclass(frozen=True)
class SuiteRun:
    """One shape at one size: its measures and what the simulator spent."""

    shape: str
    nodes: int
    policy: str
    image_bytes: int
    layers: int
    binding: str
    measures: Measures
    failed: int
    wall_seconds: float
    #: seconds of coordinator CPU the done reports took (bench/sim/overheads.py
    #: ``coordinator_s`` each): near the completion time, the one coordinator bound the job
    coordinator_busy_s: float = 0.0
    #: CPU seconds the scheduler itself took in this run (SimResult.scheduler_cpu_s:
    #: measured, so it varies from run to run and no gate reads it)
    scheduler_cpu_s: float = 0.0
    #: done reports that reached the coordinator (SimResult.reports)
    reports: int = 0
    #: the least x T*, median and p90 slowdown any schedule could give this cluster with
    #: one coordinator at the run's cost a report (bench/slowdown_floor.py): a goal the
    #: floor is above cannot be met by any order of transfers
    floor_median: float = 1.0
    floor_p90: float = 1.0
    floor_ratio: float = 1.0

    @property
    def coordinator_floor(self) -> float:
        """The coordinator's busy seconds over T*: a floor under x T*.

        One coordinator applies every done report before the last node is done, so
        the job takes at least its busy seconds; where x T* is near this, the
        coordinator bound the job, not the network.
        """
        return self.coordinator_busy_s / self.measures.t_star

    @property
    def scheduler_ms_per_report(self) -> float:
        """The scheduler's measured CPU per done report, ms: to hold against the charge.

        The simulated coordinator takes ``coordinator_s`` (1.1 ms, measured with the
        scheduler's pass in it at the load generator's cluster) per done report; a run
        whose scheduler alone takes more than that here would, on a real coordinator,
        queue its reports longer than the simulator says.
        """
        return 1000 * self.scheduler_cpu_s / self.reports if self.reports else 0.0

    @property
    def out_of_reach(self) -> list[str]:
        """The goals (``Measures.goals``' names) whose floor is above them: out of any reach."""
        floors = {"ratio": self.floor_ratio, "median": self.floor_median, "p90": self.floor_p90}
        return [goal for goal, limit in GOAL_LIMITS.items() if floors[goal] > limit]

    @property
    def key(self) -> str:
        """``<shape>@<nodes>``: how the gate's record names this run."""
        return f"{self.shape}@{self.nodes}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "nodes": self.nodes,
            "policy": self.policy,
            "image_bytes": self.image_bytes,
            "layers": self.layers,
            "binding": self.binding,
            **self.measures.as_dict(),
            "goals": self.measures.goals(),
            "failed": self.failed,
            "wall_seconds": self.wall_seconds,
            "coordinator_busy_s": self.coordinator_busy_s,
            "coordinator_floor": self.coordinator_floor,
            "scheduler_cpu_s": self.scheduler_cpu_s,
            "scheduler_ms_per_report": self.scheduler_ms_per_report,
            "reports": self.reports,
            "slowdown_floor_median": self.floor_median,
            "slowdown_floor_p90": self.floor_p90,
            "ratio_floor": self.floor_ratio,
            "out_of_reach": self.out_of_reach,
        }


def suite_profiles(
    random_n: int = 0, seeds_from: int = 1, *, directory: Path = PROFILES
) -> list[ClusterProfile]:
    """Every profile file of ``directory`` (by name), then ``random_n`` drawn shapes."""
    if random_n < 0 or seeds_from < 0:
        raise ValueError("--random and --seeds-from must be >= 0")
    files = sorted(directory.glob("*.toml"))
    if not files:
        raise ProfileError(f"no profile (*.toml) in {directory}")
    profiles = [load_profile(f) for f in files]
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise ProfileError(f"two profiles in {directory} share a name: {sorted(names)}")
    return profiles + [drawn_profile(seeds_from + i) for i in range(random_n)]


def only_shapes(profiles: list[ClusterProfile], only: str | None) -> list[ClusterProfile]:
    """The profiles ``--only`` names (comma-separated; None or empty: all), in suite order."""
    if not only:
        return profiles
    want = {s.strip() for s in only.split(",") if s.strip()}
    unknown = want - {p.name for p in profiles}
    if unknown:
        raise ValueError(f"--only: no shape {', '.join(sorted(unknown))} in the suite")
    return [p for p in profiles if p.name in want]


def run_suite(
    profiles: Sequence[ClusterProfile],
    nodes: Sequence[int],
    policy: str = DEFAULT_POLICY,
    overheads: Overheads | None = None,
    *,
    progress: Callable[[SuiteRun], None] | None = None,
    workers: int = 1,
) -> list[SuiteRun]:
    """Simulate every profile at every size, in order; ``progress`` sees each run as it ends.

    ``workers`` > 1 runs that many simulations at once in worker processes: each
    simulation is deterministic (simulated time, seeded shapes), so the runs are
    the same as one after the other, only sooner on a machine with the cores
    (the CI gate, ~77 s one at a time on 2 vCPUs).
    """
    demo: dict[int, list[tuple[str, int]]] = {}
    tasks: list[_SuiteTask] = []
    for profile in profiles:
        layers = profile_layers(profile, demo)
        tasks += [(profile, n, layers, policy, overheads) for n in nodes]
    if workers > 1 and len(tasks) > 1:
        ctx = multiprocessing.get_context("spawn")  # no forked copy of a test runner's state
        with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx) as pool:
            return _collect(pool.map(_simulate, tasks), progress)
    return _collect(map(_simulate, tasks), progress)


def profile_layers(
    profile: ClusterProfile, demo: dict[int, list[tuple[str, int]]] | None = None
) -> list[tuple[str, int]]:
    """The image a suite run of ``profile`` distributes: its ``layers``, else the demo's.

    (The lab's demo image of ``payload_mib``: built once per size, kept in ``demo``.)
    """
    if profile.layers:
        return [(f"layer-{i + 1}", s) for i, s in enumerate(profile.layers)]
    mib = profile.payload_mib or 0
    if demo is None:
        return demo_layers(mib)
    if mib not in demo:
        demo[mib] = demo_layers(mib)
    return demo[mib]


def _collect(
    runs: Iterable[SuiteRun], progress: Callable[[SuiteRun], None] | None
) -> list[SuiteRun]:
    """The runs in order, each shown to ``progress`` as it ends."""
    out = []
    for run in runs:
        out.append(run)
        if progress is not None:
            progress(run)
    return out


#: one simulation of the suite: profile, demanders, layers, policy, overheads
_SuiteTask = tuple[ClusterProfile, int, list[tuple[str, int]], str, Overheads | None]


def _simulate(task: _SuiteTask) -> SuiteRun:
    """Simulate one profile at one size (a top-level function: worker processes call it)."""
    profile, n, layers, policy, overheads = task
    image_bytes = sum(s for _, s in layers)
    p = profile.scaled(n)
    sim = Simulation(p, layers, overheads, policy=policy)
    result = sim.run()
    done = not result.failed and bool(result.node_seconds)
    # the coordinator's least seconds a node: a done report per layer (bench/slowdown_floor.py)
    reports_s = len(layers) * sim.overheads.coordinator_s
    return SuiteRun(
        shape=profile.name,
        nodes=n,
        policy=result.policy,
        image_bytes=image_bytes,
        layers=len(layers),
        binding=p.bound(image_bytes).binding,
        measures=measure(
            p,
            image_bytes,
            result.node_seconds,
            complete=done,
            origin_bytes=result.sent_bytes.get(ORIGIN, 0),
        ),
        failed=len(result.failed),
        wall_seconds=result.wall_seconds,
        coordinator_busy_s=result.coordinator_busy_s,
        scheduler_cpu_s=result.scheduler_cpu_s,
        reports=result.reports,
        floor_median=slowdown_floor(p, image_bytes, 0.5, reports_s=reports_s),
        floor_p90=slowdown_floor(p, image_bytes, 0.9, reports_s=reports_s),
        floor_ratio=completion_floor(p, image_bytes, reports_s),
    )


def _f(x: float | None, fmt: str) -> str:
    return format(x, fmt) if x is not None else "--"


def table_header() -> str:
    return (
        f"{'shape':<20} {'nodes':>6} {'T*':>8} {'completion':>10} {'x T*':>6} "
        f"{'slow med':>8} {'slow p90':>8} {'floor':>14} {'origin/S':>8} {'coord':>5} {'sched':>5} "
        f"{'wall':>7} "
        f"{'<=1.25':>6} {'med<=2':>6} {'p90<=3':>6}"
    )


def table_row(r: SuiteRun) -> str:
    m, g = r.measures, r.measures.goals()

    def ok(goal: str) -> str:
        return "pass" if g[goal] else "FAIL"

    return (
        f"{r.shape:<20} {r.nodes:>6} {m.t_star:>7.1f}s {_f(m.completion, '9.1f'):>9}s "
        f"{_f(m.ratio, '.2f'):>6} {_f(m.slowdown_median, '.2f'):>8} "
        f"{_f(m.slowdown_p90, '.2f'):>8} {_floors(r):>14} "
        f"{_f(m.origin_copies, '.1f'):>8} "
        f"{r.coordinator_floor:>5.2f} {r.scheduler_ms_per_report:>5.2f} {r.wall_seconds:>6.2f}s "
        f"{ok('ratio'):>6} {ok('median'):>6} {ok('p90'):>6}"
    )


def _floors(r: SuiteRun) -> str:
    """The floor column: x T* / median / p90 any schedule could reach at best."""
    return f"{r.floor_ratio:.2f}/{r.floor_median:.2f}/{r.floor_p90:.2f}"


def summary(runs: Sequence[SuiteRun]) -> str:
    met = [all(r.measures.goals().values()) for r in runs]
    return (
        f"{sum(met)} of {len(runs)} runs meet every goal (x T* <= {GOAL_RATIO}, median "
        f"slowdown <= {GOAL_MEDIAN_SLOWDOWN}, p90 <= {GOAL_P90_SLOWDOWN}); "
        f"{sum(bool(r.out_of_reach) for r in runs)} have a goal no schedule meets (floor "
        "above it); "
        f"{sum(r.failed > 0 for r in runs)} left nodes without the image; "
        f"wall {sum(r.wall_seconds for r in runs):.1f} s"
    )


def _nodes(spec: str) -> list[int]:
    try:
        nodes = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--nodes wants comma-separated node counts, got {spec!r}") from None
    if not nodes or any(not 1 <= n <= MAX_NODES for n in nodes):
        raise ValueError(f"--nodes wants counts in 1 .. {MAX_NODES}, got {spec!r}")
    return nodes


def _policy(name: str) -> str:
    """``--policy``'s value, checked: a policy the scheduler knows."""
    if name not in POLICIES:
        raise ValueError(f"--policy: no policy {name!r} (known: {', '.join(POLICIES)})")
    return name


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.sim suite",
        description="Simulate every profile of bench/profiles at several sizes; one table.",
    )
    p.add_argument(
        "--nodes",
        default=",".join(map(str, DEFAULT_NODES)),
        help="demander counts, comma-separated (default %(default)s; the issue's 10000 is opt-in)",
    )
    p.add_argument("--random", type=int, default=0, metavar="N", help="also N drawn shapes")
    p.add_argument("--seeds-from", type=int, default=1, help="first seed of --random (default 1)")
    p.add_argument("--policy", default=DEFAULT_POLICY, help=f"default {DEFAULT_POLICY}")
    p.add_argument("--only", help="comma-separated shape names (default: all)")
    p.add_argument("--profiles", default=str(PROFILES), help="the profile directory")
    p.add_argument("--out", default=str(OUT), help="JSON of every run (default %(default)s)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="simulations at once, in worker processes (same results; default 1)",
    )
    p.add_argument(
        "--record",
        nargs="?",
        const=str(GATE),
        metavar="GATE.json",
        help=f"write the regression gate's record (default {GATE})",
    )
    p.add_argument(
        "--check",
        nargs="?",
        const=str(GATE),
        metavar="GATE.json",
        help=f"compare with the gate's record (default {GATE}); exit 1 if a shape got worse",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging("warning")  # the demo-image builder's info lines would split the table
    try:
        nodes = _nodes(args.nodes)
        profiles = only_shapes(
            suite_profiles(args.random, args.seeds_from, directory=Path(args.profiles)), args.only
        )
        record = read_record(Path(args.check)) if args.check else None
        if args.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
        _policy(args.policy)
    except (ProfileError, ValueError, OSError) as e:
        print(f"bench.sim suite: {e}", file=sys.stderr)
        return 2
    print(f"policy {args.policy}; {len(profiles)} shapes x {len(nodes)} sizes", flush=True)
    print(table_header(), flush=True)
    runs = run_suite(
        profiles,
        nodes,
        args.policy,
        progress=lambda r: print(table_row(r), flush=True),
        workers=args.jobs,
    )
    print(summary(runs))
    params = {"policy": args.policy, "nodes": nodes, "random": args.random,
              "seeds_from": args.seeds_from}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**params, "runs": [r.as_dict() for r in runs]}, indent=1) + "\n")
    print(f"wrote {out}")
    if args.record:
        if args.only:
            print("bench.sim suite: --record needs the whole suite (no --only)", file=sys.stderr)
            return 2
        path = Path(args.record)
        path.write_text(json.dumps(make_record(runs, params), indent=1, sort_keys=True) + "\n")
        print(f"recorded the gate in {path}")
    if record is not None:
        problems = check(runs, record, whole_suite=not args.only)
        print("\n".join(problems) if problems else "gate: no shape worse than its record")
        if problems:
            return 1
    return 1 if any(r.failed for r in runs) else 0
