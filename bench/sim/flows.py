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
reached through *full* resources (:meth:`FlowNetwork._refill_local`), a few
dozen where the component holds thousands. The allocation is the same up to
float rounding (a whole-component fill sums the same shares in another order).
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
    #: :meth:`_full` is one look-up (it summed every flow through the resource: many-small
    #: at 200 nodes called it 6.9 M times, 15 of the fill's 57 profiled seconds)
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

    def _full(self, r: Resource) -> bool:
        """Whether the flows through ``r`` take all of it (within float rounding).

        The running sum differs from a fresh one by float rounding only (~1e-15 of the
        capacity over a run), far inside ``_FULL``; and taking a nearly full resource for
        full (or not) changes only how much is re-filled, not the allocation.
        """
        return self._used.get(r, 0.0) >= self._capacity[r] * (1 - _FULL)

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
        *bottleneck*, a full resource on which no flow gets more. A change at
        ``start`` travels only through full resources (a resource with room
        left binds nobody), so the flows to re-fill are those reached from
        ``start`` through full ones. Resources on their edge that still have
        room enter the fill with what the flows outside leave of them. If the
        fill makes one of those a bottleneck, the change did reach past it:
        it joins the full ones and the fill is redone. Every other flow keeps
        its bottleneck, untouched, so the result is max-min fair again -- the
        allocation a whole-component fill gives, up to float rounding
        (tests/bench/test_flows_refill.py checks both on random sequences).
        """
        through, flows, capacity = self._through, self._flows, self._capacity
        roots = [r for r in start if r in through]
        opened: set[Resource] = set(roots)  # resources whose every flow is re-filled
        while True:
            members: set[str] = set()
            seen: set[Resource] = set(roots)
            todo = list(roots)
            while todo:
                for fid in through[todo.pop()]:
                    if fid not in members:
                        members.add(fid)
                        for x in flows[fid].resources:
                            if x not in seen:
                                seen.add(x)
                                if x in opened or self._full(x):
                                    opened.add(x)
                                    todo.append(x)
            left: dict[Resource, float] = {}
            users: dict[Resource, int] = {}
            version: dict[Resource, int] = {}
            heap: list[tuple[float, int, Resource]] = []
            for r in seen:
                cap = capacity[r]
                if r in opened:
                    n = len(through[r])
                else:  # an edge resource: what the flows outside leave of it
                    n = 0
                    for fid in through[r]:
                        if fid in members:
                            n += 1
                        else:
                            cap -= flows[fid].rate
                    cap = cap if cap > 0.0 else 0.0
                left[r], users[r], version[r] = cap, n, 0
                heap.append((cap / n, 0, r))
            heapq.heapify(heap)
            pop, push = heapq.heappop, heapq.heappush
            out: dict[str, float] = {}
            reached: list[Resource] = []
            while heap:
                share, v, r = pop(heap)
                if v != version[r] or users[r] == 0:
                    continue
                if r not in opened:
                    reached.append(r)  # an edge resource became a bottleneck
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
            if not reached:
                self._set_rates(out)
                return out
            opened.update(reached)

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
