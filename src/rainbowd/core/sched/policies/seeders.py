"""The seeder side of the planner's indexes: free holders and relays per layer.

Why: a :meth:`~rainbowd.core.sched.policies.Planner.plan` call should cost about
the transfers it starts, so the holders with free upload of each layer stand
sorted by free upload (best fit bisects them), and so do the relays (nodes
still receiving a layer that may seed it: rules.py, cut-through relay), each
offered only while its chain's lag stays within the budget.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from typing import TYPE_CHECKING

from .state import _MIN_FREE_SHARE, MIN_SPEED_BPS, RELAY_HOP_S, PlannerState

if TYPE_CHECKING:
    from ..records import Node


class SeederIndex(PlannerState):
    """Per layer, the holders with free upload and the relays, sorted by what they offer."""

    def holding_added(self, node: Node, layer: str) -> None:
        self._raise_fastest(layer, node.speed_bps)
        key = self._seed_key.get(node.node_id)
        if key is not None:
            insort(self._free.setdefault(layer, []), key)

    def holding_removed(self, node: Node, layer: str) -> None:
        """``node`` deleted ``layer``: it leaves the layer's free holders (it cannot seed it)."""
        self._sums_epoch += 1
        key = self._seed_key.get(node.node_id)
        idle = self._free.get(layer)
        if key is not None and idle:
            i = bisect_left(idle, key)
            if i < len(idle) and idle[i] == key:
                del idle[i]
        # min_share is taken of the fastest holder: one that is gone must not count
        # (a demander would wait for a seeder that no longer exists)
        rest = [self._s.nodes[h].speed_bps for h in self._s.holders_of(layer) if h != node.node_id]
        if rest:
            self._fastest_holder[layer] = max(rest)
        else:
            self._fastest_holder.pop(layer, None)

    def _raise_fastest(self, layer: str, speed: float) -> None:
        """A holder of ``layer`` uploads at ``speed``: the layer's fastest holder is no slower.

        A change moves ``_sums_epoch``: the demand sums kept per node
        (DemanderIndex._demand_sums) divide by it.
        """
        if speed > self._fastest_holder.get(layer, 0.0):
            self._fastest_holder[layer] = speed
            self._sums_epoch += 1

    def _refresh_seeder(self, node: Node) -> None:
        nid = node.node_id
        self._prior.setdefault(nid, node.speed_bps)
        free = self.free_up(node)
        seeds = node.up and not node.suspect
        if not self.rules.slots:
            seeds = seeds and not self._up_used.get(nid)
        want = (-free, nid) if seeds and free >= _MIN_FREE_SHARE * node.speed_bps else None
        if self.rules.relay:
            self._refresh_relay(node, free, seeds)
        have = self._seed_key.get(nid)
        if want == have:
            return
        for layer in node.holdings:
            self._raise_fastest(layer, node.speed_bps)
            idle = self._free.setdefault(layer, [])
            if have is not None:
                del idle[bisect_left(idle, have)]
            if want is not None:
                insort(idle, want)
        if want is None:
            self._seed_key.pop(nid, None)
        else:
            self._seed_key[nid] = want

    def _refresh_relay(self, node: Node, free: float, seeds: bool) -> None:
        """Re-key ``node`` as a relay of each layer it is receiving (and does not hold)."""
        nid = node.node_id
        want: dict[str, tuple[float, str]] = {}
        if seeds:
            for t in node.transfers.values():
                if t.demander != nid or t.layer in node.holdings:
                    continue
                plan = self._plans.get(t.transfer_id)
                if plan is None or plan.direct:
                    continue
                if self._one_chunk(t.layer):
                    continue  # a relay forwards whole chunks: of one chunk, only the hop's cost
                if plan.lag + self.hop_s(t.layer, plan.planned) > self.lag_budget():
                    continue  # one more hop would trail too far behind (rules.py: relay)
                rate = min(free, plan.planned)
                if rate >= _MIN_FREE_SHARE * node.speed_bps:
                    key = (-rate, nid)
                    if key < want.get(t.layer, (0.0, "")):
                        want[t.layer] = key
        have = self._relay_keys.get(nid, {})
        if want == have:
            return
        for layer, key in have.items():
            relays = self._relays[layer]
            del relays[bisect_left(relays, key)]
            if not relays:
                del self._relays[layer]
        for layer, key in want.items():
            insort(self._relays.setdefault(layer, []), key)
        if want:
            self._relay_keys[nid] = want
        else:
            self._relay_keys.pop(nid, None)

    def lag_budget(self) -> float:
        """Seconds a relay chain's tail may trail a complete copy (rules.py, cut-through relay)."""
        return self.rules.relay_lag_s * max(1.0, math.log10(max(len(self._s.nodes), 1)) - 1)

    def hop_s(self, layer: str, rate: float) -> float:
        """Seconds one hop at ``rate`` adds to a chain's lag: a chunk's wire time + fixed cost."""
        return self._chunk_size(layer) / max(rate, MIN_SPEED_BPS) + RELAY_HOP_S

    def relay_rate(self, node: Node, layer: str) -> float:
        """The rate ``node`` can relay ``layer`` at (0: it is not a relay of it)."""
        key = self._relay_keys.get(node.node_id, {}).get(layer)
        return -key[0] if key is not None else 0.0

    def _seedable(self, layer: str) -> bool:
        """Some holder (or relay) of ``layer`` has free upload."""
        return bool(self._free.get(layer)) or bool(self._relays.get(layer))

    def _best_free(self, layer: str) -> float:
        """The largest free upload (relay rate) any seeder of ``layer`` offers."""
        return max(-lst[0][0] for lst in (self._free.get(layer), self._relays.get(layer)) if lst)
