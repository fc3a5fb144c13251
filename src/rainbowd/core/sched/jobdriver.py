"""The job driver: jobs, transfer reports and faults turned into scheduler calls.

Why one module: the rules that decide what a report or a fault does to the
scheduler -- which failure makes a seeder suspect, which pair rests and for
how long, which failure counts against a demander's budget, when a transfer
the scheduler gave up on is taken back -- were written three times: in the
coordinator's services, in the simulator's loop (which knew none of the
faults) and in a test's loop. Here they are written once, pure (no I/O, no
clock: every call takes ``now``), so the coordinator and the simulator drive
the scheduler through the same code and a fault the simulator injects takes
the path a real report takes.

What stays with the callers: the coordinator keeps persistence, auth, HTTP,
metrics, the evidence checks (a report about a peer counts only when a
transfer backs it; bad chunks penalize or quarantine a seeder only on
several demanders' word; coordinator/evidence.py) and the holdings the nodes
report; the simulator keeps its network model. Both keep their own job
records; the driver gives them :class:`FailureBudget` for the per-layer
failure count.

The rules (PAPER.md, "Fault handling"):

* a job demands, per target, every layer it lacks, in image order;
* a failed transfer frees both sides; what it says about the seeder:
  ``io``/``unreachable`` (and not ``not_held``): the seeder is *suspect* (no
  new work until it reports) and the pair avoids each other for
  ``IO_AVOID_INTERVALS`` heartbeat intervals; bad chunks (``seeder_fault``)
  or a wrong host key: the pair avoids each other for
  ``VERIFY_AVOID_SECONDS``; ``relay`` (the seeder was relaying a layer it was
  still receiving and its own pull failed): the relay is *not* blamed, the
  pair rests ``REST_INTERVALS``; ``security`` without a seeder fault (the
  seeder's trust list is behind): the pair rests ``REST_INTERVALS``;
* budgets: a ``disk`` failure fails the node at once, a ``relay`` failure
  is free, any other counts; ``MAX_LAYER_FAILURES`` on one layer fail the node;
* a node that fails a job stops demanding what no other job of it needs;
* adoption: a transfer the agent still runs is taken back into the scheduler
  unless the demander holds the layer or another transfer brings that piece.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from .pieces import PieceScheduler
from .reasons import TransferReason
from .records import Transfer

#: transfer failures of one (node, layer) in one job after which the node fails in the job
MAX_LAYER_FAILURES = 5
#: a demander that got bad chunks (or a wrong host key) from a seeder avoids it this long
VERIFY_AVOID_SECONDS = 60.0
#: a demander that could not reach a seeder avoids it for this many heartbeat intervals
IO_AVOID_INTERVALS = 2.0
#: a pair whose failure was nobody's fault (a relay behind, a trust list behind) rests this
#: many heartbeat intervals: the re-plan prefers another seeder while the cause clears
REST_INTERVALS = 1.0

#: failure kinds that say the seeder could not be reached or cut the connection
UNREACHABLE_KINDS = ("io", "unreachable")


class Charge(Enum):
    """What a failure costs the demander's budget for the layer."""

    FREE = "free"  # nobody's fault here: re-planned without counting
    COUNT = "count"  # one of MAX_LAYER_FAILURES
    FINAL = "final"  # the node fails at once (its disk is full: no seeder can help)


class Blame(Enum):
    """What a failure says about the seeder (the scheduler's side of it is applied here)."""

    NONE = "none"
    SUSPECT = "suspect"  # could not reach it: suspect, and the pair avoids it
    RELAY = "relay"  # a relay's upstream failed: not the relay's fault; the pair rests
    TRUST_BEHIND = "trust_behind"  # it refused the demander's key: its trust list is behind
    BAD_CHUNKS = "bad_chunks"  # it sent bytes that failed verification
    HOST_KEY = "host_key"  # its host key was not the pinned one


@dataclass(frozen=True)
class Failure:
    """A transfer failure as the demander reports it (``TransferFailed`` without the text)."""

    kind: str
    seeder_fault: bool = False
    not_held: bool = False

    @property
    def accuses_seeder(self) -> bool:
        """Does it say something about the seeder (so the coordinator wants evidence)?"""
        return self.seeder_fault or self.not_held or self.kind in ("security", *UNREACHABLE_KINDS)

    @property
    def charge(self) -> Charge:
        if self.kind == "disk":
            return Charge.FINAL
        if self.kind == "relay":
            return Charge.FREE
        return Charge.COUNT

    @property
    def blame(self) -> Blame:
        """The seeder's share, in the order the coordinator has always read a report."""
        if self.kind == "security":
            return Blame.HOST_KEY if self.seeder_fault else Blame.TRUST_BEHIND
        if self.seeder_fault:
            return Blame.BAD_CHUNKS
        if self.kind == "relay":
            return Blame.RELAY
        if self.kind in UNREACHABLE_KINDS and not self.not_held:
            return Blame.SUSPECT
        return Blame.NONE


@dataclass(frozen=True)
class Failed:
    """What :meth:`JobDriver.failed` did: the transfer, whether it was still running, the rule."""

    transfer: Transfer
    was_active: bool
    charge: Charge
    blame: Blame
    #: until when the pair avoids each other (0: it does not); a pass after it may pair them
    avoid_until: float = 0.0


@dataclass
class FailureBudget:
    """Failed transfers per layer of one node in one job (``MAX_LAYER_FAILURES`` each)."""

    limit: int = MAX_LAYER_FAILURES
    failures: dict[str, int] = field(default_factory=dict)

    def charge(self, layer: str, charge: Charge) -> int:
        """Count a failure of ``layer``; returns the count so far (0: it was free)."""
        if charge is Charge.FREE:
            return 0
        n = self.failures.get(layer, 0) + 1
        self.failures[layer] = n
        return n

    def exhausted(self, layer: str, charge: Charge) -> bool:
        """Whether the node fails its job after this failure of ``layer`` (already charged)."""
        return charge is Charge.FINAL or self.failures.get(layer, 0) >= self.limit


class Timing(Protocol):
    """The one setting the rules read: the agents' heartbeat interval (seconds)."""

    @property
    def heartbeat_interval(self) -> float: ...


class JobDriver:
    """Jobs, reports and faults as scheduler calls; see the module docstring.

    ``timing`` is read on every call (the coordinator's settings are shared
    and tests change them); ``scheduler`` stays reachable for the read-only
    questions (holds, active, speed) callers ask it directly.
    """

    def __init__(self, scheduler: PieceScheduler, timing: Timing) -> None:
        self.scheduler = scheduler
        self.timing = timing

    # -- nodes ----------------------------------------------------------------
    def node_up(
        self,
        node_id: str,
        speed_bps: float = 0.0,
        holdings: Iterable[str] = (),
        *,
        max_upload_bps: float | None = None,
        max_download_bps: float | None = None,
        download_bps: float = 0.0,
    ) -> None:
        """A node joins or comes back: schedulable with its hints (and what it holds)."""
        self.scheduler.add_node(
            node_id,
            speed_bps,
            holdings,
            max_upload_bps=max_upload_bps,
            max_download_bps=max_download_bps,
            download_bps=download_bps,
        )

    def reported(self, node_id: str) -> bool:
        """An up node was heard from: a suspect is schedulable again. True if it was suspect."""
        if not self.scheduler.is_suspect(node_id):
            return False
        self.scheduler.add_node(node_id)
        return True

    def node_down(self, node_id: str) -> list[Transfer]:
        """A node is gone: the transfers it received are dropped (returned); those it
        seeds stay until their demanders report (they may still be moving bytes)."""
        return self.scheduler.node_down(node_id)

    def orphans(self, is_up: Callable[[str], bool]) -> list[Transfer]:
        """Release running transfers whose demander is not up (adopted, it never came back)."""
        gone = [t for t in self.scheduler.active() if not is_up(t.demander)]
        for t in gone:
            self.scheduler.fail(t.transfer_id)
        return gone

    # -- jobs -----------------------------------------------------------------
    def demand(self, node_id: str, layers: Iterable[str], job_id: str, now: float) -> None:
        """``node_id`` needs ``layers`` (image order) for ``job_id``."""
        for layer in layers:
            self.scheduler.demand(node_id, layer, job_id, now)

    def release(self, node_id: str, layers: Iterable[str], keep: set[str]) -> None:
        """A node failed a job: stop demanding its ``layers`` that no other job needs (``keep``)."""
        for layer in layers:
            if layer not in keep:
                self.scheduler.cancel_demand(node_id, layer)

    def plan(self, now: float) -> list[Transfer]:
        """Every transfer the scheduler allows now."""
        return self.scheduler.schedule(now)

    def unusable(self, t: Transfer) -> None:
        """A planned transfer that cannot be handed out (no manifest, no node): drop its demand."""
        self.scheduler.fail(t.transfer_id)
        self.scheduler.cancel_demand(t.demander, t.layer)

    # -- reports --------------------------------------------------------------
    def done(
        self, transfer_id: str, now: float, bytes_moved: int, seconds: float = 0.0
    ) -> Transfer | None:
        """The demander verified its piece in ``seconds``: the seeder's speed and the
        transfer's fixed cost are measured. None if not running."""
        if not self.scheduler.is_active(transfer_id):
            return None
        return self.scheduler.complete(transfer_id, now, bytes_moved, seconds)

    def holds_layer(self, t: Transfer) -> bool:
        """Whether ``t``'s demander holds all of ``t.layer`` now that ``t`` is done.

        A piece finishing does not make a holding: the job counts the layer (and
        the node seeds it whole) once the scheduler has every piece of it there.
        """
        return t.end_chunk == 0 or self.scheduler.holds(t.demander, t.layer)

    def failed(self, t: Transfer, failure: Failure, now: float, *, blame: bool = True) -> Failed:
        """A failure report of ``t``: free both sides, and apply what it says of the seeder.

        ``blame`` False: the seeder is gone or already quarantined, so nothing
        is held against it. The caller charges its job records with
        ``charge`` (:class:`FailureBudget`) and checks its evidence.
        """
        active = self.scheduler.is_active(t.transfer_id)
        if active:
            self.scheduler.fail(t.transfer_id)
        rule = failure.blame if blame else Blame.NONE
        return Failed(t, active, failure.charge, rule, self._blame(t, rule, now))

    def _blame(self, t: Transfer, rule: Blame, now: float) -> float:
        """Apply ``rule`` to the scheduler; returns until when the pair avoids each other."""
        interval = self.timing.heartbeat_interval
        if rule in (Blame.HOST_KEY, Blame.BAD_CHUNKS):
            return self.bad_peer(t.demander, t.seeder, now)
        if rule in (Blame.TRUST_BEHIND, Blame.RELAY):
            until = now + REST_INTERVALS * interval
        elif rule is Blame.SUSPECT:
            self.scheduler.suspect(t.seeder)
            until = now + IO_AVOID_INTERVALS * interval
        else:
            return 0.0
        self.scheduler.avoid(t.demander, t.seeder, until)
        return until

    def bad_peer(self, demander: str, seeder: str, now: float) -> float:
        """``demander`` got bad chunks or a wrong host key from ``seeder``: the pair part
        (until the time returned)."""
        until = now + VERIFY_AVOID_SECONDS
        self.scheduler.avoid(demander, seeder, until)
        return until

    def penalize(self, seeder: str) -> float:
        """Several demanders' word against ``seeder``: its speed halves (returned)."""
        return self.scheduler.penalize(seeder)

    # -- adoption -------------------------------------------------------------
    def adopt(self, t: Transfer) -> Transfer:
        """Lock ``t`` back in (after a restart); raises SchedulerError if its piece is gone."""
        return self.scheduler.adopt(t)

    def readopt(self, t: Transfer, *, held: bool) -> bool:
        """The agent still runs ``t`` though the scheduler gave up on it: take it back.

        Not when the demander holds the layer (``held``) or another transfer
        brings the same piece (it was re-planned meanwhile).
        """
        if held or self.scheduler.receiving_piece(t.demander, t) is not None:
            return False
        self.scheduler.adopt(t)
        return True

    def adopt_reported(
        self, transfer_id: str, layer: str, seeder: str, demander: str, job_id: str, now: float
    ) -> Transfer | None:
        """A transfer nobody here issued (its record is lost) that the agent runs.

        Taken in unless another transfer brings the layer to ``demander``.
        """
        if self.scheduler.receiving(demander, layer) is not None:
            return None
        t = Transfer(
            transfer_id=transfer_id,
            layer=layer,
            seeder=seeder,
            demander=demander,
            job_id=job_id,
            started_at=now,
            reason=TransferReason.adopted(),
            seeder_speed_bps=self.scheduler.speed(seeder),
        )
        self.scheduler.adopt(t)
        return t

    def lost(self, transfer_id: str) -> Transfer:
        """An adopted transfer whose assignment never reached the agent: planned again."""
        return self.scheduler.fail(transfer_id)

    def absent(self, t: Transfer, *, held: bool, now: float) -> bool:
        """The agent no longer runs ``t``: over -- completed if the layer is held (True),
        released otherwise (False)."""
        if held:
            self.scheduler.complete(t.transfer_id, now)
            return True
        self.scheduler.fail(t.transfer_id)
        return False
