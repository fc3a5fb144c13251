"""The dispatch service: transfers from the scheduler to the demanders' mailboxes, and back.

After every event that can free a seeder or a demander,
:meth:`Dispatch.schedule` asks the job driver (rainbowd.core.sched.jobdriver) for the
scheduler's transfers and queues each as a ``TransferAssignment`` to its
demander (the demander pulls). This service remembers every transfer (active
ones, and recently ended ones so late reports are understood), persists the
active ones, notes which were delivered (an agent's poll cursor passed them),
withdraws those the scheduler dropped (:meth:`Dispatch.aborted`) and, after a
coordinator restart, adopts the stored ones back into the scheduler before any
node is heard from.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import structlog

from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.digest import short
from rainbowd.core.messages import Assignment, AssignmentBatch, TransferAssignment
from rainbowd.core.sched.records import Transfer
from rainbowd.core.sched.scheduler import SchedulerError

from .cluster import Node
from .context import ServiceContext
from .evidence import PeerEvidence
from .jobs_service import JobsService
from .piece_wire import assignment_for
from .state import TransferState

log = structlog.get_logger(__name__)

#: finished/aborted transfers remembered so late reports are still understood
TRANSFER_MEMORY = 10_000


@dataclass
class Tracked:
    """What the coordinator knows of one transfer beyond the scheduler's record.

    ``t`` is that record, shared, not copied; the fields beside it are the
    coordinator's lifecycle of the transfer (its mailbox, delivery, restart and
    report bookkeeping), which the scheduler and the simulator must not see.
    """

    t: Transfer
    seq: int = 0  # mailbox sequence number of its assignment (0: not queued by us)
    acked_at: float = 0.0  # when the demander's cursor passed it (it was delivered)
    restored: bool = False  # adopted from the database after a restart
    reported: bool = False  # its done/failed report was applied
    bytes_seen: int = 0  # the most bytes a progress report of it has shown


def transfer_fields(t: Transfer) -> dict[str, str]:
    """The fields every log line about one transfer carries, in the same order."""
    return {
        "transfer": t.transfer_id,
        "layer": short(t.layer),
        "seeder": t.seeder,
        "demander": t.demander,
    }


class Dispatch:
    """Tracked transfers, scheduling and delivery; see the module docstring."""

    def __init__(
        self,
        ctx: ServiceContext,
        manifests: Mapping[str, ChunkManifest],
        jobs: JobsService,
        evidence: PeerEvidence,
    ) -> None:
        self.ctx = ctx
        self.manifests = manifests
        self.jobs = jobs
        self.evidence = evidence
        # every transfer known: active ones and recently ended ones
        self.transfers: OrderedDict[str, Tracked] = OrderedDict()
        # node -> {transfer id: mailbox seq} of transfers not yet delivered to it
        self.undelivered: dict[str, dict[str, int]] = {}
        # inside one_schedule(): whether a schedule was asked for (None: not inside)
        self._deferred: bool | None = None
        # a schedule_soon() pass waiting for the event loop's next turn
        self._soon: asyncio.Handle | None = None

    def remember(self, tr: Tracked) -> None:
        self.transfers[tr.t.transfer_id] = tr
        while len(self.transfers) > TRANSFER_MEMORY:
            self.transfers.popitem(last=False)

    def save(self, tr: Tracked, state: TransferState = "active") -> None:
        """Persist ``tr``: the scheduler's record as it is, with its mailbox seq and state."""
        self.ctx.store.save_transfer(tr.t, tr.seq, state)

    def restore_transfers(self) -> list[Transfer]:
        """Adopt the transfers that were in flight when the last run ended.

        Agents kept pulling while we were away. Each one is locked again
        (seeder and demander) before any node is heard from, so nothing
        schedules a second copy of a layer a demander is still pulling; the
        demander's first poll and heartbeats then confirm or end it (see
        :meth:`rainbowd.coordinator.transfers.TransferReports.check_absent`).
        Aborted ones are only remembered, for their late reports.
        """
        ctx = self.ctx
        adopted: list[Transfer] = []
        stored = ctx.store.load_transfers()
        # pieces are sized from the cluster (PieceScheduler._load_chunks): split each layer
        # as the pieces in flight were, the longest being a whole piece (the last may be short)
        piece_chunks: dict[str, int] = {}
        for t, _, state in stored:
            if state == "active" and t.end_chunk:
                n = t.end_chunk - t.first_chunk
                piece_chunks[t.layer] = max(piece_chunks.get(t.layer, 0), n)
        for layer, n in sorted(piece_chunks.items()):
            ctx.scheduler.split_as(layer, n)
        for t, seq, state in stored:
            usable = (
                t.seeder in ctx.cluster.nodes
                and t.demander in ctx.cluster.nodes
                and t.layer in self.manifests
            )
            if not usable:
                ctx.store.delete_transfer(t.transfer_id)
                continue
            self.remember(Tracked(t, seq=seq, restored=True))
            if state == "active" and t.layer not in ctx.cluster.nodes[t.demander].holdings:
                try:
                    ctx.driver.adopt(t)
                except SchedulerError as e:  # e.g. its piece no longer exists: plan it anew
                    log.warning("stored transfer not adopted", transfer=t.transfer_id, error=str(e))
                    ctx.store.delete_transfer(t.transfer_id)
                    continue
                self.undelivered.setdefault(t.demander, {})[t.transfer_id] = seq
                adopted.append(t)
                log.info(
                    "transfer adopted after restart",
                    **transfer_fields(t),
                )
            elif state == "active":
                ctx.store.delete_transfer(t.transfer_id)  # done; its report was lost
        ctx.store.prune_transfers(TRANSFER_MEMORY)
        return adopted

    # -- polls ----------------------------------------------------------
    def poll(self, node: Node, cursor: int, trust_version: int) -> AssignmentBatch | None:
        """Assignments after ``cursor`` (and a newer trust list), or None if nothing is new."""
        cluster = self.ctx.cluster
        self.acknowledge(node, cursor)
        new_cursor, items = node.mailbox.after(cursor)
        trust = cluster.trust() if trust_version < cluster.trust_version else None
        if not items and trust is None and new_cursor == cursor:
            return None
        return AssignmentBatch(cursor=new_cursor, assignments=items, trust=trust)

    def acknowledge(self, node: Node, cursor: int) -> None:
        """The agent has received everything up to ``cursor``: note which transfers it has.

        A transfer adopted after a restart whose assignment lies beyond the
        cursor never reached the agent (the old mailbox died with the old
        process), so it is released and planned again.
        """
        pending = self.undelivered.get(node.node_id)
        if not pending:
            return
        scheduler = self.ctx.scheduler
        now = self.ctx.clock()
        lost: list[Transfer] = []
        for tid, seq in list(pending.items()):
            tr = self.transfers.get(tid)
            if tr is None or not scheduler.is_active(tid):
                del pending[tid]
            elif seq <= cursor:
                tr.acked_at = tr.acked_at or now
                del pending[tid]
            elif tr.restored:
                del pending[tid]
                lost.append(self.ctx.driver.lost(tid))
        if lost:
            self.aborted(lost, "its assignment was lost with the old coordinator process")
            self.schedule(now)

    # -- the scheduler's decisions --------------------------------------
    def aborted(self, transfers: list[Transfer], why: str) -> None:
        """Transfers the scheduler dropped: withdraw undelivered assignments, reset progress."""
        ctx = self.ctx
        ctx.metrics.transfers_aborted(len(transfers))
        now = ctx.clock()
        for t in transfers:
            self.evidence.transfer_ended(t, now)
            demander = ctx.cluster.get(t.demander)
            if demander is not None:
                demander.mailbox.drop(_is_transfer(t.transfer_id))
            self.undelivered.get(t.demander, {}).pop(t.transfer_id, None)
            for p in self.jobs.progress_of(t.demander):
                p.transfer_stopped(t.layer)
            tr = self.transfers.get(t.transfer_id)
            if tr is not None and not tr.reported:
                # kept (bounded) so a late report of it is still understood after a restart
                self.save(tr, "aborted")
            log.info(
                "transfer aborted",
                **transfer_fields(t),
                why=why,
            )

    @contextlib.contextmanager
    def one_schedule(self, *, soon: bool = False) -> Iterator[None]:
        """The schedules asked for inside run once, at the end (a batch of reports).

        Each done report frees a seeder and a demander and asks for a schedule;
        for a batch of them one schedule, knowing every completion, plans as well
        as one per report and costs one scheduler pass instead of many. With
        ``soon`` that pass waits for the event loop's next turn
        (:meth:`schedule_soon`), so the batches of every agent handled in this
        turn share it.
        """
        if self._deferred is not None:
            yield
            return
        self._deferred = False
        try:
            yield
        finally:
            wanted, self._deferred = self._deferred, None
            if wanted and soon:
                self.schedule_soon()
            elif wanted:
                self.schedule(self.ctx.clock())

    def schedule_soon(self) -> None:
        """One scheduler pass on the event loop's next turn, for every report before it.

        A saturated coordinator has many agents' reports waiting in its sockets;
        their handlers run in one turn of the loop, and one pass after them plans
        with every completion known instead of one pass per report (the pass is
        the bulk of a done report's cost). A quiet one loses one turn of the
        loop (microseconds): the demander's next poll, sent after this reply,
        is read after the pass.
        """
        if self._soon is None:
            self._soon = asyncio.get_running_loop().call_soon(self._scheduled_soon)

    def _scheduled_soon(self) -> None:
        self._soon = None
        try:
            with self.ctx.store.transaction():
                self.schedule(self.ctx.clock())
        except Exception:  # a callback: nobody else would see it
            log.exception("scheduling after reports failed")

    def schedule(self, now: float) -> None:
        """Start every transfer the scheduler allows; queue each to its demander."""
        if self._deferred is not None:
            self._deferred = True
            return
        ctx = self.ctx
        touched: set[str] = set()
        t0 = time.perf_counter()
        started = ctx.driver.plan(now)
        ctx.metrics.decision(time.perf_counter() - t0, len(started))
        for t in started:
            demander = ctx.cluster.get(t.demander)
            seeder = ctx.cluster.get(t.seeder)
            manifest = self.manifests.get(t.layer)
            assignment = (
                assignment_for(t, manifest, seeder.peer())
                if demander is not None and seeder is not None and manifest is not None
                else None
            )
            if demander is None or assignment is None:
                # cannot happen for layers of ingested images; never hand out unverifiable work
                ctx.driver.unusable(t)
                log.error("no manifest or node for a transfer; demand dropped", layer=t.layer)
                continue
            seq = demander.mailbox.put(assignment)
            tr = Tracked(t, seq=seq)
            self.remember(tr)
            self.undelivered.setdefault(t.demander, {})[t.transfer_id] = seq
            self.save(tr)
            touched.add(t.demander)
            self.jobs.transfer_started(t.demander, t.layer)
            log.info(
                "transfer assigned",
                **transfer_fields(t),
                rule=t.reason.rule,
                reason=t.reason.render(t.seeder),
            )
        for nid in touched:
            ctx.store.save_seq(nid, ctx.cluster.nodes[nid].mailbox.seq)


def _is_transfer(transfer_id: str) -> Callable[[Assignment], bool]:
    def match(a: Assignment) -> bool:
        return isinstance(a, TransferAssignment) and a.transfer_id == transfer_id

    return match
