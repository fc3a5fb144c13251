"""What the scheduler asks of a policy's pass, and tells it: :class:`PolicyPass`.

Why: the scheduler keeps the records (nodes, holders, demands, transfers) and
the rules every policy obeys; a policy decides which seeder serves which
demander, and keeps whatever indexes make that cheap. The two meet here, in
one small protocol, as kraken's piece-selection policies meet their
dispatcher: the scheduler holds one pass and calls it, never asking which
policy it is. Two passes implement it: Algorithm 1's
:class:`~rainbowd.core.sched.paper.PaperPass` (``paper``) and the
capacity-aware :class:`~rainbowd.core.sched.policies.Planner`, which runs every
policy of policies/ (each a :class:`~rainbowd.core.sched.policies.Rules` entry,
one file each). A new algorithm (not new weights) is a third pass; the
other direction, what a pass may see and do of the scheduler, is
:class:`~rainbowd.core.sched.view.SchedulerView`.

Every event below comes after the scheduler updated its own records, so a
pass reads the new state; a pass with no use for an event does nothing.
"""

from __future__ import annotations

from typing import Protocol

from .reasons import TransferReason
from .records import Demand, Node, Transfer


class PolicyPass(Protocol):
    """A policy's pass over the scheduler's records: the transfers it starts, and its indexes."""

    def plan(self, now: float) -> list[Transfer]:
        """Start every transfer the policy allows now (through ``SchedulerView.start_transfer``)."""
        ...

    def reason(self, seeder: Node, demander: Node, demand: Demand) -> TransferReason | None:
        """Why ``seeder`` serves ``demand`` when a transfer starts without a reason given, or
        None: this pass always gives one (the scheduler then refuses a transfer without)."""
        ...

    # -- the records changed -------------------------------------------------
    def holding_added(self, node: Node, layer: str) -> None:
        """``node`` holds ``layer`` now."""
        ...

    def holding_removed(self, node: Node, layer: str) -> None:
        """``node`` no longer holds ``layer``."""
        ...

    def demand_added(self, node: Node, demand: Demand) -> None:
        """``node`` asked for one more layer."""
        ...

    def demander_changed(self, node: Node) -> None:
        """``node``'s standing as a demander changed (its ``version`` just moved)."""
        ...

    def seeder_changed(self, node: Node) -> None:
        """``node``'s standing as a seeder changed (speed, up, sending)."""
        ...

    def sizes_changing(self) -> None:
        """A layer's size is about to be set: settle what was computed with the old sizes."""
        ...

    def size_set(self) -> None:
        """A layer's size was set for the first time or changed."""
        ...

    # -- a transfer's life ---------------------------------------------------
    def started(self, t: Transfer) -> None:
        """``t`` was locked on its two nodes (planned by this pass, or adopted)."""
        ...

    def seeder_booked(self, seeder: Node) -> None:
        """A transfer from ``seeder`` just started (after :meth:`started` and the demander's
        :meth:`demander_changed`)."""
        ...

    def completed(self, t: Transfer, now: float, bytes_moved: int) -> bool:
        """``t`` is done, before it is released; True if this pass measured the seeder's
        speed from it itself (else the scheduler does, its own way)."""
        ...

    def failed(self, t: Transfer) -> float | None:
        """``t`` broke, before it is released; the seeder's new speed estimate if this pass
        moved it (else None)."""
        ...

    def ended(self, t: Transfer) -> None:
        """``t`` is released (done, failed, or its node went down)."""
        ...
