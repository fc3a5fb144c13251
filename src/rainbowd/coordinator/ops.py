"""Cluster operations: the paper's "other functions", fanned out to agents and tracked per node.

``rbd run``, ``rbd rm``, ``rbd build``, ``rbd images rm-nodes`` and ``rbd
docker check`` all become one :class:`~rainbowd.core.messages.CreateOp`: a typed op
and its targets. :class:`ClusterOps` checks it against what the coordinator
knows (nodes, images, running jobs), queues one
:class:`~rainbowd.core.messages.OpAssignment` per node on the same long-poll as
transfers and loads, and tracks each node ``pending -> running -> done |
failed`` from the agent's reports. Nothing here does I/O beyond the state
store and the build-context directory, so it is driven by unit tests directly.

Why the coordinator (and not the CLI talking to nodes): the CLI reaches only
the coordinator, the agents take only typed work from it -- no shell, no
direct admin access to hosts -- and one place records who did what.

Removing an image from nodes is the one op that changes what the scheduler
may use. A node's layers are withheld from the scheduler the moment the op is
created (so no new transfer picks that node as a seeder for a layer it is
about to delete), and dropped from its holdings for good when the agent
reports the layers it removed. Withheld layers are ignored in heartbeats
until then (a heartbeat built before the removal must not bring them back);
if the op fails on the node its layers are still on disk and the next
heartbeat lists them again. This is an explicit, logged event (heartbeats
that stop listing a layer shrink holdings too, see coordinator/holdings.py).

Durability: every op is a row in the ``ops`` table (its OpView), written on
every state change, so ``GET /v1/ops/{id}`` survives a coordinator restart
and an agent's late report after a restart is still applied. Assignments not
yet delivered when the coordinator stops are lost with its in-memory
mailboxes; those nodes fail at the op's deadline ("did not report"), never
re-run on their own (running a container twice is worse than not at all).
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import structlog

from rainbowd.core.digest import Digest, hex_part, is_digest, short
from rainbowd.core.messages import (
    BuildOp,
    CreateOp,
    DockerCheckOp,
    Op,
    OpAssignment,
    OpList,
    OpNodeState,
    OpResult,
    OpView,
    RemoveContainerOp,
    RemoveImageOp,
    RunOp,
)
from rainbowd.lib.buildcontext import (
    MAX_CONTEXT,
    ContextError,
    digest_of,
    dockerfile_path,
    normalize_ref,
    read_dockerfile,
)
from rainbowd.lib.dockerfile import check_from

from .errors import BadRequest, Conflict, Forbidden, NotFound
from .images import check_ref

if TYPE_CHECKING:
    from .cluster import Node
    from .context import ServiceContext
    from .jobs_service import JobsService
    from .state import StoredImage

log = structlog.get_logger(__name__)

#: seconds each kind of op may take on a node before that node fails
OP_TIMEOUTS = {
    "run": 60.0,  # plus the op's own wait
    "rm": 60.0,  # plus the stop timeout
    "build": 1800.0,
    "rm-image": 300.0,
    "docker-check": 60.0,
}
#: ``docker check --install``: apt-get may download the engine first
INSTALL_TIMEOUT = 900.0
#: longest ``rbd run`` may wait for a container to exit before reporting "running"
MAX_RUN_WAIT = 60.0
#: operations remembered (in memory and in the database)
OP_MEMORY = 1000
#: uploaded contexts no running build uses are deleted after this long (seconds)
CONTEXT_TTL = 3600.0
#: largest output kept per node (the agent already cuts it; this bounds a bad agent)
MAX_OUTPUT = 64 * 1024

#: Docker container names
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")


def op_kind(op: Op) -> str:
    tag = msgspec.inspect.type_info(type(op))
    assert isinstance(tag, msgspec.inspect.StructType)
    return str(tag.tag)


class ClusterOps:
    """Operations of one coordinator; see the module docstring.

    Built from the coordinator's narrow context (coordinator/context.py), the
    image table and the jobs service -- what an op is checked against -- not
    from the coordinator itself.
    """

    def __init__(
        self,
        ctx: ServiceContext,
        images: Mapping[str, StoredImage],
        jobs: JobsService,
        contexts_dir: Path,
    ) -> None:
        self.ctx = ctx
        self.images = images
        self.jobs = jobs
        self.clock = ctx.clock
        self.contexts_dir = contexts_dir
        self.ops: dict[str, OpView] = {}
        # node -> layer -> op id: layers an rm-image op is deleting there (not holdings now)
        self._withheld: dict[str, dict[str, str]] = {}
        for view in ctx.store.load_ops():
            self.ops[view.op_id] = view

    # ------------------------------------------------------------------
    # queries
    # ------------------------------------------------------------------
    def view(self, op_id: str) -> OpView:
        op = self.ops.get(op_id)
        if op is None:
            raise NotFound(f"no operation {op_id!r} (rbd ops lists them)")
        return op

    def views(self) -> OpList:
        return OpList(ops=sorted(self.ops.values(), key=lambda o: (o.created_at, o.op_id)))

    def withheld(self, node_id: str, layer: str) -> bool:
        """True while an rm-image op deletes ``layer`` on ``node_id`` (heartbeats cannot add it)."""
        return layer in self._withheld.get(node_id, {})

    # ------------------------------------------------------------------
    # build contexts
    # ------------------------------------------------------------------
    def context_path(self, digest: str) -> Path:
        if not is_digest(digest):
            raise BadRequest(f"context digest {digest!r} is not sha256:<64 hex digits>")
        return self.contexts_dir / f"{hex_part(Digest(digest))}.tar"

    def save_context(self, digest: str, data: bytes) -> None:
        """Store an uploaded context tar under its digest (checked), atomically."""
        path = self.context_path(digest)
        if len(data) > MAX_CONTEXT:
            raise BadRequest(f"build context of {len(data)} bytes exceeds {MAX_CONTEXT} bytes")
        actual = digest_of(data)
        if actual != digest:
            raise BadRequest(f"build context is {actual}, not {digest} as named; upload again")
        self.contexts_dir.mkdir(parents=True, exist_ok=True)
        if path.exists():
            os.utime(path)  # fresh again for CONTEXT_TTL
            return
        fd, tmp = tempfile.mkstemp(dir=self.contexts_dir, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        log.info("build context stored", context=short(digest), bytes=len(data))

    def context_for(self, node: Node, digest: str) -> Path:
        """The context file, for a node with a build op using it that it has not finished."""
        path = self.context_path(digest)
        for op in self.ops.values():
            if not isinstance(op.op, BuildOp) or op.op.context_digest != digest:
                continue
            for n in op.nodes:
                if n.node_id == node.node_id and n.state in ("pending", "running"):
                    if not path.is_file():
                        raise NotFound(f"build context {digest} is gone from the coordinator")
                    return path
        raise Forbidden(f"node {node.node_id} has no running build that uses context {digest}")

    # ------------------------------------------------------------------
    # creating an op
    # ------------------------------------------------------------------
    def create(self, req: CreateOp) -> OpView:
        now = self.clock()
        kind = op_kind(req.op)
        targets = self.jobs.targets(req.targets)
        per_node = self._check(req.op, targets)
        timeout = OP_TIMEOUTS[kind]
        if isinstance(req.op, RunOp):
            timeout += req.op.wait
        elif isinstance(req.op, RemoveContainerOp):
            timeout += req.op.stop_timeout
        elif isinstance(req.op, DockerCheckOp) and req.op.install:
            timeout = INSTALL_TIMEOUT
        op_id = "o-" + secrets.token_hex(6)
        view = OpView(
            op_id=op_id,
            kind=kind,
            op=req.op,
            state="running",
            created_at=now,
            deadline=now + timeout,
            nodes=[OpNodeState(node_id=nid, state="pending") for nid in targets],
        )
        self.ops[op_id] = view
        for ns in view.nodes:
            node = self.ctx.cluster.nodes[ns.node_id]
            if not node.up:
                ns.state, ns.finished_at = "failed", now
                ns.error = f"node {ns.node_id} is down (last seen {now - node.last_seen:.0f}s ago)"
                continue
            op = per_node.get(ns.node_id, req.op)
            if isinstance(op, RemoveImageOp):
                self._withhold(node, op.drop_layers, op_id)
            node.mailbox.put(OpAssignment(op_id=op_id, op=op, timeout=timeout))
            self.ctx.store.save_seq(node.node_id, node.mailbox.seq)
        self._settle(view, now)
        self._save(view)
        log.info("operation created", op=op_id, kind=kind, nodes=targets)
        return view

    def _check(self, op: Op, targets: list[str]) -> dict[str, Op]:
        """Refuse a bad op (BadRequest/NotFound/Conflict); return per-node variants of it."""
        if isinstance(op, RunOp):
            if not op.image:
                raise BadRequest("run: name the image to run")
            if op.name and not _NAME_RE.match(op.name):
                raise BadRequest(
                    f"run: container name {op.name!r} is not valid (letters, digits, _.- "
                    "starting with a letter or digit)"
                )
            if not 0 <= op.wait <= MAX_RUN_WAIT:
                raise BadRequest(f"run: wait must be between 0 and {MAX_RUN_WAIT:.0f} seconds")
            return {}
        if isinstance(op, RemoveContainerOp):
            if not op.container or not _NAME_RE.match(op.container):
                raise BadRequest(f"rm: {op.container!r} is not a container name or id")
            if not 0 <= op.stop_timeout <= 300:
                raise BadRequest("rm: stop_timeout must be between 0 and 300 seconds")
            return {}
        if isinstance(op, BuildOp):
            return self._check_build(op, targets)
        if isinstance(op, RemoveImageOp):
            return self._check_rm_image(op, targets)
        return {}

    def _ready_image(self, ref: str, what: str) -> StoredImage:
        """The ready image ``ref`` (``name`` matches ``name:latest``); NotFound/Conflict if not."""
        image = self.images.get(ref) or next(
            (i for r, i in self.images.items() if normalize_ref(r) == normalize_ref(ref)), None
        )
        if image is None:
            known = ", ".join(sorted(self.images)) or "none"
            raise NotFound(f"{what}: no image {ref!r} known to the coordinator (known: {known})")
        if image.state != "ready" or image.record is None:
            raise Conflict(f"{what}: image {image.ref} is {image.state}; it must be ready")
        return image

    def _check_build(self, op: BuildOp, targets: list[str]) -> dict[str, Op]:
        check_ref(op.tag)
        try:
            dockerfile_path(op.dockerfile)
        except ContextError as e:
            raise BadRequest(f"build: {e}") from None
        base = self._ready_image(op.base, "build --base")
        assert base.record is not None
        path = self.context_path(op.context_digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BadRequest(
                f"build: context {op.context_digest} was not uploaded (PUT /v1/contexts/DIGEST)"
            ) from None
        if len(data) != op.context_size:
            raise BadRequest(f"build: context is {len(data)} bytes, not {op.context_size}")
        try:
            check_from(read_dockerfile(data, op.dockerfile), op.base)
        except ContextError as e:
            raise BadRequest(f"build: {e}") from None
        return {
            nid: msgspec.structs.replace(op, base_id=base.record.config_digest) for nid in targets
        }

    def _check_rm_image(self, op: RemoveImageOp, targets: list[str]) -> dict[str, Op]:
        if op.drop_layers or op.image_id:
            raise BadRequest("rm-image: drop_layers and image_id are set by the coordinator")
        image = self._ready_image(op.image, "images rm-nodes")
        assert image.record is not None
        ref, image_id = image.ref, image.record.config_digest
        layers = list(dict.fromkeys(lr.digest for lr in image.record.layers))
        busy = sorted(
            j.job_id
            for j in self.jobs.jobs.values()
            if j.running
            and j.image == ref
            and any(not j.nodes[n].final for n in targets if n in j.nodes)
        )
        if busy:
            raise Conflict(
                f"images rm-nodes: job(s) {', '.join(busy)} are distributing {ref} to these "
                "nodes; wait for them to finish"
            )
        out: dict[str, Op] = {}
        for nid in targets:
            node = self.ctx.cluster.nodes[nid]
            if nid == image.origin:
                drop: list[str] = []  # the origin's copy is where every other copy comes from
            else:
                keep = self._needed_elsewhere(node, ref)
                drop = [d for d in layers if d in node.holdings and d not in keep]
            seeding = [
                t for t in self.ctx.scheduler.active() if t.seeder == nid and t.layer in drop
            ]
            if seeding:
                t = seeding[0]
                raise Conflict(
                    f"images rm-nodes: {nid} is sending layer {short(t.layer)} to {t.demander} "
                    "right now; wait for that job to finish"
                )
            out[nid] = msgspec.structs.replace(op, image=ref, image_id=image_id, drop_layers=drop)
        return out

    def _needed_elsewhere(self, node: Node, ref: str) -> set[str]:
        """Layers ``node`` must keep: those of another image it holds whole, or is being sent."""
        keep: set[str] = set()
        for other_ref, image in self.images.items():
            if other_ref == ref or image.record is None:
                continue
            digests = {lr.digest for lr in image.record.layers}
            if digests <= node.holdings or image.origin == node.node_id:
                keep |= digests
        for job in self.jobs.jobs.values():
            p = job.nodes.get(node.node_id)
            if job.running and p is not None and not p.final:
                keep |= set(p.sizes)
        return keep

    def _withhold(self, node: Node, layers: list[str], op_id: str) -> None:
        """Take ``layers`` out of ``node``'s holdings now: no new transfer may use them."""
        if not layers:
            return
        marks = self._withheld.setdefault(node.node_id, {})
        for layer in layers:
            marks[layer] = op_id
            node.holdings.discard(layer)
            self.ctx.scheduler.remove_holding(node.node_id, layer)
        self.ctx.save_node(node)
        log.warning(
            "layers withheld from the scheduler: being removed from the node",
            op=op_id,
            node=node.node_id,
            layers=[short(d) for d in layers],
        )

    def _release(self, node_id: str, op_id: str) -> None:
        marks = self._withheld.get(node_id, {})
        for layer in [d for d, o in marks.items() if o == op_id]:
            del marks[layer]

    # ------------------------------------------------------------------
    # agent reports
    # ------------------------------------------------------------------
    def _node_state(self, node: Node, op_id: str) -> tuple[OpView, OpNodeState]:
        op = self.ops.get(op_id)
        if op is None:
            raise NotFound(f"no operation {op_id!r}")
        for ns in op.nodes:
            if ns.node_id == node.node_id:
                return op, ns
        raise Forbidden(f"operation {op_id} does not target node {node.node_id}")

    def started(self, node: Node, op_id: str) -> None:
        op, ns = self._node_state(node, op_id)
        if ns.state == "pending":
            ns.state, ns.started_at = "running", self.clock()
            self._save(op)

    def result(self, node: Node, op_id: str, r: OpResult) -> None:
        now = self.clock()
        op, ns = self._node_state(node, op_id)
        bad = [d for d in r.removed_layers if not is_digest(d)]
        if bad:
            raise BadRequest(f"op result: removed_layers are not sha256 digests: {bad[:3]}")
        if ns.state in ("done", "failed"):
            log.info("repeated or late op report ignored", op=op_id, node=node.node_id)
            return
        self._release(node.node_id, op_id)
        if r.removed_layers:
            self._holdings_removed(node, r.removed_layers, op_id)
        ns.state = "done" if r.ok else "failed"
        ns.summary = r.summary[:1000]
        ns.output = r.output[-MAX_OUTPUT:]
        ns.error = "" if r.ok else (r.error or f"node {node.node_id}: failed (no reason given)")
        ns.exit_code, ns.container, ns.image_id = r.exit_code, r.container, r.image_id
        ns.removed_layers = list(r.removed_layers)
        ns.started_at = ns.started_at or now
        ns.finished_at = now
        (log.info if r.ok else log.warning)(
            "operation finished on node",
            op=op_id,
            kind=op.kind,
            node=node.node_id,
            ok=r.ok,
            summary=ns.summary,
            error=ns.error,
        )
        self._settle(op, now)
        self._save(op)

    def _holdings_removed(self, node: Node, layers: list[str], op_id: str) -> None:
        """The agent deleted these layers: they are no longer holdings, for good."""
        for layer in layers:
            node.holdings.discard(layer)
            self.ctx.scheduler.remove_holding(node.node_id, layer)
        self.ctx.save_node(node)
        log.warning(
            "layers removed from node store",
            op=op_id,
            node=node.node_id,
            layers=[short(d) for d in layers],
        )

    # ------------------------------------------------------------------
    # time
    # ------------------------------------------------------------------
    def expire(self, now: float) -> None:
        """Fail nodes that did not report by their op's deadline; prune old contexts."""
        for op in self.ops.values():
            if op.state != "running" or now < op.deadline:
                continue
            for ns in op.nodes:
                if ns.state in ("pending", "running"):
                    self._release(ns.node_id, op.op_id)
                    ns.state, ns.finished_at = "failed", now
                    ns.error = (
                        f"node {ns.node_id} did not report within "
                        f"{op.deadline - op.created_at:.0f}s (is its agent running? rbd nodes)"
                    )
            self._settle(op, now)
            self._save(op)
            log.warning("operation timed out on some nodes", op=op.op_id, kind=op.kind)
        self._prune_contexts(now)

    def _prune_contexts(self, now: float) -> None:
        if not self.contexts_dir.is_dir():
            return
        in_use = {
            op.op.context_digest
            for op in self.ops.values()
            if op.state == "running" and isinstance(op.op, BuildOp)
        }
        for path in self.contexts_dir.glob("*.tar"):
            digest = "sha256:" + path.stem
            try:
                old = now - path.stat().st_mtime > CONTEXT_TTL
            except FileNotFoundError:
                continue
            if digest not in in_use and old:
                path.unlink(missing_ok=True)

    def _settle(self, op: OpView, now: float) -> None:
        if op.state != "running" or any(n.state in ("pending", "running") for n in op.nodes):
            return
        op.state = "failed" if any(n.state == "failed" for n in op.nodes) else "done"
        op.finished_at = now
        if isinstance(op.op, BuildOp):
            self._drop_context(op.op.context_digest)

    def _drop_context(self, digest: str) -> None:
        """A finished build's context goes unless another running build uses it."""
        for other in self.ops.values():
            if (
                other.state == "running"
                and isinstance(other.op, BuildOp)
                and other.op.context_digest == digest
            ):
                return
        self.context_path(digest).unlink(missing_ok=True)

    def _save(self, op: OpView) -> None:
        self.ctx.store.save_op(op)
        if len(self.ops) > OP_MEMORY:
            for old in sorted(self.ops.values(), key=lambda o: o.created_at)[:-OP_MEMORY]:
                if old.state != "running":
                    del self.ops[old.op_id]
            self.ctx.store.prune_ops(OP_MEMORY)
