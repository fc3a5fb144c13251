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

Every transfer records why its seeder was chosen (``reason``, a
:class:`~rainbowd.core.sched.reasons.TransferReason`: the rule and the numbers
that decided it) so ``rbd job`` and the console can explain the plan.

Faults (PAPER.md, "Fault handling"): a node that is down or *suspect* (a
demander could not reach it; cleared by its next heartbeat, i.e. the next
:meth:`Scheduler.add_node`) is given no new work. A demander can be kept away
from one seeder for a while (:meth:`Scheduler.avoid`) and a seeder that sent
bad bytes is slowed down in the ranking (:meth:`Scheduler.penalize`). After a
coordinator restart the transfers agents are still running are taken back
with :meth:`Scheduler.adopt`, so no demander is handed a second transfer of a
layer it is already pulling.

Cost. The coordinator calls :meth:`Scheduler.schedule` after every event (each
heartbeat, report and job), and the simulator runs clusters of 10,000 nodes,
so nothing here rescans the cluster per call. Standing indexes answer the two
questions Algorithm 1 asks, and are updated as events arrive:

* *who may seed layer L*: per layer, the idle holders sorted by
  (speed descending, node id) -- the order the published algorithm's seeder
  queue pops them in;
* *who waits for layer L*: per layer, a heap of the free demanders that need
  it, keyed by their longest-waiting demand (lazy: an entry carries the
  demander's version and is dropped when that is stale).

Only ``paper`` reads these two indexes; under a capacity-aware policy the
planner (policies/) keeps its own, so they are not maintained there (every
transfer start and end would otherwise re-key them for nothing).

A call then walks the idle holders of the layers someone waits for, fastest
first, and stops once no waiting demander is left for any layer an idle
seeder could serve. It costs about the transfers it starts (times the layers a
seeder holds), not seeders x demanders, and makes exactly the decisions of the
plain algorithm (tests/core/test_scheduler.py keeps that as a reference and
compares the two on random event sequences).
"""

from __future__ import annotations

import heapq
import itertools
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet

from . import reasons as rs
from .policies import RULES, Planner
from .reasons import TransferReason
from .records import Demand, Node, SeederKey, Transfer

#: speed assumed for a node nothing is known about (bytes/s); 100 Mbit/s
DEFAULT_SPEED_BPS = 12.5e6

#: ``paper`` is Algorithm 1 (this module); the others are capacity-aware (policies/)
POLICIES = ("paper", *RULES)
#: the best measured policy across the profile suite (bench/RESULTS.md, issue 13); ``paper``
#: and the others stay selectable
DEFAULT_POLICY = "swarm"

#: the holders of a layer nobody holds
_NOBODY: frozenset[str] = frozenset()
#: a waiting demander in a layer's heap: (seq of its longest-waiting demand, node id, version)
_WaitEntry = tuple[int, str, int]


class SchedulerError(ValueError):
    """An event that contradicts the scheduler's state (unknown id, say)."""


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
        #: node id -> its record (records.Node); the policies read it (view.SchedulerView)
        self.nodes: dict[str, Node] = {}
        # (node, layer) -> demand, in arrival order (pending() reports this order)
        self._demands: dict[tuple[str, str], Demand] = {}
        self._active: dict[str, Transfer] = {}
        # (demander, seeder) -> time until which that seeder is not used for that demander
        self._avoid: dict[tuple[str, str], float] = {}
        # layer -> nodes holding it
        self._holders: dict[str, set[str]] = {}
        # layer -> idle holders (up, not suspect, not sending), sorted by SeederKey
        self._idle: dict[str, list[SeederKey]] = {}
        # layer -> heap of free demanders needing it; entries with an old version are stale
        self._waiting: dict[str, list[_WaitEntry]] = {}
        #: layer -> open demands of it (bounds the stale entries a heap may keep; the
        #: planner sums the bytes still wanted with it)
        self.open_demands: dict[str, int] = {}
        #: layer -> size in bytes, where known (the capacity-aware policies plan with it)
        self.layer_sizes: dict[str, int] = {}
        #: layer -> chunk size in bytes, where known (``relay`` bounds the lag of a chain with it)
        self.layer_chunks: dict[str, int] = {}
        self._planner = Planner(RULES[policy], self) if policy in RULES else None

    # -- nodes -----------------------------------------------------------
    def add_node(
        self,
        node_id: str,
        speed_bps: float = 0.0,
        holdings: Iterable[str] = (),
        *,
        max_upload_bps: float | None = None,
        max_download_bps: float | None = None,
        download_bps: float = 0.0,
    ) -> None:
        """Add (or bring back up) a node; its holdings make it a seeder.

        A known node keeps its measured speed (``speed_bps`` is only the first
        estimate, e.g. the agent's configured hint). ``max_upload_bps`` /
        ``max_download_bps`` are its configured bandwidth caps (0 = none; None =
        leave as they are): its speed estimate is clamped to the upload cap, and
        a transfer to it is expected at no more than its download cap.
        ``download_bps`` is the first estimate of its download speed (0 = unknown:
        its upload estimate stands in, as before agents sent both).
        """
        node = self.nodes.get(node_id)
        if node is None:
            node = Node(node_id, speed_bps or self.default_speed_bps, down_bps=download_bps)
            self.nodes[node_id] = node
        if max_upload_bps is not None:
            node.max_upload_bps = max(0.0, max_upload_bps)
        if max_download_bps is not None:
            node.max_download_bps = max(0.0, max_download_bps)
        node.speed_bps = node.clamp(node.speed_bps)
        node.up = True
        node.suspect = False
        self._touch(node)
        self._sync_idle(node)
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
        self._touch(node)
        self._sync_idle(node)
        aborted = [
            t
            for t in node.transfers.values()
            if t.demander == node_id or (t.seeder == node_id and not self.nodes[t.demander].up)
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
        node = self._node(node_id)
        node.suspect = True
        self._touch(node)
        self._sync_idle(node)

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
        self._sync_idle(node)
        return node.speed_bps

    def observe_speed(self, node_id: str, bytes_per_second: float) -> None:
        """Measured upload performance of a node (its last distribution)."""
        if bytes_per_second > 0:
            node = self._node(node_id)
            node.speed_bps = node.clamp(bytes_per_second)
            self._sync_idle(node)

    def speed(self, node_id: str) -> float:
        return self._node(node_id).speed_bps

    def set_layer_size(self, layer: str, size: int, chunk_size: int = 0) -> None:
        """Tell the scheduler how big ``layer`` is (bytes) and how it is chunked.

        ``paper`` needs neither. The capacity-aware policies plan with the size;
        ``relay`` also with the chunk size, since a relay hop forwards whole
        verified chunks (each hop adds a chunk's time to the lag).
        """
        if size > 0 and self.layer_sizes.get(layer) != size:
            self.layer_sizes[layer] = size
            if self._planner is not None:
                self._planner.layer_size_set()
        if chunk_size > 0:
            self.layer_chunks[layer] = chunk_size

    def add_holding(self, node_id: str, layer: str) -> None:
        node = self._node(node_id)
        if layer not in node.holdings:
            node.holdings.add(layer)
            self._holders.setdefault(layer, set()).add(node_id)
            if node.idle_key is not None:
                insort(self._idle.setdefault(layer, []), node.idle_key)
            if self._planner is not None:
                self._planner.holding_added(node, layer)
        if self._drop_demand(node, layer):
            self._touch(node)

    def remove_holding(self, node_id: str, layer: str) -> None:
        """``node_id`` deleted ``layer`` (store eviction, or an admin removed the image).

        It is no longer a seeder of it: it leaves the layer's holders and
        idle-seeder list. Its running transfers are left alone (the callers
        refuse to remove a layer a node is seeding). Unknown nodes are ignored.
        """
        node = self.nodes.get(node_id)
        if node is None or layer not in node.holdings:
            return
        node.holdings.discard(layer)
        self._holders.get(layer, set()).discard(node_id)
        if node.idle_key is not None:
            idle = self._idle[layer]
            del idle[bisect_left(idle, node.idle_key)]
        if self._planner is not None:
            self._planner.holding_removed(node, layer)

    def holds(self, node_id: str, layer: str) -> bool:
        return layer in self._node(node_id).holdings

    def holders(self, layer: str) -> list[str]:
        return sorted(self._holders.get(layer, ()))

    def holders_of(self, layer: str) -> AbstractSet[str]:
        """The nodes holding ``layer``, unsorted and not copied (view.py: the planner's)."""
        return self._holders.get(layer, _NOBODY)

    # -- demands ---------------------------------------------------------
    def demand(self, node_id: str, layer: str, job_id: str, now: float) -> bool:
        """``node_id`` needs ``layer``; False if it holds it or already asked."""
        node = self._node(node_id)
        if layer in node.holdings or layer in node.demands:
            return False
        d = Demand(node_id, layer, job_id, now, next(self._seq))
        self._demands[(node_id, layer)] = d
        node.demands[layer] = d
        self.open_demands[layer] = self.open_demands.get(layer, 0) + 1
        if self._planner is None and node.free_demander and layer not in node.pulling:
            # the newest demand never changes the node's rank (its oldest wanted
            # demand), so its other heap entries stay valid: add just this one
            first = node.first_wanted()
            assert first is not None
            self._push_waiting(layer, (first.seq, node_id, node.version))
        if self._planner is not None:
            self._planner.demand_added(node, d)
        return True

    def cancel_demand(self, node_id: str, layer: str) -> None:
        node = self.nodes.get(node_id)
        if node is not None and self._drop_demand(node, layer):
            self._touch(node)

    def pending(self) -> list[tuple[str, str]]:
        """(node, layer) demands not yet satisfied, in arrival order."""
        return list(self._demands)

    def active(self) -> list[Transfer]:
        """Every active transfer, in start order (a copy: O(transfers))."""
        return list(self._active.values())

    def active_for(self, node_id: str) -> list[Transfer]:
        """Active transfers ``node_id`` sends or receives, in start order; [] for an unknown node.

        Costs what it returns, so per-node hot paths (a heartbeat checking the
        transfers of one agent) need not scan every transfer of the cluster.
        """
        node = self.nodes.get(node_id)
        return list(node.transfers.values()) if node is not None else []

    def is_demanding(self, node_id: str) -> bool:
        """Whether ``node_id`` receives a transfer or waits for a layer (O(its transfers))."""
        node = self.nodes.get(node_id)
        if node is None:
            return False
        return bool(node.demands) or any(t.demander == node_id for t in node.transfers.values())

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
        self._lock(t, seeder, demander)
        self._touch(demander)
        self._sync_idle(seeder)
        return t

    def receiving(self, node_id: str, layer: str) -> Transfer | None:
        """The active transfer bringing ``layer`` to ``node_id``, if any."""
        node = self.nodes.get(node_id)
        if node is None:
            return None
        return next(
            (t for t in node.transfers.values() if t.demander == node_id and t.layer == layer),
            None,
        )

    # -- the algorithm ---------------------------------------------------
    def schedule(self, now: float) -> list[Transfer]:
        """Start every transfer Algorithm 1 allows right now.

        Idle seeders are taken fastest first; each goes to the longest-waiting
        free demander (not kept away from it by :meth:`avoid`) that needs a
        layer it holds, and sends that demander the first such layer in image
        order. A seeder nobody can use stays idle.
        """
        if self._avoid:
            self._avoid = {k: v for k, v in self._avoid.items() if v > now}
        if self._planner is not None:
            return self._planner.plan(now)
        # layers some free demander waits for
        live: dict[str, list[_WaitEntry]] = {}
        for layer, heap in list(self._waiting.items()):
            if self._top(heap) is None:
                del self._waiting[layer]
            else:
                live[layer] = heap
        if not live:
            return []
        # merge the idle-holder lists of those layers: (seeder key, layer, index in that list)
        frontier = [(idle[0], layer, 0) for layer in live if (idle := self._idle.get(layer))]
        heapq.heapify(frontier)
        seen: set[str] = set()
        started: list[Transfer] = []
        while frontier and live:
            key, layer, i = heapq.heappop(frontier)
            if layer not in live:
                continue  # nobody waits for it any more
            idle = self._idle[layer]
            if i + 1 < len(idle):
                heapq.heappush(frontier, (idle[i + 1], layer, i + 1))
            seeder_id = key[1]
            if seeder_id in seen:
                continue  # came up earlier through another layer it holds
            seen.add(seeder_id)
            seeder = self.nodes[seeder_id]
            demander = self._pick(seeder, live)
            if demander is None:
                continue
            demand = next(
                d
                for lr, d in demander.demands.items()
                if lr in seeder.holdings and lr not in demander.pulling
            )
            started.append(self.start_transfer(seeder, demander, demand, now))
            for lr in demander.demands:
                if lr in live and self._top(live[lr]) is None:
                    del live[lr]
        # the idle lists stay as they were during the walk; now take the seeders out
        for t in started:
            self._sync_idle(self.nodes[t.seeder])
        return started

    def _pick(self, seeder: Node, live: dict[str, list[_WaitEntry]]) -> Node | None:
        """The longest-waiting free demander that ``seeder`` may serve, or None."""
        if len(seeder.holdings) < len(live):
            layers = [lr for lr in seeder.holdings if lr in live]
        else:
            layers = [lr for lr in live if lr in seeder.holdings]
        best: _WaitEntry | None = None
        for layer in layers:
            entry = self._first_allowed(live[layer], seeder.node_id)
            if entry is not None and (best is None or entry < best):
                best = entry
        return None if best is None else self.nodes[best[1]]

    def _first_allowed(self, heap: list[_WaitEntry], seeder_id: str) -> _WaitEntry | None:
        """The top valid entry of ``heap`` whose demander may be paired with ``seeder_id``."""
        top = self._top(heap)
        if top is None or self.allowed(top[1], seeder_id):
            return top
        kept_away: list[_WaitEntry] = []
        while top is not None and not self.allowed(top[1], seeder_id):
            kept_away.append(heapq.heappop(heap))
            top = self._top(heap)
        for entry in kept_away:
            heapq.heappush(heap, entry)
        return top

    def allowed(self, demander_id: str, seeder_id: str) -> bool:
        """Whether ``seeder_id`` may serve ``demander_id`` now (not itself, not avoided)."""
        return demander_id != seeder_id and (demander_id, seeder_id) not in self._avoid

    def start_transfer(
        self,
        seeder: Node,
        demander: Node,
        demand: Demand,
        now: float,
        reason: TransferReason | None = None,
        plan_hook: Callable[[Transfer], None] | None = None,
    ) -> Transfer:
        """Create and lock a transfer; a planner gives ``reason`` and books it via ``plan_hook``.

        Without a ``reason`` (``paper``) it is Algorithm 1's: the fastest idle holder,
        its speed, the slower idle holders left, and the demander's download cap if
        that sets the expected rate.
        """
        expected = seeder.speed_bps
        capped = 0 < demander.max_download_bps < expected
        if capped:
            expected = demander.max_download_bps
        if reason is None:
            # the idle lists are those of the start of this schedule() call, so the
            # holders after this seeder in its layer's list are the slower idle ones left
            idle = self._idle[demand.layer]
            assert seeder.idle_key is not None
            others = len(idle) - bisect_right(idle, seeder.idle_key)
            numbers = {rs.SEEDER_BPS: seeder.speed_bps, rs.SLOWER_IDLE: float(others)}
            if capped:
                numbers[rs.DOWNLOAD_CAP_BPS] = expected
            reason = TransferReason(rule=rs.FASTEST_IDLE, policy=self.policy, numbers=numbers)
        t = Transfer(
            transfer_id=self._new_id(),
            layer=demand.layer,
            seeder=seeder.node_id,
            demander=demander.node_id,
            job_id=demand.job_id,
            started_at=now,
            reason=reason,
            seeder_speed_bps=seeder.speed_bps,
            expected_bps=expected,
        )
        if plan_hook is not None:
            plan_hook(t)
        self._lock(t, seeder, demander)
        self._touch(demander)
        if self._planner is not None:
            self._sync_idle(seeder)
        return t

    # -- outcomes --------------------------------------------------------
    def complete(self, transfer_id: str, now: float, bytes_moved: int = 0) -> Transfer:
        """The demander verified the layer: it becomes a seeder of it.

        ``bytes_moved`` over the time since the transfer started is the
        seeder's measured speed from now on.
        """
        t = self._get(transfer_id)
        seconds = now - t.started_at
        if self._planner is not None:
            self._planner.observe(t, now, bytes_moved)
        elif bytes_moved > 0 and seconds > 0:
            rate = bytes_moved / seconds
            demander = self.nodes.get(t.demander)
            cap = demander.max_download_bps if demander is not None else 0.0
            if cap > 0 and rate >= 0.8 * cap:
                # the demander's own cap set the pace: this says little about the
                # seeder, except that it is at least this fast
                rate = max(rate, self._node(t.seeder).speed_bps)
            self.observe_speed(t.seeder, rate)
        self._release(t)
        self.add_holding(t.demander, t.layer)
        return t

    def fail(self, transfer_id: str) -> Transfer:
        """The transfer broke: both sides are free; the demand waits for a seeder again."""
        t = self._get(transfer_id)
        if self._planner is not None:
            self._planner.failed(t)
        self._release(t)
        return t

    def _get(self, transfer_id: str) -> Transfer:
        t = self._active.get(transfer_id)
        if t is None:
            raise SchedulerError(f"no active transfer {transfer_id!r}")
        return t

    # -- bookkeeping -----------------------------------------------------
    def _lock(self, t: Transfer, seeder: Node, demander: Node) -> None:
        self._active[t.transfer_id] = t
        seeder.transfers[t.transfer_id] = t
        demander.transfers[t.transfer_id] = t
        demander.pulling[t.layer] = demander.pulling.get(t.layer, 0) + 1
        if seeder.sending is None:
            seeder.sending = t.transfer_id
        if demander.receiving is None:
            demander.receiving = t.transfer_id
        if self._planner is not None:
            self._planner.started(t)

    def _release(self, t: Transfer) -> None:
        if self._active.pop(t.transfer_id, None) is None:
            return
        if self._planner is not None:
            self._planner.ended(t)
        seeder, demander = self.nodes[t.seeder], self.nodes[t.demander]
        seeder.transfers.pop(t.transfer_id, None)
        demander.transfers.pop(t.transfer_id, None)
        left = demander.pulling.get(t.layer, 0) - 1
        if left > 0:
            demander.pulling[t.layer] = left
        else:
            demander.pulling.pop(t.layer, None)
        if seeder.sending == t.transfer_id:
            seeder.sending = None
        if demander.receiving == t.transfer_id:
            demander.receiving = None
        self._touch(demander)
        self._sync_idle(seeder)

    def _drop_demand(self, node: Node, layer: str) -> bool:
        if node.demands.pop(layer, None) is None:
            return False
        del self._demands[(node.node_id, layer)]
        left = self.open_demands[layer] - 1
        if left:
            self.open_demands[layer] = left
        else:
            del self.open_demands[layer]
        return True

    def _touch(self, node: Node) -> None:
        """``node``'s standing as a demander changed: re-enter it in the waiting heaps.

        Its older entries become stale (wrong version) and are dropped when
        they surface. A node that cannot receive now is entered nowhere.
        """
        node.version += 1
        if self._planner is not None:
            self._planner.refresh(node)
            return  # the waiting heaps are Algorithm 1's index: a planner keeps its own
        if not node.free_demander:
            return
        rank: int | None = None
        for layer, d in node.demands.items():
            if layer in node.pulling:
                continue
            if rank is None:
                rank = d.seq
            self._push_waiting(layer, (rank, node.node_id, node.version))

    def _push_waiting(self, layer: str, entry: _WaitEntry) -> None:
        heap = self._waiting.setdefault(layer, [])
        heapq.heappush(heap, entry)
        if len(heap) > 2 * self.open_demands.get(layer, 0) + 64:
            # at most one entry per open demand is valid: drop the stale rest
            heap[:] = [e for e in heap if self.nodes[e[1]].version == e[2]]
            heapq.heapify(heap)

    def _top(self, heap: list[_WaitEntry]) -> _WaitEntry | None:
        """The first valid entry of a waiting heap (stale ones are popped on the way)."""
        while heap:
            entry = heap[0]
            if self.nodes[entry[1]].version == entry[2]:
                return entry
            heapq.heappop(heap)
        return None

    def _sync_idle(self, node: Node) -> None:
        """Put ``node`` in (or take it out of, or move it in) its layers' idle-holder lists."""
        if self._planner is not None:
            self._planner.refresh(node)
            return  # the idle-holder lists are Algorithm 1's index: a planner keeps its own
        want = (-node.speed_bps, node.node_id) if node.free_seeder else None
        have = node.idle_key
        if want == have:
            return
        if have is not None:
            for layer in node.holdings:
                idle = self._idle[layer]
                del idle[bisect_left(idle, have)]
        if want is not None:
            for layer in node.holdings:
                insort(self._idle.setdefault(layer, []), want)
        node.idle_key = want

    def _node(self, node_id: str) -> Node:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise SchedulerError(f"unknown node {node_id!r}") from None
