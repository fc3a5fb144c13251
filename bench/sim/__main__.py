"""``python -m bench.sim``: simulate one distribution over a cluster profile.

::

    .venv/bin/python -m bench.sim --profile paper [--nodes 1000]
        [--out bench/out/sim-paper.json] [--compare LAB.json] [--layers 1996800,8396800,10240]
        [--policy relay] [--chunk-kib 64] [--relay-hop-ms 50]
        [--efficiency 0.95] [--assign-ms 2] [--connect-ms 30] [--channel-ms 2] [--finish-ms 5]
        [--coordinator-ms 2.5]
        [--fault dies:NODE@T] [--fault unreachable:NODE@T] [--fault corrupt:SEEDER->DEMANDER@T]
        [--fault blip:NODE@T]                      # faults: see bench/sim/faults.py
    .venv/bin/python -m bench.sim suite [--nodes 100,1000] [--random N] [--policy P]
        [--out FILE] [--record [GATE.json]]        # every profile: see bench/sim/suite.py

``--policy`` defaults to the coordinator's (``rainbowd.core.sched.scheduler.DEFAULT_POLICY``).
The image is the profile's ``[image] layers`` if it gives them, else the lab's
demo image for its ``payload_mib`` (built in a temporary directory to learn its
layer sizes); ``--layers`` gives sizes instead, and ``--compare`` names a lab
result whose layers are then used so both runs move the same bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rainbowd.core.chunks import MIN_CHUNK_SIZE
from rainbowd.core.sched.scheduler import DEFAULT_POLICY
from rainbowd.devcluster.profile import (
    ClusterProfile,
    ProfileError,
    load_profile,
    scale_suffix,
)

from .calibrate import hop_report
from .engine import SimResult, Simulation
from .faults import Fault, parse_fault
from .image import given_layers, profile_layers
from .overheads import Overheads
from .report import compare, table, to_json

PROFILES = Path(__file__).resolve().parents[1] / "profiles"
OUT = Path(__file__).resolve().parents[1] / "out"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["suite"]:
        from .suite import main as suite_main

        return suite_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        lab = _read_json(args.compare) if args.compare else None
        # a lab run at a --rate-scale is compared with the same cluster unless told otherwise
        scale = args.rate_scale
        if scale is None:
            scale = float(lab.get("rate_scale", 1.0)) if lab is not None else 1.0
        profile = _profile(_profile_name(args.profile, lab), args.nodes).rates_scaled(scale)
        if args.chunk_kib is not None:
            if args.chunk_kib * 1024 < MIN_CHUNK_SIZE:
                raise ValueError(f"--chunk-kib must be >= {MIN_CHUNK_SIZE // 1024}")
            profile = dataclasses.replace(profile, chunk_size=args.chunk_kib * 1024)
        # each per-transfer cost: the flag's, else the lab run's measure, else the default
        flags = {
            "assign_s": args.assign_ms,
            "connect_s": args.connect_ms,
            "channel_s": args.channel_ms,
            "finish_s": args.finish_ms,
        }
        measured = lab_costs(lab, args.lab_system) if lab is not None else {}
        charged = {k: v for k, v in measured.items() if flags[k] is None}
        default = Overheads()
        costs = {
            k: flag / 1e3 if flag is not None else charged.get(k, float(getattr(default, k)))
            for k, flag in flags.items()
        }
        overheads = Overheads(
            efficiency=args.efficiency,
            **costs,
            verify_Bps=args.verify_mbyte_s * 1e6,
            relay_hop_s=args.relay_hop_ms / 1e3,
            coordinator_s=args.coordinator_ms / 1e3,
        )
        if args.layers:
            layers = given_layers(args.layers)
        elif lab is not None and lab.get("layers"):
            layers = [(str(name), int(size)) for name, size in lab["layers"]]
        else:
            layers = profile_layers(profile)
        faults = [parse_fault(spec) for spec in args.fault]
        sim = Simulation(profile, layers, overheads, policy=args.policy, faults=faults)
    except (ProfileError, ValueError, OSError) as e:
        print(f"bench.sim: {e}", file=sys.stderr)
        return 2
    result = sim.run()
    doc = to_json(profile, layers, result, overheads)
    out = Path(args.out) if args.out else OUT / f"sim-{profile.name.replace('@', '-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(doc))
    print(
        f"\n{result.transfers} transfers, {result.events} events; the coordinator busy "
        f"{result.coordinator_busy_s:.1f} s on {result.reports} done reports (the scheduler's "
        f"own CPU here: {result.scheduler_cpu_s:.1f} s); wrote {out}"
    )
    if faults:
        print(fault_summary(faults, result))
    if lab is not None:
        if charged:
            said = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in sorted(charged.items()))
            print(f"per-transfer costs measured in the lab run, charged: {said}")
        try:
            print(compare(lab, doc, args.lab_system))
            print(hop_report(lab, args.lab_system, profile, overheads))
        except ValueError as e:
            print(f"bench.sim: {e}", file=sys.stderr)
            return 2
    return 0 if not result.failed else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.sim", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument(
        "--profile",
        help="a name in bench/profiles/ or a .toml path (default: the --compare lab run's, "
        "else paper)",
    )
    p.add_argument("--nodes", type=int, help="scale the profile to this many demanders")
    p.add_argument(
        "--rate-scale",
        type=float,
        metavar="F",
        help="every link rate times F (default: the --compare lab run's, else 1)",
    )
    p.add_argument(
        "--policy",
        default=DEFAULT_POLICY,
        help=f"scheduler policy (default: the coordinator's, {DEFAULT_POLICY})",
    )
    p.add_argument("--out", help="result JSON (default bench/out/sim-<profile>.json)")
    p.add_argument("--compare", metavar="LAB.json", help="a lab result to compare with")
    p.add_argument("--lab-system", default="rbd", help="the system of LAB.json to compare with")
    p.add_argument("--layers", help="layer sizes in bytes, comma-separated, image order")
    p.add_argument(
        "--chunk-kib", type=int, help="rbd's chunk size instead of the profile's (KiB, >= 64)"
    )
    d = Overheads()
    p.add_argument("--efficiency", type=float, default=d.efficiency, help="goodput/line rate")
    lab_or = "default: the --compare lab run's measure (bench/lab/transfer_costs.py), else"
    p.add_argument("--assign-ms", type=float, help=f"{lab_or} {d.assign_s * 1e3:g}")
    p.add_argument("--connect-ms", type=float, help=f"{lab_or} {d.connect_s * 1e3:g}")
    p.add_argument("--channel-ms", type=float, help=f"default {d.channel_s * 1e3:g}")
    p.add_argument("--finish-ms", type=float, help=f"{lab_or} {d.finish_s * 1e3:g}")
    p.add_argument("--verify-mbyte-s", type=float, default=d.verify_Bps / 1e6)
    p.add_argument("--relay-hop-ms", type=float, default=d.relay_hop_s * 1e3)
    p.add_argument(
        "--coordinator-ms",
        type=float,
        default=d.coordinator_s * 1e3,
        help="the coordinator's CPU per done report (0: an ideal coordinator)",
    )
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND:NODE@T",
        help="inject a fault (repeatable): dies:NODE@T (or seeder-dies), unreachable:NODE@T, "
        "corrupt:SEEDER->DEMANDER@T (DEMANDER * for anyone), blip:NODE@T; bench/sim/faults.py",
    )
    return p


def fault_summary(faults: Sequence[Fault], result: SimResult) -> str:
    """What the faults did: the reports the driver got, who died, who failed and why."""
    lines = ["faults: " + ", ".join(f.spec() for f in faults)]
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(result.failures.items())) or "none"
    lines.append(f"  failure reports: {kinds}")
    lines.append(f"  seeders made suspect {result.suspected} times; {result.adopted} adopted back")
    if result.dead:
        lines.append("  dead (not waited for): " + ", ".join(sorted(result.dead)))
    if result.quarantined:
        lines.append("  quarantined (out of the job): " + ", ".join(sorted(result.quarantined)))
    for node, why in sorted(result.failed.items()):
        lines.append(f"  FAILED {node}: {why}")
    return "\n".join(lines)


def _profile_name(given: str | None, lab: dict[str, Any] | None) -> str:
    """The profile to simulate: ``given``, else the lab run's, else ``paper``.

    A lab run names its profile (``paper-x0.25`` at a quarter of the rates:
    the scale is read apart); comparing it with another profile's simulation
    would compare two clusters, so a ``given`` profile that is not the run's
    is refused.
    """
    ran = ""
    if lab is not None:
        suffix = scale_suffix(float(lab.get("rate_scale", 1.0)))
        ran = str(lab.get("profile", "")).removesuffix(suffix)
    if given is None:
        return ran or "paper"
    if ran and Path(given).stem != ran:
        raise ValueError(
            f"the lab run is of profile {ran!r}, not {given!r}: leave --profile out to "
            "simulate the run's own"
        )
    return given


def _profile(name: str, nodes: int | None) -> ClusterProfile:
    path = Path(name)
    if not name.endswith(".toml"):
        path = PROFILES / f"{name}.toml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.toml")))
            raise ProfileError(f"no profile {name!r} in {PROFILES} (known: {known})")
    profile = load_profile(path)
    return profile.scaled(nodes) if nodes else profile


def lab_costs(lab: dict[str, Any], system: str) -> dict[str, float]:
    """The per-transfer costs ``system``'s lab run measured (seconds, by Overheads field).

    Empty when the run did not measure them (its processes logged below info
    level, or it predates bench/lab/transfer_costs.py). Only finite, non-negative
    numbers are taken: the file is read, not trusted.
    """
    notes = lab.get("systems", {}).get(system, {}).get("notes", {})
    costs = notes.get("transfer_costs") if isinstance(notes, dict) else None
    if not isinstance(costs, dict):
        return {}
    out = {}
    for name in ("assign_s", "connect_s", "finish_s"):
        v = costs.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf"):
            out[name] = float(v)
    return out


def _read_json(path: str) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    if not isinstance(doc, dict) or "systems" not in doc:
        raise ValueError(f"{path} is not a lab result (no 'systems')")
    return doc


if __name__ == "__main__":
    sys.exit(main())
