"""The enrollment service: who may talk to the coordinator; registrations and heartbeats.

A node enrolls once with the cluster's join token and gets a credential of
its own (only its hash is stored); re-registering needs that credential, and
a join token cannot take over an enrolled id. Every registration and
heartbeat says what the node holds and pulls: holdings follow it
(coordinator/holdings_service.py), its transfer list is reconciled
(coordinator/transfers.py), and the node is up again (coordinator/liveness.py).
An agent that re-registers has restarted: whatever it was pulling or loading
is gone, so its transfers are released and its Docker loads re-issued. The
admin and metrics tokens are checked here too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from rainbowd.core.digest import is_digest
from rainbowd.core.messages import Heartbeat, HeartbeatReply, RegisterReply, RegisterRequest

from . import auth
from .cluster import Node
from .context import ServiceContext
from .dispatch import Dispatch
from .errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from .holdings_service import HoldingsService
from .jobs_service import JobsService
from .liveness import Liveness
from .state import StoredNode
from .transfers import TransferReports
from .views import unknown_node

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Tokens:
    """The cluster's secrets: join (enroll a node), admin (the admin API), metrics (scrapes)."""

    join: str
    admin: str
    #: accepted (besides the admin token) on GET /metrics; "" = admin token only
    metrics: str = ""


class Enrollment:
    """Authentication, registration, heartbeats and node removal; see the module docstring."""

    def __init__(
        self,
        ctx: ServiceContext,
        tokens: Tokens,
        jobs: JobsService,
        dispatch: Dispatch,
        holdings: HoldingsService,
        liveness: Liveness,
        reports: TransferReports,
    ) -> None:
        self.ctx = ctx
        self.tokens = tokens
        self.jobs = jobs
        self.dispatch = dispatch
        self.holdings = holdings
        self.liveness = liveness
        self.reports = reports

    # -- authentication -------------------------------------------------
    def check_admin(self, header: str | None) -> None:
        token = auth.bearer(header)
        if token is None:
            raise Unauthorized("admin API: send 'Authorization: Bearer <admin token>'")
        if not auth.same_secret(token, self.tokens.admin):
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
            (self.tokens.metrics and auth.same_secret(token, self.tokens.metrics))
            or auth.same_secret(token, self.tokens.admin)
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
        node = self.ctx.cluster.get(node_id)
        if node is None:
            raise Forbidden(f"node {node_id!r} is not enrolled; register it with the join token")
        if not auth.credential_matches(credential, node.info.credential_hash):
            raise Forbidden(f"credential for node {node_id!r} is wrong")
        return node

    # -- agents ---------------------------------------------------------
    def register(self, req: RegisterRequest) -> RegisterReply:
        ctx = self.ctx
        now = ctx.clock()
        _check_register(req)
        node = ctx.cluster.get(req.node_id)
        if node is not None:
            credential = self._check_reregister(node, req)
            peer_before = node.peer()
            info = node.info
            info.address, info.ssh_port = req.address, req.ssh_port
            info.host_key, info.client_key = req.host_key, req.client_key
            info.labels, info.roles = dict(req.labels), list(req.roles)
            info.docker, info.speed_hint_bps = req.docker, req.speed_hint_bps
            info.containerd, info.mirror = req.containerd, req.mirror
            info.download_hint_bps = req.download_hint_bps
            info.max_upload_bps, info.max_download_bps = req.max_upload_bps, req.max_download_bps
            # the agent (re)started: whatever it was pulling or loading is gone,
            # including transfers adopted after a coordinator restart
            node.up = False
            self.dispatch.aborted(ctx.driver.node_down(node.node_id), "agent re-registered")
            restarted = True
            if node.peer() != peer_before and not node.quarantined:
                ctx.cluster.trust_changed()
            log.info("node re-registered", node=node.node_id, address=req.address)
        else:
            if not req.join_token:
                raise Unauthorized(
                    f"node {req.node_id!r} is not enrolled: enrolling needs the cluster join "
                    "token (on the coordinator: rbd-coordinator show-token join --state-dir DIR)"
                )
            if not auth.same_secret(req.join_token, self.tokens.join):
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
                containerd=req.containerd,
                mirror=req.mirror,
                speed_hint_bps=req.speed_hint_bps,
                download_hint_bps=req.download_hint_bps,
                max_upload_bps=req.max_upload_bps,
                max_download_bps=req.max_download_bps,
                registered_at=now,
            )
            node = ctx.cluster.add(info)
            ctx.cluster.trust_changed()
            restarted = False
            log.info("node enrolled", node=node.node_id, address=req.address, roles=req.roles)
        node.epoch += 1
        node.last_seen = now
        node.disk_free = req.disk_free
        node.reported_active = {}
        self.liveness.bring_up(node, now)
        self.holdings.add(node, req.holdings, now)
        self.holdings.follow(node, req.holdings, now)
        if restarted:
            self.jobs.reload(node, now)
        ctx.save_node(node)
        ctx.save_trust_version()
        self.dispatch.schedule(now)
        return RegisterReply(
            node_id=node.node_id,
            credential=credential,
            heartbeat_interval=ctx.settings.heartbeat_interval,
            trust=ctx.cluster.trust(),
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
        ctx = self.ctx
        t0 = time.perf_counter()
        now = ctx.clock()
        bad = [d for d in hb.holdings if not is_digest(d)]
        if bad:
            raise BadRequest(f"heartbeat: holdings are not sha256 digests: {bad[:3]}")
        node.last_seen = now
        node.load, node.disk_free, node.disk_used = hb.load, hb.disk_free, hb.disk_used
        node.reported_active = {a.transfer_id: (a.layer, a.seeder) for a in hb.active}
        if not node.up and not node.quarantined:
            log.info("node is back up", node=node.node_id)
        changed = self.holdings.add(node, hb.holdings, now)
        changed = self.holdings.follow(node, hb.holdings, now) or changed
        self.reports.reconcile(node, hb, now)
        self.liveness.bring_up(node, now)
        if changed:
            ctx.save_node(node)
        self.dispatch.schedule(now)
        reply = HeartbeatReply(
            trust_version=ctx.cluster.trust_version, pinned=self.holdings.pins(node)
        )
        ctx.metrics.heartbeat(time.perf_counter() - t0)
        return reply

    # -- admin ----------------------------------------------------------
    def remove_node(self, node_id: str) -> None:
        """Forget a node (so its id can be enrolled again); it must not be in a running job."""
        ctx = self.ctx
        node = ctx.cluster.get(node_id)
        if node is None:
            raise NotFound(unknown_node(ctx.cluster, node_id))
        busy_jobs = [j.job_id for j, p in self.jobs.jobs_of(node_id) if not p.final]
        if busy_jobs:
            raise Conflict(f"node {node_id} is in running job(s) {', '.join(busy_jobs)}")
        self.dispatch.aborted(ctx.driver.node_down(node_id), f"node {node_id} removed")
        ctx.driver.release(node_id, list(node.holdings), keep=set())
        ctx.cluster.remove(node_id)
        ctx.store.delete_node(node_id)
        ctx.cluster.trust_changed()
        ctx.save_trust_version()
        log.warning("node removed by admin", node=node_id)
        self.dispatch.schedule(ctx.clock())


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
