"""The jobs service: distribution jobs, their nodes' progress, and Docker loads.

A job asks for one image on a set of nodes (coordinator/jobs.py keeps each
node's state). This service creates jobs, answers which running jobs a node
is in (every other service asks it), persists a node's change (one row, or
the whole job when it ends), stops demanding for a node that failed, and
sends a node holding every layer its ``LoadAssignment``; the agents' load
reports come back here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import structlog

from rainbowd.core.messages import (
    CreateJob,
    JobList,
    JobView,
    LoadAssignment,
    LoadDone,
    SeederUse,
    TaskFailed,
)

from . import holdings
from .cluster import Node
from .context import Schedule, ServiceContext
from .errors import BadRequest, Conflict, Forbidden, NotFound
from .jobs import Job, NodeProgress
from .state import StoredImage

log = structlog.get_logger(__name__)

#: seconds between two writes of the job rows piece reports left for later
#: (:meth:`JobsService.save_piece_lines`). A node finishes a piece every ~0.5-1 s in the
#: lab, so writing every half heartbeat interval spared little (bench/coordinator_load.py,
#: 100 agents, 6 layers of 7 pieces: 1.42-1.49 ms per done report against 1.34-1.48); at
#: 5 s, four alternating pairs: 1.17 / 1.42 / 1.46 / 1.30 ms -> 1.14 / 1.21 / 1.38 / 1.18 ms
#: (every pair lower, median -12 %). What a kill -9 can lose is this long.
PIECE_LINES_EVERY_S = 5.0


class JobsService:
    """Jobs and loads; see the module docstring."""

    def __init__(
        self, ctx: ServiceContext, images: Mapping[str, StoredImage], schedule: Schedule
    ) -> None:
        self.ctx = ctx
        self.images = images  # the image table (read only here)
        self.schedule = schedule
        self.jobs: dict[str, Job] = {}
        self.loads: dict[str, tuple[str, str]] = {}  # load id -> (job id, node id)
        #: (job id, node id) -> the node's progress, whose row lacks only finished pieces'
        #: lines (:meth:`record_use`; written by :meth:`save_piece_lines`)
        self._unsaved: dict[tuple[str, str], tuple[Job, NodeProgress]] = {}
        self._lines_due = 0.0  # when save_piece_lines next writes (given a time)

    # -- which jobs a node is in ----------------------------------------
    def jobs_of(self, node_id: str) -> Iterable[tuple[Job, NodeProgress]]:
        for job in self.jobs.values():
            if job.running and node_id in job.nodes:
                yield job, job.nodes[node_id]

    def progress_of(self, node_id: str) -> list[NodeProgress]:
        return [p for _, p in self.jobs_of(node_id)]

    def transfer_started(self, node_id: str, layer: str) -> None:
        """A transfer of ``layer`` into ``node_id`` began: its jobs that need it show it."""
        for p in self.progress_of(node_id):
            if p.needs(layer):
                p.started_transfer(layer)

    def record_use(self, node_id: str, job_id: str, use: SeederUse) -> None:
        """Count a finished transfer into the jobs of ``node_id`` that get its layer, and save.

        The transfer's own job counts it even when it has ended: a done report that
        reaches a restarted coordinator after the node's heartbeat showed the layer
        held (and the job finished on that) would otherwise leave the node listed
        without the layer's transfer (tests/faults/test_coordinator_restart.py).
        """
        jobs = list(self.jobs_of(node_id))
        own = self.jobs.get(job_id)
        if own is not None and not own.running and node_id in own.nodes:
            jobs.append((own, own.nodes[node_id]))
        for job, p in jobs:
            if use.layer in p.sizes:
                p.record(use)  # every piece of a split layer counts (first: once each)
                if job.running and use.layer not in p.done:
                    self._unsaved[(job.job_id, p.node_id)] = (job, p)  # a piece: saved soon
                else:
                    self.job_changed(job, p)

    def save_piece_lines(self, now: float | None = None) -> int:
        """Write the node rows whose only change since their last write is finished pieces.

        Why deferred: a node's row holds a line per layer and seeder, with the
        reason each seeder was chosen, and grows with the seeders a node pulls
        from (dozens under ``swarm``); it was rewritten, encoded and committed on
        every piece's done report. A piece that completes a layer, and every
        change of a node's state, is written at once (:meth:`job_changed`); the
        rest waits for this call: given ``now``, at most every
        ``PIECE_LINES_EVERY_S`` (the coordinator's liveness loop), without it at
        once (its shutdown, tests). What a kill -9 can lose: the lines (and wire
        bytes) of the pieces finished in the last ``PIECE_LINES_EVERY_S`` of a
        layer not yet complete -- the job's accounting, never whether a node
        holds its image. Returns the rows written.
        """
        if now is not None:
            if now < self._lines_due:
                return 0
            self._lines_due = now + PIECE_LINES_EVERY_S
        if not self._unsaved:
            return 0
        pending, self._unsaved = self._unsaved, {}
        written = 0
        try:
            with self.ctx.store.transaction():
                for (job_id, _), (job, p) in pending.items():
                    if self.jobs.get(job_id) is job and job.running:
                        self.ctx.store.save_job_node(job_id, p.view())
                        written += 1
        except BaseException:
            self._unsaved = {**pending, **self._unsaved}  # tried again at the next call
            raise
        return written

    def jobs_of_all(self) -> Iterable[tuple[Job, NodeProgress]]:
        for job in list(self.jobs.values()):
            if job.running:
                for p in job.nodes.values():
                    yield job, p

    # -- admin ----------------------------------------------------------
    def job_views(self, *, transfers: bool = True) -> JobList:
        jobs = sorted(self.jobs.values(), key=lambda j: (j.created_at, j.job_id))
        return JobList(jobs=[j.view(transfers=transfers) for j in jobs])

    def job_view(self, job_id: str, *, transfers: bool = True) -> JobView:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return job.view(transfers=transfers)

    def create_job(self, req: CreateJob, *, pull: bool = False) -> JobView:
        """A new job (``pull``: made by a front door's miss, coordinator/pulls.py)."""
        ctx = self.ctx
        now = ctx.clock()
        image = self.images.get(req.image)
        if image is None:
            known = ", ".join(sorted(self.images)) or "none"
            raise NotFound(f"no image {req.image!r} (known: {known}); add it first")
        if image.state != "ready" or image.record is None:
            detail = f": {image.error}" if image.error else ""
            raise Conflict(f"image {req.image} is {image.state}{detail}; it must be ready")
        targets = self.targets(req.targets)
        layers = [(lr.digest, lr.size) for lr in image.record.layers]
        holdings = {nid: ctx.cluster.nodes[nid].holdings for nid in targets}
        job = Job.create(
            ctx.new_id("j"),
            req.image,
            layers,
            targets,
            holdings,
            now,
            image_bytes=image.record.uncompressed_size,
            pull=pull,
        )
        self.jobs[job.job_id] = job
        log.info("job created", job=job.job_id, image=req.image, nodes=len(targets))
        self.start_job_nodes(job, now)
        if job.settle(now):
            self.job_finished(job)
        ctx.store.save_job(job.view())
        self.schedule(now)
        return job.view()

    def join(self, job: Job, node_id: str, now: float) -> None:
        """``node_id`` joins the running pull ``job``: it demands what it lacks, as targets do."""
        first = next(iter(job.nodes.values()))
        held = self.ctx.cluster.nodes[node_id].holdings
        p = job.add_node(node_id, first.layers, first.sizes, held, now)
        log.info("node joined pull job", job=job.job_id, node=node_id, image=job.image)
        if p.all_held():
            self.node_has_all(job, p, now)
        else:
            self.ctx.driver.demand(node_id, p.missing(), job.job_id, now)
        self.ctx.store.save_job(job.view())
        self.schedule(now)

    def targets(self, names: list[str]) -> list[str]:
        nodes = self.ctx.cluster.nodes
        if not names:
            raise BadRequest('targets is empty: list node ids, or ["all"]')
        if "all" in names:
            if len(names) != 1:
                raise BadRequest('targets: "all" cannot be combined with node ids')
            out = sorted(nid for nid, n in nodes.items() if not n.quarantined)
            if not out:
                raise BadRequest('targets ["all"]: no usable node is enrolled')
            return out
        out = list(dict.fromkeys(names))
        unknown = [n for n in out if n not in nodes]
        if unknown:
            known = ", ".join(sorted(nodes)) or "none"
            raise BadRequest(f"unknown node(s): {', '.join(unknown)} (enrolled: {known})")
        bad = [n for n in out if nodes[n].quarantined]
        if bad:
            raise BadRequest(f"quarantined node(s): {', '.join(bad)}; an admin must clear them")
        return out

    def start_job_nodes(self, job: Job, now: float) -> None:
        """Demand what each unfinished node lacks; nodes holding everything go to load/done."""
        for p in job.nodes.values():
            if p.final:
                continue
            if p.node_id not in self.ctx.cluster.nodes:
                p.fail(f"node {p.node_id} is no longer enrolled", now)
            elif p.state == "loading" or p.all_held():
                self.node_has_all(job, p, now)
            else:
                self.ctx.driver.demand(p.node_id, p.missing(), job.job_id, now)

    # -- a node's progress in its jobs ----------------------------------
    def node_has_all(self, job: Job, p: NodeProgress, now: float) -> None:
        ctx = self.ctx
        node = ctx.cluster.get(p.node_id)
        image = self.images.get(job.image)
        if node is None or image is None or image.record is None:
            p.fail(f"node {p.node_id} or image {job.image} vanished", now)
            return
        engines = node.docker or node.containerd
        if job.pull or not (engines or node.mirror):
            # no engine and no front door: holding the layers is all; and a pull's client
            # (containerd, Docker) takes the image from the front door, which has the record
            p.finish(now)
            return
        load_id = ctx.new_id("l")
        p.loading(load_id)
        self.loads[load_id] = (job.job_id, p.node_id)
        # a front door with no engine still needs the record (its manifest) to serve the image
        node.mailbox.put(
            LoadAssignment(
                load_id=load_id, job_id=job.job_id, image=image.record, catalog_only=not engines
            )
        )
        ctx.store.save_seq(node.node_id, node.mailbox.seq)

    def node_failed(self, job: Job, p: NodeProgress, now: float) -> None:
        """Stop demanding for a node that failed a job (unless another job still needs it)."""
        still = {layer for _, q in self.jobs_of(p.node_id) if not q.final for layer in q.missing()}
        self.ctx.driver.release(p.node_id, p.missing(), still)
        log.warning("node failed in job", job=job.job_id, node=p.node_id, error=p.error)
        self.job_changed(job, p)

    def job_changed(self, job: Job, p: NodeProgress) -> None:
        """Persist a change of node ``p`` in ``job``: its own row, or the whole job when it ends.

        Writing the whole job view on every report made a job of N nodes cost
        O(N^2) (a 500-node job spent half the coordinator's time in
        ``Job.view`` and its JSON); one node's row is O(1). Before a job ends,
        its done nodes are checked against their holdings (coordinator/holdings.py).
        """
        ctx = self.ctx
        now = ctx.clock()
        self._unsaved.pop((job.job_id, p.node_id), None)  # its row is written below
        if job.running and all(q.final for q in job.nodes.values()):
            for _, q in holdings.recheck_done(job, ctx.cluster.nodes, ctx.scheduler, now):
                ctx.store.save_job_node(job.job_id, q.view())
        if job.settle(now):
            log.info("job finished", job=job.job_id, state=job.state, error=job.error)
            self.job_finished(job)
            ctx.store.save_job(job.view())
        else:
            ctx.store.save_job_node(job.job_id, p.view())

    def job_finished(self, job: Job) -> None:
        self.ctx.metrics.job_finished(job.state, job.finished_at - job.created_at)

    def reload(self, node: Node, now: float) -> None:
        """Re-issue the image loads a restarted agent lost (its jobs wait on them)."""
        for job, p in list(self.jobs_of(node.node_id)):
            if p.state == "loading":
                self.loads.pop(p.load_id, None)
                self.node_has_all(job, p, now)

    # -- load reports ---------------------------------------------------
    def load_done(self, node: Node, load_id: str, m: LoadDone) -> None:
        job, p = self._load(node, load_id)
        if p.state == "loading":
            p.finish(self.ctx.clock())
            log.info("image loaded", node=node.node_id, job=job.job_id, seconds=m.seconds)
            self.job_changed(job, p)

    def load_failed(self, node: Node, load_id: str, m: TaskFailed) -> None:
        job, p = self._load(node, load_id)
        if p.state == "loading":
            p.fail(f"docker load on {node.node_id} failed: {m.reason}", self.ctx.clock())
            log.warning("image load failed", node=node.node_id, job=job.job_id, reason=m.reason)
            self.job_changed(job, p)

    def _load(self, node: Node, load_id: str) -> tuple[Job, NodeProgress]:
        entry = self.loads.get(load_id)
        if entry is None:
            raise NotFound(f"no load {load_id!r} (unknown, or from before a restart)")
        job_id, node_id = entry
        if node_id != node.node_id:
            raise Forbidden(f"load {load_id} belongs to {node_id}, not {node.node_id}")
        return self.jobs[job_id], self.jobs[job_id].nodes[node_id]
