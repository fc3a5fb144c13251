"""``relay_hop_s`` measured from a lab run's transfer timeline.

A cut-through relay forwards a chunk once it holds all of it, so in a chain
of nodes with equal links each node finishes a layer one hop after the node
it pulls from: the chunk's time on the link into the relay (which the model
charges exactly) plus the relay's own cost of waking, checking and serving
the chunk and the demander's of checking and writing it (``relay_hop_s``).

Only hops where that difference is the hop alone are counted:

* the demander was assigned while its seeder was still receiving the same
  layer (a relayed transfer, not one from a complete copy);
* both transfers were assigned in the layer's first planning round (within
  ``round_s`` of its first assignment), so they ran side by side from the
  start, neither waiting for a seeder freed later;
* seeder and demander have the same download rate (a faster demander would
  wait on the relay, a slower one would finish late for its own link's sake);
* the layer has more than one chunk (one-chunk layers are never relayed).

In the lab's ``paper`` profile these are the first-round chains through the
fast nodes. The lab report's ``timeline`` note (bench/lab/rbd_system.py)
gives, per transfer, its layer, seeder, demander and the seconds from the
job's start at which it was assigned and done.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from rainbowd.devcluster.profile import ClusterProfile

from .overheads import Overheads


def relay_hop_overheads(
    timeline: Sequence[Mapping[str, Any]],
    profile: ClusterProfile,
    efficiency: float,
    *,
    round_s: float = 0.5,
) -> list[float]:
    """Per qualifying hop: its finish lag minus the chunk's time on the link into the relay."""
    rate = {n.name: n.down_Bps for n in profile.all_nodes}
    by_demander: dict[tuple[str, str], Mapping[str, Any]] = {}
    first: dict[str, float] = {}
    for t in timeline:
        if t.get("assigned") is None or t.get("done") is None:
            continue
        by_demander[(t["layer"], t["demander"])] = t
        first[t["layer"]] = min(first.get(t["layer"], t["assigned"]), t["assigned"])
    out: list[float] = []
    for (layer, demander), t in by_demander.items():
        up = by_demander.get((layer, t["seeder"]))
        if up is None or t["bytes"] <= profile.chunk_size:
            continue
        relayed = t["assigned"] < up["done"]
        first_round = max(t["assigned"], up["assigned"]) - first[layer] <= round_s
        r_in = rate.get(t["seeder"])
        if not (relayed and first_round) or r_in is None or rate.get(demander) != r_in:
            continue
        wire = min(profile.chunk_size, t["bytes"]) / (r_in * efficiency)
        out.append(t["done"] - up["done"] - wire)
    return sorted(out)


def hop_report(
    lab: Mapping[str, Any], lab_system: str, profile: ClusterProfile, overheads: Overheads
) -> str:
    """One line: the measured per-hop overhead of ``lab_system`` next to the model's."""
    timeline = ((lab.get("systems") or {}).get(lab_system) or {}).get("notes", {}).get("timeline")
    if not timeline:
        return f"relay hops: {lab_system} has no transfer timeline in the lab result"
    hops = relay_hop_overheads(timeline, profile, overheads.efficiency)
    if not hops:
        return f"relay hops: no first-round relay hop between equal links in {lab_system}'s run"
    q = statistics.quantiles(hops, n=4) if len(hops) > 1 else [hops[0]] * 3
    return (
        f"relay hops ({len(hops)} first-round hops between equal links): overhead beyond "
        f"the chunk's wire time median {statistics.median(hops) * 1e3:.0f} ms "
        f"(quartiles {q[0] * 1e3:.0f}..{q[2] * 1e3:.0f} ms); "
        f"model relay_hop_s {overheads.relay_hop_s * 1e3:.0f} ms"
    )
