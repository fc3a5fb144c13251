"""Typed, versioned messages of the control plane (agent/CLI <-> coordinator).

Every body on the wire is one of these structs, encoded as msgpack
(``application/msgpack``) or, for the admin API, JSON. Decoding goes through
:func:`decode`, which enforces a size limit, checks the protocol version and
validates every field's type and bound (rainbowd.core.wirebounds: every number
finite and in range, every string valid UTF-8 and of bounded length, every
list bounded), so a handler only ever sees a well-formed struct. A bad body
raises :class:`MessageError` naming the field, with a message fit for a 4xx reply.

Schema rules (for the engineer adding a field next year):
- add fields with defaults only; never change a field's meaning or type;
- give every field a bounded type from rainbowd.core.wirebounds (tests/core/test_messages.py
  fails on a bare float, int, str, list or dict in a message the coordinator decodes);
- a breaking change bumps PROTOCOL_VERSION, and the coordinator then refuses
  old agents with a clear "upgrade" error rather than misreading them.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

import msgpack
import msgspec
from msgspec import Meta

from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.sched.reasons import TransferReason
from rainbowd.core.wirebounds import (
    MAX_ACTIVE,
    MAX_LAYERS,
    Bytes,
    ConfigText,
    Count,
    Digest,
    Digests,
    Holdings,
    Int32,
    Labels,
    Load,
    ManifestText,
    Name,
    Names,
    Output,
    Port,
    Rate,
    Roles,
    Seconds,
    Secret,
    SshKey,
    Text,
    Words,
)

PROTOCOL_VERSION = 1
MSGPACK = "application/msgpack"
JSON = "application/json"
#: largest control-plane body accepted (an ingest report lists every chunk digest)
MAX_BODY = 16 * 1024 * 1024

T = TypeVar("T")


class MessageError(ValueError):
    """A body could not be decoded into the expected message; safe to show the sender."""


class Msg(msgspec.Struct, kw_only=True):
    """Base of every top-level message: carries the protocol version."""

    v: Int32 = PROTOCOL_VERSION


# --------------------------------------------------------------------------
# Peers and the trust list
# --------------------------------------------------------------------------
class PeerInfo(msgspec.Struct, kw_only=True):
    """What a node needs to reach and authenticate a peer over SSH."""

    node_id: Name
    address: Name
    ssh_port: Port
    host_key: SshKey  # OpenSSH public key line of the peer's SSH server
    client_key: SshKey  # OpenSSH public key the peer's client authenticates with


class TrustList(msgspec.Struct, kw_only=True):
    """The coordinator's list of trusted nodes; agents serve only these clients."""

    version: Count
    peers: list[PeerInfo]


# --------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------
class LayerRef(msgspec.Struct, kw_only=True):
    digest: Digest  # digest of the blob as stored and moved
    size: Bytes
    media_type: Name
    diff_id: Digest  # digest of the uncompressed tar (what Docker knows a layer by)
    uncompressed_size: Bytes = 0  # size of the tar behind diff_id; 0 = not known


class ManifestDoc(msgspec.Struct, kw_only=True):
    """A registry manifest or index exactly as its source had it (UTF-8 JSON text).

    ``digest`` is the sha256 of ``text.encode()``: what the source named it by,
    and what a client pulling by digest asks for. Who receives one checks the
    digest again (rainbowd.core.upstreammanifest).
    """

    digest: Digest
    media_type: Name
    text: ManifestText


class UpstreamManifest(msgspec.Struct, kw_only=True):
    """The source's own manifest of an image (issue 17: the digest clients know).

    ``manifest`` lists the image's config and layers, as the record does;
    ``index``, when the source's tag named a manifest list, is that list (one
    of its entries is ``manifest``: the platform the origin chose).
    """

    manifest: ManifestDoc
    index: ManifestDoc | None = None

    @property
    def top(self) -> ManifestDoc:
        """What the source's tag names: the index when there is one, else the manifest."""
        return self.index if self.index is not None else self.manifest


class ImageRecord(msgspec.Struct, kw_only=True):
    """An image: its config (verbatim JSON text) and ordered layers."""

    ref: Text
    config_digest: Digest
    config: ConfigText
    layers: Annotated[list[LayerRef], Meta(max_length=MAX_LAYERS)]
    #: the source's manifest, byte for byte, when the source had one (a registry, an OCI
    #: layout); None for a docker archive or engine, and from older origins
    upstream: UpstreamManifest | None = None

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def uncompressed_size(self) -> int:
        return sum(layer.uncompressed_size or layer.size for layer in self.layers)


# Where an origin reads an image from. Paths and credential files name files on
# the origin host: secrets never travel through the coordinator.
Compression = Literal["off", "gzip", "zstd"]


class ArchiveSource(msgspec.Struct, kw_only=True, tag="archive", tag_field="kind"):
    """A docker-archive tarball (``docker save`` output) on the origin host."""

    path: Text


class OciLayoutSource(msgspec.Struct, kw_only=True, tag="oci-layout", tag_field="kind"):
    """An OCI image layout directory (index.json, blobs/) on the origin host."""

    path: Text
    tag: Name = ""  # org.opencontainers.image.ref.name in index.json; "" = the only image


class RegistrySource(msgspec.Struct, kw_only=True, tag="registry", tag_field="kind"):
    """An image in an OCI/Docker registry (distribution API v2)."""

    reference: Text  # host[:port]/repository[:tag|@sha256:...]
    insecure: bool = False  # plain HTTP, for a registry on a trusted network
    ca_file: Text = ""  # PEM bundle on the origin host to verify the registry's TLS cert
    credentials_file: Text = ""  # on the origin host: one line "user:password"
    platform: Name = ""  # os/arch[/variant] to pick from an index; "" = the origin's own


class DockerEngineSource(msgspec.Struct, kw_only=True, tag="docker", tag_field="kind"):
    """An image in a Docker engine reachable from the origin host."""

    image: Text  # name:tag or image id, as the engine knows it
    docker_url: Text = ""  # "" = the origin agent's own docker_url


ImageSource = ArchiveSource | OciLayoutSource | RegistrySource | DockerEngineSource


# --------------------------------------------------------------------------
# Agent -> coordinator
# --------------------------------------------------------------------------
class RegisterRequest(Msg, kw_only=True):
    node_id: Name
    join_token: Secret = ""  # needed to enroll a new node
    credential: Secret = ""  # needed to re-register a known node
    address: Name
    ssh_port: Port
    host_key: SshKey
    client_key: SshKey
    labels: Labels = {}
    roles: Roles = []  # "origin" may ingest images from a source
    docker: bool = False  # a Docker engine is reachable on this host
    #: containerd answers on this host (a load target too); absent from older agents
    containerd: bool = False
    #: this node runs a registry front door (mirror_listen): it is sent each image's record
    #: (a catalog-only load) when it holds every layer, engine or not (issue 17)
    mirror: bool = False
    disk_free: Bytes = 0
    speed_hint_bps: Rate = 0.0  # configured link speed; 0 = unknown
    #: configured download speed (links are often asymmetric); 0 = unknown: the upload hint
    download_hint_bps: Rate = 0.0
    holdings: Holdings = []
    #: the agent's configured caps (bytes/s; 0 = none): the scheduler never expects more
    max_upload_bps: Rate = 0.0
    max_download_bps: Rate = 0.0


class RegisterReply(Msg, kw_only=True):
    node_id: str
    credential: str  # per-node secret; sent once, stored only as a hash by the coordinator
    heartbeat_interval: Seconds
    trust: TrustList


class LayerProgress(msgspec.Struct, kw_only=True):
    digest: Digest
    have: Count
    count: Count


class ActiveTransfer(msgspec.Struct, kw_only=True):
    transfer_id: Name
    layer: Digest
    seeder: Name
    bytes_done: Bytes
    bytes_total: Bytes
    rate_bps: Rate


class Heartbeat(Msg, kw_only=True):
    holdings: Holdings = []
    partials: Annotated[list[LayerProgress], Meta(max_length=MAX_ACTIVE)] = []
    active: Annotated[list[ActiveTransfer], Meta(max_length=MAX_ACTIVE)] = []
    load: Load = 0.0
    disk_free: Bytes = 0
    disk_used: Bytes = 0
    #: transfers whose pull ended but whose done/failed report the coordinator has not
    #: taken yet (a heartbeat may overtake a report): not abandoned, not to be re-planned
    reporting: Annotated[list[Name], Meta(max_length=MAX_ACTIVE)] = []
    #: the agent's assignment cursor when it built this heartbeat: every transfer
    #: assigned at or below it that the agent still runs or has yet to report is in
    #: ``active`` or ``reporting``. 0: not said (an agent older than this field)
    cursor: Count = 0


class HeartbeatReply(Msg, kw_only=True):
    trust_version: Count
    #: layers this node must not evict now: needed by a pending or running job on
    #: it, seeded by it in an active transfer, or (origin) of an image in the table
    pinned: list[str] = []


class EvictRequest(Msg, kw_only=True):
    """The agent wants to delete these complete layers to bring its store under its limit.

    It deletes only what the reply accepts, and only after the reply: the
    coordinator has by then dropped them from the node's holdings, so it never
    offers the node as a seeder of a layer that is gone.
    """

    layers: Digests


class EvictReply(Msg, kw_only=True):
    accepted: list[str] = []
    #: digest -> why the coordinator refused (a job needs it, it is being seeded, ...)
    refused: dict[str, str] = {}


class TransferAssignment(msgspec.Struct, kw_only=True, tag="transfer", tag_field="kind"):
    """Pull ``layer`` from ``seeder``: its chunks are checked against ``layer``.

    ``first_chunk``/``end_chunk``: only chunks [first_chunk, end_chunk) of the
    layer (one *piece*; several pieces of a layer move at once from different
    seeders). Both 0 (the default, and all an older coordinator sends) is the
    whole layer. Anything else must satisfy 0 <= first < end <= chunk count.
    """

    transfer_id: Name
    job_id: Name
    layer: ChunkManifest
    seeder: PeerInfo
    reason: Text
    first_chunk: Count = 0
    end_chunk: Count = 0

    def __post_init__(self) -> None:
        first, end, count = self.first_chunk, self.end_chunk, self.layer.count
        if (first, end) != (0, 0) and not 0 <= first < end <= count:
            raise ValueError(
                f"transfer {self.transfer_id}: chunk range [{first}, {end}) of layer "
                f"{self.layer.digest} is not within its {count} chunks (want 0 <= first < "
                f"end <= {count}, or both 0 for the whole layer)"
            )

    def chunk_range(self) -> tuple[int, int]:
        """The chunks to move as [first, end): the whole layer when the range is (0, 0)."""
        if self.end_chunk == 0:
            return 0, self.layer.count
        return self.first_chunk, self.end_chunk


class IngestAssignment(msgspec.Struct, kw_only=True, tag="ingest", tag_field="kind"):
    """Origin only: read an image from ``source`` into the local store."""

    ingest_id: Name
    ref: Text
    source: ImageSource
    chunk_size: Bytes
    compression: Compression = "off"  # for uncompressed layers; registry blobs pass unchanged


class LoadAssignment(msgspec.Struct, kw_only=True, tag="load", tag_field="kind"):
    """All layers of ``image`` are held: load it into the node's Docker and/or containerd."""

    load_id: Name
    job_id: Name
    image: ImageRecord
    #: no engine to load into: only keep the record for the node's registry front door
    catalog_only: bool = False


# --------------------------------------------------------------------------
# Cluster operations (rbd run / rm / build / images rm-nodes / docker check)
# --------------------------------------------------------------------------
class RunOp(msgspec.Struct, kw_only=True, tag="run", tag_field="kind"):
    """Create and start a container from an image the node already holds in Docker."""

    image: Text
    name: Name = ""  # container name; "" = Docker picks one
    cmd: Words = []  # [] = the image's CMD
    network: Name = ""  # Docker network mode ("none", "host", ...); "" = the engine's default
    wait: Seconds = 5.0  # seconds to wait for it to exit before reporting "running"


class RemoveContainerOp(msgspec.Struct, kw_only=True, tag="rm", tag_field="kind"):
    """Stop and remove a container (by name or id)."""

    container: Name
    stop_timeout: Seconds = 10.0  # seconds between SIGTERM and SIGKILL


class BuildOp(msgspec.Struct, kw_only=True, tag="build", tag_field="kind"):
    """Build ``tag`` from an uploaded context on top of an already distributed ``base``."""

    tag: Text
    base: Text  # an image known to the coordinator; every FROM must name it
    context_digest: Digest  # sha256 of the context tar uploaded to the coordinator
    context_size: Bytes
    dockerfile: Text = "Dockerfile"  # path inside the context
    network: Name = ""  # network mode of RUN steps; "" = the engine's default
    base_id: Digest = ""  # set by the coordinator: the base's config digest (its Docker image id)


class RemoveImageOp(msgspec.Struct, kw_only=True, tag="rm-image", tag_field="kind"):
    """Remove an image from the node's Docker engine and its layers from the layer store."""

    image: Text
    image_id: Name = ""  # set by the coordinator: only this Docker image id is removed
    drop_layers: Digests = []  # set by the coordinator per node: layers nothing else needs


class DockerCheckOp(msgspec.Struct, kw_only=True, tag="docker-check", tag_field="kind"):
    """Report the node's Docker engine; with ``install``, ``apt-get install -y docker.io`` first."""

    install: bool = False


Op = RunOp | RemoveContainerOp | BuildOp | RemoveImageOp | DockerCheckOp


class OpAssignment(msgspec.Struct, kw_only=True, tag="op", tag_field="kind"):
    """Carry out one cluster operation on this node and report an :class:`OpResult`."""

    op_id: Name
    op: Op
    timeout: Seconds  # seconds the coordinator waits for the result


Assignment = TransferAssignment | IngestAssignment | LoadAssignment | OpAssignment


class AssignmentBatch(Msg, kw_only=True):
    """Reply to the assignment long-poll: everything after the agent's cursor."""

    cursor: Count
    assignments: list[Assignment] = []
    trust: TrustList | None = None  # present when newer than the agent's version


class TransferProgress(Msg, kw_only=True):
    bytes_done: Bytes
    bytes_total: Bytes
    rate_bps: Rate


class TransferDone(Msg, kw_only=True):
    bytes_moved: Bytes  # bytes actually fetched in this transfer (resume moves less)
    seconds: Seconds


#: ``relay``: the seeder was a relay (still receiving the layer) that could not
#: provide a chunk in time or whose own pull failed -- not the relay's fault
FailureKind = Literal[
    "security", "verify", "io", "unreachable", "disk", "cancelled", "internal", "relay"
]


class TransferFailed(Msg, kw_only=True):
    reason: Output
    kind: FailureKind
    seeder_fault: bool = False  # the seeder misbehaved (bad bytes, wrong host key)
    not_held: bool = False  # the seeder answered not_held: it does not have the layer


# -- several transfer reports in one request (POST /v1/reports) ---------------
#: most reports in one batch; with a failure reason at its longest (64 KiB) the
#: body still fits MAX_BODY
MAX_REPORT_ITEMS = 200
#: a report id (rainbowd/report_id.py): the same one on every attempt of a report
ReportId = Annotated[str, Meta(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]


class ProgressItem(msgspec.Struct, kw_only=True, tag="progress", tag_field="kind"):
    """Bytes so far of an active transfer (no id: a lost or repeated one does no harm)."""

    transfer_id: Name
    progress: TransferProgress


class DoneItem(msgspec.Struct, kw_only=True, tag="done", tag_field="kind"):
    """A transfer's done report; ``report_id`` makes it safe to send again."""

    transfer_id: Name
    report_id: ReportId
    done: TransferDone


class FailedItem(msgspec.Struct, kw_only=True, tag="failed", tag_field="kind"):
    """A transfer's failure report; ``report_id`` makes it safe to send again."""

    transfer_id: Name
    report_id: ReportId
    failed: TransferFailed


ReportItem = ProgressItem | DoneItem | FailedItem


class ReportBatch(Msg, kw_only=True):
    """An agent's transfer reports, sent together.

    The coordinator checks each item on its own (coordinator/http/report_batch.py),
    so one malformed item is refused alone, with a result saying why, and the
    others are applied.
    """

    items: Annotated[list[ReportItem], Meta(max_length=MAX_REPORT_ITEMS)]


class ReportResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How one item of a batch was taken: an HTTP status and, if refused, why.

    200 applied, 208 already applied (a retry), 4xx refused (not retried),
    5xx or 503 not taken now (retried with the same report id).
    """

    status: int
    error: str = ""


class ReportBatchReply(Msg, kw_only=True):
    """One result per item, in order (sent only when an item was not applied: else 204)."""

    results: list[ReportResult]


class IngestDone(Msg, kw_only=True):
    image: ImageRecord
    manifests: Annotated[list[ChunkManifest], Meta(max_length=MAX_LAYERS)]


class ResolveTag(Msg, kw_only=True):
    """A node's registry front door asks which manifest ``registry/repository:tag`` names.

    ``registry`` is the host the client pulled from (``docker.io``,
    ``registry.example.com:5000``): containerd says it (``?ns=``), else the
    agent's ``mirror_registry``. Only the coordinator answers this, never a peer.
    """

    registry: Name
    repository: Text
    tag: Name


class ResolvedTag(Msg, kw_only=True):
    """The manifest a tag names now (the upstream's digest), and the image holding it.

    ``ingesting``: no ready image has the tag yet, and the origin is reading it
    (added on demand: coordinator/pulls.py); ``digest`` and ``media_type`` are
    empty, ``ref`` names the image to pull (POST /v1/pulls) once it is ready.
    """

    digest: Digest
    media_type: Name
    ref: Text
    state: Literal["ready", "ingesting"] = "ready"


class TaskFailed(Msg, kw_only=True):
    """An ingest or load failed; ``reason`` names what and why."""

    reason: Output


class LoadDone(Msg, kw_only=True):
    seconds: Seconds
    layers_sent: Count  # layers streamed to its engines (the rest they had), summed


class SecurityEvent(Msg, kw_only=True):
    kind: Literal["host_key_mismatch", "client_key_refused", "bad_chunk"]
    peer: Name
    detail: Text


# --------------------------------------------------------------------------
# Admin API
# --------------------------------------------------------------------------
class NodeView(msgspec.Struct, kw_only=True):
    node_id: str
    address: str
    ssh_port: int
    roles: list[str]
    labels: dict[str, str]
    docker: bool
    state: Literal["up", "down"]
    speed_bps: float
    holdings: int
    load: float
    disk_free: int
    disk_used: int
    busy: bool
    last_seen: float
    quarantined: bool = False
    quarantine_reason: str = ""
    suspect: bool = False  # a demander could not reach it: no new work until it reports
    containerd: bool = False  # containerd answers there (a load target beside Docker)
    mirror: bool = False  # it runs a registry front door (mirror_listen)


class ImageView(msgspec.Struct, kw_only=True):
    ref: str
    state: Literal["ingesting", "ready", "failed"]
    size: int
    layers: list[LayerRef]
    nodes: list[str]  # nodes holding every layer
    origin: str
    error: str = ""
    source: str = ""  # where the origin read it, for people (rainbowd.core.sources.describe)
    uncompressed_size: int = 0
    standby_origins: list[str] = []  # next origins, in the order they take over
    #: the manifest digest nodes' registry front doors serve it by ("" until ready): the
    #: upstream's own when its manifest was kept (``upstream``), else rbd's built one
    digest: str = ""
    upstream: bool = False


#: most standby origins one image may name (each reads the source only if it takes over)
MAX_STANDBY_ORIGINS = 8
StandbyOrigins = Annotated[list[Name], Meta(max_length=MAX_STANDBY_ORIGINS)]


class CreateImage(Msg, kw_only=True):
    ref: Text
    source: ImageSource
    origin: Name = ""  # node id with the origin role; "" = the only origin
    compression: Compression = "off"
    #: origin nodes that read the same source and take over, in this order, when the
    #: origin goes down while the image is ingesting or distributed (coordinator/origin_standby.py)
    standby_origins: StandbyOrigins = []


class PullRequest(Msg, kw_only=True):
    """A node's registry front door lacks ``image``: the node asks to get it (POST /v1/pulls).

    A node asks only for itself (it is the authenticated caller); the image is
    one the coordinator knows, by its rbd ref.
    """

    image: Text


class PullReply(Msg, kw_only=True):
    """What became of a pull: ``held`` (the node holds every layer: serve it now),
    ``joined`` (the node is in the running pull job ``job_id``), ``ingesting`` (the
    origin is still reading the image: ask again)."""

    state: Literal["held", "joined", "ingesting"]
    job_id: str = ""
    image: ImageRecord | None = None  # the record to serve (once ready)


class CreateJob(Msg, kw_only=True):
    image: Text
    targets: Names  # node ids, or ["all"]


class SeederUse(msgspec.Struct, kw_only=True):
    """A finished transfer into a node: who served which layer, why, and when."""

    layer: str
    seeder: str
    reason: TransferReason  # the rule and the numbers that chose the seeder
    bytes: int
    seconds: float  # as the demander measured it
    # coordinator clock: assigned and reported done (0.0 in records from before these fields)
    started_at: float = 0.0
    finished_at: float = 0.0


# "down": the node stopped answering mid-job; not final, it resumes when it returns
NodeJobStateName = Literal["pending", "transferring", "loading", "down", "done", "failed"]


class NodeJobState(msgspec.Struct, kw_only=True):
    node_id: str
    state: NodeJobStateName
    layers_done: int
    layers_total: int
    bytes_done: int
    bytes_total: int
    rate_bps: float
    transfers: list[SeederUse]
    started_at: float
    finished_at: float = 0.0
    error: str = ""
    wire_bytes: int = 0  # bytes that crossed links to this node in this job (done transfers)


class JobView(msgspec.Struct, kw_only=True):
    job_id: str
    image: str
    state: Literal["running", "done", "failed"]
    created_at: float
    finished_at: float = 0.0
    nodes: list[NodeJobState]
    error: str = ""
    image_bytes: int = 0  # one copy of the image, uncompressed
    wire_bytes: int = 0  # bytes that crossed links for this job, all nodes together
    # one copy as it crosses a link (the image's distinct layers as stored, compressed or
    # not): wire_bytes / copy_bytes is the number of copies the job sent
    copy_bytes: int = 0
    #: made by pulls through the nodes' registry front doors (not by an admin): nodes
    #: that pull the same image while it runs join it (coordinator/pulls.py)
    pull: bool = False


class ActiveTransferView(msgspec.Struct, kw_only=True):
    """A transfer in flight: who feeds whom right now, how far, and why that seeder.

    Finished transfers are in :class:`NodeJobState` ``transfers``; these are
    the live edges of a job's transfer graph (the web console draws both).
    """

    transfer_id: str
    layer: str
    seeder: str
    demander: str
    reason: TransferReason
    started_at: float
    bytes_done: int
    bytes_total: int
    rate_bps: float


class ActiveTransferList(Msg, kw_only=True):
    transfers: list[ActiveTransferView]


class NodeList(Msg, kw_only=True):
    nodes: list[NodeView]


class ImageList(Msg, kw_only=True):
    images: list[ImageView]


class JobList(Msg, kw_only=True):
    jobs: list[JobView]


class SecurityEventView(msgspec.Struct, kw_only=True):
    """A refused host key, a bad chunk, a quarantine: what an operator must see."""

    at: float
    reporter: str  # the node that saw it
    peer: str  # the node it is about
    kind: str
    detail: str
    id: int = 0  # its place in the log: the cursor of the next page (``after=``)


class SecurityEventList(Msg, kw_only=True):
    """One page of the log (``GET /v1/security-events?after=ID&limit=N``), oldest first."""

    events: list[SecurityEventView]
    total: int = 0  # events kept by the coordinator, all pages together
    more: bool = False  # with ``after=``: events after this page remain


class CreateOp(Msg, kw_only=True):
    op: Op
    targets: Names  # node ids, or ["all"]


class OpStarted(Msg, kw_only=True):
    """Agent -> coordinator: the node began the operation."""


class OpResult(Msg, kw_only=True):
    """Agent -> coordinator: how the operation ended on one node."""

    ok: bool
    summary: Text  # one line for the operator: "exited 0", "running", "Docker 20.10, overlay2"
    output: Output = ""  # container output, build log, apt-get output (tail, bounded)
    error: Output = ""  # when not ok: what failed on that node and what to do about it
    exit_code: Int32 | None = None  # run: the container's exit code if it ended in the wait
    container: Name = ""  # run: the container id
    image_id: Name = ""  # build: the built image id
    removed_layers: Digests = []  # rm-image: layers dropped from the node's store


OpNodeStateName = Literal["pending", "running", "done", "failed"]


class OpNodeState(msgspec.Struct, kw_only=True):
    node_id: str
    state: OpNodeStateName
    summary: str = ""
    output: str = ""
    error: str = ""  # names the node and what went wrong
    exit_code: int | None = None
    container: str = ""
    image_id: str = ""
    removed_layers: list[str] = []
    started_at: float = 0.0
    finished_at: float = 0.0


class OpView(msgspec.Struct, kw_only=True):
    op_id: str
    kind: str  # the op's tag: run, rm, build, rm-image, docker-check
    op: Op
    state: Literal["running", "done", "failed"]  # failed: some node failed
    created_at: float
    deadline: float  # nodes that have not reported by then fail
    nodes: list[OpNodeState]
    finished_at: float = 0.0


class OpList(Msg, kw_only=True):
    ops: list[OpView]


class ErrorReply(Msg, kw_only=True):
    error: str


# --------------------------------------------------------------------------
# Codec
# --------------------------------------------------------------------------
def to_wire(msg: msgspec.Struct) -> Any:
    """A struct as plain builtins (what msgpack and JSON encode)."""
    return msgspec.to_builtins(msg)


def encode(msg: msgspec.Struct, content_type: str = MSGPACK) -> bytes:
    """``msg`` as msgpack, or as strict JSON: a NaN or infinity raises ValueError, never
    goes out as ``NaN`` (which no JSON parser, the web console's included, accepts)."""
    if content_type == JSON:
        return json.dumps(to_wire(msg), separators=(",", ":"), allow_nan=False).encode()
    data: bytes = msgpack.packb(to_wire(msg), use_bin_type=True)
    return data


class _Envelope(msgspec.Struct):
    """Only the protocol version of a body (every other field is skipped unread)."""

    v: Any = PROTOCOL_VERSION


def decode(body: bytes, kind: type[T], content_type: str = MSGPACK) -> T:
    """Decode and validate ``body`` as ``kind``; raise MessageError saying why not.

    msgspec's own decoders read the body straight into ``kind``: they accept
    only valid UTF-8 (no lone surrogates), JSON without ``NaN``/``Infinity``
    literals, and check every bound declared on the fields.
    """
    name = getattr(kind, "__name__", str(kind))
    if len(body) > MAX_BODY:
        raise MessageError(f"{name}: body of {len(body)} bytes exceeds the {MAX_BODY} limit")
    kind_name = "JSON" if content_type == JSON else "msgpack"
    decoder: Any = msgspec.json if content_type == JSON else msgspec.msgpack
    try:
        version = decoder.decode(body, type=_Envelope).v
    except msgspec.ValidationError:
        version = PROTOCOL_VERSION  # not an object: the decode below says so
    except (msgspec.DecodeError, RecursionError) as e:  # RecursionError: deeply nested
        raise MessageError(f"{name}: body is not valid {kind_name}: {e}{_hint(e)}") from None
    if version != PROTOCOL_VERSION:
        raise MessageError(
            f"{name}: protocol version {version!r} is not supported (this side speaks "
            f"{PROTOCOL_VERSION}); upgrade the older side"
        )
    try:
        result: T = decoder.decode(body, type=kind)
    except msgspec.ValidationError as e:
        raise MessageError(f"{name}: {e}") from None
    except (msgspec.DecodeError, RecursionError) as e:
        raise MessageError(f"{name}: body is not valid {kind_name}: {e}{_hint(e)}") from None
    except ValueError as e:  # a struct's own check (a bad digest in a manifest, say)
        raise MessageError(f"{name}: {e}") from None
    return result


def _hint(e: Exception) -> str:
    """What to do about a decode error whose own words do not say it."""
    text = str(e)
    if "surrogate" in text or "UTF-8" in text:
        return " (every string must be valid UTF-8: no lone surrogates such as \\udc80)"
    return ""
