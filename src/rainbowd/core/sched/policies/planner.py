"""The planner the scheduler holds: transfers ending, adopted, failed; speeds observed.

Why: the scheduler tells its planner about every transfer's life (started,
ended, observed, failed), and the planner gives back the reservations and, with
``ewma``, moves the speed estimate of the side that limited a transfer
(rules.py, measured speeds). The rest of :class:`Planner` is in its bases:
state.py -> seeders.py -> demanders.py -> fit.py -> merge.py -> walk.py, one concern
each.
The scheduler sees it as a :class:`~rainbowd.core.sched.policy.PolicyPass`;
the last methods here are that protocol's names for what the bases do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .state import (
    FAILED_FACTOR,
    FAILURES_TO_SLOW,
    MIN_OBSERVE_S,
    MIN_OBSERVED_RATIO,
    MIN_SPEED_BPS,
    RESERVED_DUST_BPS,
    _Plan,
)
from .walk import Walker

if TYPE_CHECKING:
    from ..reasons import TransferReason
    from ..records import Demand, Node, Transfer


class Planner(Walker):
    """The capacity-aware planner behind one :class:`Scheduler` (see rules.py)."""

    def started(self, t: Transfer) -> None:
        """A transfer the planner did not plan (adopted): reserve what it plausibly takes."""
        if t.transfer_id in self._plans:
            return
        seeder, node = self._s.nodes[t.seeder], self._s.nodes[t.demander]
        if self.rules.slots:
            rate = max(0.0, min(self.free_up(seeder), self.free_down(node)))
        else:
            rate = min(seeder.speed_bps, node.speed_bps)
        up = rate if self.rules.slots else seeder.speed_bps
        down = rate if self.rules.slots else node.speed_bps
        # (adopted after a restart: whether it was relayed is not known; taken as direct)
        self._hold(t, _Plan(up, down, max(rate, MIN_SPEED_BPS), True))

    def ended(self, t: Transfer) -> None:
        plan = self._plans.pop(t.transfer_id, None)
        if plan is None:
            return
        left = self._receiving.get(t.layer, 0) - 1
        if left > 0:
            self._receiving[t.layer] = left
        else:
            self._receiving.pop(t.layer, None)
        self._up_used[t.seeder] = max(0.0, self._up_used.get(t.seeder, 0.0) - plan.up)
        if plan.urgent:
            self._urgent_used[t.seeder] = self._urgent_used.get(t.seeder, 0.0) - plan.up
        self._down_used[t.demander] = max(0.0, self._down_used.get(t.demander, 0.0) - plan.down)
        if plan.direct:
            left = self._direct_bytes.get(t.seeder, 0) - self._s.layer_sizes.get(t.layer, 0)
            self._direct_bytes[t.seeder] = max(0, left)
        for x in (self._up_used, self._down_used):
            for nid in (t.seeder, t.demander):
                if x.get(nid, 1.0) < RESERVED_DUST_BPS:
                    x.pop(nid, None)

    def observe(self, t: Transfer, now: float, bytes_moved: int) -> float | None:
        """A completed transfer's rate moves the estimate of the side that limited it.

        Returns the new estimate of the node that changed (None: no change).
        Only transfers of ``MIN_OBSERVE_S`` or longer count, so set-up delays
        of small layers do not read as slow links.
        """
        self._failures.pop(t.seeder, None)
        plan = self._plans.get(t.transfer_id)
        seconds = now - t.started_at
        if self.rules.ewma <= 0 or plan is None or plan.direct or bytes_moved <= 0:
            return None
        if seconds < MIN_OBSERVE_S:
            return None
        if plan.planned <= 0:
            return None
        ratio = max(MIN_OBSERVED_RATIO, bytes_moved / seconds / plan.planned)
        node = self._s.nodes[t.seeder if plan.seeder_limited else t.demander]
        # a rate above plan only means others left room: it brings a slowed node back up to
        # its first estimate (the agent's hint), never beyond it
        seen = min(self._prior.setdefault(node.node_id, node.speed_bps), node.speed_bps * ratio)
        ewma = self.rules.ewma
        node.speed_bps = max(MIN_SPEED_BPS, (1 - ewma) * node.speed_bps + ewma * seen)
        return node.speed_bps

    def failed(self, t: Transfer) -> float | None:
        """A failed transfer counts against its seeder; repeated failures halve its estimate."""
        n = self._failures.get(t.seeder, 0) + 1
        self._failures[t.seeder] = n
        if self.rules.ewma <= 0 or n < FAILURES_TO_SLOW:
            return None
        node = self._s.nodes[t.seeder]
        node.speed_bps = max(MIN_SPEED_BPS, node.speed_bps * FAILED_FACTOR)
        return node.speed_bps

    # -- the rest of the PolicyPass protocol (policy.py) -------------------------
    def reason(self, seeder: Node, demander: Node, demand: Demand) -> TransferReason | None:
        """None: the planner gives each transfer it starts its reason (Fitter)."""
        return None

    def demander_changed(self, node: Node) -> None:
        if not node.up:
            self._pulled_from.forget(node.node_id)  # its connections went down with it
        self.refresh(node)

    def seeder_changed(self, node: Node) -> None:
        self.refresh(node)

    def seeder_booked(self, seeder: Node) -> None:
        self.refresh(seeder)

    def sizes_changing(self) -> None:
        self.flush()  # demanders changed before: re-key them with the sizes they saw

    def size_set(self) -> None:
        self.layer_size_set()

    def completed(self, t: Transfer, now: float, bytes_moved: int) -> bool:
        """The planner measures speeds itself (:meth:`observe`)."""
        self._clock = max(self._clock, now)
        self.observe(t, now, bytes_moved)
        return True
