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
several flows per node get larger components, still filled exactly.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field

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
        component with it (whether or not its rate moved).
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
        return self._refill_from(resources)

    def remove(self, flow: str) -> dict[str, float]:
        """End ``flow``; returns the rates of the flows that shared a component with it."""
        f = self._flows.pop(flow, None)
        if f is None:
            raise FlowError(f"no flow {flow!r}")
        for r in f.resources:
            users = self._through[r]
            users.pop(flow, None)
            if not users:
                del self._through[r]
            if r[0] == "flow":
                del self._capacity[r]
        return self._refill_from(f.resources)

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
    def _refill_from(self, start: Iterable[Resource]) -> dict[str, float]:
        """Progressive filling of every component touching ``start``; the new rates there.

        One pass finds the component (flows linked through shared resources)
        and its resources; each resource's unfrozen users start as every flow
        through it, since a component holds all of them. Then resources are
        popped by fair share (ties: by how many of their flows froze already,
        then by resource), and a popped resource freezes its unfrozen flows at
        its share. The order -- and so every float -- is that of the plain
        algorithm (tests/unit/test_flows_refill.py replays both).
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
                f.rate = share
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
        return out
