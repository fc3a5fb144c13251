"""Policy ``paper``: Algorithm 1 of RainbowD, applied per layer, and its two indexes.

Why a class of its own: the :class:`~rainbowd.core.sched.scheduler.Scheduler`
keeps the cluster's records (nodes, holdings, demands, transfers) for every
policy, while these indexes and this pass are only ``paper``'s; the
capacity-aware policies plan with their own (policies/). The pass sees the
scheduler only as a :class:`~rainbowd.core.sched.view.SchedulerView`, as
those policies do, and starts each transfer through it.

The algorithm:

* idle seeders are kept in a heap ordered by measured performance (the speed
  of their last upload; faster first);
* the best idle seeder is taken first and given to the demander that has
  waited longest among those needing a layer this seeder holds;
* a seeder serves one transfer at a time and a demander receives one at a time
  (a node may send one layer while it receives another: upload and download
  are separate links);
* when a transfer completes, the demander holds the layer and so becomes a
  seeder of it; demanders without an idle seeder wait until one frees up.

Cost. The coordinator asks for a pass after every event (each heartbeat,
report and job), and the simulator runs clusters of 10,000 nodes, so nothing
here rescans the cluster per call. Standing indexes answer the two questions
Algorithm 1 asks, and are updated as events arrive (the scheduler tells this
class when a node's standing as a seeder or a demander changed):

* *who may seed layer L*: per layer, the idle holders sorted by
  (speed descending, node id) -- the order the published algorithm's seeder
  queue pops them in;
* *who waits for layer L*: per layer, a heap of the free demanders that need
  it, keyed by their longest-waiting demand (lazy: an entry carries the
  demander's version and is dropped when that is stale).

A pass then walks the idle holders of the layers someone waits for, fastest
first, and stops once no waiting demander is left for any layer an idle
seeder could serve. It costs about the transfers it starts (times the layers a
seeder holds), not seeders x demanders, and makes exactly the decisions of the
plain algorithm (tests/core/test_scheduler.py keeps that as a reference and
compares the two on random event sequences).
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right, insort

from . import reasons as rs
from .reasons import TransferReason
from .records import Demand, Node, SeederKey, Transfer
from .view import SchedulerView

#: the name this policy is selected by, and that its transfers' reasons carry
PAPER = "paper"

#: a waiting demander in a layer's heap: (seq of its longest-waiting demand, node id, version)
_WaitEntry = tuple[int, str, int]
#: stale entries a layer's waiting heap may keep beyond two per open demand before it is
#: compacted (a small floor so a layer with few demands is not rebuilt on every push)
_STALE_SLACK = 64


class PaperPass:
    """Algorithm 1's idle-holder lists and waiting heaps, and the pass over them."""

    def __init__(self, view: SchedulerView) -> None:
        self._view = view
        # layer -> idle holders (up, not suspect, not sending), sorted by SeederKey
        self._idle: dict[str, list[SeederKey]] = {}
        # layer -> heap of free demanders needing it; entries with an old version are stale
        self._waiting: dict[str, list[_WaitEntry]] = {}

    # -- keeping the indexes ---------------------------------------------
    def holding_added(self, node: Node, layer: str) -> None:
        """``node`` now holds ``layer``: an idle node becomes one of its idle holders."""
        if node.idle_key is not None:
            insort(self._idle.setdefault(layer, []), node.idle_key)

    def holding_removed(self, node: Node, layer: str) -> None:
        """``node`` no longer holds ``layer``: it leaves the layer's idle holders."""
        if node.idle_key is not None:
            idle = self._idle[layer]
            del idle[bisect_left(idle, node.idle_key)]

    def demand_added(self, node: Node, demand: Demand) -> None:
        """``node`` asked for one more layer: enter it in that layer's heap if it can receive.

        The newest demand never changes the node's rank (its oldest wanted
        demand), so its other heap entries stay valid: only this one is added.
        """
        if node.free_demander and demand.layer not in node.pulling:
            first = node.first_wanted()
            assert first is not None
            self._push_waiting(demand.layer, (first.seq, node.node_id, node.version))

    def demander_changed(self, node: Node) -> None:
        """Re-enter ``node`` (its version just moved) in the heaps of the layers it waits for.

        Its older entries become stale (wrong version) and are dropped when
        they surface. A node that cannot receive now is entered nowhere.
        """
        if not node.free_demander:
            return
        rank: int | None = None
        for layer, d in node.demands.items():
            if layer in node.pulling:
                continue
            if rank is None:
                rank = d.seq
            self._push_waiting(layer, (rank, node.node_id, node.version))

    def seeder_changed(self, node: Node) -> None:
        """Put ``node`` in (or take it out of, or move it in) its layers' idle-holder lists."""
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

    # -- events Algorithm 1 has no use for (policy.PolicyPass) --------------
    def sizes_changing(self) -> None:
        """Algorithm 1 needs no layer sizes."""

    def size_set(self) -> None:
        """Algorithm 1 needs no layer sizes."""

    def started(self, t: Transfer) -> None:
        """Nothing reserved: a transfer holds its seeder and demander by their locks."""

    def seeder_booked(self, seeder: Node) -> None:
        """Nothing yet: the idle lists stay as they were during :meth:`plan`'s walk (its
        reasons count the slower idle holders left), which takes its seeders out at its end."""

    def failed(self, t: Transfer) -> float | None:
        """No estimate moves on a failure; None."""
        return None

    def ended(self, t: Transfer) -> None:
        """Nothing to give back: the scheduler re-indexes both nodes as it unlocks them."""

    def completed(self, t: Transfer, now: float, bytes_moved: int) -> bool:
        """False: the scheduler measures the seeder's speed its own way for ``paper``."""
        return False

    # -- the pass --------------------------------------------------------
    def plan(self, now: float) -> list[Transfer]:
        """Start every transfer Algorithm 1 allows right now.

        Idle seeders are taken fastest first; each goes to the longest-waiting
        free demander (not kept away from it by an avoided pair) that needs a
        layer it holds, and sends that demander the first such layer in image
        order. A seeder nobody can use stays idle.
        """
        nodes = self._view.nodes
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
            seeder = nodes[seeder_id]
            demander = self._pick(seeder, live)
            if demander is None:
                continue
            demand = next(
                d
                for lr, d in demander.demands.items()
                if lr in seeder.holdings and lr not in demander.pulling
            )
            reason = self.reason(seeder, demander, demand)
            started.append(self._view.start_transfer(seeder, demander, demand, now, reason))
            for lr in demander.demands:
                if lr in live and self._top(live[lr]) is None:
                    del live[lr]
        # the idle lists stay as they were during the walk; now take the seeders out
        for t in started:
            self.seeder_changed(nodes[t.seeder])
        return started

    def reason(self, seeder: Node, demander: Node, demand: Demand) -> TransferReason:
        """Why Algorithm 1 chose ``seeder``: the fastest idle holder, its speed, the
        slower idle holders left, and the demander's download cap if that sets the
        expected rate.
        """
        # the idle lists are those of the start of this pass, so the holders after
        # this seeder in its layer's list are the slower idle ones left
        idle = self._idle[demand.layer]
        assert seeder.idle_key is not None
        others = len(idle) - bisect_right(idle, seeder.idle_key)
        numbers = {rs.SEEDER_BPS: seeder.speed_bps, rs.SLOWER_IDLE: float(others)}
        if 0 < demander.max_download_bps < seeder.speed_bps:
            numbers[rs.DOWNLOAD_CAP_BPS] = demander.max_download_bps
        return TransferReason(rule=rs.FASTEST_IDLE, policy=PAPER, numbers=numbers)

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
        return None if best is None else self._view.nodes[best[1]]

    def _first_allowed(self, heap: list[_WaitEntry], seeder_id: str) -> _WaitEntry | None:
        """The top valid entry of ``heap`` whose demander may be paired with ``seeder_id``."""
        allowed = self._view.allowed
        top = self._top(heap)
        if top is None or allowed(top[1], seeder_id):
            return top
        kept_away: list[_WaitEntry] = []
        while top is not None and not allowed(top[1], seeder_id):
            kept_away.append(heapq.heappop(heap))
            top = self._top(heap)
        for entry in kept_away:
            heapq.heappush(heap, entry)
        return top

    def _push_waiting(self, layer: str, entry: _WaitEntry) -> None:
        heap = self._waiting.setdefault(layer, [])
        heapq.heappush(heap, entry)
        if len(heap) > 2 * self._view.open_demands.get(layer, 0) + _STALE_SLACK:
            # at most one entry per open demand is valid: drop the stale rest
            nodes = self._view.nodes
            heap[:] = [e for e in heap if nodes[e[1]].version == e[2]]
            heapq.heapify(heap)

    def _top(self, heap: list[_WaitEntry]) -> _WaitEntry | None:
        """The first valid entry of a waiting heap (stale ones are popped on the way)."""
        nodes = self._view.nodes
        while heap:
            entry = heap[0]
            if nodes[entry[1]].version == entry[2]:
                return entry
            heapq.heappop(heap)
        return None
