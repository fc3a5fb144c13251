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
  re-computed when any flow starts or ends, for the flows that change can move);
* after its last byte and the finish delay the coordinator learns of it:
  ``complete(tid, now, bytes)`` (so the seeder's measured speed is bytes
  over the time since the decision, delays included, as in the real
  coordinator), then ``schedule(now)`` again.

Cut-through relay (policy ``relay``): a transfer whose seeder does not hold
the layer yet is *downstream* of the transfer bringing the layer to that
seeder. Its bytes can never overtake the relay's, so while the upstream flow
runs, the downstream flow carries a cap of its own equal to the upstream's
current rate (a tiny one while the upstream is still in its setup delay);
caps follow rate changes down a chain of relays, and drop when the upstream's
last byte arrived. Starting behind and never faster, a downstream flow stays
behind (conservative: in the agent a demander that starts behind may catch up
on the chunks the relay already has). A relay forwards only whole verified
chunks, so a downstream flow's first byte comes no sooner than its upstream's
first byte plus one hop: a chunk's wire time on the link into the relay plus the
``relay_hop_s`` overhead. Down a chain the hops add up, which is what makes
long relay chains slow in the lab.

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

from rainbowd.core.sched.pieces import PieceScheduler
from rainbowd.core.sched.scheduler import Scheduler, Transfer
from rainbowd.devcluster.profile import ClusterProfile

from .flows import FlowNetwork
from .overheads import Overheads

#: a relayed flow's cap is only moved when it changes by more than this share of itself
#: (rates and caps can chase each other round a cycle of relays; this ends the chase)
_CAP_EPSILON = 1e-3

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
    cap: float | None = None  # its own rate cap while its relay's upstream still runs
    first_byte_at: float = 0.0  # when its first byte is (or was) due on the wire


@dataclass
class SimResult:
    """What one run produced: per-node completion times and the simulator's own cost."""

    policy: str
    #: demander -> seconds from the job's start until it held every layer
    node_seconds: dict[str, float] = field(default_factory=dict)
    #: demander -> why it never held every layer
    failed: dict[str, str] = field(default_factory=dict)
    #: seeder -> bytes it sent in transfers that completed (the origin's: bench/measures.py)
    sent_bytes: dict[str, int] = field(default_factory=dict)
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
        scheduler: Scheduler | PieceScheduler | None = None,
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
        if isinstance(scheduler, Scheduler):
            scheduler = PieceScheduler.around(scheduler)
        self.scheduler = scheduler or PieceScheduler(policy)
        self.network = FlowNetwork(incremental=True)
        self.result = SimResult(self.scheduler.policy)
        self._events: list[tuple[float, int, int, str, int]] = []
        self._seq = itertools.count()
        self._running: dict[str, _Running] = {}
        self._connected: set[tuple[str, str]] = set()  # (demander, seeder) with an SSH connection
        self._held: dict[str, int] = {}  # demander -> layers held
        self._upstream: dict[str, str] = {}  # relayed transfer -> the transfer feeding its seeder
        self._downstream: dict[str, set[str]] = {}  # transfer -> transfers it feeds (relay)
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
            self.scheduler.set_layer_size(layer, size, self.profile.chunk_size)
        self.scheduler.add_node(origin.name, origin.up_Bps, names)
        for n in self.profile.nodes:
            self.scheduler.add_node(n.name, n.up_Bps, download_bps=n.down_Bps)
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
            size = self.scheduler.piece_of(t).size
            start = now + self.overheads.setup(new)
            if not self.scheduler.holds_piece(t.seeder, t):
                up = self.scheduler.receiving_piece(t.seeder, t)
                if up is None or up.transfer_id not in self._running:
                    raise RuntimeError(f"{t.transfer_id}: {t.seeder} neither holds nor receives")
                u = self._running[up.transfer_id]
                if u.flowing or u.remaining > 0:  # else: every byte is in, only its report is due
                    self._upstream[t.transfer_id] = up.transfer_id
                    self._downstream.setdefault(up.transfer_id, set()).add(t.transfer_id)
                    start = max(start, u.first_byte_at + self._hop(t, u.transfer))
            self._running[t.transfer_id] = _Running(t, size, float(size), first_byte_at=start)
            self.result.transfers += 1
            self._push(start, _START, t.transfer_id)

    def _hop(self, t: Transfer, upstream: Transfer) -> float:
        """How far a relayed flow's first byte trails its upstream's (module docstring).

        A chunk's time on the link bringing it *into* the relay, plus the hop's
        fixed cost: the relay forwards the chunk once it has all of it.
        """
        link = min(self.network.up_Bps(upstream.seeder), self.network.down_Bps(t.seeder))
        piece = self.scheduler.piece_of(t).size
        return min(self.profile.chunk_size, piece) / link + self.overheads.relay_hop_s

    def _start(self, tid: str, now: float) -> None:
        r = self._running[tid]
        r.since, r.flowing = now, True
        r.cap = self._cap_for(tid)
        t = r.transfer
        self._rates(self.network.add(tid, t.seeder, t.demander, r.cap), now)

    def _end(self, tid: str, now: float) -> None:
        r = self._running[tid]
        up = self._upstream.get(tid)
        if up is not None:
            u = self._running[up]
            behind = u.remaining - u.rate * (now - u.since)
            if behind > 1.0:  # the model's invariant: a relayed flow never overtakes
                raise RuntimeError(f"{tid} ended {behind:.0f} B ahead of its relay's upstream {up}")
        r.flowing = False
        r.remaining = 0.0
        self._rates(self.network.remove(tid), now)
        for d in sorted(self._downstream.pop(tid, ())):
            self._upstream.pop(d, None)
            self._recap(d, now)  # the relay has every byte now: no cap
        self._push(now + self.overheads.finish(r.size), _DONE, tid)

    def _cap_for(self, tid: str) -> float | None:
        """A relayed flow's cap: its upstream's rate while that runs (module docstring)."""
        up = self._upstream.get(tid)
        if up is None:
            return None
        u = self._running[up]
        return max(u.rate, 1.0) if u.flowing else 1.0

    def _recap(self, tid: str, now: float) -> None:
        """Give a running relayed flow its current cap (re-filling its component).

        Caps and rates can chase each other round a cycle (a relay's upload shared
        with the flow that feeds another relay of it): a cap moving by less than
        ``_CAP_EPSILON`` of itself is left as it is, so the chase ends; the chase
        runs as a work list, not as recursion, so a long relay chain cannot
        overflow the stack.
        """
        work = [tid]
        while work:
            fid = work.pop()
            r = self._running.get(fid)
            if r is None or not r.flowing:
                continue
            cap = self._cap_for(fid)
            if cap == r.cap or (
                cap is not None
                and r.cap is not None
                and abs(cap - r.cap) <= _CAP_EPSILON * max(cap, r.cap)
            ):
                continue
            r.cap = cap
            t = r.transfer
            rates = self.network.remove(fid)
            rates.update(self.network.add(fid, t.seeder, t.demander, cap))
            for moved in self._settle(rates, now):
                work.extend(sorted(self._downstream.get(moved, ())))

    def _done(self, tid: str, now: float) -> None:
        r = self._running.pop(tid)
        t = self.scheduler.complete(tid, now, r.size)
        self.result.sent_bytes[t.seeder] = self.result.sent_bytes.get(t.seeder, 0) + r.size
        if self.scheduler.holds(t.demander, t.layer):
            self._held[t.demander] += 1
        if self._held[t.demander] == len(self.layers):
            self.result.node_seconds[t.demander] = now
        self._dispatch(now)

    def _rates(self, rates: dict[str, float], now: float) -> None:
        """New rates for flows of a re-filled component: settle bytes, re-predict their end.

        Flows fed by one whose rate moved get their caps moved too (relay chains).
        """
        for fid in self._settle(rates, now):
            for d in sorted(self._downstream.get(fid, ())):
                self._recap(d, now)

    def _settle(self, rates: dict[str, float], now: float) -> list[str]:
        """Apply new rates; returns the flows whose rate moved and that feed relayed flows."""
        moved: list[str] = []
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
            if fid in self._downstream:
                moved.append(fid)
        return moved
