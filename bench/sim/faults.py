"""Faults a simulated run injects: a small schedule, parsed from ``--fault`` specs.

Why: the simulator drives the scheduler through the job driver
(rainbowd.core.sched.jobdriver) as the coordinator does, so a fault here becomes the
report the coordinator would get -- an ``io`` failure from a dead seeder, an
``unreachable`` one, bad chunks, a relay whose upstream broke -- and takes the
same path (suspect, avoid, failure budgets, adoption). The faults:

=============================  ===========================================================
``dies:NODE@T``                the node's agent dies (kill -9): its flows stop, demanders
(also ``seeder-dies``)         pulling from it see the connection close and report ``io``;
                               the coordinator marks it down at once if it was demanding
                               (its long-poll drops), else after ``MISSED_HEARTBEATS``
``unreachable:NODE@T``         from T no new connection to NODE succeeds (its SSH port is
                               closed; it still heartbeats and pulls): each transfer from
                               it that starts fails ``unreachable`` after the puller's
                               connect timeout
``corrupt:SEEDER->DEMANDER@T`` from T, chunks SEEDER sends DEMANDER (``*``: anyone) fail
                               verification: the first one ends the transfer (``verify``,
                               a seeder fault); the coordinator's evidence rule penalizes
                               SEEDER on a second demander's word and quarantines it on
                               ``SEEDER_FAULT_LIMIT`` demanders' (coordinator/evidence.py)
``blip:NODE@T``                the coordinator loses NODE's long-poll (marks it down) while
                               its agent keeps pulling; its next heartbeat brings it back
                               and its transfers are adopted again
=============================  ===========================================================

A transfer relaying what a failed transfer was bringing (cut-through relay)
fails with ``relay`` when its upstream does (the relay answers "unavailable"
at once, agent/dataplane/relay.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from rainbowd.coordinator.evidence import PeerEvidence

#: the fault kinds a spec may name (``seeder-dies`` is another name for ``dies``)
KINDS = ("dies", "unreachable", "corrupt", "blip")
_ALIASES = {"seeder-dies": "dies"}
#: KIND:NODE@T or corrupt:SEEDER->DEMANDER@T (T in seconds of simulated time)
_SPEC = re.compile(
    r"^(?P<kind>[a-z-]+):(?P<node>[^@>\s-][^@\s]*?)(->(?P<peer>[^@\s]+))?@(?P<at>[0-9.]+)$"
)
#: a demander reading from a seeder whose process died sees its connection close at once
DEAD_PEER_NOTICE_S = 0.0
#: a connection to a node that accepts none fails after the puller's connect timeout
#: (agent/dataplane/puller.py, ``connect_timeout``)
CONNECT_TIMEOUT_S = 10.0
#: a relay whose own pull ended answers "unavailable" at once (agent/dataplane/relay.py)
RELAY_NOTICE_S = 0.0
#: any demander, in ``corrupt:SEEDER->*``
ANYONE = "*"


@dataclass(frozen=True)
class Fault:
    """One fault: ``kind`` hits ``node`` (and ``peer``, for ``corrupt``) at ``at`` seconds."""

    kind: str
    node: str
    at: float
    peer: str = ""

    def spec(self) -> str:
        """The fault as it is written on the command line."""
        target = f"{self.node}->{self.peer}" if self.peer else self.node
        return f"{self.kind}:{target}@{self.at:g}"


def parse_fault(spec: str) -> Fault:
    """``dies:n007@12.5`` -> a :class:`Fault`; ValueError naming what is wrong."""
    m = _SPEC.match(spec.strip())
    if m is None:
        raise ValueError(
            f"fault {spec!r}: expected KIND:NODE@T or corrupt:SEEDER->DEMANDER@T "
            f"(kinds: {', '.join(KINDS)}, seeder-dies)"
        )
    kind = _ALIASES.get(m["kind"], m["kind"])
    if kind not in KINDS:
        raise ValueError(f"fault {spec!r}: unknown kind {m['kind']!r} (kinds: {', '.join(KINDS)})")
    peer = m["peer"] or ""
    if kind == "corrupt" and not peer:
        raise ValueError(f"fault {spec!r}: corrupt needs SEEDER->DEMANDER (DEMANDER * for anyone)")
    if kind != "corrupt" and peer:
        raise ValueError(f"fault {spec!r}: only corrupt names a pair")
    return Fault(kind, m["node"], float(m["at"]), peer)


def check_nodes(faults: list[Fault], nodes: set[str]) -> None:
    """Every node a fault names is in the run; ValueError otherwise."""
    for f in faults:
        for name in (f.node, f.peer):
            if name and name != ANYONE and name not in nodes:
                raise ValueError(f"fault {f.spec()}: no node {name!r} in this run")


class FaultState:
    """Which faults are in force at the current simulated time (the engine applies them)."""

    def __init__(self) -> None:
        self.dead: set[str] = set()
        self.closed: set[str] = set()  # nodes accepting no connection (unreachable)
        self.corrupt: set[tuple[str, str]] = set()  # (seeder, demander or ANYONE)
        self.phases: dict[str, float] = {}  # node -> its heartbeats' phase (share of an interval)
        self.quarantined: set[str] = set()  # out: the coordinator's evidence rule put it out
        #: which demanders reported bad chunks of which seeder (the coordinator's own rule)
        self.evidence = PeerEvidence()

    def gone(self, node: str) -> bool:
        """The node is out of the run for good (dead, or quarantined)."""
        return node in self.dead or node in self.quarantined

    def phase(self, nodes: list[str]) -> None:
        """Spread the nodes' heartbeats over the interval: node i of n beats at (i/n + k) I."""
        self.phases = {name: i / len(nodes) for i, name in enumerate(nodes)}

    def next_beat(self, node: str, now: float, interval: float) -> float:
        """The first heartbeat of ``node`` after ``now``."""
        phase = self.phases[node] * interval
        return phase + (math.floor((now - phase) / interval) + 1) * interval

    def refuses(self, seeder: str) -> bool:
        """A new connection to ``seeder`` fails (it is dead or unreachable)."""
        return seeder in self.closed or self.gone(seeder)

    def corrupts(self, seeder: str, demander: str) -> bool:
        """Chunks from ``seeder`` to ``demander`` fail verification."""
        return (seeder, demander) in self.corrupt or (seeder, ANYONE) in self.corrupt
