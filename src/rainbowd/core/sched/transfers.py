"""The scheduler's active transfers, and the locks each one holds on its two nodes.

Why a class of its own: a transfer's start, adoption, completion and failure
all take or give back the same things -- the seeder's sending slot, the
demander's receiving slot, the demander's count of pulls of the layer, and
each node's list of its transfers -- and these must move together or a node
stays locked forever. :class:`ActiveTransfers` is the one place that moves
them; the :class:`~rainbowd.core.sched.scheduler.Scheduler` decides *when*
(and tells the policy and re-indexes the nodes around it).
"""

from __future__ import annotations

from .records import Node, Transfer


class ActiveTransfers:
    """Every active transfer by id, in start order, and its locks on the nodes' records."""

    def __init__(self) -> None:
        self._by_id: dict[str, Transfer] = {}

    def __contains__(self, transfer_id: object) -> bool:
        return transfer_id in self._by_id

    def __bool__(self) -> bool:
        return bool(self._by_id)

    def get(self, transfer_id: str) -> Transfer | None:
        return self._by_id.get(transfer_id)

    def all(self) -> list[Transfer]:
        """Every active transfer, in start order (a copy: O(transfers))."""
        return list(self._by_id.values())

    def lock(self, t: Transfer, seeder: Node, demander: Node) -> None:
        """Record ``t`` as active on both nodes.

        A slot (seeder sending, demander receiving) already held by another
        transfer stays with that one: only :meth:`Scheduler.adopt` can bring a
        second, and then both run, as they do in reality.
        """
        self._by_id[t.transfer_id] = t
        seeder.transfers[t.transfer_id] = t
        demander.transfers[t.transfer_id] = t
        demander.pulling[t.layer] = demander.pulling.get(t.layer, 0) + 1
        if seeder.sending is None:
            seeder.sending = t.transfer_id
        if demander.receiving is None:
            demander.receiving = t.transfer_id

    def forget(self, t: Transfer) -> bool:
        """Take ``t`` out of the active ones; False if it was not (ended already)."""
        return self._by_id.pop(t.transfer_id, None) is not None

    @staticmethod
    def unlock(t: Transfer, seeder: Node, demander: Node) -> None:
        """Give back what :meth:`lock` took on ``t``'s nodes (after :meth:`forget`)."""
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
