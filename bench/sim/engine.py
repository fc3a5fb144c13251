"""The discrete-event loop: the real Scheduler driving transfers over a fluid network.

One run distributes one image from the profile's origin to every demander,
feeding :class:`rainbowd.scheduler.Scheduler` exactly as the coordinator
does (coordinator/core.py):

* every node is added with its speed hint -- the profile's upload rate, as
  the lab configures each agent's ``speed_hint_mbps`` -- the origin holding
  every layer;
* at t = 0 the job demands, node by node in id order (the coordinator's
  targets ``["all"]``), every layer in image order, then asks for a schedule;
* each transfer the scheduler starts waits for its setup delay, then runs as
  a flow in :class:`~bench.sim.flows.FlowNetwork` (rates max-min fair,
  re-computed when any flow starts or ends);
* after its last byte and the finish delay the coordinator learns of it:
  ``complete(tid, now, bytes)`` (so the seeder's measured speed is bytes
  over the time since the decision, delays included, as in the real
  coordinator), then ``schedule(now)`` again.

Events are kept in one heap; a flow's end is re-predicted only when its rate
changes (older predictions are skipped by version), so an event costs about
the size of the flow component it touches, not the number of flows.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from rainbowd.profile import ClusterProfile
from rainbowd.scheduler import Scheduler, Transfer

from .flows import FlowNetwork
from .overheads import Overheads

# event kinds (events at the same instant are handled in the order they were queued)
_START, _END, _DONE = 0, 1, 2


@dataclass
class _Running:
    """A transfer the simulator is moving: bytes left as of ``since`` at ``rate``."""

    transfer: Transfer
    size: int
    remaining: float
    rate: float = 0.0
    since: float = 0.0
    version: int = 0
    flowing: bool = False


@dataclass
class SimResult:
    """What one run produced: per-node completion times and the simulator's own cost."""

    policy: str
    #: demander -> seconds from the job's start until it held every layer
    node_seconds: dict[str, float] = field(default_factory=dict)
    #: demander -> why it never held every layer
    failed: dict[str, str] = field(default_factory=dict)
    transfers: int = 0
    new_connections: int = 0
    events: int = 0
    wall_seconds: float = 0.0

    @property
    def total(self) -> float:
        """Seconds until every demander held the image (inf if one never did)."""
        if self.failed or not self.node_seconds:
            return float("inf")
        return max(self.node_seconds.values())

    @property
    def speedup(self) -> float:
        """Simulated seconds per wall-clock second."""
        return self.total / self.wall_seconds if self.wall_seconds > 0 else float("inf")


class Simulation:
    """One distribution of ``layers`` over ``profile``; call :meth:`run` once."""

    def __init__(
        self,
        profile: ClusterProfile,
        layers: Sequence[tuple[str, int]],
        overheads: Overheads | None = None,
        *,
        policy: str = "paper",
        scheduler: Scheduler | None = None,
    ) -> None:
        """``scheduler`` (default: a new ``Scheduler(policy)``) must be fresh; the run adds nodes.

        Passing one lets a test or an experiment drive a variant (a subclass
        that starts several flows per node, say) through the same loop.
        """
        if not layers:
            raise ValueError("an image needs at least one layer")
        if len({name for name, _ in layers}) != len(layers):
            raise ValueError("layer names must be distinct")
        self.profile = profile
        self.layers = list(layers)
        self.sizes = dict(layers)
        self.overheads = overheads or Overheads()
        self.scheduler = scheduler or Scheduler(policy)
        self.network = FlowNetwork()
        self.result = SimResult(self.scheduler.policy)
        self._events: list[tuple[float, int, int, str, int]] = []
        self._seq = itertools.count()
        self._running: dict[str, _Running] = {}
        self._connected: set[tuple[str, str]] = set()  # (demander, seeder) with an SSH connection
        self._held: dict[str, int] = {}  # demander -> layers held
        self._ran = False

    def run(self) -> SimResult:
        if self._ran:
            raise RuntimeError("a Simulation runs once; make a new one")
        self._ran = True
        wall = time.perf_counter()
        eff = self.overheads.efficiency
        origin = self.profile.origin
        names = [layer for layer, _ in self.layers]
        for n in self.profile.all_nodes:
            self.network.add_node(n.name, n.up_Bps * eff, n.down_Bps * eff)
        for layer, size in self.layers:
            self.scheduler.set_layer_size(layer, size)
        self.scheduler.add_node(origin.name, origin.up_Bps, names)
        for n in self.profile.nodes:
            self.scheduler.add_node(n.name, n.up_Bps)
        for n in sorted(self.profile.nodes, key=lambda n: n.name):
            self._held[n.name] = 0
            for layer in names:
                self.scheduler.demand(n.name, layer, "sim", 0.0)
        self._dispatch(0.0)
        events = 0
        while self._events:
            now, _, kind, tid, version = heapq.heappop(self._events)
            events += 1
            if kind == _START:
                self._start(tid, now)
            elif kind == _END:
                r = self._running.get(tid)
                if r is not None and r.version == version:  # else re-predicted since
                    self._end(tid, now)
            else:
                self._done(tid, now)
        for n in self.profile.nodes:
            if n.name not in self.result.node_seconds:
                self.result.failed[n.name] = (
                    f"held {self._held[n.name]} of {len(names)} layers when nothing was left to do"
                )
        self.result.events = events
        self.result.wall_seconds = time.perf_counter() - wall
        return self.result

    # -- events ----------------------------------------------------------
    def _push(self, at: float, kind: int, tid: str, version: int = 0) -> None:
        heapq.heappush(self._events, (at, next(self._seq), kind, tid, version))

    def _dispatch(self, now: float) -> None:
        """Ask the scheduler for transfers; each starts after its setup delay."""
        for t in self.scheduler.schedule(now):
            pair = (t.demander, t.seeder)
            new = pair not in self._connected
            if new:
                self._connected.add(pair)
                self.result.new_connections += 1
            size = self.sizes[t.layer]
            self._running[t.transfer_id] = _Running(t, size, float(size))
            self.result.transfers += 1
            self._push(now + self.overheads.setup(new), _START, t.transfer_id)

    def _start(self, tid: str, now: float) -> None:
        r = self._running[tid]
        r.since, r.flowing = now, True
        self._rates(self.network.add(tid, r.transfer.seeder, r.transfer.demander), now)

    def _end(self, tid: str, now: float) -> None:
        r = self._running[tid]
        r.flowing = False
        self._rates(self.network.remove(tid), now)
        self._push(now + self.overheads.finish(r.size), _DONE, tid)

    def _done(self, tid: str, now: float) -> None:
        r = self._running.pop(tid)
        t = self.scheduler.complete(tid, now, r.size)
        self._held[t.demander] += 1
        if self._held[t.demander] == len(self.layers):
            self.result.node_seconds[t.demander] = now
        self._dispatch(now)

    def _rates(self, rates: dict[str, float], now: float) -> None:
        """New rates for flows of a re-filled component: settle bytes, re-predict their end."""
        for fid, rate in rates.items():
            r = self._running[fid]
            r.remaining = max(0.0, r.remaining - r.rate * (now - r.since))
            r.since = now
            if rate == r.rate and r.version:
                continue  # unchanged: its predicted end still holds
            r.rate = rate
            r.version += 1
            if rate > 0:  # a starved flow waits for the next re-fill
                self._push(now + r.remaining / rate, _END, fid, r.version)
