"""The liveness service: which nodes are up, and what happens when one goes down or returns.

A node is up from its registration or heartbeat until it misses
``MISSED_HEARTBEATS`` intervals (:meth:`Liveness.check_liveness`, called
periodically), or -- if it is a demander -- until its agent's long-poll
connection drops mid-wait (:meth:`Liveness.poll_closed`). Going down releases
its transfers and shows it "down since ..." in its running jobs; it fails in
them only after ``node_down_timeout``. After a coordinator restart, adopted
transfers whose demander never came back are released, and job nodes waiting
for a layer nobody holds any more fail (holdings.OrphanWatch).
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from . import holdings
from .cluster import MISSED_HEARTBEATS, Node
from .context import ServiceContext
from .dispatch import Dispatch
from .jobs_service import JobsService

log = structlog.get_logger(__name__)

#: a liveness pass this many heartbeat intervals after the last one (they run every half
#: interval) means the coordinator itself stalled: stale nodes get one more pass, never two
STALL_FACTOR = 1.0


class Liveness:
    """Up, suspect and down nodes; see the module docstring."""

    def __init__(
        self,
        ctx: ServiceContext,
        jobs: JobsService,
        dispatch: Dispatch,
        started_at: float,
        on_pass: Callable[[float], None],
    ) -> None:
        self.ctx = ctx
        self.jobs = jobs
        self.dispatch = dispatch
        self.started_at = started_at
        #: what else each pass does: cluster ops past their deadline fail (ops.py), images
        #: whose origin is down move to a standby origin (origin_standby.py)
        self.on_pass = on_pass
        self.orphans = holdings.OrphanWatch()
        self._last_check: float | None = None  # when check_liveness last ran
        self._deferred = False  # the last pass left stale nodes up (see check_liveness)

    def bring_up(self, node: Node, now: float) -> None:
        """The node reported: schedulable again; its jobs stop showing it down."""
        driver = self.ctx.driver
        if node.quarantined:
            return
        if not node.up:
            driver.node_up(
                node.node_id,
                node.info.speed_hint_bps,
                max_upload_bps=node.info.max_upload_bps,
                max_download_bps=node.info.max_download_bps,
                download_bps=node.info.download_hint_bps,
            )
            node.up = True
            node.down_since = 0.0
        elif driver.reported(node.node_id):
            log.info("suspect node reported; schedulable again", node=node.node_id)
        for job, p in list(self.jobs.jobs_of(node.node_id)):
            if p.came_back():
                log.info("node back in job", job=job.job_id, node=node.node_id)
                self.jobs.job_changed(job, p)

    def poll_opened(self, node: Node) -> int:
        """A long-poll of ``node`` starts waiting; returns its agent's epoch."""
        node.polls += 1
        return node.epoch

    def poll_closed(self, node: Node, epoch: int, *, dropped: bool) -> None:
        """A long-poll ended; ``dropped``: its connection went away mid-wait.

        An agent always has a poll waiting, so a dropped one means the agent
        died (kill -9, crash) or its link did: the node is marked down at once
        and its seeder freed, instead of three heartbeat intervals later. A
        normal end (an answer or the wait running out) never gets here with
        ``dropped``; nor does a poll of an older agent process (``epoch``) or
        one while another poll of the node is still waiting. Only a node that
        is a demander (receiving or waiting for a layer) is marked down this
        way -- that is what holds a seeder or a plan; an idle node is left to
        the missed-heartbeat rule.
        """
        node.polls = max(0, node.polls - 1)
        if not dropped or node.epoch != epoch or node.polls or not node.up:
            return
        nid = node.node_id
        if not self.ctx.scheduler.is_demanding(nid):
            # nothing waits on it as a demander: missed heartbeats (or a demander's
            # "unreachable" report, if it seeds) decide, as for any silent node
            log.info("agent connection dropped mid-poll; idle node left to heartbeats", node=nid)
            return
        log.warning("agent connection dropped mid-poll; node marked down", node=node.node_id)
        self.mark_down(node, "its connection to the coordinator dropped", self.ctx.clock())

    def mark_down(self, node: Node, why: str, now: float) -> None:
        node.up = False
        node.down_since = now
        self.dispatch.aborted(
            self.ctx.driver.node_down(node.node_id), f"node {node.node_id} down: {why}"
        )
        for job, p in list(self.jobs.jobs_of(node.node_id)):
            if not p.final:
                p.went_down(why, now, self.ctx.settings.node_down_timeout)
                self.jobs.job_changed(job, p)
        self.dispatch.schedule(now)

    def check_liveness(self) -> list[str]:
        """Mark nodes that stopped heartbeating down; fail targets down for too long."""
        ctx = self.ctx
        now = ctx.clock()
        interval = ctx.settings.heartbeat_interval
        gone = ctx.cluster.stale(now, interval)
        gap = 0.0 if self._last_check is None else now - self._last_check
        self._last_check = now
        if gone and gap > STALL_FACTOR * interval and not self._deferred:
            # the passes run every half interval: a gap this long is the coordinator's own
            # stall (a saturated core), and the heartbeats it has not read yet wait in its
            # sockets. Marking their nodes down would abort live transfers (the lab's paper
            # run: 14 live nodes down in 9 s); the next pass, half an interval on, decides.
            log.warning(
                "liveness pass late; marking down deferred",
                late_s=round(gap, 3),
                stale=len(gone),
            )
            self._deferred = True
            gone = []
        else:
            self._deferred = False
        for node in gone:
            log.warning("node missed heartbeats; marked down", node=node.node_id)
            self.mark_down(node, f"missed heartbeats for {now - node.last_seen:.1f}s", now)
        self.reap_orphans(now)
        self.expire_down_nodes(now)
        grace = holdings.ORPHAN_GRACE_INTERVALS * interval
        for job, p, why in self.orphans.check(
            self.jobs.jobs_of_all(), ctx.cluster.nodes, now, grace
        ):
            p.fail(why, now)
            self.jobs.node_failed(job, p, now)
        self.on_pass(now)
        return [n.node_id for n in gone]

    def reap_orphans(self, now: float) -> None:
        """Release adopted transfers whose demander never came back after a restart."""
        ctx = self.ctx
        if now - self.started_at <= MISSED_HEARTBEATS * ctx.settings.heartbeat_interval:
            return
        orphans = ctx.driver.orphans(lambda nid: (n := ctx.cluster.get(nid)) is not None and n.up)
        if orphans:
            self.dispatch.aborted(orphans, "its demander did not come back after the restart")
            self.dispatch.schedule(now)

    def expire_down_nodes(self, now: float) -> None:
        ctx = self.ctx
        timeout = ctx.settings.node_down_timeout
        for job, p in list(self.jobs.jobs_of_all()):
            node = ctx.cluster.get(p.node_id)
            if p.final or node is None or node.up or node.quarantined or not node.down_since:
                continue
            if now - node.down_since < timeout:
                continue
            p.fail(
                f"node {p.node_id} down for {now - node.down_since:.0f}s "
                f"(node_down_timeout {timeout:.0f}s)",
                now,
            )
            self.jobs.node_failed(job, p, now)
