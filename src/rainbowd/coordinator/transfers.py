"""The transfer reports service: progress, done and failed reports, and heartbeats' transfer lists.

**The agent is the authority on what it pulls.** A heartbeat lists the
agent's active transfers (:meth:`TransferReports.reconcile`): one the
coordinator had given up on is adopted back; one it never issued (its record
is lost) is adopted if it makes sense; one the coordinator thinks active but
the agent, having received it, no longer lists, is over -- completed if the
layer is now held, released otherwise (its report, if it still comes, is
applied for its information). Reports for ids nobody knows are ignored (a
done one still counts the layer if the node's heartbeat listed that
transfer). A failure report that blames the seeder must be backed by a
transfer; what it does to the scheduler (suspect, avoid, the demander's
failure budget) is the job driver's rule (rainbowd.core.sched.jobdriver), what else it
costs the seeder is coordinator/quarantine.py's.
"""

from __future__ import annotations

from collections.abc import Mapping

import structlog

from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.digest import short
from rainbowd.core.messages import (
    Heartbeat,
    SeederUse,
    TransferDone,
    TransferFailed,
    TransferProgress,
)
from rainbowd.core.sched.jobdriver import Charge, Failure

from .cluster import Node
from .context import ServiceContext
from .dispatch import Dispatch, Tracked, transfer_fields
from .errors import Forbidden
from .evidence import PeerEvidence
from .holdings_service import HoldingsService
from .jobs_service import JobsService
from .quarantine import Quarantine

log = structlog.get_logger(__name__)

#: a delivered transfer missing from a heartbeat received this long after delivery is over
ABSENCE_GRACE = 0.5


class TransferReports:
    """What agents say of their transfers; see the module docstring."""

    def __init__(
        self,
        ctx: ServiceContext,
        manifests: Mapping[str, ChunkManifest],
        jobs: JobsService,
        dispatch: Dispatch,
        holdings: HoldingsService,
        quarantine: Quarantine,
        evidence: PeerEvidence,
    ) -> None:
        self.ctx = ctx
        self.manifests = manifests
        self.jobs = jobs
        self.dispatch = dispatch
        self.holdings = holdings
        self.quarantine = quarantine
        self.evidence = evidence

    # -- heartbeats -----------------------------------------------------
    def reconcile(self, node: Node, hb: Heartbeat, now: float) -> None:
        """Line our view of ``node``'s incoming transfers up with what its agent says it pulls."""
        listed = {a.transfer_id for a in hb.active}
        for a in hb.active:
            tr = self.dispatch.transfers.get(a.transfer_id)
            if tr is None:
                tr = self.adopt_unknown(node, a.transfer_id, a.layer, a.seeder, now)
                if tr is None:
                    continue
            elif tr.t.demander != node.node_id or tr.reported:
                continue  # not its transfer, or over (a heartbeat older than the report)
            elif not self.ctx.scheduler.is_active(a.transfer_id):
                if not self.readopt(node, tr):
                    continue
            if not tr.acked_at:
                tr.acked_at = now  # listed, so delivered
                self.dispatch.undelivered.get(node.node_id, {}).pop(a.transfer_id, None)
            self.bytes_moved(tr, a.bytes_done, now)
            for p in self.jobs.progress_of(node.node_id):
                p.progress(tr.t.layer, a.bytes_done, a.rate_bps)
        self.check_absent(node, listed | set(hb.reporting), now, hb.cursor)

    def adopt_unknown(
        self, node: Node, transfer_id: str, layer: str, seeder: str, now: float
    ) -> Tracked | None:
        """A transfer we never issued (its record is lost): track it if it makes sense."""
        ctx = self.ctx
        if (
            layer in node.holdings
            or layer not in self.manifests
            or seeder not in ctx.cluster.nodes
            or seeder == node.node_id
        ):
            return None
        job_id = next((j.job_id for j, p in self.jobs.jobs_of(node.node_id) if p.needs(layer)), "")
        t = ctx.driver.adopt_reported(transfer_id, layer, seeder, node.node_id, job_id, now)
        if t is None:
            return None
        tr = Tracked(t, acked_at=now)
        self.dispatch.remember(tr)
        self.dispatch.save(tr)
        self.jobs.transfer_started(node.node_id, layer)
        log.warning(
            "unknown transfer adopted from heartbeat",
            transfer=transfer_id,
            layer=short(layer),
            seeder=seeder,
            demander=node.node_id,
        )
        return tr

    def readopt(self, node: Node, tr: Tracked) -> bool:
        """We gave up on this transfer (node down), yet the agent still pulls it: take it back."""
        ctx = self.ctx
        t = tr.t
        if t.seeder not in ctx.cluster.nodes:
            return False
        if not ctx.driver.readopt(t, held=t.layer in node.holdings):
            return False
        self.dispatch.save(tr)
        self.jobs.transfer_started(node.node_id, t.layer)
        log.info(
            "transfer taken back: the agent still pulls it",
            **transfer_fields(t),
        )
        return True

    def check_absent(self, node: Node, listed: set[str], now: float, cursor: int) -> None:
        """End active transfers to ``node`` that its agent, having received them, no longer runs.

        ``listed``: the transfers the heartbeat names, pulling or with their report
        on its way (a heartbeat can overtake the report: such a transfer is not
        abandoned). Only transfers the heartbeat answers for count: delivered at
        least ABSENCE_GRACE before it, and, when the agent sends its assignment
        ``cursor``, assigned at or below it -- a heartbeat built before the agent
        had an assignment cannot list it, however late it arrives (in a busy
        100-node lab a heartbeat took ~1 s to land, and 9 % of the transfers were
        ended by heartbeats built before they arrived or overtaking their reports,
        then planned and pulled again). A completed one shows in the holdings; the
        others are released so the demand is planned again -- the agent's report,
        if it still comes, is applied then for what it says about the seeder.
        """
        scheduler = self.ctx.scheduler
        for t in scheduler.active_for(node.node_id):  # not every transfer: per heartbeat
            if t.demander != node.node_id or t.transfer_id in listed:
                continue
            tr = self.dispatch.transfers.get(t.transfer_id)
            if tr is None or not tr.acked_at or now - tr.acked_at < ABSENCE_GRACE:
                continue
            if cursor and tr.seq and tr.seq > cursor:
                continue  # assigned after this heartbeat was built
            if self.ctx.driver.absent(t, held=t.layer in node.holdings, now=now):
                self.evidence.transfer_ended(t, now)
                self.ctx.store.delete_transfer(t.transfer_id)
                log.info(
                    "transfer over: layer held, report still to come",
                    transfer=t.transfer_id,
                    layer=short(t.layer),
                    demander=t.demander,
                )
            else:
                self.dispatch.aborted([t], f"agent {node.node_id} no longer runs it")

    # -- transfer reports -----------------------------------------------
    def tracked(self, node: Node, transfer_id: str) -> Tracked | None:
        """The transfer, None if unknown (e.g. issued before a restart that lost it)."""
        tr = self.dispatch.transfers.get(transfer_id)
        if tr is not None and tr.t.demander != node.node_id:
            raise Forbidden(
                f"transfer {transfer_id} belongs to {tr.t.demander}, not {node.node_id}"
            )
        return tr

    @staticmethod
    def heard_from(node: Node, now: float) -> None:
        """A report from ``node`` shows it alive as well as a heartbeat would.

        A busy host's heartbeat can be late (its uplink full, its threads busy with
        chunks) while its transfer reports keep coming; marking it down would abort
        the very transfers it is reporting. (Only a heartbeat brings a down node back.)
        """
        node.last_seen = max(node.last_seen, now)

    def bytes_moved(self, tr: Tracked, bytes_done: int, now: float) -> None:
        """The demander says ``bytes_done`` of ``tr`` arrived (a progress report, a heartbeat).

        Bytes moved since it last said so: the seeder is alive and serving, even if
        its own heartbeat is late (a busy seeder sends no transfer reports of its own).
        """
        if bytes_done > tr.bytes_seen:
            tr.bytes_seen = bytes_done
            seeder = self.ctx.cluster.get(tr.t.seeder)
            if seeder is not None:
                self.heard_from(seeder, now)

    def transfer_progress(self, node: Node, transfer_id: str, m: TransferProgress) -> None:
        now = self.ctx.clock()
        self.heard_from(node, now)
        tr = self.tracked(node, transfer_id)
        if tr is not None:
            self.bytes_moved(tr, m.bytes_done, now)
        if tr is not None and self.ctx.scheduler.is_active(transfer_id):
            for p in self.jobs.progress_of(node.node_id):
                p.progress(tr.t.layer, m.bytes_done, m.rate_bps)

    def _log_growths(self) -> None:
        """Say when pieces grew to the measured cost of a transfer (core/sched/transfer_cost.py)."""
        scheduler = self.ctx.scheduler
        for layer, per, pieces in scheduler.take_growths():
            meter = scheduler.cost_meter
            log.info(
                "pieces grown",
                layer=short(layer),
                chunks_per_piece=per,
                pieces=pieces,
                transfer_overhead_s=round(meter.overhead_s(), 3),
                pull_rate_mbps=round(meter.rate_Bps() / 1e6, 2),
            )

    def transfer_done(self, node: Node, transfer_id: str, m: TransferDone) -> None:
        ctx = self.ctx
        now = ctx.clock()
        self.heard_from(node, now)
        tr = self.tracked(node, transfer_id)
        if tr is None:
            layer = node.reported_active.get(transfer_id, ("", ""))[0]
            log.info(
                "done report for an unknown transfer",
                transfer=transfer_id,
                node=node.node_id,
                layer=short(layer) if layer else None,
            )
            # a piece of a split layer is not the layer: the node's heartbeat says when it is
            whole = len(ctx.scheduler.pieces(layer)) == 1
            if whole and layer in self.manifests and self.holdings.add(node, [layer], now):
                ctx.save_node(node)
            self.dispatch.schedule(now)
            return
        t = tr.t
        if ctx.driver.done(transfer_id, now, m.bytes_moved, m.seconds) is not None:
            self.evidence.transfer_ended(t, now)
            self._log_growths()
        else:
            log.info("late done report for an ended transfer", transfer=transfer_id)
        first, tr.reported = not tr.reported, True
        ctx.store.delete_transfer(transfer_id)
        if first:
            ctx.metrics.transfer_done(m.seconds, m.bytes_moved)
            use = SeederUse(
                layer=t.layer,
                seeder=t.seeder,
                reason=t.reason,
                bytes=m.bytes_moved,
                seconds=m.seconds,
                started_at=t.started_at,
                finished_at=now,
            )
        log.info(
            "transfer done",
            **transfer_fields(t),
            bytes=m.bytes_moved,
            seconds=round(m.seconds, 3),
        )
        if ctx.driver.holds_layer(t) and self.holdings.add(node, [t.layer], now):
            ctx.save_node(node)
        if first:
            # after the holding: the recorded use must survive a restart, also when the
            # layer completed a holding (a kill -9 right after lost it: the job then listed
            # the node without that layer, tests/faults/test_coordinator_restart.py)
            self.jobs.record_use(node.node_id, t.job_id, use)
        self.dispatch.schedule(now)

    def transfer_failed(self, node: Node, transfer_id: str, m: TransferFailed) -> None:
        ctx = self.ctx
        now = ctx.clock()
        self.heard_from(node, now)
        tr = self.tracked(node, transfer_id)
        if tr is None:
            log.info("failure report for an unknown transfer", transfer=transfer_id, kind=m.kind)
            return
        if tr.reported:
            log.info("repeated report for an ended transfer", transfer=transfer_id)
            return
        t = tr.t
        failure = Failure(m.kind, seeder_fault=m.seeder_fault, not_held=m.not_held)
        if failure.accuses_seeder:
            what = f"a {m.kind} failure of {transfer_id}"
            self.quarantine.check_backed(node, t.seeder, what, now)
        tr.reported = True
        ctx.store.delete_transfer(transfer_id)
        seeder = ctx.cluster.get(t.seeder)
        # the scheduler's side of the failure (suspect, avoid, rest) is the driver's rule;
        # a seeder gone or already quarantined has nothing more held against it
        outcome = ctx.driver.failed(
            t, failure, now, blame=seeder is not None and not seeder.quarantined
        )
        if outcome.was_active:
            self.evidence.transfer_ended(t, now)
            # (one the coordinator had already dropped was counted as aborted then)
            ctx.metrics.transfer_failed(m.kind, now - t.started_at)
        why = f"{m.kind}: {m.reason}"
        log.warning(
            "transfer failed",
            **transfer_fields(t),
            kind=m.kind,
            reason=m.reason,
            seeder_fault=m.seeder_fault,
        )
        for job, p in list(self.jobs.jobs_of(node.node_id)):
            if outcome.charge is Charge.FINAL:
                failed = p.count_failure(t.layer, f"disk full: {m.reason}", now, final=True)
            elif outcome.charge is Charge.FREE:
                # e.g. a relay's own pull was behind or broke: not this demander's failure;
                # it is re-planned without using up its failure budget
                p.transfer_stopped(t.layer)
                failed = False
            else:
                failed = p.count_failure(t.layer, f"from {t.seeder}: {why}", now)
            if failed:
                self.jobs.node_failed(job, p, now)
        if seeder is not None and not seeder.quarantined:
            self.quarantine.blame_seeder(t, m, outcome.blame, now)
        self.dispatch.schedule(now)
