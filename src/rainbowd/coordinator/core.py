"""The coordinator's brain: a thin facade over its services, and the rules they implement.

Everything the HTTP layer does ends up as one method call here, with the
current time taken from ``clock``. No aiohttp, no sockets: tests drive this
class directly or through the real app. Mutations happen on the event loop
thread only, so no locks are needed.

:class:`Coordinator` only wires the services, one module each, and hands
each a narrow :class:`~rainbowd.coordinator.context.ServiceContext` (state
store, scheduler, cluster registry, clock, id source, metrics, settings) plus
the few services it calls -- never the coordinator itself:

* enrollment.py -- tokens, registration, heartbeats, node removal
* liveness.py -- up and down, dropped long-polls, missed heartbeats
* dispatch.py -- scheduling, tracked transfers, delivery, aborts
* transfers.py -- transfer reports, heartbeats' transfer lists, adoption
* quarantine.py -- peer reports, security events, quarantine
* jobs_service.py -- jobs, each node's progress in them, Docker loads
* images_service.py -- the image table, ingests, chunk manifests
* holdings_service.py -- holdings followed both ways, store eviction
* restore.py -- reload after a restart; views.py -- read models and the
  metrics snapshot

How a job runs: each target node *demands* every layer it lacks (in image
order); after every event that can free a seeder or a demander,
:meth:`Dispatch.schedule` asks the scheduler (default policy ``swarm``) for
transfers -- jobs, reports and faults reach it through the job driver
(rainbowd.core.sched.jobdriver, ``ctx.driver``), which holds the rules below; holdings,
layer sizes and the read-only views use the scheduler directly -- and queues
each as a :class:`TransferAssignment` to the demander (the demander pulls). A
finished transfer makes the demander a seeder. A node holding every layer loads
the image into Docker (``LoadAssignment``) when it has Docker.

Quarantine (the evidence rules are in coordinator/evidence.py): a report
about a peer counts only if the coordinator assigned the reporter a transfer
from that peer that is running or ended within ``EVIDENCE_WINDOW``; any other
is refused (403) and recorded as an ``unfounded_report`` against the
reporter. A host-key claim makes the coordinator probe the seeder's host key
itself (coordinator/hostkey_probe.py); only its own probe seeing a key other
than the pinned one quarantines the seeder. Bad chunks ("verify" with
seeder_fault, or a bad_chunk event) make that pair avoid each other; the
seeder is penalized (speed halved) once two different demanders have reported
it and quarantined once ``seeder_fault_limit`` different demanders have --
never on one node's word, and an origin never on peers' word at all. A
demander whose client key a seeder refused (its trust list is behind) blames
nobody: the seeder is woken to fetch the list and the pair rests a heartbeat.
A quarantined node stays out -- heartbeats and re-registration do not bring
it back -- until an admin clears it (``POST /v1/nodes/{id}/clear-quarantine``).

Holdings follow what each node says it holds, both ways (coordinator/holdings.py):
a layer its heartbeat stops listing is dropped and demanded again by its
running jobs, a seeder that answered ``not_held`` loses the layer at once, a
node counted done is rechecked when its job ends, and job nodes waiting for a
layer no node holds any more fail naming it.

Faults (PAPER.md, "Fault handling"; what they do to the scheduler is the job
driver's rule, the rest is the services' named above):

* **Coordinator restart.** Transfers in flight are persisted; a restarted
  coordinator adopts them back into the scheduler (their seeder and demander
  stay locked) before any node is heard from. Every node is down until its
  first heartbeat, so nothing is scheduled for it before the coordinator
  knows what it holds and pulls. Late reports of those transfers are accepted
  as usual; reports for ids nobody knows are answered 204 and ignored (a done
  one still counts the layer if the node's heartbeat listed that transfer).
* **The agent is the authority on what it pulls.** A heartbeat lists the
  agent's active transfers: one the coordinator had given up on is adopted
  back; one the coordinator thinks active but the agent, having received it,
  no longer lists, is over -- completed if the layer is now held, released
  otherwise (its report, if it still comes, is applied for its information).
* **Seeder death.** A demander reporting "io"/"unreachable" makes the seeder
  *suspect*: no new work until its next heartbeat, and that demander avoids it
  for two intervals. The demander is re-planned at once and resumes from its
  partial. When a seeder goes down its transfers to live demanders are not
  cut by the coordinator: the demander's own failure report (or heartbeat)
  ends them, so it is never handed a second pull of a layer it still pulls.
* **Relay failure** (policy ``relay``: the seeder was still receiving the
  layer). A relay that cannot provide a chunk in time, or whose own pull
  failed, answers "unavailable" and the demander reports kind "relay": the
  relay is neither suspected nor penalized (its upstream failed, not it), the
  failure does not count against the demander's per-layer budget, and the
  pair rests one heartbeat interval. A relay that *dies* cuts the connection,
  which reads as "io" like any dead seeder.
* **Demander death.** An agent's long-poll connection dropping mid-wait marks
  it down at once (no waiting for three missed heartbeats): its seeder is
  released for others, and in each running job the node shows "down since
  ..." while it stays non-final. When it returns (heartbeat or
  re-registration) it resumes and finishes; if it stays away longer than
  ``node_down_timeout`` it fails in those jobs.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from rainbowd.core.chunks import DEFAULT_CHUNK_SIZE, ChunkManifest
from rainbowd.core.messages import (
    AssignmentBatch,
    CreateImage,
    CreateJob,
    EvictReply,
    EvictRequest,
    Heartbeat,
    HeartbeatReply,
    ImageList,
    ImageView,
    IngestDone,
    JobList,
    JobView,
    LoadDone,
    NodeList,
    NodeView,
    PullReply,
    PullRequest,
    RegisterReply,
    RegisterRequest,
    ResolvedTag,
    ResolveTag,
    SecurityEvent,
    SecurityEventList,
    TaskFailed,
    TransferDone,
    TransferFailed,
    TransferProgress,
)
from rainbowd.core.sched.pieces import PieceScheduler
from rainbowd.core.sched.records import Transfer
from rainbowd.core.sched.scheduler import DEFAULT_POLICY

from . import views
from .cluster import Cluster, Node
from .context import ServiceContext, Settings, random_id
from .dispatch import Dispatch, Tracked
from .enrollment import Enrollment, Tokens
from .errors import NotFound
from .evidence import PeerEvidence
from .holdings import OrphanWatch
from .holdings_service import HoldingsService
from .hostkey_probe import HostKeyChecks, Probe, probe_host_key
from .images_service import ImagesService
from .jobs import Job
from .jobs_service import JobsService
from .liveness import Liveness
from .metrics import CoordinatorMetrics, MetricsSnapshot
from .ops import ClusterOps
from .origin_standby import OriginStandby
from .pulls import PullsService
from .quarantine import Quarantine
from .restore import restore
from .state import StateStore, StoredImage
from .transfers import ABSENCE_GRACE, TransferReports
from .upstreams import Upstream, resolve_tag

__all__ = [
    "ABSENCE_GRACE",
    "MAX_WAIT",
    "NODE_DOWN_TIMEOUT",
    "SEEDER_FAULT_LIMIT",
    "Coordinator",
]

#: longest a long-poll may wait (seconds)
MAX_WAIT = 30.0
#: different demanders reporting bad chunks (transfers or bad_chunk events) from a seeder
#: before it is quarantined (at least evidence.MIN_INDEPENDENT_DEMANDERS)
SEEDER_FAULT_LIMIT = 3
#: a target node down this long fails in its running jobs (seconds)
NODE_DOWN_TIMEOUT = 300.0


class Coordinator:
    """The coordinator's services, wired; its methods are what the HTTP API calls.

    The state the services share is reachable here too (``store``,
    ``scheduler``, ``cluster``, ``images``, ``manifests``, ``jobs``,
    ``transfers``...), for the tests and the console's read-only views.
    """

    def __init__(
        self,
        store: StateStore,
        *,
        join_token: str,
        admin_token: str,
        heartbeat_interval: float = 2.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        policy: str = DEFAULT_POLICY,
        node_down_timeout: float = NODE_DOWN_TIMEOUT,
        seeder_fault_limit: int = SEEDER_FAULT_LIMIT,
        clock: Callable[[], float] = time.time,
        metrics: CoordinatorMetrics | None = None,
        metrics_token: str = "",
        host_key_probe: Probe = probe_host_key,
        upstreams: dict[str, Upstream] | None = None,
    ) -> None:
        if not join_token or not admin_token:
            raise ValueError("join and admin tokens must not be empty")
        self.store = store
        self.tokens = Tokens(join=join_token, admin=admin_token, metrics=metrics_token)
        self.settings = Settings(
            heartbeat_interval=heartbeat_interval,
            chunk_size=chunk_size,
            node_down_timeout=node_down_timeout,
            seeder_fault_limit=seeder_fault_limit,
        )
        self.clock = clock
        self.started_at = clock()
        self.scheduler = PieceScheduler(policy, new_id=lambda: random_id("t"))
        self.cluster = Cluster(int(store.get_meta("trust_version", "0") or 0))
        self.metrics = metrics if metrics is not None else CoordinatorMetrics()
        self.metrics.watch(self.metrics_snapshot)
        self.metrics.is_leader.set(1)  # a Coordinator exists only while it leads
        self.images: dict[str, StoredImage] = {}
        #: registry host -> upstream host, for nodes' mirrors (coordinator/upstreams.py)
        self.upstreams: dict[str, Upstream] = dict(upstreams or {})
        self.manifests: dict[str, ChunkManifest] = {}
        self.evidence = PeerEvidence()  # which reports about peers count (evidence.py)
        self.host_key_checks = HostKeyChecks(clock, host_key_probe)
        ctx = ServiceContext(
            store=store,
            scheduler=self.scheduler,
            cluster=self.cluster,
            clock=clock,
            metrics=self.metrics,
            settings=self.settings,
        )
        self.ctx = ctx
        # the services, each built from the context and the services it calls
        self.job_service = JobsService(ctx, self.images, lambda now: self.dispatch.schedule(now))
        self.dispatch = Dispatch(ctx, self.manifests, self.job_service, self.evidence)
        self.holding_service = HoldingsService(
            ctx, self.job_service, self.images, lambda nid, d: self.ops.withheld(nid, d)
        )
        self.liveness = Liveness(
            ctx, self.job_service, self.dispatch, self.started_at, self._liveness_pass
        )
        self.quarantine = Quarantine(
            ctx,
            self.job_service,
            self.dispatch,
            self.holding_service,
            self.liveness,
            self.evidence,
            self.host_key_checks,
        )
        self.reports = TransferReports(
            ctx,
            self.manifests,
            self.job_service,
            self.dispatch,
            self.holding_service,
            self.quarantine,
            self.evidence,
        )
        self.image_service = ImagesService(
            ctx,
            self.images,
            self.manifests,
            self.job_service,
            self.holding_service,
            self.dispatch.schedule,
        )
        self.enrollment = Enrollment(
            ctx,
            self.tokens,
            self.job_service,
            self.dispatch,
            self.holding_service,
            self.liveness,
            self.reports,
        )
        # rbd run/rm/build/images rm-nodes/docker check (coordinator/ops.py)
        self.ops = ClusterOps(ctx, self.images, self.job_service, store.work_dir / "contexts")
        self.pulls = PullsService(ctx, self.image_service, self.job_service)
        self.origin_standby = OriginStandby(
            ctx, self.image_service, self.job_service, self.started_at
        )
        restore(ctx, self.image_service, self.job_service, self.dispatch, self.started_at)

    def _liveness_pass(self, now: float) -> None:
        """What runs on each liveness pass besides liveness itself."""
        self.ops.expire(now)
        self.origin_standby.fail_over(now)

    # ------------------------------------------------------------------
    # shared state, as it was reachable before the split
    # ------------------------------------------------------------------
    @property
    def jobs(self) -> dict[str, Job]:
        return self.job_service.jobs

    @property
    def loads(self) -> dict[str, tuple[str, str]]:
        return self.job_service.loads

    @property
    def transfers(self) -> OrderedDict[str, Tracked]:
        return self.dispatch.transfers

    @property
    def orphans(self) -> OrphanWatch:
        return self.liveness.orphans

    @property
    def join_token(self) -> str:
        return self.tokens.join

    @property
    def admin_token(self) -> str:
        return self.tokens.admin

    @property
    def metrics_token(self) -> str:
        return self.tokens.metrics

    @property
    def heartbeat_interval(self) -> float:
        return self.settings.heartbeat_interval

    @property
    def chunk_size(self) -> int:
        return self.settings.chunk_size

    @property
    def seeder_fault_limit(self) -> int:
        return self.settings.seeder_fault_limit

    @property
    def node_down_timeout(self) -> float:
        return self.settings.node_down_timeout

    @node_down_timeout.setter
    def node_down_timeout(self, value: float) -> None:
        self.settings.node_down_timeout = value

    def metrics_snapshot(self) -> MetricsSnapshot:
        """The state gauges of ``GET /metrics``, counted now."""
        return views.metrics_snapshot(self.cluster, self.scheduler, self.jobs.values())

    # ------------------------------------------------------------------
    # authentication, agents (enrollment.py, liveness.py, dispatch.py)
    # ------------------------------------------------------------------
    def check_admin(self, header: str | None) -> None:
        self.enrollment.check_admin(header)

    def check_metrics(self, header: str | None) -> None:
        self.enrollment.check_metrics(header)

    def authenticate_node(self, header: str | None) -> Node:
        return self.enrollment.authenticate_node(header)

    def register(self, req: RegisterRequest) -> RegisterReply:
        return self.enrollment.register(req)

    def heartbeat(self, node: Node, hb: Heartbeat) -> HeartbeatReply:
        return self.enrollment.heartbeat(node, hb)

    def pins(self, node: Node) -> list[str]:
        return self.holding_service.pins(node)

    def evict(self, node: Node, req: EvictRequest) -> EvictReply:
        return self.holding_service.evict(node, req)

    def poll(self, node: Node, cursor: int, trust_version: int) -> AssignmentBatch | None:
        return self.dispatch.poll(node, cursor, trust_version)

    def empty_batch(self, cursor: int) -> AssignmentBatch:
        return AssignmentBatch(cursor=cursor)

    def poll_opened(self, node: Node) -> int:
        return self.liveness.poll_opened(node)

    def poll_closed(self, node: Node, epoch: int, *, dropped: bool) -> None:
        self.liveness.poll_closed(node, epoch, dropped=dropped)

    def check_liveness(self) -> list[str]:
        return self.liveness.check_liveness()

    def save_piece_lines(self, now: float | None = None) -> int:
        """Write the job rows deferred by piece reports (JobsService.save_piece_lines)."""
        return self.job_service.save_piece_lines(now)

    # -- reports (transfers.py, quarantine.py, images_service.py, jobs_service.py) --
    def transfer_progress(self, node: Node, transfer_id: str, m: TransferProgress) -> None:
        self.reports.transfer_progress(node, transfer_id, m)

    def transfer_done(self, node: Node, transfer_id: str, m: TransferDone) -> None:
        self.reports.transfer_done(node, transfer_id, m)

    def transfer_failed(self, node: Node, transfer_id: str, m: TransferFailed) -> None:
        self.reports.transfer_failed(node, transfer_id, m)

    def security_events(self, limit: int = 1000) -> SecurityEventList:
        return self.quarantine.security_events(limit)

    def security_event(self, node: Node, ev: SecurityEvent) -> None:
        self.quarantine.security_event(node, ev)

    def ingest_done(self, node: Node, ingest_id: str, m: IngestDone) -> None:
        self.image_service.ingest_done(node, ingest_id, m)

    def ingest_failed(self, node: Node, ingest_id: str, m: TaskFailed) -> None:
        self.image_service.ingest_failed(node, ingest_id, m)

    def load_done(self, node: Node, load_id: str, m: LoadDone) -> None:
        self.job_service.load_done(node, load_id, m)

    def load_failed(self, node: Node, load_id: str, m: TaskFailed) -> None:
        self.job_service.load_failed(node, load_id, m)

    # ------------------------------------------------------------------
    # admin
    # ------------------------------------------------------------------
    def node_views(self) -> NodeList:
        return views.node_views(self.cluster, self.scheduler)

    def node_view(self, node_id: str) -> NodeView:
        return views.node_view(self.cluster, self.scheduler, node_id)

    def clear_quarantine(self, node_id: str) -> NodeView:
        self.quarantine.clear_quarantine(node_id)
        return self.node_view(node_id)

    def remove_node(self, node_id: str) -> None:
        self.enrollment.remove_node(node_id)

    def image_views(self) -> ImageList:
        return self.image_service.image_views()

    def resolve_tag(self, node: Node, req: ResolveTag) -> ResolvedTag:
        """The upstream manifest a tag names, for ``node``'s mirror (coordinator/upstreams.py).

        A tag no ready image has is added and ingested on demand where its upstream
        allows it (coordinator/pulls.py): the answer then says ``ingesting``.
        """
        try:
            return resolve_tag(self.images, self.upstreams, req)
        except NotFound:
            pending = self.pulls.on_demand(node, req, self.upstreams)
            if pending is None:
                raise
            return pending

    def image_view(self, ref: str) -> ImageView:
        return self.image_service.image_view(ref)

    def add_image(self, req: CreateImage) -> ImageView:
        return self.image_service.add_image(req)

    def remove_image(self, ref: str) -> None:
        self.image_service.remove_image(ref)

    def job_views(self, *, transfers: bool = True) -> JobList:
        return self.job_service.job_views(transfers=transfers)

    def job_view(self, job_id: str, *, transfers: bool = True) -> JobView:
        return self.job_service.job_view(job_id, transfers=transfers)

    def create_job(self, req: CreateJob) -> JobView:
        return self.job_service.create_job(req)

    def pull(self, node: Node, req: PullRequest) -> PullReply:
        return self.pulls.pull(node, req)

    # -- for ops.py and tests: the rules below the API ----------------------
    def _targets(self, names: list[str]) -> list[str]:
        return self.job_service.targets(names)

    def _save_node(self, node: Node) -> None:
        self.ctx.save_node(node)

    def _aborted(self, transfers: list[Transfer], why: str) -> None:
        self.dispatch.aborted(transfers, why)
