"""The leader lease, sans I/O: when to acquire, when to renew, when to stop leading.

Coordinators sharing one PostgreSQL compete for one lease row (the design:
docs/standby-coordinator.md, "Leader election"; the statements: coordinator/state/lease.py).
This class holds only the decisions, with the time passed in (a monotonic
clock of the coordinator's own host), so a fake clock tests every case and the
process around it (coordinator/http/leadership.py) only does what it is told:

* a **standby** tries to acquire every ``poll_s``;
* a **leader** renews every ``renew_s``;
* a leader **stops** scheduling once ``lease_s - margin_s`` has passed since it
  *sent* its last successful acquire or renew (:attr:`LeaseKeeper.valid_until`),
  whether or not the renews after it were answered; and at once when a renew
  updates no row (another coordinator holds a newer token: deposed).

Why the stop is always before anyone else can lead: the server sets
``expires_at = now() + lease`` when it *executes* the statement, which is after
we sent it, so on the server's clock the lease ends later than ``sent +
lease``. Our deadline ``sent + lease - margin`` on our own clock therefore comes
first as long as the two clocks tick at about the same rate (they need not
agree on the time). The margin covers what a rate difference cannot: our event
loop being late to look (a scheduling pass or a slow statement between two
checks). If the loop is stuck longer than that, fencing still holds: every
write transaction of the leader checks its token (state/postgres.py), so a
deposed leader's write is refused by the database.

The numbers: with a 3 s lease, a renew every second survives two lost renews
before the leader stops; standbys try every second, so a takeover after a
leader dies takes at most ``lease + poll`` plus the restore (issue 16's goal:
5 s).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

#: seconds a lease lasts on the database's clock from the statement that took or renewed it
LEASE_S = 3.0
#: a leader renews this often: a third of the lease, so two renews may fail before it stops
RENEW_S = LEASE_S / 3
#: a standby tries to acquire this often (bounds the takeover time: lease + poll + restore)
STANDBY_POLL_S = 1.0
#: the leader stops this long before its lease can end on the server: event-loop lateness
#: (a scheduling pass, a slow statement) between two checks, and clock rate differences
MARGIN_S = 0.5


class Action(Enum):
    """What the process should do now."""

    WAIT = "wait"  # nothing until ``Step.wake_at``
    ACQUIRE = "acquire"  # a standby tries to take the lease
    RENEW = "renew"  # the leader renews its lease
    STEP_DOWN = "step_down"  # the leader must stop scheduling now (by its own clock)


@dataclass(frozen=True)
class Step:
    """A decision: the action, and when to ask again (monotonic seconds)."""

    action: Action
    wake_at: float


class LeaseKeeper:
    """One coordinator's view of its lease; every method takes the monotonic time.

    The driver asks :meth:`step`; for ACQUIRE or RENEW it notes the time it
    sends the statement, runs it, and reports the outcome with that time
    (:meth:`acquired`, :meth:`acquire_failed`, :meth:`renewed`,
    :meth:`renew_failed`, :meth:`deposed`). STEP_DOWN has already made this
    keeper a standby when it is returned.
    """

    def __init__(
        self,
        lease_s: float = LEASE_S,
        renew_s: float = RENEW_S,
        poll_s: float = STANDBY_POLL_S,
        margin_s: float = MARGIN_S,
    ) -> None:
        if not 0 < renew_s < lease_s - margin_s or margin_s < 0 or poll_s <= 0:
            raise ValueError(
                f"lease {lease_s} s, renew {renew_s} s, margin {margin_s} s: the leader must "
                "renew before its own deadline (renew < lease - margin)"
            )
        self.lease_s = lease_s
        self.renew_s = renew_s
        self.poll_s = poll_s
        self.margin_s = margin_s
        #: the fencing token of the lease held (None: standby)
        self.token: int | None = None
        #: monotonic time the leader must have stopped by (meaningful while leading)
        self.valid_until = 0.0
        self._next_try = 0.0  # a standby's next acquire, or the leader's next renew

    @property
    def leading(self) -> bool:
        return self.token is not None

    def step(self, now: float) -> Step:
        """What to do at ``now``."""
        if self.token is not None:
            if now >= self.valid_until:
                self.token = None
                self._next_try = now + self.poll_s
                return Step(Action.STEP_DOWN, now)
            if now >= self._next_try:
                return Step(Action.RENEW, self.valid_until)
            return Step(Action.WAIT, min(self._next_try, self.valid_until))
        if now >= self._next_try:
            return Step(Action.ACQUIRE, now + self.poll_s)
        return Step(Action.WAIT, self._next_try)

    # -- outcomes, each with the time its statement was sent ------------------
    def acquired(self, sent_at: float, token: int) -> None:
        """The acquire sent at ``sent_at`` took the lease with ``token``."""
        self.token = token
        self.valid_until = sent_at + self.lease_s - self.margin_s
        self._next_try = sent_at + self.renew_s

    def acquire_failed(self, sent_at: float) -> None:
        """Someone else holds a live lease, or the database did not answer: try again later."""
        self._next_try = sent_at + self.poll_s

    def renewed(self, sent_at: float) -> None:
        """The renew sent at ``sent_at`` updated our row: the deadline moves on."""
        self.valid_until = max(self.valid_until, sent_at + self.lease_s - self.margin_s)
        self._next_try = sent_at + self.renew_s

    def renew_failed(self, sent_at: float) -> None:
        """The database did not answer: still leading until :attr:`valid_until`; retry soon.

        The retry comes after a third of the renew interval (not a whole one),
        so a short outage costs little of what is left of the lease.
        """
        self._next_try = sent_at + self.renew_s / 3

    def deposed(self, now: float) -> None:
        """The renew updated no row: another coordinator holds a newer token. Stop now."""
        self.token = None
        self.valid_until = now
        self._next_try = now + self.poll_s

    def released(self, now: float) -> None:
        """We gave the lease up (shutting down): a standby, trying again only after a poll."""
        self.deposed(now)
