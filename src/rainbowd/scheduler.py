"""The scheduler: turns demands (node needs layer) into transfers (seeder -> demander).

Pure code, in the sans-IO style: no sockets, no clock, no tasks. The
coordinator feeds it events (a node came up, a layer is held, a transfer
finished) with the current time passed in, and asks :meth:`Scheduler.schedule`
for new transfers. Unit tests and the simulator drive this same class.

Policy ``paper`` is Algorithm 1 of RainbowD applied per layer:

* idle seeders are kept in a heap ordered by measured performance (the speed
  of their last upload; faster first);
* the best idle seeder is taken first and given to the demander that has
  waited longest among those needing a layer this seeder holds;
* a seeder serves one transfer at a time and a demander receives one at a time
  (a node may send one layer while it receives another: upload and download
  are separate links);
* when a transfer completes, the demander holds the layer and so becomes a
  seeder of it; demanders without an idle seeder wait until one frees up.

Every transfer records why its seeder was chosen (``reason``) so ``rbd job``
can explain the plan.

Faults (PAPER.md, "Fault handling"): a node that is down or *suspect* (a
demander could not reach it; cleared by its next heartbeat, i.e. the next
:meth:`Scheduler.add_node`) is given no new work. A demander can be kept away
from one seeder for a while (:meth:`Scheduler.avoid`) and a seeder that sent
bad bytes is slowed down in the ranking (:meth:`Scheduler.penalize`). After a
coordinator restart the transfers agents are still running are taken back
with :meth:`Scheduler.adopt`, so no demander is handed a second transfer of a
layer it is already pulling.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

#: speed assumed for a node nothing is known about (bytes/s); 100 Mbit/s
DEFAULT_SPEED_BPS = 12.5e6

POLICIES = ("paper",)


class SchedulerError(ValueError):
    """An event that contradicts the scheduler's state (unknown id, say)."""


@dataclass
class Transfer:
    """One layer moving from ``seeder`` to ``demander``."""

    transfer_id: str
    layer: str
    seeder: str
    demander: str
    job_id: str
    started_at: float
    reason: str
    seeder_speed_bps: float


@dataclass
class _Node:
    node_id: str
    speed_bps: float
    up: bool = True
    suspect: bool = False  # unreachable for a demander; no new work until it reports
    holdings: set[str] = field(default_factory=set)
    sending: str | None = None  # transfer id while seeding
    receiving: str | None = None  # transfer id while demanding


@dataclass
class _Demand:
    node_id: str
    layer: str
    job_id: str
    since: float
    seq: int


class Scheduler:
    """Seeder/demander matching for one cluster. See the module docstring."""

    def __init__(
        self,
        policy: str = "paper",
        *,
        default_speed_bps: float = DEFAULT_SPEED_BPS,
        new_id: Callable[[], str] | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise SchedulerError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
        self.policy = policy
        self.default_speed_bps = default_speed_bps
        counter = itertools.count(1)
        self._new_id = new_id or (lambda: f"t{next(counter)}")
        self._seq = itertools.count()
        self._nodes: dict[str, _Node] = {}
        # (node, layer) -> demand, insertion-ordered per node = image layer order
        self._demands: dict[tuple[str, str], _Demand] = {}
        self._active: dict[str, Transfer] = {}
        # (demander, seeder) -> time until which that seeder is not used for that demander
        self._avoid: dict[tuple[str, str], float] = {}

    # -- nodes -----------------------------------------------------------
    def add_node(self, node_id: str, speed_bps: float = 0.0, holdings: Iterable[str] = ()) -> None:
        """Add (or bring back up) a node; its holdings make it a seeder."""
        node = self._nodes.get(node_id)
        if node is None:
            node = _Node(node_id, speed_bps or self.default_speed_bps)
            self._nodes[node_id] = node
        node.up = True
        node.suspect = False
        for layer in holdings:
            self.add_holding(node_id, layer)

    def node_down(self, node_id: str) -> list[Transfer]:
        """A node is gone: it gets no new work; the transfers that cannot go on are returned.

        Aborted (and returned) are the transfers it was receiving, and those it
        was seeding to a demander that is down as well. A transfer it was
        seeding to a live demander stays active: that demander's pull fails
        by itself (the connection is gone) and its report -- or its next
        heartbeat no longer listing the transfer -- ends it. Ending it here
        would free the demand while the demander may still be pulling the
        layer, and the next seeder would send the same layer a second time.
        Its own demands stay and wait for its return.
        """
        node = self._node(node_id)
        node.up = False
        aborted = [
            t
            for t in self._active.values()
            if t.demander == node_id or (t.seeder == node_id and not self._nodes[t.demander].up)
        ]
        for t in aborted:
            self._release(t)
        return aborted

    def suspect(self, node_id: str) -> None:
        """A demander could not reach ``node_id``: no new work for it until :meth:`add_node`.

        Its running transfers are left alone (it may be alive and serving
        others); it just stops being chosen, so a dead seeder is not picked
        again in the seconds before its missed heartbeats mark it down.
        """
        self._node(node_id).suspect = True

    def is_suspect(self, node_id: str) -> bool:
        return self._node(node_id).suspect

    def avoid(self, demander: str, seeder: str, until: float) -> None:
        """Do not pair ``demander`` with ``seeder`` before ``until`` (a failed pair)."""
        key = (demander, seeder)
        self._avoid[key] = max(until, self._avoid.get(key, 0.0))

    def penalize(self, node_id: str, factor: float = 0.5) -> float:
        """Scale a seeder's performance down (it sent bad bytes); returns the new speed."""
        node = self._node(node_id)
        node.speed_bps = max(1.0, node.speed_bps * factor)
        return node.speed_bps

    def observe_speed(self, node_id: str, bytes_per_second: float) -> None:
        """Measured upload performance of a node (its last distribution)."""
        if bytes_per_second > 0:
            self._node(node_id).speed_bps = bytes_per_second

    def speed(self, node_id: str) -> float:
        return self._node(node_id).speed_bps

    def add_holding(self, node_id: str, layer: str) -> None:
        node = self._node(node_id)
        node.holdings.add(layer)
        self._demands.pop((node_id, layer), None)

    def remove_holding(self, node_id: str, layer: str) -> None:
        """``node_id`` no longer holds ``layer`` (an admin removed it): not a seeder of it now.

        Its running transfers are left alone; the caller refuses a removal
        while the node seeds that layer.
        """
        node = self._nodes.get(node_id)
        if node is not None:
            node.holdings.discard(layer)

    def holds(self, node_id: str, layer: str) -> bool:
        return layer in self._node(node_id).holdings

    def holders(self, layer: str) -> list[str]:
        return sorted(n.node_id for n in self._nodes.values() if layer in n.holdings)

    # -- demands ---------------------------------------------------------
    def demand(self, node_id: str, layer: str, job_id: str, now: float) -> bool:
        """``node_id`` needs ``layer``; False if it holds it or already asked."""
        node = self._node(node_id)
        if layer in node.holdings or (node_id, layer) in self._demands:
            return False
        self._demands[(node_id, layer)] = _Demand(node_id, layer, job_id, now, next(self._seq))
        return True

    def cancel_demand(self, node_id: str, layer: str) -> None:
        self._demands.pop((node_id, layer), None)

    def pending(self) -> list[tuple[str, str]]:
        """(node, layer) demands not yet satisfied, in arrival order."""
        return list(self._demands)

    def active(self) -> list[Transfer]:
        return list(self._active.values())

    def is_active(self, transfer_id: str) -> bool:
        return transfer_id in self._active

    def adopt(self, t: Transfer) -> Transfer:
        """Take back a transfer that is already running (e.g. from before a restart).

        It is tracked like one :meth:`schedule` started, so its outcome is
        accepted by :meth:`complete`/:meth:`fail` and, above all, no second
        transfer of the same layer is started for its demander while it runs.
        Its nodes may be down (not heard from yet). A lock (seeder sending,
        demander receiving) already held by another transfer stays with that
        one: both run, as they do in reality.
        """
        known = self._active.get(t.transfer_id)
        if known is not None:
            return known
        seeder, demander = self._node(t.seeder), self._node(t.demander)
        if t.seeder == t.demander:
            raise SchedulerError(
                f"transfer {t.transfer_id}: seeder and demander are both {t.seeder}"
            )
        self._active[t.transfer_id] = t
        if seeder.sending is None:
            seeder.sending = t.transfer_id
        if demander.receiving is None:
            demander.receiving = t.transfer_id
        return t

    def receiving(self, node_id: str, layer: str) -> Transfer | None:
        """The active transfer bringing ``layer`` to ``node_id``, if any."""
        return next(
            (t for t in self._active.values() if t.demander == node_id and t.layer == layer), None
        )

    # -- the algorithm ---------------------------------------------------
    def schedule(self, now: float) -> list[Transfer]:
        """Start every transfer Algorithm 1 allows right now."""
        in_flight = {(t.demander, t.layer) for t in self._active.values()}
        self._avoid = {k: v for k, v in self._avoid.items() if v > now}
        wanted: dict[str, list[_Demand]] = {}
        for key, d in self._demands.items():
            if key in in_flight:
                continue
            demander = self._nodes[d.node_id]
            if demander.up and not demander.suspect and demander.receiving is None:
                wanted.setdefault(d.node_id, []).append(d)
        if not wanted:
            return []
        wanted_layers = {d.layer for ds in wanted.values() for d in ds}
        idle = [
            (-n.speed_bps, n.node_id)
            for n in self._nodes.values()
            if n.up and not n.suspect and n.sending is None and n.holdings & wanted_layers
        ]
        heapq.heapify(idle)
        # demanders compete in order of their longest-waiting demand
        order = sorted(wanted, key=lambda nid: min(d.seq for d in wanted[nid]))
        started: list[Transfer] = []
        while idle and order:
            _, seeder_id = heapq.heappop(idle)
            seeder = self._nodes[seeder_id]
            for demander_id in order:
                if demander_id == seeder_id or (demander_id, seeder_id) in self._avoid:
                    continue
                demand = next((d for d in wanted[demander_id] if d.layer in seeder.holdings), None)
                if demand is None:
                    continue
                t = self._start(seeder, demand, now, idle)
                started.append(t)
                order.remove(demander_id)
                break
        return started

    def _start(
        self, seeder: _Node, demand: _Demand, now: float, idle_left: list[tuple[float, str]]
    ) -> Transfer:
        others = sum(1 for _, nid in idle_left if demand.layer in self._nodes[nid].holdings)
        reason = (
            f"{self.policy}: fastest idle seeder holding the layer "
            f"({seeder.speed_bps / 1e6:.1f} MB/s measured; {others} slower idle holder(s) left)"
        )
        t = Transfer(
            transfer_id=self._new_id(),
            layer=demand.layer,
            seeder=seeder.node_id,
            demander=demand.node_id,
            job_id=demand.job_id,
            started_at=now,
            reason=reason,
            seeder_speed_bps=seeder.speed_bps,
        )
        seeder.sending = t.transfer_id
        self._nodes[demand.node_id].receiving = t.transfer_id
        self._active[t.transfer_id] = t
        return t

    # -- outcomes --------------------------------------------------------
    def complete(self, transfer_id: str, now: float, bytes_moved: int = 0) -> Transfer:
        """The demander verified the layer: it becomes a seeder of it."""
        t = self._take(transfer_id)
        seconds = now - t.started_at
        if bytes_moved > 0 and seconds > 0:
            self.observe_speed(t.seeder, bytes_moved / seconds)
        self.add_holding(t.demander, t.layer)
        return t

    def fail(self, transfer_id: str) -> Transfer:
        """The transfer broke: both sides are free; the demand waits for a seeder again."""
        return self._take(transfer_id)

    def _take(self, transfer_id: str) -> Transfer:
        t = self._active.get(transfer_id)
        if t is None:
            raise SchedulerError(f"no active transfer {transfer_id!r}")
        self._release(t)
        return t

    def _release(self, t: Transfer) -> None:
        self._active.pop(t.transfer_id, None)
        for nid, attr in ((t.seeder, "sending"), (t.demander, "receiving")):
            node = self._nodes.get(nid)
            if node is not None and getattr(node, attr) == t.transfer_id:
                setattr(node, attr, None)

    def _node(self, node_id: str) -> _Node:
        try:
            return self._nodes[node_id]
        except KeyError:
            raise SchedulerError(f"unknown node {node_id!r}") from None
