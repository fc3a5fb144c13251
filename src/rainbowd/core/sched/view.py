"""What a scheduling policy may see of the scheduler, and the one thing it may do.

Why: the capacity-aware planner (policies/) lives beside the scheduler that
keeps the cluster's records (scheduler.py), and used to read that class's
private fields and call its private ``_start``, so each imported the other.
:class:`SchedulerView` is the whole contract instead, as kraken's piece
policies see their dispatcher only through a small interface: the records of
records.py to read, and :meth:`SchedulerView.start_transfer` to act. Every
other rule of the scheduler (avoided pairs, suspects, adopt, node down) stays
the scheduler's, because a transfer can only start through it. The
:class:`~rainbowd.core.sched.scheduler.Scheduler` satisfies this protocol
(checked by mypy where it hands itself to its planner); the policies import
this module and records.py, never scheduler.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from typing import Protocol

from .reasons import TransferReason
from .records import Demand, Node, Transfer


class SchedulerView(Protocol):
    """The scheduler as a policy sees it: its records, read-only, and starting a transfer.

    A policy may change one thing in a record directly: a node's ``speed_bps``,
    the estimate the planner moves when a transfer it planned ends or fails
    (the scheduler re-indexes the node right after, as it frees the transfer).
    """

    @property
    def nodes(self) -> Mapping[str, Node]:
        """Every known node by id (up or not)."""
        ...

    @property
    def layer_sizes(self) -> Mapping[str, int]:
        """Layer -> size in bytes, where known."""
        ...

    @property
    def layer_chunks(self) -> Mapping[str, int]:
        """Layer -> chunk size in bytes, where known."""
        ...

    @property
    def open_demands(self) -> Mapping[str, int]:
        """Layer -> how many demands of it are open (a layer none wants is absent)."""
        ...

    def holders_of(self, layer: str) -> AbstractSet[str]:
        """The nodes holding ``layer`` (not the ones still receiving it)."""
        ...

    def allowed(self, demander_id: str, seeder_id: str) -> bool:
        """Whether ``seeder_id`` may serve ``demander_id`` now (not itself, not avoided)."""
        ...

    def receiving(self, node_id: str, layer: str) -> Transfer | None:
        """The active transfer bringing ``layer`` to ``node_id``, if any."""
        ...

    def start_transfer(
        self,
        seeder: Node,
        demander: Node,
        demand: Demand,
        now: float,
        reason: TransferReason | None = None,
        plan_hook: Callable[[Transfer], None] | None = None,
    ) -> Transfer:
        """Start ``demand``'s transfer from ``seeder``; ``plan_hook`` books it before it locks."""
        ...
