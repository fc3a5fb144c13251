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

Quarantine: a seeder blamed for a security failure (wrong host key, bad bytes)
is taken out of the trust list and out of the scheduler (``node_down``), and
stays out -- heartbeats and re-registration do not bring it back -- until an
admin clears it (``POST /v1/nodes/{id}/clear-quarantine``).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

import msgspec
import structlog

from rainbowd.chunks import DEFAULT_CHUNK_SIZE, ChunkManifest
from rainbowd.digest import is_digest, short
from rainbowd.messages import (
    Assignment,
    AssignmentBatch,
    CreateImage,
    CreateJob,
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
    SeederUse,
    TaskFailed,
    TransferAssignment,
    TransferDone,
    TransferFailed,
    TransferProgress,
)
from rainbowd.scheduler import Scheduler, Transfer
from rainbowd.sources import SourceError, check_source, describe

from . import auth
from .cluster import Cluster, Node
from .errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from .images import check_ingest, check_ref, image_view
from .jobs import Job, NodeProgress
from .state import StateStore, StoredImage, StoredNode

log = structlog.get_logger(__name__)

#: longest a long-poll may wait (seconds)
MAX_WAIT = 30.0
#: bad-chunk reports against one peer after which it is quarantined
BAD_CHUNK_LIMIT = 3
#: finished/aborted transfers remembered so late reports are still understood
_TRANSFER_MEMORY = 10_000


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
        policy: str = "paper",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not join_token or not admin_token:
            raise ValueError("join and admin tokens must not be empty")
        self.store = store
        self.join_token = join_token
        self.admin_token = admin_token
        self.heartbeat_interval = heartbeat_interval
        self.chunk_size = chunk_size
        self.clock = clock
        self.scheduler = Scheduler(policy, new_id=lambda: "t-" + secrets.token_hex(6))
        self.cluster = Cluster(int(store.get_meta("trust_version", "0") or 0))
        self.images: dict[str, StoredImage] = {}
        self.manifests: dict[str, ChunkManifest] = {}
        self.jobs: dict[str, Job] = {}
        # every transfer started this run: active ones and recently ended ones
        self.transfers: OrderedDict[str, Transfer] = OrderedDict()
        self.loads: dict[str, tuple[str, str]] = {}  # load id -> (job id, node id)
        self._restore()

    # ------------------------------------------------------------------
    # restart
    # ------------------------------------------------------------------
    def _restore(self) -> None:
        """Reload nodes (down until they heartbeat), images and jobs from SQLite."""
        for info, seq in self.store.load_nodes():
            node = self.cluster.add(info, seq)
            self.scheduler.add_node(node.node_id, info.speed_hint_bps, node.holdings)
            self.scheduler.node_down(node.node_id)
        for image in self.store.load_images():
            self.images[image.ref] = image
            for m in image.manifests:
                self.manifests.setdefault(m.digest, m)
            if image.state == "ingesting":
                self._queue_ingest(image)
        now = self.clock()
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
                job.settle(now)
                self.store.save_job(job.view())
        log.info(
            "state restored",
            nodes=len(self.cluster.nodes),
            images=len(self.images),
            jobs=len(self.jobs),
            trust_version=self.cluster.trust_version,
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
            if node.up:
                # the agent restarted: whatever it was doing is gone
                node.up = False
                self._aborted(self.scheduler.node_down(node.node_id), "agent re-registered")
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
                registered_at=now,
            )
            node = self.cluster.add(info)
            self.cluster.trust_changed()
            log.info("node enrolled", node=node.node_id, address=req.address, roles=req.roles)
        node.last_seen = now
        node.disk_free = req.disk_free
        self._bring_up(node)
        self._add_holdings(node, req.holdings, now)
        self._save_node(node)
        self._save_trust_version()
        self._schedule(now)
        return RegisterReply(
            node_id=node.node_id,
            credential=credential,
            heartbeat_interval=self.heartbeat_interval,
            trust=self.cluster.trust(),
        )

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
        now = self.clock()
        bad = [d for d in hb.holdings if not is_digest(d)]
        if bad:
            raise BadRequest(f"heartbeat: holdings are not sha256 digests: {bad[:3]}")
        node.last_seen = now
        node.load, node.disk_free, node.disk_used = hb.load, hb.disk_free, hb.disk_used
        if not node.up and not node.quarantined:
            log.info("node is back up", node=node.node_id)
        self._bring_up(node)
        changed = self._add_holdings(node, hb.holdings, now)
        for a in hb.active:
            t = self.transfers.get(a.transfer_id)
            if t is not None and t.demander == node.node_id and self._is_active(t.transfer_id):
                for p in self._progress_of(node.node_id):
                    p.progress(t.layer, a.bytes_done, a.rate_bps)
        if changed:
            self._save_node(node)
        self._schedule(now)
        return HeartbeatReply(trust_version=self.cluster.trust_version)

    def _bring_up(self, node: Node) -> None:
        if node.up or node.quarantined:
            return
        self.scheduler.add_node(node.node_id, node.info.speed_hint_bps)
        node.up = True

    def poll(self, node: Node, cursor: int, trust_version: int) -> AssignmentBatch | None:
        """Assignments after ``cursor`` (and a newer trust list), or None if nothing is new."""
        new_cursor, items = node.mailbox.after(cursor)
        trust = self.cluster.trust() if trust_version < self.cluster.trust_version else None
        if not items and trust is None and new_cursor == cursor:
            return None
        return AssignmentBatch(cursor=new_cursor, assignments=items, trust=trust)

    def empty_batch(self, cursor: int) -> AssignmentBatch:
        return AssignmentBatch(cursor=cursor)

    def check_liveness(self) -> list[str]:
        """Mark nodes that stopped heartbeating down; their transfers are re-planned."""
        now = self.clock()
        gone = self.cluster.stale(now, self.heartbeat_interval)
        for node in gone:
            node.up = False
            log.warning("node missed heartbeats; marked down", node=node.node_id)
            self._aborted(self.scheduler.node_down(node.node_id), f"node {node.node_id} down")
        if gone:
            self._schedule(now)
        return [n.node_id for n in gone]

    # -- transfer reports -----------------------------------------------
    def _transfer_of(self, node: Node, transfer_id: str) -> Transfer:
        t = self.transfers.get(transfer_id)
        if t is None:
            raise NotFound(f"no transfer {transfer_id!r} (unknown, or from before a restart)")
        if t.demander != node.node_id:
            raise Forbidden(f"transfer {transfer_id} belongs to {t.demander}, not {node.node_id}")
        return t

    def _is_active(self, transfer_id: str) -> bool:
        return any(t.transfer_id == transfer_id for t in self.scheduler.active())

    def transfer_progress(self, node: Node, transfer_id: str, m: TransferProgress) -> None:
        t = self._transfer_of(node, transfer_id)
        if self._is_active(transfer_id):
            for p in self._progress_of(node.node_id):
                p.progress(t.layer, m.bytes_done, m.rate_bps)

    def transfer_done(self, node: Node, transfer_id: str, m: TransferDone) -> None:
        now = self.clock()
        t = self._transfer_of(node, transfer_id)
        if self._is_active(transfer_id):
            self.scheduler.complete(transfer_id, now, m.bytes_moved)
        else:
            log.info("late done report for an ended transfer", transfer=transfer_id)
        use = SeederUse(
            layer=t.layer, seeder=t.seeder, reason=t.reason, bytes=m.bytes_moved, seconds=m.seconds
        )
        for p in self._progress_of(node.node_id):
            if p.needs(t.layer):
                p.record(use)
        log.info(
            "transfer done",
            transfer=transfer_id,
            layer=short(t.layer),
            seeder=t.seeder,
            demander=t.demander,
            bytes=m.bytes_moved,
            seconds=round(m.seconds, 3),
        )
        if self._add_holdings(node, [t.layer], now):
            self._save_node(node)
        self._schedule(now)

    def transfer_failed(self, node: Node, transfer_id: str, m: TransferFailed) -> None:
        now = self.clock()
        t = self._transfer_of(node, transfer_id)
        if not self._is_active(transfer_id):
            log.info("failure report for an ended transfer", transfer=transfer_id)
            return
        self.scheduler.fail(transfer_id)
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
        for job, p in self._jobs_of(node.node_id):
            if p.count_failure(t.layer, f"from {t.seeder}: {why}", now):
                self._node_failed(job, p, now)
        if m.kind == "security" or m.seeder_fault:
            self.store.add_security_event(node.node_id, t.seeder, f"transfer_{m.kind}", m.reason)
            self._quarantine(t.seeder, f"transfer {transfer_id} to {t.demander} failed: {why}", now)
        self._schedule(now)

    def security_event(self, node: Node, ev: SecurityEvent) -> None:
        now = self.clock()
        self.store.add_security_event(node.node_id, ev.peer, ev.kind, ev.detail)
        log.warning(
            "security event", reporter=node.node_id, peer=ev.peer, kind=ev.kind, detail=ev.detail
        )
        peer = self.cluster.get(ev.peer)
        if peer is None or peer.node_id == node.node_id:
            return
        if ev.kind == "host_key_mismatch":
            why = f"{node.node_id} saw a host key mismatch: {ev.detail}"
            self._quarantine(peer.node_id, why, now)
        elif ev.kind == "bad_chunk":
            peer.bad_chunks += 1
            if peer.bad_chunks >= BAD_CHUNK_LIMIT:
                self._quarantine(
                    peer.node_id, f"{peer.bad_chunks} bad chunks reported (last: {ev.detail})", now
                )
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
            self._job_changed(job)

    def load_failed(self, node: Node, load_id: str, m: TaskFailed) -> None:
        job, p = self._load(node, load_id)
        if p.state == "loading":
            p.fail(f"docker load on {node.node_id} failed: {m.reason}", self.clock())
            log.warning("image load failed", node=node.node_id, job=job.job_id, reason=m.reason)
            self._job_changed(job)

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
                n.view(self.scheduler.speed(nid), nid in busy)
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
            node.bad_chunks = 0
            if self.clock() - node.last_seen <= 3 * self.heartbeat_interval:
                self._bring_up(node)
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
        job.settle(now)
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
        new = [d for d in dict.fromkeys(layers) if d not in node.holdings]
        if not new:
            return False
        for layer in new:
            node.holdings.add(layer)
            self.scheduler.add_holding(node.node_id, layer)
        for job, p in list(self._jobs_of(node.node_id)):
            changed = [layer for layer in new if p.hold(layer)]
            if changed and p.all_held():
                self._node_has_all(job, p, now)
            if changed:
                self._job_changed(job)
        return True

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
        self._job_changed(job)

    def _job_changed(self, job: Job) -> None:
        if job.settle(self.clock()):
            log.info("job finished", job=job.job_id, state=job.state, error=job.error)
        self.store.save_job(job.view())

    def _quarantine(self, node_id: str, reason: str, now: float) -> None:
        node = self.cluster.get(node_id)
        if node is None or node.quarantined:
            return
        node.info.quarantined, node.info.quarantine_reason = True, reason
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
        for t in transfers:
            demander = self.cluster.get(t.demander)
            if demander is not None:
                demander.mailbox.drop(_is_transfer(t.transfer_id))
            for p in self._progress_of(t.demander):
                p.transfer_stopped(t.layer)
            log.info("transfer aborted", transfer=t.transfer_id, layer=short(t.layer), why=why)

    def _schedule(self, now: float) -> None:
        """Start every transfer the scheduler allows; queue each to its demander."""
        touched: set[str] = set()
        for t in self.scheduler.schedule(now):
            demander = self.cluster.get(t.demander)
            seeder = self.cluster.get(t.seeder)
            manifest = self.manifests.get(t.layer)
            if demander is None or seeder is None or manifest is None:
                # cannot happen for layers of ingested images; never hand out unverifiable work
                self.scheduler.fail(t.transfer_id)
                self.scheduler.cancel_demand(t.demander, t.layer)
                log.error("no manifest or node for a transfer; demand dropped", layer=t.layer)
                continue
            self.transfers[t.transfer_id] = t
            while len(self.transfers) > _TRANSFER_MEMORY:
                self.transfers.popitem(last=False)
            demander.mailbox.put(
                TransferAssignment(
                    transfer_id=t.transfer_id,
                    job_id=t.job_id,
                    layer=manifest,
                    seeder=seeder.peer(),
                    reason=t.reason,
                )
            )
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
