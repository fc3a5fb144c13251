"""The discrete-event loop: the real Scheduler driving transfers over a fluid network.

One run distributes one image from the profile's origin to every demander,
feeding :class:`rainbowd.core.sched.scheduler.Scheduler` through the coordinator's own
job driver (:class:`rainbowd.core.sched.jobdriver.JobDriver`), so jobs, reports and the
faults of bench/sim/faults.py take the coordinator's path:

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

Faults (``faults=``, bench/sim/faults.py) become the reports an agent would
send, handed to the driver after the finish delay: it fails the transfer,
makes the seeder suspect or the pair avoid each other, and the node's job
record charges its :class:`~rainbowd.core.sched.jobdriver.FailureBudget`; a node whose
budget for a layer runs out fails (``SimResult.failed``). A suspect is
schedulable again at its next heartbeat (node i's heartbeats fall at
``(i / n + k) * heartbeat_interval``). A dead node is not waited for
(``SimResult.dead``). Conservative against the agent: a failed transfer's
bytes are lost (the agent keeps its verified chunks and the next pull moves
only the rest), and a transfer that ends while the coordinator has it
dropped (``blip``) is pulled again.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from rainbowd.coordinator.cluster import MISSED_HEARTBEATS
from rainbowd.coordinator.core import SEEDER_FAULT_LIMIT
from rainbowd.core.chunks import layer_chunk_size
from rainbowd.core.sched.jobdriver import Blame, Charge, Failure, FailureBudget, JobDriver
from rainbowd.core.sched.pieces import PieceScheduler
from rainbowd.core.sched.records import Transfer
from rainbowd.core.sched.scheduler import Scheduler
from rainbowd.devcluster.profile import ClusterProfile

from .faults import (
    CONNECT_TIMEOUT_S,
    DEAD_PEER_NOTICE_S,
    RELAY_NOTICE_S,
    Fault,
    FaultState,
    check_nodes,
)
from .flows import FlowNetwork
from .overheads import Overheads

#: a relayed flow's cap is only moved when it changes by more than this share of itself
#: (rates and caps can chase each other round a cycle of relays; this ends the chase)
_CAP_EPSILON = 1e-3

# event kinds (events at the same instant are handled in the order they were queued):
# a flow starts, its last byte arrives, its done report arrives; a fault strikes, a failure
# report arrives, a node heartbeats (a suspect is cleared, a dropped node comes back), the
# coordinator marks a silent node down, a scheduler pass (a heartbeat of any node: one
# after a failed pair's avoid time ends, when the pair may be planned again)
_START, _END, _DONE, _FAULT, _FAILED, _HEARTBEAT, _DOWN, _PASS, _REPORTED = range(9)


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
    failing: Failure | None = None  # it failed; its report is on its way
    notice_at: float = 0.0  # when its demander noticed the failure
    started: float = -1.0  # when its flow started (-1: never)
    upstream: str = ""  # the transfer feeding its relay when it was planned ("": none)
    assigned_at: float = 0.0  # when its assignment reached the demander
    pulled_at: float = 0.0  # when the demander had it verified (its last byte, checked)


@dataclass(frozen=True)
class Traced:
    """One transfer's course, kept when a run is traced (tests pick their fault targets)."""

    transfer_id: str
    seeder: str
    demander: str
    layer: str
    started: float  # its flow's start (-1: it never flowed)
    ended: float  # when its done or failure report reached the driver
    outcome: str  # "done", a failure kind, or "dropped" (done while the scheduler had dropped it)
    upstream: str  # the transfer feeding its relay ("": it read a held piece)
    #: bytes it moves (its piece: ``layer`` names the whole layer), so a trace gives each
    #: link's use over time -- bytes / (ended - started) is its mean rate, report included
    size: int


def _traced(r: _Running, now: float, outcome: str) -> Traced:
    t = r.transfer
    return Traced(
        t.transfer_id, t.seeder, t.demander, t.layer, r.started, now, outcome, r.upstream, r.size
    )


@dataclass
class SimResult:
    """What one run produced: per-node completion times and the simulator's own cost."""

    policy: str
    #: demander -> seconds from the job's start until it held every layer
    node_seconds: dict[str, float] = field(default_factory=dict)
    #: demander -> why it never held every layer
    failed: dict[str, str] = field(default_factory=dict)
    #: node -> when it died (a ``dies`` fault): not waited for, neither done nor failed
    dead: dict[str, float] = field(default_factory=dict)
    #: node -> when bad-chunk reports of several demanders quarantined it: out, as the dead
    quarantined: dict[str, float] = field(default_factory=dict)
    #: failure reports the driver got, by kind (faults only; none in a fault-free run)
    failures: dict[str, int] = field(default_factory=dict)
    #: times a failure made its seeder suspect
    suspected: int = 0
    #: transfers the scheduler had dropped that a heartbeat gave back to it (``blip``)
    adopted: int = 0
    #: every transfer's course, when the run is traced (``Simulation(trace=True)``)
    trace: list[Traced] = field(default_factory=list)
    #: seeder -> bytes it sent in transfers that completed (the origin's: bench/measures.py)
    sent_bytes: dict[str, int] = field(default_factory=dict)
    transfers: int = 0
    #: done reports that reached the coordinator
    reports: int = 0
    new_connections: int = 0
    #: seconds of coordinator CPU the done reports took (``Overheads.coordinator_s`` each)
    coordinator_busy_s: float = 0.0
    #: the longest a done report waited for the coordinator to be free
    report_wait_max_s: float = 0.0
    #: CPU seconds this process spent in the job driver's ``plan`` and ``done``: the
    #: scheduler's own cost, measured, not simulated (so it varies from run to run, like
    #: ``wall_seconds``). The simulated coordinator is charged ``coordinator_s`` per done
    #: report whatever this is; where this over the done reports passes that charge, the
    #: one coordinator could not keep up with the run (bench/RESULTS.md, session 34)
    scheduler_cpu_s: float = 0.0
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


class _FaultEvents:
    """What faults do to a run (bench/sim/faults.py): the reports agents would send.

    Mixed into :class:`Simulation` (one class would pass 400 lines); it uses
    the simulation's state and its three event hooks, declared here.
    """

    profile: ClusterProfile
    scheduler: PieceScheduler
    driver: JobDriver
    overheads: Overheads
    network: FlowNetwork
    result: SimResult
    faults: list[Fault]
    layers: list[tuple[str, int]]
    tracing: bool
    _chunks: dict[str, int]
    _fault: FaultState
    _budget: dict[str, FailureBudget]
    _down: set[str]
    _dropped: dict[str, Transfer]
    _running: dict[str, _Running]
    _downstream: dict[str, set[str]]
    _upstream: dict[str, str]

    def _push(self, at: float, kind: int, tid: str, version: int = 0) -> None:
        raise NotImplementedError

    def _dispatch(self, now: float) -> None:
        raise NotImplementedError

    def _rates(self, rates: dict[str, float], now: float) -> None:
        raise NotImplementedError

    def _fault_event(self, kind: int, key: str, now: float) -> None:
        if kind == _FAULT:
            self._strike(self.faults[int(key)], now)
        elif kind == _FAILED:
            self._failed(key, now)
        elif kind == _HEARTBEAT:
            self._heartbeat(key, now)
        elif kind == _DOWN:
            self._mark_down(key, now)
        else:
            self._dispatch(now)

    def _strike(self, f: Fault, now: float) -> None:
        if f.kind == "dies":
            self._die(f.node, now)
        elif f.kind == "unreachable":
            self._fault.closed.add(f.node)  # transfers starting from now on fail (_start)
        elif f.kind == "corrupt":
            self._fault.corrupt.add((f.node, f.peer))
            for tid in sorted(self._running):  # a running pull fails at its next chunk
                r = self._running[tid]
                t = r.transfer
                if r.flowing and r.failing is None and self._fault.corrupts(t.seeder, t.demander):
                    bad = Failure("verify", seeder_fault=True)
                    self._fail(tid, bad, now, now + self._chunk_time(t))
        else:  # blip: the coordinator drops the node; its agent pulls on and heartbeats
            self._mark_down(f.node, now)
            self._push(self._next_beat(f.node, now), _HEARTBEAT, f.node)

    def _die(self, node: str, now: float) -> None:
        """The node's agent dies: its pulls stop unreported, pulls from it fail ``io``."""
        self._fault.dead.add(node)
        self.result.dead[node] = now
        # first the pulls from it (their demanders see the connection close: io), then its
        # own pulls (nobody reports them; they feed relays from it, which failed already)
        for tid in sorted(self._running):
            r = self._running[tid]
            ended = not r.flowing and r.remaining == 0  # every byte in: its report is due
            if r.transfer.seeder == node and r.failing is None and not ended:
                self._fail(tid, Failure("io"), now, now + DEAD_PEER_NOTICE_S)
        for tid in sorted(self._running):
            r = self._running[tid]
            if r.transfer.demander == node and r.failing is None:
                self._fail(tid, Failure("cancelled"), now, now, report=False)
        if self.scheduler.is_demanding(node):
            self._mark_down(node, now)  # its long-poll dropped (coordinator/liveness.py)
        else:  # idle: its missed heartbeats decide
            interval = self.profile.heartbeat_interval
            last = self._next_beat(node, now) - interval
            self._push(last + MISSED_HEARTBEATS * interval, _DOWN, node)

    def _fail(
        self, tid: str, failure: Failure, now: float, notice_at: float, *, report: bool = True
    ) -> None:
        """``tid`` breaks now; its demander reports ``failure`` (noticed at ``notice_at``).

        The transfers relaying what it was bringing fail with it (``relay``).
        """
        if notice_at < now:
            raise ValueError(
                f"{tid}: a failure is noticed at {notice_at}, before it happens ({now})"
            )
        r = self._running[tid]
        r.failing, r.notice_at = failure, notice_at
        r.version += 1  # its predicted end no longer holds
        if r.flowing:
            r.flowing = False
            self._rates(self.network.remove(tid), now)
        if report:
            self._push(notice_at + self.overheads.finish(0), _FAILED, tid)
        for d in sorted(self._downstream.pop(tid, ())):
            self._upstream.pop(d, None)
            dr = self._running.get(d)
            if dr is not None and dr.failing is None and (dr.flowing or dr.remaining > 0):
                self._fail(d, Failure("relay"), now, notice_at + RELAY_NOTICE_S)

    def _failed(self, tid: str, now: float) -> None:
        """A failure report reaches the coordinator: the driver's rules, then the job's budget."""
        r = self._running.pop(tid)
        self._downstream.pop(tid, None)
        self._dropped.pop(tid, None)
        t, failure = r.transfer, r.failing
        assert failure is not None
        self.result.failures[failure.kind] = self.result.failures.get(failure.kind, 0) + 1
        self._traced(r, now, failure.kind)
        outcome = self.driver.failed(t, failure, now)
        self.result.suspected += outcome.blame is Blame.SUSPECT
        node, layer = t.demander, t.layer
        budget = self._budget[node]
        waiting = node not in self.result.node_seconds and node not in self.result.failed
        waiting = waiting and not self._fault.gone(node)
        if waiting and not self.scheduler.holds(node, layer):
            n = budget.charge(layer, outcome.charge)
            if outcome.charge is not Charge.FREE and budget.exhausted(layer, outcome.charge):
                self.result.failed[node] = (
                    f"layer {layer} failed {n} times (last: {failure.kind} from {t.seeder})"
                )
                missing = [lr for lr, _ in self.layers if not self.scheduler.holds(node, lr)]
                self.driver.release(node, missing, keep=set())
        if outcome.blame is Blame.BAD_CHUNKS:
            self._judge(t.seeder, t.demander, now)
        if self.scheduler.is_suspect(t.seeder) and not self._fault.gone(t.seeder):
            self._push(self._next_beat(t.seeder, now), _HEARTBEAT, t.seeder)
        if outcome.avoid_until > now:
            self._push(outcome.avoid_until, _PASS, t.demander)
        self._dispatch(now)

    def _judge(self, seeder: str, demander: str, now: float) -> None:
        """The coordinator's evidence rule on bad chunks (coordinator/evidence.py, quarantine.py):
        the second demander's word penalizes the seeder, ``SEEDER_FAULT_LIMIT`` quarantine it
        (never the origin) -- it is out of the job, as a dead node is."""
        origin = seeder == self.profile.origin.name
        verdict, _ = self._fault.evidence.bad_chunk_verdict(
            seeder, demander, origin=origin, limit=SEEDER_FAULT_LIMIT
        )
        if verdict == "penalize":
            self.driver.penalize(seeder)
        elif verdict == "quarantine" and not self._fault.gone(seeder):
            self._fault.quarantined.add(seeder)
            self.result.quarantined[seeder] = now
            self._mark_down(seeder, now)  # its pulls stop: nobody serves it any more

    def _heartbeat(self, node: str, now: float) -> None:
        """The node's heartbeat: its dropped pulls are adopted back, it is up and trusted again."""
        if self._fault.gone(node):
            return
        for tid, t in sorted(self._dropped.items()):
            r = self._running.get(tid)
            if t.demander != node or r is None or r.failing is not None:
                continue
            if self.driver.readopt(t, held=self.scheduler.holds(node, t.layer)):
                del self._dropped[tid]
                self.result.adopted += 1
        if node in self._down:
            self._down.discard(node)
            n = self.profile.node(node)
            self.driver.node_up(node, n.up_Bps, download_bps=n.down_Bps)
        else:
            self.driver.reported(node)
        self._dispatch(now)

    def _mark_down(self, node: str, now: float) -> None:
        """The coordinator marks ``node`` down: the transfers the driver drops stop being
        tracked; those of a live agent keep flowing (it does not know)."""
        if node in self._down:
            return
        self._down.add(node)
        for t in self.driver.node_down(node):
            r = self._running.get(t.transfer_id)
            if r is None:
                continue
            if self._fault.gone(t.demander) or self._fault.gone(t.seeder):
                if r.failing is None:
                    self._fail(t.transfer_id, Failure("cancelled"), now, now, report=False)
                self._running.pop(t.transfer_id)
            elif r.failing is None:
                self._dropped[t.transfer_id] = t
        self._dispatch(now)

    def _traced(self, r: _Running, now: float, outcome: str) -> None:
        if self.tracing:
            self.result.trace.append(_traced(r, now, outcome))

    def _next_beat(self, node: str, now: float) -> float:
        return self._fault.next_beat(node, now, self.profile.heartbeat_interval)

    def _chunk_time(self, t: Transfer) -> float:
        """One chunk of ``t`` on its link: when a bad first chunk is found."""
        link = min(self.network.up_Bps(t.seeder), self.network.down_Bps(t.demander))
        return min(self._chunks[t.layer], self.scheduler.piece_of(t).size) / link


class Simulation(_FaultEvents):
    """One distribution of ``layers`` over ``profile``; call :meth:`run` once."""

    def __init__(
        self,
        profile: ClusterProfile,
        layers: Sequence[tuple[str, int]],
        overheads: Overheads | None = None,
        *,
        policy: str = "paper",
        scheduler: Scheduler | PieceScheduler | None = None,
        faults: Sequence[Fault] = (),
        trace: bool = False,
    ) -> None:
        """``scheduler`` (default: a new ``Scheduler(policy)``) must be fresh; the run adds nodes.

        Passing one lets a test or an experiment drive a variant (a subclass
        that starts several flows per node, say) through the same loop.
        ``faults`` (bench/sim/faults.py) strike at their times; ``trace`` keeps
        every transfer's course in ``SimResult.trace``.
        """
        if not layers:
            raise ValueError("an image needs at least one layer")
        if len({name for name, _ in layers}) != len(layers):
            raise ValueError("layer names must be distinct")
        self.profile = profile
        self.layers = list(layers)
        self.sizes = dict(layers)
        #: each layer's chunk size, as the origin agent cuts it (core.chunks.layer_chunk_size)
        self._chunks = {n: layer_chunk_size(s, profile.chunk_size) for n, s in layers}
        self.overheads = overheads or Overheads()
        if isinstance(scheduler, Scheduler):
            scheduler = PieceScheduler.around(scheduler)
        self.scheduler = scheduler or PieceScheduler(policy)
        self.scheduler.report_cost_s = self.overheads.coordinator_s
        self.driver = JobDriver(self.scheduler, profile)
        self.faults = list(faults)
        self.tracing = trace
        check_nodes(self.faults, {n.name for n in profile.all_nodes})
        self._fault = FaultState()
        self._budget: dict[str, FailureBudget] = {}  # demander -> its job's failure budget
        self._down: set[str] = set()  # nodes the coordinator has marked down
        self._dropped: dict[str, Transfer] = {}  # transfers the scheduler dropped, still flowing
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
        self._coordinator_free_at = 0.0  # when the coordinator has applied every report so far

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
        self.driver.node_up(origin.name, origin.up_Bps, names)
        for n in self.profile.nodes:
            self.driver.node_up(n.name, n.up_Bps, download_bps=n.down_Bps)
        for layer, size in self.layers:
            self.scheduler.set_layer_size(layer, size, self._chunks[layer])
        for n in sorted(self.profile.nodes, key=lambda n: n.name):
            self._held[n.name] = 0
            self._budget[n.name] = FailureBudget()
            self.driver.demand(n.name, names, "sim", 0.0)
        self._fault.phase([n.name for n in self.profile.all_nodes])
        for i, f in enumerate(self.faults):
            self._push(f.at, _FAULT, str(i))
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
            elif kind == _DONE:
                self._report(tid, now)
            elif kind == _REPORTED:
                self._done(tid, now)
            else:
                self._fault_event(kind, tid, now)
        for n in self.profile.nodes:
            if n.name not in self.result.node_seconds and not self._fault.gone(n.name):
                self.result.failed.setdefault(
                    n.name,
                    f"held {self._held[n.name]} of {len(names)} layers when nothing was left to do",
                )
        self.result.events = events
        self.result.wall_seconds = time.perf_counter() - wall
        return self.result

    # -- events ----------------------------------------------------------
    def _push(self, at: float, kind: int, tid: str, version: int = 0) -> None:
        heapq.heappush(self._events, (at, next(self._seq), kind, tid, version))

    def _dispatch(self, now: float) -> None:
        """Ask the driver for transfers; each starts after its setup delay."""
        cpu = time.process_time()
        started = self.driver.plan(now)
        self.result.scheduler_cpu_s += time.process_time() - cpu
        for t in started:
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
                if u.failing is not None:  # the relay's own pull broke: "unavailable" once
                    # its demander knows (a relay waits for chunks its pull is still bringing)
                    self._running[t.transfer_id] = _Running(t, size, float(size))
                    self.result.transfers += 1
                    notice = max(start, u.notice_at) + RELAY_NOTICE_S
                    self._fail(t.transfer_id, Failure("relay"), now, notice)
                    continue
                if u.flowing or u.remaining > 0:  # else: every byte is in, only its report is due
                    self._upstream[t.transfer_id] = up.transfer_id
                    self._downstream.setdefault(up.transfer_id, set()).add(t.transfer_id)
                    start = max(start, u.first_byte_at + self._hop(t, u.transfer))
            r = _Running(
                t, size, float(size), first_byte_at=start, assigned_at=now + self.overheads.assign_s
            )
            r.upstream = self._upstream.get(t.transfer_id, "")
            self._running[t.transfer_id] = r
            self.result.transfers += 1
            self._push(start, _START, t.transfer_id)

    def _hop(self, t: Transfer, upstream: Transfer) -> float:
        """How far a relayed flow's first byte trails its upstream's (module docstring).

        A chunk's time on the link bringing it *into* the relay, plus the hop's
        fixed cost: the relay forwards the chunk once it has all of it.
        """
        link = min(self.network.up_Bps(upstream.seeder), self.network.down_Bps(t.seeder))
        piece = self.scheduler.piece_of(t).size
        return min(self._chunks[t.layer], piece) / link + self.overheads.relay_hop_s

    def _start(self, tid: str, now: float) -> None:
        r = self._running.get(tid)
        if r is None or r.failing is not None:
            return  # it failed (or its seeder died) in its setup delay
        t = r.transfer
        if self._fault.refuses(t.seeder):
            self._fail(tid, Failure("unreachable"), now, now + CONNECT_TIMEOUT_S)
            return
        r.since, r.flowing, r.started = now, True, now
        r.cap = self._cap_for(tid)
        self._rates(self.network.add(tid, t.seeder, t.demander, r.cap), now)
        if self._fault.corrupts(t.seeder, t.demander):
            self._fail(tid, Failure("verify", seeder_fault=True), now, now + self._chunk_time(t))

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
        r.pulled_at = now + r.size / self.overheads.verify_Bps
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

    def _report(self, tid: str, now: float) -> None:
        """A done report reaches the coordinator; it is applied once the coordinator is free.

        The coordinator is one server taking ``Overheads.coordinator_s`` of CPU per done
        report, first come first served (overheads.py): while it works off a queue, every
        report waits, and so does every assignment it would bring.
        """
        self.result.reports += 1
        cost = self.overheads.coordinator_s
        if cost <= 0:
            self._done(tid, now)
            return
        start = max(now, self._coordinator_free_at)
        self._coordinator_free_at = start + cost
        self.result.coordinator_busy_s += cost
        self.result.report_wait_max_s = max(self.result.report_wait_max_s, start - now)
        self._push(start + cost, _REPORTED, tid)

    def _done(self, tid: str, now: float) -> None:
        r = self._running.pop(tid, None)
        if r is None or r.failing is not None:
            return  # a node of it is out of the run, or a fault struck it after its last byte
        # the demander's own time for the pull, as an agent's done report says it
        cpu = time.process_time()
        t = self.driver.done(tid, now, r.size, r.pulled_at - r.assigned_at)
        self.result.scheduler_cpu_s += time.process_time() - cpu
        self._traced(r, now, "done" if t is not None else "dropped")
        if t is None:  # the scheduler had dropped it (blip): the piece is pulled again
            self._dropped.pop(tid, None)
            self._dispatch(now)
            return
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
