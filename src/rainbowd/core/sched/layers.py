"""The scheduler's records per layer: who holds it, who wants it, how big it is.

Why a class of its own: holdings and demands are kept twice, on each
:class:`~rainbowd.core.sched.records.Node` (what it holds, what it waits for)
and per layer (its holders, its open demands), because the policies ask both
ways; :class:`LayerRecords` keeps the two sides in step, so the
:class:`~rainbowd.core.sched.scheduler.Scheduler` only decides when a holding
or demand comes or goes, and which policy index to tell.
"""

from __future__ import annotations

import itertools
from collections.abc import Set as AbstractSet

from .records import Demand, Node

#: the holders of a layer nobody holds
_NOBODY: frozenset[str] = frozenset()


class LayerRecords:
    """Holders and open demands per layer (mirrored on the nodes), and layer sizes."""

    def __init__(self) -> None:
        # layer -> nodes holding it
        self._holders: dict[str, set[str]] = {}
        # (node, layer) -> demand, in arrival order (pending() reports this order)
        self._demands: dict[tuple[str, str], Demand] = {}
        # arrival number of the next demand (a demander's rank is its oldest one's)
        self._seq = itertools.count()
        #: layer -> open demands of it (a layer none wants is absent)
        self.open_demands: dict[str, int] = {}
        #: layer -> size in bytes, where known
        self.sizes: dict[str, int] = {}
        #: layer -> chunk size in bytes, where known
        self.chunks: dict[str, int] = {}

    # -- holders ---------------------------------------------------------
    def add_holder(self, node: Node, layer: str) -> bool:
        """``node`` holds ``layer``; False if it did already."""
        if layer in node.holdings:
            return False
        node.holdings.add(layer)
        self._holders.setdefault(layer, set()).add(node.node_id)
        return True

    def remove_holder(self, node: Node, layer: str) -> bool:
        """``node`` no longer holds ``layer``; False if it did not."""
        if layer not in node.holdings:
            return False
        node.holdings.discard(layer)
        self._holders.get(layer, set()).discard(node.node_id)
        return True

    def holders_of(self, layer: str) -> AbstractSet[str]:
        """The nodes holding ``layer``, unsorted and not copied."""
        return self._holders.get(layer, _NOBODY)

    # -- demands ---------------------------------------------------------
    def add_demand(self, node: Node, layer: str, job_id: str, now: float) -> Demand | None:
        """``node`` wants ``layer`` for ``job_id``; None if it holds it or already asked."""
        if layer in node.holdings or layer in node.demands:
            return None
        d = Demand(node.node_id, layer, job_id, now, next(self._seq))
        self._demands[(node.node_id, layer)] = d
        node.demands[layer] = d
        self.open_demands[layer] = self.open_demands.get(layer, 0) + 1
        return d

    def drop_demand(self, node: Node, layer: str) -> bool:
        """``node`` no longer wants ``layer`` (it holds it, or gave up); False if it did not."""
        if node.demands.pop(layer, None) is None:
            return False
        del self._demands[(node.node_id, layer)]
        left = self.open_demands[layer] - 1
        if left:
            self.open_demands[layer] = left
        else:
            del self.open_demands[layer]
        return True

    def pending(self) -> list[tuple[str, str]]:
        """(node, layer) demands not yet satisfied, in arrival order."""
        return list(self._demands)

    # -- sizes -----------------------------------------------------------
    def set_size(self, layer: str, size: int) -> bool:
        """Record ``layer``'s size in bytes (0 = unknown, ignored); True if it moved."""
        if size <= 0 or self.sizes.get(layer) == size:
            return False
        self.sizes[layer] = size
        return True

    def set_chunk_size(self, layer: str, chunk_size: int) -> None:
        """Record how ``layer`` is chunked (0 = unknown, ignored)."""
        if chunk_size > 0:
            self.chunks[layer] = chunk_size
