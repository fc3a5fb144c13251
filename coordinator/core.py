"""The coordinator's brain: enrollment, heartbeats, images, jobs and the scheduler.

Everything the HTTP layer does ends up as one method call here, with the
current time taken from ``clock``. No aiohttp, no sockets: tests drive this
class directly or through the real app. Mutations happen on the event loop
thread only, so no locks are needed.

How a job runs: each target node *demands* every layer it lacks (in image
order); after every event that can free a seeder or a demander,
:meth:`Coordinator._schedule` asks the ``paper`` scheduler for transfers and
queues each as a :class:`TransferAssignment` to the demander (the demander
pulls). A finished transfer makes the demander a seeder. A node holding every
layer loads the image into Docker (``LoadAssignment``) when it has Docker.

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

Faults (PAPER.md, "Fault handling"; this is where they are decided):

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

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgspec
import structlog

from rainbowd.chunks import DEFAULT_CHUNK_SIZE, ChunkManifest
from rainbowd.digest import is_digest, short
from rainbowd.messages import (
    Assignment,
    AssignmentBatch,
    CreateImage,
    CreateJob,
    EvictReply,
    EvictRequest,
    Heartbeat,
    HeartbeatReply,
    ImageList,
    ImageView,
    IngestAssignment,
    IngestDone,
    JobList,
    JobView,
    LoadAssignment,
    LoadDone,
    NodeList,
    NodeView,
    RegisterReply,
    RegisterRequest,
    RegistrySource,
    SecurityEvent,
    SecurityEventList,
    SecurityEventView,
    SeederUse,
    TaskFailed,
    TransferAssignment,
    TransferDone,
    TransferFailed,
    TransferProgress,
)
from rainbowd.pieces import PieceScheduler
from rainbowd.scheduler import DEFAULT_POLICY, SchedulerError, Transfer
from rainbowd.sources import SourceError, check_source, describe

from . import auth, holdings
from .cluster import MISSED_HEARTBEATS, Cluster, Node
from .errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from .evidence import COORDINATOR, PeerEvidence, unfounded
from .hostkey_probe import HostKeyChecks, Probe, ProbeOutcome, probe_host_key
from .images import check_ingest, check_ref, image_view
from .jobs import Job, NodeProgress
from .metrics import CoordinatorMetrics
from .ops import ClusterOps
from .piece_wire import assignment_for, chunk_range, holds_whole_layer
from .pins import pinned_layers
from .state import StateStore, StoredImage, StoredNode, StoredTransfer

log = structlog.get_logger(__name__)

#: longest a long-poll may wait (seconds)
MAX_WAIT = 30.0
#: different demanders reporting bad chunks (transfers or bad_chunk events) from a seeder
#: before it is quarantined (at least evidence.MIN_INDEPENDENT_DEMANDERS)
SEEDER_FAULT_LIMIT = 3
#: a target node down this long fails in its running jobs (seconds)
NODE_DOWN_TIMEOUT = 300.0
#: a demander that got bad chunks from a seeder does not use it again for this long
VERIFY_AVOID_SECONDS = 60.0
#: a demander that could not reach a seeder avoids it for this many heartbeat intervals
IO_AVOID_INTERVALS = 2.0
#: a delivered transfer missing from a heartbeat received this long after delivery is over
ABSENCE_GRACE = 0.5
#: finished/aborted transfers remembered so late reports are still understood
_TRANSFER_MEMORY = 10_000


@dataclass
class _Tracked:
    """What the coordinator knows of one transfer beyond the scheduler's record."""

    t: Transfer
    seq: int = 0  # mailbox sequence number of its assignment (0: not queued by us)
    acked_at: float = 0.0  # when the demander's cursor passed it (it was delivered)
    restored: bool = False  # adopted from the database after a restart
    reported: bool = False  # its done/failed report was applied
    bytes_seen: int = 0  # the most bytes a progress report of it has shown


class Coordinator:
    """All coordinator state and rules; see the module docstring."""

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
    ) -> None:
        if not join_token or not admin_token:
            raise ValueError("join and admin tokens must not be empty")
        self.store = store
        self.join_token = join_token
        self.admin_token = admin_token
        #: accepted (besides the admin token) on GET /metrics; "" = admin token only
        self.metrics_token = metrics_token
        self.heartbeat_interval = heartbeat_interval
        self.chunk_size = chunk_size
        self.clock = clock
        self.node_down_timeout = node_down_timeout
        self.seeder_fault_limit = seeder_fault_limit
        self.started_at = clock()
        self.scheduler = PieceScheduler(policy, new_id=lambda: "t-" + secrets.token_hex(6))
        self.cluster = Cluster(int(store.get_meta("trust_version", "0") or 0))
        self.images: dict[str, StoredImage] = {}
        self.manifests: dict[str, ChunkManifest] = {}
        self.jobs: dict[str, Job] = {}
        # every transfer known: active ones and recently ended ones
        self.transfers: OrderedDict[str, _Tracked] = OrderedDict()
        # node -> {transfer id: mailbox seq} of transfers not yet delivered to it
        self._undelivered: dict[str, dict[str, int]] = {}
        self.loads: dict[str, tuple[str, str]] = {}  # load id -> (job id, node id)
        self.metrics = metrics if metrics is not None else CoordinatorMetrics()
        self.metrics.watch(self)
        # rbd run/rm/build/images rm-nodes/docker check (coordinator/ops.py)
        self.ops = ClusterOps(self, store.path.parent / "contexts", clock)
        self.evidence = PeerEvidence()  # which reports about peers count (evidence.py)
        self.host_key_checks = HostKeyChecks(clock, host_key_probe)
        self.orphans = holdings.OrphanWatch()
        self._restore()

    # ------------------------------------------------------------------
    # restart
    # ------------------------------------------------------------------
    def _restore(self) -> None:
        """Reload nodes (down until they heartbeat), images and jobs from SQLite."""
        for info, seq in self.store.load_nodes():
            node = self.cluster.add(info, seq)
            node.down_since = self.started_at
            self.scheduler.add_node(
                node.node_id,
                info.speed_hint_bps,
                node.holdings,
                max_upload_bps=info.max_upload_bps,
                max_download_bps=info.max_download_bps,
                download_bps=info.download_hint_bps,
            )
            self.scheduler.node_down(node.node_id)
        for image in self.store.load_images():
            self.images[image.ref] = image
            for m in image.manifests:
                self.manifests.setdefault(m.digest, m)
                self.scheduler.set_layer_size(m.digest, m.size, m.chunk_size)
            if image.state == "ingesting":
                self._queue_ingest(image)
        now = self.clock()
        adopted = self._restore_transfers()
        for view in self.store.load_jobs():
            job_image = self.images.get(view.image)
            if job_image is None or job_image.record is None:
                log.warning("job references a missing image; dropped", job=view.job_id)
                continue
            layers = [(lr.digest, lr.size) for lr in job_image.record.layers]
            holdings = {nid: n.holdings for nid, n in self.cluster.nodes.items()}
            job = Job.from_view(view, layers, holdings)
            job.image_bytes = job.image_bytes or job_image.record.uncompressed_size
            self.jobs[job.job_id] = job
            if job.running:
                self._start_job_nodes(job, now)
                if job.settle(now):
                    self._job_finished(job)
                self.store.save_job(job.view())
        for t in adopted:
            for p in self._progress_of(t.demander):
                if p.needs(t.layer):
                    p.started_transfer(t.layer)
        log.info(
            "state restored",
            transfers_adopted=len(adopted),
            nodes=len(self.cluster.nodes),
            images=len(self.images),
            jobs=len(self.jobs),
            trust_version=self.cluster.trust_version,
        )

    def _restore_transfers(self) -> list[Transfer]:
        """Adopt the transfers that were in flight when the last run ended.

        Agents kept pulling while we were away. Each one is locked again
        (seeder and demander) before any node is heard from, so nothing
        schedules a second copy of a layer a demander is still pulling; the
        demander's first poll and heartbeats then confirm or end it (see
        :meth:`_check_absent`). Aborted ones are only remembered, for their
        late reports.
        """
        adopted: list[Transfer] = []
        for st in self.store.load_transfers():
            t = Transfer(
                transfer_id=st.transfer_id,
                layer=st.layer,
                seeder=st.seeder,
                demander=st.demander,
                job_id=st.job_id,
                started_at=st.started_at,
                reason=st.reason,
                seeder_speed_bps=st.seeder_speed_bps,
                first_chunk=st.first_chunk,
                end_chunk=st.end_chunk,
            )
            usable = (
                st.seeder in self.cluster.nodes
                and st.demander in self.cluster.nodes
                and st.layer in self.manifests
            )
            if not usable:
                self.store.delete_transfer(st.transfer_id)
                continue
            self._remember(_Tracked(t, seq=st.seq, restored=True))
            if st.state == "active" and st.layer not in self.cluster.nodes[st.demander].holdings:
                try:
                    self.scheduler.adopt(t)
                except SchedulerError as e:  # e.g. its piece no longer exists: plan it anew
                    log.warning("stored transfer not adopted", transfer=t.transfer_id, error=str(e))
                    self.store.delete_transfer(st.transfer_id)
                    continue
                self._undelivered.setdefault(t.demander, {})[t.transfer_id] = st.seq
                adopted.append(t)
                log.info(
                    "transfer adopted after restart",
                    transfer=t.transfer_id,
                    layer=short(t.layer),
                    seeder=t.seeder,
                    demander=t.demander,
                )
            elif st.state == "active":
                self.store.delete_transfer(st.transfer_id)  # done; its report was lost
        self.store.prune_transfers(_TRANSFER_MEMORY)
        return adopted

    def _remember(self, tr: _Tracked) -> None:
        self.transfers[tr.t.transfer_id] = tr
        while len(self.transfers) > _TRANSFER_MEMORY:
            self.transfers.popitem(last=False)

    def _stored(self, tr: _Tracked, state: str = "active") -> StoredTransfer:
        t = tr.t
        return StoredTransfer(
            transfer_id=t.transfer_id,
            layer=t.layer,
            seeder=t.seeder,
            demander=t.demander,
            job_id=t.job_id,
            started_at=t.started_at,
            reason=t.reason,
            seeder_speed_bps=t.seeder_speed_bps,
            seq=tr.seq,
            state="aborted" if state == "aborted" else "active",
            first_chunk=chunk_range(t)[0],
            end_chunk=chunk_range(t)[1],
        )

    # ------------------------------------------------------------------
    # authentication
    # ------------------------------------------------------------------
    def check_admin(self, header: str | None) -> None:
        token = auth.bearer(header)
        if token is None:
            raise Unauthorized("admin API: send 'Authorization: Bearer <admin token>'")
        if not auth.same_secret(token, self.admin_token):
            raise Forbidden(
                "admin API: the admin token is wrong (see the coordinator's admin-token file)"
            )

    def check_metrics(self, header: str | None) -> None:
        """GET /metrics: the metrics token, or the admin token.

        A token of its own so a Prometheus server can scrape without holding
        the admin token (which can distribute images and remove nodes).
        """
        token = auth.bearer(header)
        if token is None:
            raise Unauthorized(
                "metrics: send 'Authorization: Bearer <metrics token>' (rbd-coordinator "
                "show-token metrics; in prometheus.yml: authorization.credentials_file)"
            )
        if not (
            (self.metrics_token and auth.same_secret(token, self.metrics_token))
            or auth.same_secret(token, self.admin_token)
        ):
            raise Forbidden("metrics: the token is neither the metrics token nor the admin token")

    def authenticate_node(self, header: str | None) -> Node:
        """The node named by ``Authorization: Bearer <node_id>:<credential>``."""
        token = auth.bearer(header)
        if token is None:
            raise Unauthorized("agent API: send 'Authorization: Bearer <node_id>:<credential>'")
        parts = auth.split_node_token(token)
        if parts is None:
            raise Unauthorized("agent API: bearer token must be '<node_id>:<credential>'")
        node_id, credential = parts
        node = self.cluster.get(node_id)
        if node is None:
            raise Forbidden(f"node {node_id!r} is not enrolled; register it with the join token")
        if not auth.credential_matches(credential, node.info.credential_hash):
            raise Forbidden(f"credential for node {node_id!r} is wrong")
        return node

    # ------------------------------------------------------------------
    # agents
    # ------------------------------------------------------------------
    def register(self, req: RegisterRequest) -> RegisterReply:
        now = self.clock()
        _check_register(req)
        node = self.cluster.get(req.node_id)
        if node is not None:
            credential = self._check_reregister(node, req)
            peer_before = node.peer()
            info = node.info
            info.address, info.ssh_port = req.address, req.ssh_port
            info.host_key, info.client_key = req.host_key, req.client_key
            info.labels, info.roles = dict(req.labels), list(req.roles)
            info.docker, info.speed_hint_bps = req.docker, req.speed_hint_bps
            info.download_hint_bps = req.download_hint_bps
            info.max_upload_bps, info.max_download_bps = req.max_upload_bps, req.max_download_bps
            # the agent (re)started: whatever it was pulling or loading is gone,
            # including transfers adopted after a coordinator restart
            node.up = False
            self._aborted(self.scheduler.node_down(node.node_id), "agent re-registered")
            restarted = True
            if node.peer() != peer_before and not node.quarantined:
                self.cluster.trust_changed()
            log.info("node re-registered", node=node.node_id, address=req.address)
        else:
            if not req.join_token:
                raise Unauthorized(
                    f"node {req.node_id!r} is not enrolled: enrolling needs the cluster join "
                    "token (on the coordinator: rbd-coordinator show-token join --state-dir DIR)"
                )
            if not auth.same_secret(req.join_token, self.join_token):
                raise Forbidden("the join token is wrong for this cluster")
            credential = auth.new_token()
            info = StoredNode(
                node_id=req.node_id,
                address=req.address,
                ssh_port=req.ssh_port,
                host_key=req.host_key,
                client_key=req.client_key,
                credential_hash=auth.hash_secret(credential),
                labels=dict(req.labels),
                roles=list(req.roles),
                docker=req.docker,
                speed_hint_bps=req.speed_hint_bps,
                download_hint_bps=req.download_hint_bps,
                max_upload_bps=req.max_upload_bps,
                max_download_bps=req.max_download_bps,
                registered_at=now,
            )
            node = self.cluster.add(info)
            self.cluster.trust_changed()
            restarted = False
            log.info("node enrolled", node=node.node_id, address=req.address, roles=req.roles)
        node.epoch += 1
        node.last_seen = now
        node.disk_free = req.disk_free
        node.reported_active = {}
        self._bring_up(node, now)
        self._add_holdings(node, req.holdings, now)
        self._follow_holdings(node, req.holdings, now)
        if restarted:
            self._reload(node, now)
        self._save_node(node)
        self._save_trust_version()
        self._schedule(now)
        return RegisterReply(
            node_id=node.node_id,
            credential=credential,
            heartbeat_interval=self.heartbeat_interval,
            trust=self.cluster.trust(),
        )

    def _reload(self, node: Node, now: float) -> None:
        """Re-issue the Docker loads a restarted agent lost (its jobs wait on them)."""
        for job, p in list(self._jobs_of(node.node_id)):
            if p.state == "loading":
                self.loads.pop(p.load_id, None)
                self._node_has_all(job, p, now)

    def _check_reregister(self, node: Node, req: RegisterRequest) -> str:
        if req.credential:
            if not auth.credential_matches(req.credential, node.info.credential_hash):
                raise Forbidden(
                    f"credential for node {node.node_id!r} is wrong; use the credential saved "
                    "by its agent, or remove the node (rbd node remove) and enroll it again"
                )
            return req.credential
        if req.join_token:
            raise Conflict(
                f"node id {node.node_id!r} is already enrolled and a join token cannot take it "
                "over. Restart the agent with the credential it saved at enrollment, choose "
                f"another node id, or remove the old node first (rbd node remove {node.node_id})"
            )
        raise Unauthorized(
            f"node {node.node_id!r} is enrolled: re-registering needs its credential"
        )

    def heartbeat(self, node: Node, hb: Heartbeat) -> HeartbeatReply:
        t0 = time.perf_counter()
        now = self.clock()
        bad = [d for d in hb.holdings if not is_digest(d)]
        if bad:
            raise BadRequest(f"heartbeat: holdings are not sha256 digests: {bad[:3]}")
        node.last_seen = now
        node.load, node.disk_free, node.disk_used = hb.load, hb.disk_free, hb.disk_used
        node.reported_active = {a.transfer_id: (a.layer, a.seeder) for a in hb.active}
        if not node.up and not node.quarantined:
            log.info("node is back up", node=node.node_id)
        changed = self._add_holdings(node, hb.holdings, now)
        changed = self._follow_holdings(node, hb.holdings, now) or changed
        self._reconcile(node, hb, now)
        self._bring_up(node, now)
        if changed:
            self._save_node(node)
        self._schedule(now)
        reply = HeartbeatReply(trust_version=self.cluster.trust_version, pinned=self.pins(node))
        self.metrics.heartbeat(time.perf_counter() - t0)
        return reply

    # -- store eviction (agents with a store limit; see pins.py) ---------
    def pins(self, node: Node) -> list[str]:
        """Layers ``node`` must not evict right now, sorted."""
        return sorted(self._pinned(node))

    def _pinned(self, node: Node) -> dict[str, str]:
        return pinned_layers(
            node.node_id, self.jobs.values(), self.images, self.scheduler.active_for(node.node_id)
        )

    def evict(self, node: Node, req: EvictRequest) -> EvictReply:
        """Let ``node`` delete the unpinned layers it asks for; forget that it holds them.

        The holdings are dropped (here and in the scheduler, so the node is no
        longer offered as their seeder) before the agent deletes a byte; a
        refused layer stays held and the reason goes back to the agent.
        """
        bad = [d for d in req.layers if not is_digest(d)]
        if bad:
            raise BadRequest(f"evict: layers are not sha256 digests: {bad[:3]}")
        pinned = self._pinned(node)
        accepted: list[str] = []
        refused: dict[str, str] = {}
        for layer in dict.fromkeys(req.layers):
            if layer in pinned:
                refused[layer] = pinned[layer]
                continue
            accepted.append(layer)
            node.holdings.discard(layer)
            self.scheduler.remove_holding(node.node_id, layer)
        if accepted:
            self._save_node(node)
        log.info(
            "layers evicted by node",
            node=node.node_id,
            accepted=[short(d) for d in accepted],
            refused={short(d): why for d, why in refused.items()},
        )
        return EvictReply(accepted=accepted, refused=refused)

    def _reconcile(self, node: Node, hb: Heartbeat, now: float) -> None:
        """Line our view of ``node``'s incoming transfers up with what its agent says it pulls."""
        listed = {a.transfer_id for a in hb.active}
        for a in hb.active:
            tr = self.transfers.get(a.transfer_id)
            if tr is None:
                tr = self._adopt_unknown(node, a.transfer_id, a.layer, a.seeder, now)
                if tr is None:
                    continue
            elif tr.t.demander != node.node_id or tr.reported:
                continue  # not its transfer, or over (a heartbeat older than the report)
            elif not self.scheduler.is_active(a.transfer_id):
                if not self._readopt(node, tr):
                    continue
            if not tr.acked_at:
                tr.acked_at = now  # listed, so delivered
                self._undelivered.get(node.node_id, {}).pop(a.transfer_id, None)
            for p in self._progress_of(node.node_id):
                p.progress(tr.t.layer, a.bytes_done, a.rate_bps)
        self._check_absent(node, listed, now)

    def _adopt_unknown(
        self, node: Node, transfer_id: str, layer: str, seeder: str, now: float
    ) -> _Tracked | None:
        """A transfer we never issued (its record is lost): track it if it makes sense."""
        if (
            layer in node.holdings
            or layer not in self.manifests
            or seeder not in self.cluster.nodes
            or seeder == node.node_id
            or self.scheduler.receiving(node.node_id, layer) is not None
        ):
            return None
        job_id = next((j.job_id for j, p in self._jobs_of(node.node_id) if p.needs(layer)), "")
        t = Transfer(
            transfer_id=transfer_id,
            layer=layer,
            seeder=seeder,
            demander=node.node_id,
            job_id=job_id,
            started_at=now,
            reason="adopted: the agent was already pulling it (unknown to this coordinator)",
            seeder_speed_bps=self.scheduler.speed(seeder),
        )
        self.scheduler.adopt(t)
        tr = _Tracked(t, acked_at=now)
        self._remember(tr)
        self.store.save_transfer(self._stored(tr))
        for p in self._progress_of(node.node_id):
            if p.needs(layer):
                p.started_transfer(layer)
        log.warning(
            "unknown transfer adopted from heartbeat",
            transfer=transfer_id,
            layer=short(layer),
            seeder=seeder,
            demander=node.node_id,
        )
        return tr

    def _readopt(self, node: Node, tr: _Tracked) -> bool:
        """We gave up on this transfer (node down), yet the agent still pulls it: take it back."""
        t = tr.t
        if t.layer in node.holdings or self.scheduler.receiving_piece(node.node_id, t) is not None:
            return False
        if t.seeder not in self.cluster.nodes:
            return False
        self.scheduler.adopt(t)
        self.store.save_transfer(self._stored(tr))
        for p in self._progress_of(node.node_id):
            if p.needs(t.layer):
                p.started_transfer(t.layer)
        log.info(
            "transfer taken back: the agent still pulls it",
            transfer=t.transfer_id,
            layer=short(t.layer),
            seeder=t.seeder,
            demander=t.demander,
        )
        return True

    def _check_absent(self, node: Node, listed: set[str], now: float) -> None:
        """End active transfers to ``node`` that its agent, having received them, no longer runs.

        Only transfers delivered at least ABSENCE_GRACE before this heartbeat
        count (a heartbeat built just before a delivery cannot list it). A
        completed one shows in the holdings; the others are released so the
        demand is planned again -- the agent's report, if it still comes, is
        applied then for what it says about the seeder.
        """
        for t in self.scheduler.active_for(node.node_id):  # not every transfer: per heartbeat
            if t.demander != node.node_id or t.transfer_id in listed:
                continue
            tr = self.transfers.get(t.transfer_id)
            if tr is None or not tr.acked_at or now - tr.acked_at < ABSENCE_GRACE:
                continue
            if t.layer in node.holdings:
                self.scheduler.complete(t.transfer_id, now)
                self.evidence.transfer_ended(t, now)
                self.store.delete_transfer(t.transfer_id)
                log.info(
                    "transfer over: layer held, report still to come",
                    transfer=t.transfer_id,
                    layer=short(t.layer),
                    demander=t.demander,
                )
            else:
                self.scheduler.fail(t.transfer_id)
                self._aborted([t], f"agent {node.node_id} no longer runs it")

    def _bring_up(self, node: Node, now: float) -> None:
        """The node reported: schedulable again; its jobs stop showing it down."""
        if node.quarantined:
            return
        if not node.up:
            self.scheduler.add_node(
                node.node_id,
                node.info.speed_hint_bps,
                max_upload_bps=node.info.max_upload_bps,
                max_download_bps=node.info.max_download_bps,
                download_bps=node.info.download_hint_bps,
            )
            node.up = True
            node.down_since = 0.0
        elif self.scheduler.is_suspect(node.node_id):
            log.info("suspect node reported; schedulable again", node=node.node_id)
            self.scheduler.add_node(node.node_id)
        for job, p in list(self._jobs_of(node.node_id)):
            if p.came_back():
                log.info("node back in job", job=job.job_id, node=node.node_id)
                self._job_changed(job, p)

    def poll(self, node: Node, cursor: int, trust_version: int) -> AssignmentBatch | None:
        """Assignments after ``cursor`` (and a newer trust list), or None if nothing is new."""
        self._acknowledge(node, cursor)
        new_cursor, items = node.mailbox.after(cursor)
        trust = self.cluster.trust() if trust_version < self.cluster.trust_version else None
        if not items and trust is None and new_cursor == cursor:
            return None
        return AssignmentBatch(cursor=new_cursor, assignments=items, trust=trust)

    def _acknowledge(self, node: Node, cursor: int) -> None:
        """The agent has received everything up to ``cursor``: note which transfers it has.

        A transfer adopted after a restart whose assignment lies beyond the
        cursor never reached the agent (the old mailbox died with the old
        process), so it is released and planned again.
        """
        pending = self._undelivered.get(node.node_id)
        if not pending:
            return
        now = self.clock()
        lost: list[Transfer] = []
        for tid, seq in list(pending.items()):
            tr = self.transfers.get(tid)
            if tr is None or not self.scheduler.is_active(tid):
                del pending[tid]
            elif seq <= cursor:
                tr.acked_at = tr.acked_at or now
                del pending[tid]
            elif tr.restored:
                del pending[tid]
                self.scheduler.fail(tid)
                lost.append(tr.t)
        if lost:
            self._aborted(lost, "its assignment was lost with the old coordinator process")
            self._schedule(now)

    def empty_batch(self, cursor: int) -> AssignmentBatch:
        return AssignmentBatch(cursor=cursor)

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
        if not self.scheduler.is_demanding(nid):
            # nothing waits on it as a demander: missed heartbeats (or a demander's
            # "unreachable" report, if it seeds) decide, as for any silent node
            log.info("agent connection dropped mid-poll; idle node left to heartbeats", node=nid)
            return
        log.warning("agent connection dropped mid-poll; node marked down", node=node.node_id)
        self._mark_down(node, "its connection to the coordinator dropped", self.clock())

    def _mark_down(self, node: Node, why: str, now: float) -> None:
        node.up = False
        node.down_since = now
        self._aborted(self.scheduler.node_down(node.node_id), f"node {node.node_id} down: {why}")
        for job, p in list(self._jobs_of(node.node_id)):
            if not p.final:
                p.went_down(why, now, self.node_down_timeout)
                self._job_changed(job, p)
        self._schedule(now)

    def check_liveness(self) -> list[str]:
        """Mark nodes that stopped heartbeating down; fail targets down for too long."""
        now = self.clock()
        gone = self.cluster.stale(now, self.heartbeat_interval)
        for node in gone:
            log.warning("node missed heartbeats; marked down", node=node.node_id)
            self._mark_down(node, f"missed heartbeats for {now - node.last_seen:.1f}s", now)
        self._reap_orphans(now)
        self._expire_down_nodes(now)
        grace = holdings.ORPHAN_GRACE_INTERVALS * self.heartbeat_interval
        for job, p, why in self.orphans.check(self._jobs_of_all(), self.cluster.nodes, now, grace):
            p.fail(why, now)
            self._node_failed(job, p, now)
        self.ops.expire(now)
        return [n.node_id for n in gone]

    def _reap_orphans(self, now: float) -> None:
        """Release adopted transfers whose demander never came back after a restart."""
        if now - self.started_at <= MISSED_HEARTBEATS * self.heartbeat_interval:
            return
        orphans = [
            t
            for t in self.scheduler.active()
            if not (n := self.cluster.get(t.demander)) or not n.up
        ]
        for t in orphans:
            self.scheduler.fail(t.transfer_id)
        if orphans:
            self._aborted(orphans, "its demander did not come back after the restart")
            self._schedule(now)

    def _expire_down_nodes(self, now: float) -> None:
        for job, p in list(self._jobs_of_all()):
            node = self.cluster.get(p.node_id)
            if p.final or node is None or node.up or node.quarantined or not node.down_since:
                continue
            if now - node.down_since < self.node_down_timeout:
                continue
            p.fail(
                f"node {p.node_id} down for {now - node.down_since:.0f}s "
                f"(node_down_timeout {self.node_down_timeout:.0f}s)",
                now,
            )
            self._node_failed(job, p, now)

    def _jobs_of_all(self) -> Iterable[tuple[Job, NodeProgress]]:
        for job in list(self.jobs.values()):
            if job.running:
                for p in job.nodes.values():
                    yield job, p

    # -- transfer reports -----------------------------------------------
    def _tracked(self, node: Node, transfer_id: str) -> _Tracked | None:
        """The transfer, None if unknown (e.g. issued before a restart that lost it)."""
        tr = self.transfers.get(transfer_id)
        if tr is not None and tr.t.demander != node.node_id:
            raise Forbidden(
                f"transfer {transfer_id} belongs to {tr.t.demander}, not {node.node_id}"
            )
        return tr

    def _heard_from(self, node: Node, now: float) -> None:
        """A report from ``node`` shows it alive as well as a heartbeat would.

        A busy host's heartbeat can be late (its uplink full, its threads busy with
        chunks) while its transfer reports keep coming; marking it down would abort
        the very transfers it is reporting. (Only a heartbeat brings a down node back.)
        """
        node.last_seen = max(node.last_seen, now)

    def transfer_progress(self, node: Node, transfer_id: str, m: TransferProgress) -> None:
        now = self.clock()
        self._heard_from(node, now)
        tr = self._tracked(node, transfer_id)
        if tr is not None and m.bytes_done > tr.bytes_seen:
            # bytes moved since the last report: the seeder is alive and serving, even if
            # its own heartbeat is late (a busy seeder sends no transfer reports of its own)
            tr.bytes_seen = m.bytes_done
            seeder = self.cluster.get(tr.t.seeder)
            if seeder is not None:
                self._heard_from(seeder, now)
        if tr is not None and self.scheduler.is_active(transfer_id):
            for p in self._progress_of(node.node_id):
                p.progress(tr.t.layer, m.bytes_done, m.rate_bps)

    def transfer_done(self, node: Node, transfer_id: str, m: TransferDone) -> None:
        now = self.clock()
        self._heard_from(node, now)
        tr = self._tracked(node, transfer_id)
        if tr is None:
            layer = node.reported_active.get(transfer_id, ("", ""))[0]
            log.info(
                "done report for an unknown transfer",
                transfer=transfer_id,
                node=node.node_id,
                layer=short(layer) if layer else None,
            )
            # a piece of a split layer is not the layer: the node's heartbeat says when it is
            whole = len(self.scheduler.pieces(layer)) == 1
            if whole and layer in self.manifests and self._add_holdings(node, [layer], now):
                self._save_node(node)
            self._schedule(now)
            return
        t = tr.t
        if self.scheduler.is_active(transfer_id):
            self.scheduler.complete(transfer_id, now, m.bytes_moved)
            self.evidence.transfer_ended(t, now)
        else:
            log.info("late done report for an ended transfer", transfer=transfer_id)
        first, tr.reported = not tr.reported, True
        self.store.delete_transfer(transfer_id)
        if first:
            self.metrics.transfer_done(m.seconds, m.bytes_moved)
            use = SeederUse(
                layer=t.layer,
                seeder=t.seeder,
                reason=t.reason,
                bytes=m.bytes_moved,
                seconds=m.seconds,
                started_at=t.started_at,
                finished_at=now,
            )
            for p in self._progress_of(node.node_id):
                if t.layer in p.sizes:
                    p.record(use)  # every piece of a split layer counts (first: once each)
        log.info(
            "transfer done",
            transfer=transfer_id,
            layer=short(t.layer),
            seeder=t.seeder,
            demander=t.demander,
            bytes=m.bytes_moved,
            seconds=round(m.seconds, 3),
        )
        if holds_whole_layer(self.scheduler, t) and self._add_holdings(node, [t.layer], now):
            self._save_node(node)
        elif first:
            for job, p in list(self._jobs_of(node.node_id)):
                self._job_changed(job, p)  # the recorded use must survive a restart
        self._schedule(now)

    def transfer_failed(self, node: Node, transfer_id: str, m: TransferFailed) -> None:
        now = self.clock()
        self._heard_from(node, now)
        tr = self._tracked(node, transfer_id)
        if tr is None:
            log.info("failure report for an unknown transfer", transfer=transfer_id, kind=m.kind)
            return
        if tr.reported:
            log.info("repeated report for an ended transfer", transfer=transfer_id)
            return
        t = tr.t
        if _blames_seeder(m):
            self._check_backed(node, t.seeder, f"a {m.kind} failure of {transfer_id}", now)
        tr.reported = True
        self.store.delete_transfer(transfer_id)
        if self.scheduler.is_active(transfer_id):
            self.scheduler.fail(transfer_id)
            self.evidence.transfer_ended(t, now)
            # (one the coordinator had already dropped was counted as aborted then)
            self.metrics.transfer_failed(m.kind, now - t.started_at)
        why = f"{m.kind}: {m.reason}"
        log.warning(
            "transfer failed",
            transfer=transfer_id,
            layer=short(t.layer),
            seeder=t.seeder,
            demander=t.demander,
            kind=m.kind,
            reason=m.reason,
            seeder_fault=m.seeder_fault,
        )
        for job, p in list(self._jobs_of(node.node_id)):
            if m.kind == "disk":
                failed = p.count_failure(t.layer, f"disk full: {m.reason}", now, final=True)
            elif m.kind == "relay":
                # the relay's own pull was behind or broke: not this demander's (nor the
                # relay's) failure; it is re-planned without using up its failure budget
                p.transfer_stopped(t.layer)
                failed = False
            else:
                failed = p.count_failure(t.layer, f"from {t.seeder}: {why}", now)
            if failed:
                self._node_failed(job, p, now)
        self._blame_seeder(t, m, now)
        self._schedule(now)

    def _blame_seeder(self, t: Transfer, m: TransferFailed, now: float) -> None:
        """What a failed transfer says about its seeder (the quarantine policy)."""
        seeder = self.cluster.get(t.seeder)
        if seeder is None or seeder.quarantined:
            return
        why = f"transfer {t.transfer_id} to {t.demander} failed: {m.kind}: {m.reason}"
        if m.not_held:
            what = f"it answered not_held to {t.demander} (transfer {t.transfer_id})"
            self._holdings_lost(seeder, [t.layer], now, what)
        if m.kind == "security" and m.seeder_fault:
            self.store.add_security_event(t.demander, t.seeder, f"transfer_{m.kind}", m.reason)
            self._host_key_claim(seeder, t.demander, now)
        elif m.kind == "security":
            # the seeder refused the demander's client key: its trust list is behind
            # (evidence.py), nobody's attack. Wake its poll so it fetches the list now.
            seeder.mailbox.wake()
            self.scheduler.avoid(t.demander, t.seeder, now + self.heartbeat_interval)
            log.info("seeder's trust list is behind; re-planning", seeder=t.seeder, why=why)
        elif m.seeder_fault:
            self.store.add_security_event(t.demander, t.seeder, f"transfer_{m.kind}", m.reason)
            self._seeder_fault(seeder, t.demander, why, now)
        elif m.kind == "relay":
            # a relay (still receiving the layer) could not provide a chunk: its upstream's
            # fault, so no suspicion and no penalty; the pair rests a heartbeat, so the
            # re-plan prefers another seeder while the relay's own pull recovers
            self.scheduler.avoid(t.demander, t.seeder, now + self.heartbeat_interval)
            log.info(
                "relay could not serve; re-planning",
                relay=t.seeder,
                demander=t.demander,
                layer=short(t.layer),
            )
        elif m.kind in ("io", "unreachable") and not m.not_held:
            self.scheduler.suspect(t.seeder)
            self.scheduler.avoid(
                t.demander, t.seeder, now + IO_AVOID_INTERVALS * self.heartbeat_interval
            )
            log.warning(
                "seeder suspect: no new work until it reports",
                node=t.seeder,
                demander=t.demander,
                layer=short(t.layer),
                kind=m.kind,
            )

    def _seeder_fault(self, seeder: Node, demander: str, why: str, now: float) -> None:
        """Bad bytes from ``seeder`` (a backed claim): the pair avoid each other; penalty and
        quarantine need several different demanders (evidence.py)."""
        self.metrics.seeder_fault(seeder.node_id)
        self.scheduler.avoid(demander, seeder.node_id, now + VERIFY_AVOID_SECONDS)
        origin, limit = "origin" in seeder.info.roles, self.seeder_fault_limit
        verdict, n = self.evidence.bad_chunk_verdict(
            seeder.node_id, demander, origin=origin, limit=limit
        )
        seeder.info.seeder_faults = n
        self._save_node(seeder)
        if verdict == "quarantine":
            why = f"{n} demanders reported bad chunks (last: {why})"
            self._quarantine(seeder.node_id, why, now)
            return
        speed = self.scheduler.penalize(seeder.node_id) if verdict == "penalize" else 0.0
        log.warning(
            "bad chunks reported",
            node=seeder.node_id,
            demander=demander,
            demanders_reporting=n,
            verdict=verdict,
            origin=origin,
            speed_bps=round(speed or self.scheduler.speed(seeder.node_id)),
        )

    def _check_backed(self, node: Node, peer: str, what: str, now: float) -> None:
        """Refuse (403, recorded against ``node``) a report about ``peer`` with no transfer."""
        active = self.scheduler.active_for(node.node_id)
        if self.evidence.backed(node.node_id, peer, active, now):
            return
        why = unfounded(node.node_id, peer, what, self.evidence.window)
        self.store.add_security_event(COORDINATOR, node.node_id, "unfounded_report", why)
        log.warning("report about a peer refused", reporter=node.node_id, peer=peer, what=what)
        raise Forbidden(why)

    def _host_key_claim(self, seeder: Node, reporter: str, now: float) -> None:
        """A backed host-key claim: the pair avoid each other; we look at the key ourselves."""
        self.scheduler.avoid(reporter, seeder.node_id, now + VERIFY_AVOID_SECONDS)
        i = seeder.info
        self.host_key_checks.request(
            i.node_id, i.address, i.ssh_port, i.host_key, self._host_key_probed
        )

    def _host_key_probed(self, node_id: str, pinned: str, outcome: ProbeOutcome) -> None:
        node = self.cluster.get(node_id)
        if node is None or node.quarantined or node.info.host_key != pinned:
            return  # gone, already out, or re-registered with another key meanwhile
        where = f"{node.info.address}:{node.info.ssh_port}"
        if outcome.state != "mismatch":
            log.warning("host key claim not confirmed", node=node_id, probe=outcome.state)
            return
        now = self.clock()
        why = (
            f"host key mismatch: the coordinator's own probe of {where} was shown "
            f"{outcome.detail}, not the key {node_id} enrolled with"
        )
        self.store.add_security_event(COORDINATOR, node_id, "host_key_mismatch", why)
        self._quarantine(node_id, why, now)
        self._schedule(now)

    def security_events(self, limit: int = 1000) -> SecurityEventList:
        """The most recent security events, oldest first."""
        rows = self.store.security_events()[-limit:]
        return SecurityEventList(
            events=[
                SecurityEventView(at=at, reporter=r, peer=p, kind=k, detail=d)
                for at, r, p, k, d in rows
            ]
        )

    def security_event(self, node: Node, ev: SecurityEvent) -> None:
        """Record ``node``'s event; one accusing a peer must be backed (evidence.py) or is 403."""
        now = self.clock()
        peer = self.cluster.get(ev.peer)
        accuses = peer is not None and peer.node_id != node.node_id
        if accuses and ev.kind != "client_key_refused":
            self._check_backed(node, ev.peer, ev.kind, now)
        self.store.add_security_event(node.node_id, ev.peer, ev.kind, ev.detail)
        log.warning(
            "security event", reporter=node.node_id, peer=ev.peer, kind=ev.kind, detail=ev.detail
        )
        if peer is None or not accuses or peer.quarantined:
            return
        if ev.kind == "host_key_mismatch":
            self._host_key_claim(peer, node.node_id, now)
        elif ev.kind == "bad_chunk":
            self._seeder_fault(peer, node.node_id, f"{node.node_id}: {ev.detail}", now)
        self._schedule(now)

    # -- ingest and load reports ----------------------------------------
    def ingest_done(self, node: Node, ingest_id: str, m: IngestDone) -> None:
        now = self.clock()
        image = self._ingest(node, ingest_id)
        if image.state == "ready":
            return  # a repeated report
        if image.state != "ingesting":
            raise Conflict(f"image {image.ref} is {image.state}; ingest {ingest_id} is over")
        try:
            manifests = check_ingest(m.image, m.manifests)
        except BadRequest as e:
            image.state, image.error = "failed", e.message
            self.store.save_image(image)
            log.warning("ingest report rejected", image=image.ref, error=e.message)
            raise
        image.record = msgspec.structs.replace(m.image, ref=image.ref)
        image.manifests = manifests
        image.state, image.error = "ready", ""
        for mf in manifests:
            self.manifests.setdefault(mf.digest, mf)
            self.scheduler.set_layer_size(mf.digest, mf.size, mf.chunk_size)
        self.store.save_image(image)
        log.info("image ready", image=image.ref, layers=len(manifests), size=image.record.size)
        if self._add_holdings(node, [mf.digest for mf in manifests], now):
            self._save_node(node)
        self._schedule(now)

    def ingest_failed(self, node: Node, ingest_id: str, m: TaskFailed) -> None:
        image = self._ingest(node, ingest_id)
        if image.state != "ingesting":
            return
        image.state, image.error = "failed", m.reason or "ingest failed (no reason given)"
        self.store.save_image(image)
        log.warning("ingest failed", image=image.ref, origin=node.node_id, reason=m.reason)

    def _ingest(self, node: Node, ingest_id: str) -> StoredImage:
        image = next((i for i in self.images.values() if i.ingest_id == ingest_id), None)
        if image is None:
            raise NotFound(f"no ingest {ingest_id!r}")
        if image.origin != node.node_id:
            raise Forbidden(
                f"ingest {ingest_id} was assigned to {image.origin}, not {node.node_id}"
            )
        return image

    def load_done(self, node: Node, load_id: str, m: LoadDone) -> None:
        job, p = self._load(node, load_id)
        if p.state == "loading":
            p.finish(self.clock())
            log.info("image loaded", node=node.node_id, job=job.job_id, seconds=m.seconds)
            self._job_changed(job, p)

    def load_failed(self, node: Node, load_id: str, m: TaskFailed) -> None:
        job, p = self._load(node, load_id)
        if p.state == "loading":
            p.fail(f"docker load on {node.node_id} failed: {m.reason}", self.clock())
            log.warning("image load failed", node=node.node_id, job=job.job_id, reason=m.reason)
            self._job_changed(job, p)

    def _load(self, node: Node, load_id: str) -> tuple[Job, NodeProgress]:
        entry = self.loads.get(load_id)
        if entry is None:
            raise NotFound(f"no load {load_id!r} (unknown, or from before a restart)")
        job_id, node_id = entry
        if node_id != node.node_id:
            raise Forbidden(f"load {load_id} belongs to {node_id}, not {node.node_id}")
        return self.jobs[job_id], self.jobs[job_id].nodes[node_id]

    # ------------------------------------------------------------------
    # admin
    # ------------------------------------------------------------------
    def node_views(self) -> NodeList:
        busy = {x for t in self.scheduler.active() for x in (t.seeder, t.demander)}
        return NodeList(
            nodes=[
                n.view(self.scheduler.speed(nid), nid in busy, self.scheduler.is_suspect(nid))
                for nid, n in sorted(self.cluster.nodes.items())
            ]
        )

    def node_view(self, node_id: str) -> NodeView:
        for v in self.node_views().nodes:
            if v.node_id == node_id:
                return v
        raise NotFound(self._unknown_node(node_id))

    def _unknown_node(self, node_id: str) -> str:
        known = ", ".join(sorted(self.cluster.nodes)) or "none"
        return f"no node {node_id!r} (enrolled: {known})"

    def clear_quarantine(self, node_id: str) -> NodeView:
        node = self.cluster.get(node_id)
        if node is None:
            raise NotFound(self._unknown_node(node_id))
        if node.quarantined:
            node.info.quarantined, node.info.quarantine_reason = False, ""
            node.info.seeder_faults = 0
            self.evidence.forget(node_id)
            if self.clock() - node.last_seen <= MISSED_HEARTBEATS * self.heartbeat_interval:
                self._bring_up(node, self.clock())
            self.cluster.trust_changed()
            self._save_node(node)
            self._save_trust_version()
            log.warning("quarantine cleared by admin", node=node_id)
            self._schedule(self.clock())
        return self.node_view(node_id)

    def remove_node(self, node_id: str) -> None:
        """Forget a node (so its id can be enrolled again); it must not be in a running job."""
        node = self.cluster.get(node_id)
        if node is None:
            raise NotFound(self._unknown_node(node_id))
        busy_jobs = [j.job_id for j, p in self._jobs_of(node_id) if not p.final]
        if busy_jobs:
            raise Conflict(f"node {node_id} is in running job(s) {', '.join(busy_jobs)}")
        self._aborted(self.scheduler.node_down(node_id), f"node {node_id} removed")
        for layer in list(node.holdings):
            self.scheduler.cancel_demand(node_id, layer)
        self.cluster.remove(node_id)
        self.store.delete_node(node_id)
        self.cluster.trust_changed()
        self._save_trust_version()
        log.warning("node removed by admin", node=node_id)
        self._schedule(self.clock())

    def image_views(self) -> ImageList:
        return ImageList(images=[self.image_view(ref) for ref in sorted(self.images)])

    def image_view(self, ref: str) -> ImageView:
        image = self.images.get(ref)
        if image is None:
            known = ", ".join(sorted(self.images)) or "none"
            raise NotFound(f"no image {ref!r} (known: {known})")
        holders: list[str] = []
        if image.record is not None and image.state == "ready":
            need = {lr.digest for lr in image.record.layers}
            holders = sorted(nid for nid, n in self.cluster.nodes.items() if need <= n.holdings)
        return image_view(image, holders)

    def add_image(self, req: CreateImage) -> ImageView:
        check_ref(req.ref)
        try:
            check_source(req.source)
        except SourceError as e:
            raise BadRequest(f"image {req.ref}: {e}") from None
        if req.compression != "off" and isinstance(req.source, RegistrySource):
            raise BadRequest(
                f"image {req.ref}: compression {req.compression!r} does not apply to a registry "
                "source (registry blobs pass unchanged); leave compression off"
            )
        existing = self.images.get(req.ref)
        if existing is not None and existing.state != "failed":
            raise Conflict(f"image {req.ref} already exists ({existing.state})")
        origins = self.cluster.origins()
        if req.origin:
            node = self.cluster.get(req.origin)
            if node is None or "origin" not in node.info.roles:
                raise BadRequest(
                    f"{req.origin!r} is not a node with the origin role "
                    f"(origins: {', '.join(origins) or 'none'})"
                )
            if node.quarantined:
                raise BadRequest(f"origin {req.origin} is quarantined")
            origin = req.origin
        elif len(origins) == 1:
            origin = origins[0]
        elif not origins:
            raise BadRequest(
                "no node with the origin role is enrolled; start an agent with the origin role"
            )
        else:
            raise BadRequest(f"several origins ({', '.join(origins)}): say which one with origin")
        image = StoredImage(
            ref=req.ref,
            state="ingesting",
            source=req.source,
            origin=origin,
            ingest_id="i-" + secrets.token_hex(6),
            created_at=self.clock(),
            compression=req.compression,
        )
        self.images[req.ref] = image
        self.store.save_image(image)
        self._queue_ingest(image)
        log.info(
            "image ingest assigned",
            image=req.ref,
            origin=origin,
            ingest=image.ingest_id,
            source=describe(req.source),
            compression=req.compression,
        )
        return self.image_view(req.ref)

    def remove_image(self, ref: str) -> None:
        """Forget an image; refused while a running job distributes it.

        Its layers stay where they are (on nodes and in the chunk manifests
        known here): other images may share them, and a later image with the
        same layers then moves nothing for them.
        """
        image = self.images.get(ref)
        if image is None:
            known = ", ".join(sorted(self.images)) or "none"
            raise NotFound(f"no image {ref!r} (known: {known})")
        running = sorted(j.job_id for j in self.jobs.values() if j.running and j.image == ref)
        if running:
            raise Conflict(
                f"image {ref} is being distributed by running job(s) {', '.join(running)}; "
                "wait for them to finish"
            )
        del self.images[ref]
        self.store.delete_image(ref)
        log.warning("image removed by admin", image=ref, state=image.state)

    def _queue_ingest(self, image: StoredImage) -> None:
        node = self.cluster.get(image.origin)
        if node is None:
            image.state, image.error = "failed", f"origin {image.origin} is no longer enrolled"
            self.store.save_image(image)
            return
        node.mailbox.put(
            IngestAssignment(
                ingest_id=image.ingest_id,
                ref=image.ref,
                source=image.source,
                chunk_size=self.chunk_size,
                compression=image.compression,
            )
        )
        self.store.save_seq(node.node_id, node.mailbox.seq)

    def job_views(self) -> JobList:
        jobs = sorted(self.jobs.values(), key=lambda j: (j.created_at, j.job_id))
        return JobList(jobs=[j.view() for j in jobs])

    def job_view(self, job_id: str) -> JobView:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return job.view()

    def create_job(self, req: CreateJob) -> JobView:
        now = self.clock()
        image = self.images.get(req.image)
        if image is None:
            known = ", ".join(sorted(self.images)) or "none"
            raise NotFound(f"no image {req.image!r} (known: {known}); add it first")
        if image.state != "ready" or image.record is None:
            detail = f": {image.error}" if image.error else ""
            raise Conflict(f"image {req.image} is {image.state}{detail}; it must be ready")
        targets = self._targets(req.targets)
        layers = [(lr.digest, lr.size) for lr in image.record.layers]
        holdings = {nid: self.cluster.nodes[nid].holdings for nid in targets}
        job = Job.create(
            "j-" + secrets.token_hex(6),
            req.image,
            layers,
            targets,
            holdings,
            now,
            image_bytes=image.record.uncompressed_size,
        )
        self.jobs[job.job_id] = job
        log.info("job created", job=job.job_id, image=req.image, nodes=len(targets))
        self._start_job_nodes(job, now)
        if job.settle(now):
            self._job_finished(job)
        self.store.save_job(job.view())
        self._schedule(now)
        return job.view()

    def _targets(self, names: list[str]) -> list[str]:
        if not names:
            raise BadRequest('targets is empty: list node ids, or ["all"]')
        if "all" in names:
            if len(names) != 1:
                raise BadRequest('targets: "all" cannot be combined with node ids')
            out = sorted(nid for nid, n in self.cluster.nodes.items() if not n.quarantined)
            if not out:
                raise BadRequest('targets ["all"]: no usable node is enrolled')
            return out
        out = list(dict.fromkeys(names))
        unknown = [n for n in out if n not in self.cluster.nodes]
        if unknown:
            known = ", ".join(sorted(self.cluster.nodes)) or "none"
            raise BadRequest(f"unknown node(s): {', '.join(unknown)} (enrolled: {known})")
        bad = [n for n in out if self.cluster.nodes[n].quarantined]
        if bad:
            raise BadRequest(f"quarantined node(s): {', '.join(bad)}; an admin must clear them")
        return out

    def _start_job_nodes(self, job: Job, now: float) -> None:
        """Demand what each unfinished node lacks; nodes holding everything go to load/done."""
        for p in job.nodes.values():
            if p.final:
                continue
            if p.node_id not in self.cluster.nodes:
                p.fail(f"node {p.node_id} is no longer enrolled", now)
            elif p.state == "loading" or p.all_held():
                self._node_has_all(job, p, now)
            else:
                for layer in p.missing():
                    self.scheduler.demand(p.node_id, layer, job.job_id, now)

    # ------------------------------------------------------------------
    # internals
    # ------------------------------------------------------------------
    def _jobs_of(self, node_id: str) -> Iterable[tuple[Job, NodeProgress]]:
        for job in self.jobs.values():
            if job.running and node_id in job.nodes:
                yield job, job.nodes[node_id]

    def _progress_of(self, node_id: str) -> list[NodeProgress]:
        return [p for _, p in self._jobs_of(node_id)]

    def _add_holdings(self, node: Node, layers: Iterable[str], now: float) -> bool:
        """Record layers ``node`` now holds; advance its jobs. True if anything was new."""
        new = [
            d
            for d in dict.fromkeys(layers)
            if d not in node.holdings and not self.ops.withheld(node.node_id, d)
        ]
        if not new:
            return False
        for layer in new:
            node.holdings.add(layer)
            node.holding_since[layer] = now
            self.scheduler.add_holding(node.node_id, layer)
        for job, p in list(self._jobs_of(node.node_id)):
            changed = [layer for layer in new if p.hold(layer)]
            if changed and p.all_held():
                self._node_has_all(job, p, now)
            if changed:
                self._job_changed(job, p)
        return True

    def _follow_holdings(self, node: Node, listed: list[str], now: float) -> bool:
        """Drop the layers ``node`` stopped listing (holdings.py); True if any were."""
        grace = holdings.HOLDING_GRACE_INTERVALS * self.heartbeat_interval
        gone = holdings.unlisted(node, listed, now, grace)
        if gone:
            self._holdings_lost(node, gone, now, "its registration or heartbeat no longer lists")
        return bool(gone)

    def _holdings_lost(self, node: Node, layers: list[str], now: float, why: str) -> None:
        jobs = list(self._jobs_of(node.node_id))
        for job, p in holdings.drop(node, layers, self.scheduler, jobs, now, why):
            self._job_changed(job, p)
        self._save_node(node)

    def _node_has_all(self, job: Job, p: NodeProgress, now: float) -> None:
        node = self.cluster.get(p.node_id)
        image = self.images.get(job.image)
        if node is None or image is None or image.record is None:
            p.fail(f"node {p.node_id} or image {job.image} vanished", now)
            return
        if not node.docker:
            p.finish(now)
            return
        load_id = "l-" + secrets.token_hex(6)
        p.loading(load_id)
        self.loads[load_id] = (job.job_id, p.node_id)
        node.mailbox.put(LoadAssignment(load_id=load_id, job_id=job.job_id, image=image.record))
        self.store.save_seq(node.node_id, node.mailbox.seq)

    def _node_failed(self, job: Job, p: NodeProgress, now: float) -> None:
        """Stop demanding for a node that failed a job (unless another job still needs it)."""
        still = {layer for _, q in self._jobs_of(p.node_id) if not q.final for layer in q.missing()}
        for layer in p.missing():
            if layer not in still:
                self.scheduler.cancel_demand(p.node_id, layer)
        log.warning("node failed in job", job=job.job_id, node=p.node_id, error=p.error)
        self._job_changed(job, p)

    def _job_changed(self, job: Job, p: NodeProgress) -> None:
        """Persist a change of node ``p`` in ``job``: its own row, or the whole job when it ends.

        Writing the whole job view on every report made a job of N nodes cost
        O(N^2) (a 500-node job spent half the coordinator's time in
        ``Job.view`` and its JSON); one node's row is O(1). Before a job ends,
        its done nodes are checked against their holdings (coordinator/holdings.py).
        """
        now = self.clock()
        if job.running and all(q.final for q in job.nodes.values()):
            for _, q in holdings.recheck_done(job, self.cluster.nodes, self.scheduler, now):
                self.store.save_job_node(job.job_id, q.view())
        if job.settle(now):
            log.info("job finished", job=job.job_id, state=job.state, error=job.error)
            self._job_finished(job)
            self.store.save_job(job.view())
        else:
            self.store.save_job_node(job.job_id, p.view())

    def _job_finished(self, job: Job) -> None:
        self.metrics.job_finished(job.state, job.finished_at - job.created_at)

    def _quarantine(self, node_id: str, reason: str, now: float) -> None:
        node = self.cluster.get(node_id)
        if node is None or node.quarantined:
            return
        node.info.quarantined, node.info.quarantine_reason = True, reason
        self.metrics.quarantined()
        node.up = False
        self._aborted(self.scheduler.node_down(node_id), f"seeder {node_id} quarantined")
        for job, p in list(self._jobs_of(node_id)):
            if not p.final:
                p.fail(f"node {node_id} quarantined: {reason}", now)
                self._node_failed(job, p, now)
        self.cluster.trust_changed()
        self._save_node(node)
        self._save_trust_version()
        log.error("node quarantined", node=node_id, reason=reason)

    def _aborted(self, transfers: list[Transfer], why: str) -> None:
        """Transfers the scheduler dropped: withdraw undelivered assignments, reset progress."""
        self.metrics.transfers_aborted(len(transfers))
        now = self.clock()
        for t in transfers:
            self.evidence.transfer_ended(t, now)
            demander = self.cluster.get(t.demander)
            if demander is not None:
                demander.mailbox.drop(_is_transfer(t.transfer_id))
            self._undelivered.get(t.demander, {}).pop(t.transfer_id, None)
            for p in self._progress_of(t.demander):
                p.transfer_stopped(t.layer)
            tr = self.transfers.get(t.transfer_id)
            if tr is not None and not tr.reported:
                # kept (bounded) so a late report of it is still understood after a restart
                self.store.save_transfer(self._stored(tr, "aborted"))
            log.info(
                "transfer aborted",
                transfer=t.transfer_id,
                layer=short(t.layer),
                seeder=t.seeder,
                demander=t.demander,
                why=why,
            )

    def _schedule(self, now: float) -> None:
        """Start every transfer the scheduler allows; queue each to its demander."""
        touched: set[str] = set()
        t0 = time.perf_counter()
        started = list(self.scheduler.schedule(now))
        self.metrics.decision(time.perf_counter() - t0, len(started))
        for t in started:
            demander = self.cluster.get(t.demander)
            seeder = self.cluster.get(t.seeder)
            manifest = self.manifests.get(t.layer)
            assignment = (
                assignment_for(t, manifest, seeder.peer())
                if demander is not None and seeder is not None and manifest is not None
                else None
            )
            if demander is None or assignment is None:
                # cannot happen for layers of ingested images; never hand out unverifiable work
                self.scheduler.fail(t.transfer_id)
                self.scheduler.cancel_demand(t.demander, t.layer)
                log.error("no manifest or node for a transfer; demand dropped", layer=t.layer)
                continue
            seq = demander.mailbox.put(assignment)
            tr = _Tracked(t, seq=seq)
            self._remember(tr)
            self._undelivered.setdefault(t.demander, {})[t.transfer_id] = seq
            self.store.save_transfer(self._stored(tr))
            touched.add(t.demander)
            for p in self._progress_of(t.demander):
                if p.needs(t.layer):
                    p.started_transfer(t.layer)
            log.info(
                "transfer assigned",
                transfer=t.transfer_id,
                layer=short(t.layer),
                seeder=t.seeder,
                demander=t.demander,
                reason=t.reason,
            )
        for nid in touched:
            self.store.save_seq(nid, self.cluster.nodes[nid].mailbox.seq)

    def _save_node(self, node: Node) -> None:
        self.store.save_node(node.stored(), node.mailbox.seq)

    def _save_trust_version(self) -> None:
        self.store.set_meta("trust_version", str(self.cluster.trust_version))


def _is_transfer(transfer_id: str) -> Callable[[Assignment], bool]:
    def match(a: Assignment) -> bool:
        return isinstance(a, TransferAssignment) and a.transfer_id == transfer_id

    return match


def _blames_seeder(m: TransferFailed) -> bool:
    """Does this failure report say something about the seeder (so it needs evidence)?"""
    return m.seeder_fault or m.not_held or m.kind in ("security", "io", "unreachable")


def _check_register(req: RegisterRequest) -> None:
    if not auth.NODE_ID_RE.match(req.node_id):
        raise BadRequest(
            f"node id {req.node_id!r} is not valid (letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 63 characters)"
        )
    if not req.address:
        raise BadRequest("register: address is empty")
    if not 1 <= req.ssh_port <= 65535:
        raise BadRequest(f"register: ssh_port {req.ssh_port} is not a TCP port")
    if not req.host_key or not req.client_key:
        raise BadRequest("register: host_key and client_key are required (OpenSSH public keys)")
    bad = [d for d in req.holdings if not is_digest(d)]
    if bad:
        raise BadRequest(f"register: holdings are not sha256 digests: {bad[:3]}")
    if req.speed_hint_bps < 0:
        raise BadRequest("register: speed_hint_bps must not be negative")
    if req.max_upload_bps < 0 or req.max_download_bps < 0:
        raise BadRequest("register: max_upload_bps and max_download_bps must be >= 0 (0 = none)")
