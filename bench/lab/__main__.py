"""``python -m bench.lab``: run systems side by side on an emulated cluster, or clean up.

    python -m bench.lab run --profile paper [--systems rbd,registry,bittorrent]
                            [--out bench/out/lab-paper] [--timeout 1800] [--keep]
                            [--rate-scale 0.25]
    python -m bench.lab bound --profile paper     # T* for the profile's image
    python -m bench.lab clean                     # what a killed run left behind

``--profile`` takes a name from bench/profiles/ or a path to a TOML file.
Systems: ``rbd`` (the coordinator's default policy,
rainbowd.core.sched.scheduler.DEFAULT_POLICY), ``rbd:<policy>``, ``registry``,
``bittorrent``. Needs root (network namespaces). The run writes
``report.json`` and ``cdf.png`` into ``--out`` and prints the table; it
exits 1 if any system left a node without the image. Every node shares this
host's CPUs: a system whose timed phase kept them >= 90 % busy is marked in
the table (bench/lab/hostcpu.py), and ``--rate-scale F`` runs the same cluster
with every rate times F (its name gets ``-xF``; T* grows by 1/F).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from rainbowd.devcluster.netlab import NetLab, NetLabError
from rainbowd.devcluster.profile import ClusterProfile, ProfileError, load_profile

from .env import LabEnv, clean
from .image import build_lab_image
from .result import LabReport, LabSystem, SystemResult, layer_sizes

PROFILES = Path(__file__).resolve().parent.parent / "profiles"
DEFAULT_SYSTEMS = "rbd,registry,bittorrent"
#: seconds between two systems, so tbf queues and TIME_WAITs of one do not touch the next
SETTLE = 2.0


def resolve_profile(name_or_path: str) -> ClusterProfile:
    p = Path(name_or_path)
    if not p.suffix and not p.exists():
        p = PROFILES / f"{name_or_path}.toml"
        if not p.exists():
            known = ", ".join(sorted(f.stem for f in PROFILES.glob("*.toml")))
            raise ProfileError(f"no profile {name_or_path!r}; shipped: {known} (or pass a path)")
    return load_profile(p)


def make_system(spec: str, *, log_level: str = "warning") -> LabSystem:
    """``rbd`` (the default policy), ``rbd:<policy>``, ``rbd-pull`` (a rollout through the
    nodes' front doors: rollout_system.py), ``registry`` or ``bittorrent``."""
    name, _, arg = spec.partition(":")
    if name == "rbd":
        from .rbd_system import RbdSystem

        return RbdSystem(arg, log_level=log_level) if arg else RbdSystem(log_level=log_level)
    if name == "registry" and arg in ("", "gzip"):
        from .registry_system import RegistrySystem

        # registry:gzip holds gzipped layers, as a real registry does (and as rbd-pull reads)
        return RegistrySystem(name=spec, compress=True) if arg else RegistrySystem()
    if name == "bittorrent" and not arg:
        from .bittorrent_system import BitTorrentSystem

        return BitTorrentSystem()
    if name == "rbd-pull" and not arg:
        from .rollout_system import RolloutSystem

        return RolloutSystem()
    raise ValueError(
        f"unknown system {spec!r}: use rbd, rbd:<policy>, rbd-pull, registry, registry:gzip "
        "or bittorrent"
    )


async def run_lab(
    profile: ClusterProfile,
    systems: list[LabSystem],
    workdir: Path,
    *,
    timeout: float,
    say: bool = True,
) -> LabReport:
    """Build the lab, run each system in it in turn, tear everything down; the report."""
    image = build_lab_image(profile, workdir / "image.tar")
    layers = layer_sizes(image)
    report = LabReport(profile, sum(size for _, size in layers), layers)
    if say:
        print(
            f"lab: {profile.name}, {len(profile.nodes)} nodes + origin, "
            f"image {report.image_bytes / 1e6:.1f} MB, T* = {report.bound.t_star:.1f} s",
            flush=True,
        )
    with LabEnv(profile, workdir, image) as env:
        for i, system in enumerate(systems):
            if i:
                await asyncio.sleep(SETTLE)
            started = time.monotonic()
            env.reset_timed()
            if say:
                print(f"lab: running {system.name} ...", flush=True)
            try:
                result = await system.run(env, timeout=timeout)
            except Exception as e:  # one broken system must not hide the others' numbers
                result = SystemResult(system.name, notes={"error": str(e)})
                result.failed = {n: f"{system.name} did not run: {e}" for n in env.demanders}
            finally:
                env.stop_processes()
            result.origin_bytes = env.origin_sent
            result.host_cpu_busy = env.host_cpu_busy
            report.results.append(result)
            if say:
                took = time.monotonic() - started
                state = f"{result.total:.1f} s" if result.complete else "INCOMPLETE"
                print(f"lab: {system.name}: {state} (wall {took:.0f} s with set-up)", flush=True)
    return report


def _cmd_run(args: argparse.Namespace) -> int:
    profile = resolve_profile(args.profile).rates_scaled(args.rate_scale)
    systems = [
        make_system(s.strip(), log_level=args.log_level)
        for s in args.systems.split(",")
        if s.strip()
    ]
    NetLab.check_prerequisites()
    removed = clean()
    if removed:
        print(f"lab: removed {len(removed)} namespaces of earlier, dead runs", flush=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix=f"rbd-lab-{profile.name}-"))
    out = Path(args.out or f"bench/out/lab-{profile.name}")
    ok = False
    try:
        report = _run_main(run_lab(profile, systems, workdir, timeout=args.timeout))
        js, png = report.write(out)
        print()
        print(report.table())
        print(f"\nwrote {js} and {png}")
        ok = all(r.complete for r in report.results)
        return 0 if ok else 1
    finally:
        if args.keep or not ok:
            print(f"lab: kept {workdir} (logs in {workdir / 'logs'} and per system)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _run_main(coro: Coroutine[Any, Any, LabReport]) -> LabReport:
    """Run the lab; SIGTERM is handled like Ctrl-C: cancel, tear down, exit."""

    async def main() -> LabReport:
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await task
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    return asyncio.run(main())


def _cmd_bound(args: argparse.Namespace) -> int:
    profile = resolve_profile(args.profile).rates_scaled(args.rate_scale)
    with tempfile.TemporaryDirectory() as d:
        layers = layer_sizes(build_lab_image(profile, Path(d) / "i.tar"))
    size = sum(s for _, s in layers)
    b = profile.bound(size)
    print(f"{profile.name}: {len(profile.nodes)} nodes, image {size} B")
    print(f"T* = {b.t_star:.2f} s  (bound by the {b.binding})")
    print(f"  origin upload    S/u_s            = {b.origin_upload:8.2f} s")
    print(f"  slowest download S/min d          = {b.slowest_download:8.2f} s")
    print(f"  aggregate upload N*S/(u_s+sum u)  = {b.aggregate_upload:8.2f} s")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.lab", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run systems side by side on a profile's cluster")
    run.add_argument("--profile", default="ci", help="name in bench/profiles/ or a TOML path")
    run.add_argument("--systems", default=DEFAULT_SYSTEMS, help=f"default {DEFAULT_SYSTEMS}")
    run.add_argument("--out", help="directory for report.json and cdf.png")
    run.add_argument("--timeout", type=float, default=1800.0, help="per system, seconds")
    run.add_argument("--workdir", help="where stores and logs go (default: a temp dir)")
    run.add_argument("--keep", action="store_true", help="keep the workdir afterwards")
    run.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="rbd's coordinator and agents (info logs every assignment; use with --keep)",
    )
    bound = sub.add_parser("bound", help="print T* for a profile")
    bound.add_argument("--profile", default="paper")
    for cmd in (run, bound):
        cmd.add_argument(
            "--rate-scale",
            type=float,
            default=1.0,
            metavar="F",
            help="every link rate times F (T* / F): for a host whose CPUs the run "
            "would saturate (the table marks such runs with '!')",
        )
    sub.add_parser("clean", help="remove namespaces and processes of dead runs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "bound":
            return _cmd_bound(args)
        removed = clean()
        print(f"removed {len(removed)} namespaces" + (f": {', '.join(removed)}" if removed else ""))
        return 0
    except (ProfileError, NetLabError, ValueError) as e:
        print(f"bench.lab: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench.lab: interrupted; the lab was torn down", file=sys.stderr)
        return 130


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
