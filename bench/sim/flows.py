"""Max-min fair sharing of node links among flows (the simulator's fluid network model).

Every transfer in flight is a *flow* from a sender to a receiver. A node's
upload capacity is shared by the flows it sends, its download capacity by the
flows it receives; a flow may also carry a cap of its own (a window-limited
connection, say). Rates are the max-min fair allocation -- what TCP flows
sharing bottleneck links settle on, to a first approximation -- computed by
progressive filling: every unfrozen flow grows at the same pace; when a
resource runs full, the flows through it freeze at the rate they reached.

Why incremental: the max-min allocation decomposes over connected components
of the flow graph (resources as vertices, flows as edges), so adding or
removing one flow changes rates only inside the component(s) it touches.
:meth:`FlowNetwork.add` and :meth:`FlowNetwork.remove` re-fill just those and
return the new rates there. Under policy ``paper`` (one upload and one
download per node) every component is a single flow; policies that run
several flows per node get larger components, and ``swarm`` (many seeders per
demander) joins most flows of a large cluster into one. With ``incremental``
(the simulator's setting) a change re-fills only the flows it can move: those
through the changed links, and any other flow whose bottleneck the re-fill
moves (:meth:`FlowNetwork._refill_local`), a handful where the component holds
thousands. The allocation is the same up to float rounding (a whole-component
fill sums the same shares in another order).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

#: a resource its flows use to within this share of its capacity counts as full (sums of
#: fair shares land within ~1e-15 of it; taking a nearly full one for full only widens a re-fill)
_FULL = 1e-9

#: a shared capacity: ("up", node), ("down", node), or ("flow", flow id) for a flow's own cap
Resource = tuple[str, str]


class FlowError(ValueError):
    """A flow operation that contradicts the network (unknown node or flow, duplicate id)."""


@dataclass
class _Flow:
    resources: tuple[Resource, ...]
    rate: float = 0.0


@dataclass
class FlowNetwork:
    """Flows over per-node upload/download capacities (bytes/s), rates kept max-min fair."""

    _capacity: dict[Resource, float] = field(default_factory=dict)
    _through: dict[Resource, dict[str, None]] = field(default_factory=dict)  # ordered sets
    _flows: dict[str, _Flow] = field(default_factory=dict)
    #: the sum of the rates of the flows through each resource, kept as rates change, so
    #: whether a resource was full is one look-up (it summed every flow through it: many-
    #: small at 200 nodes asked 6.9 M times, 15 of the fill's 57 profiled seconds). It
    #: differs from a fresh sum by float rounding only, far inside ``_FULL``.
    _used: dict[Resource, float] = field(default_factory=dict)
    #: re-fill only what a change can move (:meth:`_refill_local`) instead of its whole
    #: component: the same allocation up to float rounding, far cheaper in large components
    incremental: bool = False

    def add_node(self, node: str, up_Bps: float, down_Bps: float) -> None:
        """Declare ``node``'s link capacities (bytes/s); both must be positive."""
        if up_Bps <= 0 or down_Bps <= 0:
            raise FlowError(f"node {node!r}: capacities must be > 0, got {up_Bps}, {down_Bps}")
        self._capacity[("up", node)] = up_Bps
        self._capacity[("down", node)] = down_Bps

    def up_Bps(self, node: str) -> float:
        """``node``'s upload capacity (bytes/s)."""
        return self._capacity[("up", node)]

    def down_Bps(self, node: str) -> float:
        """``node``'s download capacity (bytes/s)."""
        return self._capacity[("down", node)]

    def add(self, flow: str, src: str, dst: str, cap: float | None = None) -> dict[str, float]:
        """Start ``flow`` from ``src`` to ``dst``; returns the rates of every flow it affects.

        The returned map holds the new flow and every flow sharing a
        component with it (whether or not its rate moved); with
        ``incremental``, every flow it re-filled, which takes in every flow
        whose rate moved.
        """
        if flow in self._flows:
            raise FlowError(f"flow {flow!r} exists already")
        resources: list[Resource] = [("up", src), ("down", dst)]
        for r in resources:
            if r not in self._capacity:
                raise FlowError(f"unknown node {r[1]!r} (add_node first)")
        if cap is not None:
            if cap <= 0:
                raise FlowError(f"flow {flow!r}: cap must be > 0, got {cap}")
            own: Resource = ("flow", flow)
            self._capacity[own] = cap
            resources.append(own)
        self._flows[flow] = _Flow(tuple(resources))
        for r in resources:
            self._through.setdefault(r, {})[flow] = None
        return self._refill(resources)

    def remove(self, flow: str) -> dict[str, float]:
        """End ``flow``; returns the rates of the flows that shared a component with it.

        (With ``incremental``: of the flows it re-filled, as for :meth:`add`.)
        """
        f = self._flows.pop(flow, None)
        if f is None:
            raise FlowError(f"no flow {flow!r}")
        used = self._used
        for r in f.resources:
            users = self._through[r]
            users.pop(flow, None)
            if not users:
                del self._through[r]
                used.pop(r, None)  # (an empty resource starts again from an exact 0)
            else:
                used[r] -= f.rate
            if r[0] == "flow":
                del self._capacity[r]
        return self._refill(f.resources)

    def rate(self, flow: str) -> float:
        try:
            return self._flows[flow].rate
        except KeyError:
            raise FlowError(f"no flow {flow!r}") from None

    def rates(self) -> dict[str, float]:
        return {fid: f.rate for fid, f in self._flows.items()}

    def __len__(self) -> int:
        return len(self._flows)

    # -- internals -------------------------------------------------------
    def _refill(self, start: Sequence[Resource]) -> dict[str, float]:
        return self._refill_local(start) if self.incremental else self._refill_from(start)

    def _set_rates(self, out: dict[str, float]) -> None:
        """Give each flow of ``out`` its new rate, and move its resources' sums with it."""
        flows, used = self._flows, self._used
        for fid, rate in out.items():
            f = flows[fid]
            delta = rate - f.rate
            if delta:
                for r in f.resources:
                    used[r] = used.get(r, 0.0) + delta
                f.rate = rate

    def _refill_local(self, start: Sequence[Resource]) -> dict[str, float]:
        """Re-fill only the flows a change at ``start`` can move; returns their new rates.

        Why it is enough: in a max-min fair allocation every flow has a
        *bottleneck*, a full resource on which no flow gets more. The flows
        through ``start`` are re-filled (the *members*); every other flow keeps
        its rate and enters the fill only as what it takes of the resources it
        shares with members. The result is max-min fair again unless one of
        those kept flows (a) now gets more than the members on a full resource
        they share (it must come down), or (b) had its bottleneck on a resource
        the members share and lost it there (the resource has room now, or a
        member gets more on it): it may go up. Each such flow joins the members
        and the fill is redone; every other flow keeps its bottleneck, untouched.
        The allocation is a whole-component fill's up to float rounding
        (tests/bench/test_flows_refill.py checks both on random sequences).

        Session 12: the first version re-filled every flow reached through *full*
        resources; where every upload is booked (``swarm``) that was most of the
        component, while ~4 rates moved per change (many-small at 200 nodes: 60
        flows re-filled per change, 3.9 moved).
        """
        through, flows, capacity = self._through, self._flows, self._capacity
        members: set[str] = set()
        for r in start:
            members.update(through.get(r, ()))
        if not members:
            return {}
        # before the change: which resources were full (``used`` moves only with the rates
        # the fill sets, so it still holds the old ones) and the most any flow got there
        was_full: dict[Resource, bool] = {}
        old_max: dict[Resource, float] = {}
        while True:
            left: dict[Resource, float] = {}
            users: dict[Resource, int] = {}
            version: dict[Resource, int] = {}
            # per resource, its members and its kept flows with their rates, in its order
            # (_unsettled reads them again: one pass over each resource's flows)
            split: dict[Resource, tuple[list[str], list[str], list[float]]] = {}
            for fid in members:
                for r in flows[fid].resources:
                    if r in left:
                        continue
                    cap = capacity[r]
                    mine: list[str] = []
                    kept: list[str] = []
                    kept_rates: list[float] = []
                    for g in through[r]:
                        if g in members:
                            mine.append(g)
                        else:
                            rate = flows[g].rate
                            kept.append(g)
                            kept_rates.append(rate)
                            cap -= rate
                    split[r] = (mine, kept, kept_rates)
                    left[r], users[r], version[r] = (cap if cap > 0.0 else 0.0), len(mine), 0
            heap = [(cap / users[r], 0, r) for r, cap in left.items()]
            heapq.heapify(heap)
            pop, push = heapq.heappop, heapq.heappush
            out: dict[str, float] = {}
            while heap:
                share, v, r = pop(heap)
                if v != version[r] or users[r] == 0:
                    continue
                for fid in through[r]:
                    if fid in out or fid not in members:
                        continue
                    out[fid] = share
                    for other in flows[fid].resources:
                        if other == r:
                            continue
                        rest = left[other] - share
                        left[other] = rest = rest if rest > 0.0 else 0.0
                        n = users[other] - 1
                        users[other] = n
                        v = version[other] + 1
                        version[other] = v
                        if n:
                            push(heap, (rest / n, v, other))
                users[r] = 0
            joining = self._unsettled(out, split, was_full, old_max)
            if not joining:
                self._set_rates(out)
                return out
            members.update(joining)

    def _unsettled(
        self,
        out: dict[str, float],
        split: dict[Resource, tuple[list[str], list[str], list[float]]],
        was_full: dict[Resource, bool],
        old_max: dict[Resource, float],
    ) -> set[str]:
        """The kept flows that lost their bottleneck or got more than the members (above).

        ``split``: per resource the members use, its members and its kept flows with their
        rates, each in the resource's order (the sums are those of a pass over it).
        """
        flows, capacity, used = self._flows, self._capacity, self._used
        joining: set[str] = set()
        for r, (mine, kept, kept_rates) in split.items():
            if not kept:
                continue
            if r not in was_full:
                was_full[r] = used.get(r, 0.0) >= capacity[r] * (1 - _FULL)
                # the most any flow got here before (a max: the same in any order)
                old_max[r] = max(max(kept_rates), max(flows[g].rate for g in mine))
            rates = [out[g] for g in mine]
            full = sum(rates) + sum(kept_rates) >= capacity[r] * (1 - _FULL)
            top = max(rates)
            lost = was_full[r]
            for g, rate in zip(kept, kept_rates, strict=True):
                if full and rate > top * (1 + _FULL):
                    joining.add(g)  # (a): more than the members on a full resource
                elif lost and rate >= old_max[r] * (1 - _FULL):
                    if not full or rate < top * (1 - _FULL):
                        joining.add(g)  # (b): its bottleneck was here, and is no longer
        return joining

    def _refill_from(self, start: Iterable[Resource]) -> dict[str, float]:
        """Progressive filling of every component touching ``start``; the new rates there.

        One pass finds the component (flows linked through shared resources)
        and its resources; each resource's unfrozen users start as every flow
        through it, since a component holds all of them. Then resources are
        popped by fair share (ties: by how many of their flows froze already,
        then by resource), and a popped resource freezes its unfrozen flows at
        its share. The order -- and so every float -- is that of the plain
        algorithm (tests/bench/test_flows_refill.py replays both).
        """
        through, flows, capacity = self._through, self._flows, self._capacity
        seen: set[Resource] = set()
        todo: list[Resource] = []
        for r in start:
            if r in through and r not in seen:
                seen.add(r)
                todo.append(r)
        members: set[str] = set()
        while todo:
            for fid in through[todo.pop()]:
                if fid not in members:
                    members.add(fid)
                    for x in flows[fid].resources:
                        if x not in seen:
                            seen.add(x)
                            todo.append(x)
        left: dict[Resource, float] = {}  # capacity not yet taken by frozen flows
        users: dict[Resource, int] = {}  # unfrozen flows through it
        version: dict[Resource, int] = {}  # flows through it frozen so far (stale heap entries)
        heap: list[tuple[float, int, Resource]] = []
        for r in seen:
            cap, n = capacity[r], len(through[r])
            left[r], users[r], version[r] = cap, n, 0
            heap.append((cap / n, 0, r))
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        out: dict[str, float] = {}
        while heap:
            share, v, r = pop(heap)
            if v != version[r] or users[r] == 0:
                continue  # stale: its share changed since this entry
            for fid in through[r]:
                if fid in out:
                    continue
                out[fid] = share
                f = flows[fid]
                for other in f.resources:
                    if other == r:
                        continue
                    rest = left[other] - share
                    left[other] = rest = rest if rest > 0.0 else 0.0
                    n = users[other] - 1
                    users[other] = n
                    v = version[other] + 1
                    version[other] = v
                    if n:
                        push(heap, (rest / n, v, other))
            users[r] = 0
        self._set_rates(out)
        return out
