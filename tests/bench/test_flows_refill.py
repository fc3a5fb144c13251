"""The simulator's progressive filling (bench/sim/flows.py) against the plain algorithm.

The simulator's numbers are the project's evidence, so a faster fill must give
the *same floats in the same order*: the engine settles bytes and queues end
events in the order the fill returns its rates, and events at one instant run
in the order they were queued. ``Plain`` below is the algorithm as first
written (a component search, then progressive filling with per-resource user
counts); every add and remove of a seeded random sequence -- shared links,
equal capacities (ties), flows with caps of their own -- must return exactly
what it returns, key order included.
"""

from __future__ import annotations

import heapq
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.sim.flows import FlowNetwork, Resource


class Plain:
    """The reference: component by search, then a fill that counts users flow by flow."""

    def __init__(self) -> None:
        self.capacity: dict[Resource, float] = {}
        self.through: dict[Resource, dict[str, None]] = {}
        self.resources: dict[str, tuple[Resource, ...]] = {}

    def add_node(self, node: str, up: float, down: float) -> None:
        self.capacity[("up", node)] = up
        self.capacity[("down", node)] = down

    def add(self, flow: str, src: str, dst: str, cap: float | None = None) -> dict[str, float]:
        res: list[Resource] = [("up", src), ("down", dst)]
        if cap is not None:
            self.capacity[("flow", flow)] = cap
            res.append(("flow", flow))
        self.resources[flow] = tuple(res)
        for r in res:
            self.through.setdefault(r, {})[flow] = None
        return self.refill(self.component(res))

    def remove(self, flow: str) -> dict[str, float]:
        res = self.resources.pop(flow)
        for r in res:
            del self.through[r][flow]
            if not self.through[r]:
                del self.through[r]
            if r[0] == "flow":
                del self.capacity[r]
        return self.refill(self.component(res))

    def component(self, start: tuple[Resource, ...] | list[Resource]) -> set[str]:
        flows: set[str] = set()
        seen: set[Resource] = set()
        todo = [r for r in start if r in self.through]
        while todo:
            r = todo.pop()
            if r in seen:
                continue
            seen.add(r)
            for fid in self.through.get(r, ()):
                if fid not in flows:
                    flows.add(fid)
                    todo.extend(x for x in self.resources[fid] if x not in seen)
        return flows

    def refill(self, flows: set[str]) -> dict[str, float]:
        left: dict[Resource, float] = {}
        users: dict[Resource, int] = {}
        for fid in flows:
            for r in self.resources[fid]:
                left[r] = self.capacity[r]
                users[r] = users.get(r, 0) + 1
        version = dict.fromkeys(left, 0)
        heap = [(left[r] / users[r], 0, r) for r in left]
        heapq.heapify(heap)
        out: dict[str, float] = {}
        while heap:
            share, v, r = heapq.heappop(heap)
            if v != version[r] or users[r] == 0:
                continue
            for fid in self.through[r]:
                if fid in out:
                    continue
                out[fid] = share
                for other in self.resources[fid]:
                    if other == r:
                        continue
                    left[other] = max(0.0, left[other] - share)
                    users[other] -= 1
                    version[other] += 1
                    if users[other]:
                        heapq.heappush(heap, (left[other] / users[other], version[other], other))
            users[r] = 0
        return out


@pytest.mark.parametrize("seed", range(30))
def test_the_fill_returns_the_plain_algorithms_rates_in_its_order(seed: int) -> None:
    rng = random.Random(seed)
    names = [f"n{i}" for i in range(rng.randint(2, 12))]
    levels = [1.0, 2.0, 4.0, 8.0]  # few distinct capacities: many ties between shares
    net, plain = FlowNetwork(), Plain()
    for name in names:
        up, down = rng.choice(levels), rng.choice(levels)
        if rng.random() < 0.3:
            up, down = rng.uniform(0.5, 10), rng.uniform(0.5, 10)
        net.add_node(name, up, down)
        plain.add_node(name, up, down)
    live: list[str] = []
    for i in range(rng.randint(20, 120)):
        if live and rng.random() < 0.35:
            fid = live.pop(rng.randrange(len(live)))
            got, want = net.remove(fid), plain.remove(fid)
        else:
            fid = f"f{i}"
            cap = rng.choice([None, None, 0.7, 1.0, rng.uniform(0.1, 5)])
            src, dst = rng.choice(names), rng.choice(names)
            got, want = net.add(fid, src, dst, cap), plain.add(fid, src, dst, cap)
            live.append(fid)
        assert list(got.items()) == list(want.items())
    assert net.rates() == {fid: net.rate(fid) for fid in live}


@pytest.mark.parametrize("seed", range(60))
def test_the_incremental_fill_gives_the_whole_components_allocation(seed: int) -> None:
    """After every add and remove, every flow's rate is the whole fill's (to float rounding).

    Few distinct capacities and shared nodes make full links common, so changes
    travel far; the returned map must hold every flow whose rate moved.
    """
    rng = random.Random(1000 + seed)
    names = [f"n{i}" for i in range(rng.randint(2, 16))]
    levels = [1.0, 2.0, 3.0, 8.0]
    inc, full = FlowNetwork(incremental=True), FlowNetwork()
    for name in names:
        up, down = rng.choice(levels), rng.choice(levels)
        if rng.random() < 0.4:
            up, down = rng.uniform(0.5, 10), rng.uniform(0.5, 10)
        inc.add_node(name, up, down)
        full.add_node(name, up, down)
    live: list[str] = []
    for i in range(rng.randint(30, 200)):
        before = inc.rates()
        if live and rng.random() < 0.4:
            fid = live.pop(rng.randrange(len(live)))
            got = inc.remove(fid)
            full.remove(fid)
            before.pop(fid)
        else:
            fid = f"f{i}"
            cap = rng.choice([None, None, None, 0.7, 1.0, rng.uniform(0.1, 5)])
            src, dst = rng.choice(names), rng.choice(names)
            got = inc.add(fid, src, dst, cap)
            full.add(fid, src, dst, cap)
            live.append(fid)
            assert fid in got
        now, want = inc.rates(), full.rates()
        assert now.keys() == want.keys()
        for f, rate in want.items():
            assert now[f] == pytest.approx(rate, rel=1e-9, abs=1e-12), f
            if f not in got:
                assert now[f] == before[f]  # not re-filled: untouched


@pytest.mark.parametrize("seed", range(20))
def test_the_running_sums_of_rates_per_link_match_a_fresh_sum(seed: int) -> None:
    """The fill reads a running sum of rates per resource: it must track the rates it sums.

    After every add and remove, each resource's sum equals the sum of its flows' rates
    (to float rounding), and no resource whose last flow left keeps a sum.
    """
    rng = random.Random(5000 + seed)
    names = [f"n{i}" for i in range(rng.randint(2, 10))]
    net = FlowNetwork(incremental=rng.random() < 0.5)
    for name in names:
        net.add_node(name, rng.choice([1.0, 2.0, rng.uniform(0.5, 10)]), rng.uniform(0.5, 10))
    live: list[str] = []
    for i in range(rng.randint(30, 150)):
        if live and rng.random() < 0.4:
            net.remove(live.pop(rng.randrange(len(live))))
        else:
            cap = rng.choice([None, None, 0.7, rng.uniform(0.1, 5)])
            net.add(f"f{i}", rng.choice(names), rng.choice(names), cap)
            live.append(f"f{i}")
        assert net._used.keys() <= net._through.keys()  # no sum outlives its last flow
        for r, users in net._through.items():
            fresh = sum(net.rate(f) for f in users)
            assert net._used.get(r, 0.0) == pytest.approx(fresh, rel=1e-12, abs=1e-12), r
