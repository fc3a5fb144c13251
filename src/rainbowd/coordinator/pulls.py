"""The pulls service: a node's registry front door lacks an image, and asks for it (issue 17).

A pull through an agent's front door (agent/mirror/) of an image the node does
not hold becomes a P2P distribution to that node (``POST /v1/pulls``, a
:class:`~rainbowd.core.messages.PullRequest`). The rules:

* **A node asks only for itself.** The caller is the authenticated node; the
  request names an image the coordinator knows (its rbd ref). Nothing a node
  says can put another node in a job.
* **One job per image at a time.** The first pull of an image starts a *pull
  job* (``JobView.pull``); every node that pulls the same image while that job
  runs joins it, so the normal scheduler feeds them together -- fast nodes
  first, cut-through relay, each layer from the origin once when peers can
  carry it -- rather than in one job each. A pull after the job ended starts
  the next one.
* **The answer says what to do now**: ``held`` (the node holds every layer:
  its front door serves the image with the record in the reply), ``joined``
  (the job id; the front door waits for the layers), ``ingesting`` (the origin
  is still reading the image: ask again). An unknown or failed image is an
  error, and the front door answers the client so it falls back to the
  upstream itself.
* A node in a pull job gets no engine load: its client (containerd, Docker)
  takes the image from the front door, which has the record from the reply.

**On demand** (:meth:`PullsService.on_demand`): a tag a node's front door asks
to resolve that no ready image has, on a registry whose ``[upstreams]`` entry
allows it (``on_demand``, the default), is added as an image -- ref
``REGISTRY/REPOSITORY:TAG``, source the upstream's reference with the entry's
TLS and credential settings, read by an origin that is up -- and the answer
says ``ingesting``. Every node asking meanwhile gets the same answer and ref,
so the upstream is read once, by the origin; the nodes then pull the image as
above. An image of that reference already being ingested (an admin's) is
waited for instead of added again. A tag whose on-demand ingest failed is not
tried again for :data:`ON_DEMAND_RETRY_S` (the upstream is not hammered by
every pull of a bad tag): meanwhile the front doors answer 404.
"""

from __future__ import annotations

import structlog

from rainbowd.core.messages import (
    CreateImage,
    CreateJob,
    PullReply,
    PullRequest,
    RegistrySource,
    ResolvedTag,
    ResolveTag,
)
from rainbowd.core.sources import canonical_registry, registry_name

from .cluster import Node
from .context import ServiceContext
from .errors import BadRequest, Conflict, Forbidden, NotFound
from .images import check_ref
from .images_service import ImagesService
from .jobs_service import JobsService
from .upstreams import Upstream

log = structlog.get_logger(__name__)

#: seconds after an on-demand ingest of a tag failed before a pull may start another
ON_DEMAND_RETRY_S = 60.0


class PullsService:
    """Turns front-door misses into pull jobs; see the module docstring."""

    def __init__(self, ctx: ServiceContext, images: ImagesService, jobs: JobsService) -> None:
        self.ctx = ctx
        self.images = images
        self.jobs = jobs

    def pull(self, node: Node, req: PullRequest) -> PullReply:
        if node.quarantined:
            raise Forbidden(f"node {node.node_id} is quarantined: it gets no image by pulls")
        image = self.images.images.get(req.image)
        if image is None:
            raise NotFound(f"node {node.node_id} pulls {req.image!r}: no such image here")
        if image.state == "ingesting":
            return PullReply(state="ingesting")
        if image.state != "ready" or image.record is None:
            raise Conflict(f"image {req.image} is {image.state}: {image.error or 'not ready'}")
        record = image.record
        if {lr.digest for lr in record.layers} <= node.holdings:
            return PullReply(state="held", image=record)
        now = self.ctx.clock()
        running = [
            j for j in self.jobs.jobs.values() if j.running and j.pull and j.image == req.image
        ]
        if running:
            job = running[0]
            mine = job.nodes.get(node.node_id)
            if mine is None:
                self.jobs.join(job, node.node_id, now)
            elif mine.final:  # failed in it, or lost the layers since: not twice in one job
                raise Conflict(
                    f"node {node.node_id} was in pull job {job.job_id} of {req.image} "
                    f"({mine.state}{': ' + mine.error if mine.error else ''}); "
                    "pull again once that job has ended"
                )
            return PullReply(state="joined", job_id=job.job_id, image=record)
        view = self.jobs.create_job(CreateJob(image=req.image, targets=[node.node_id]), pull=True)
        log.info("pull job created", job=view.job_id, image=req.image, node=node.node_id)
        return PullReply(state="joined", job_id=view.job_id, image=record)

    # -- tags no image has yet --------------------------------------------
    def on_demand(
        self, node: Node, req: ResolveTag, upstreams: dict[str, Upstream]
    ) -> ResolvedTag | None:
        """Add the image a tag names, or find it being read; None: not on demand (a 404)."""
        registry = canonical_registry(req.registry)
        entry = upstreams.get(registry)
        if entry is None or not entry.on_demand or node.quarantined:
            return None
        want = (entry.host, req.repository, req.tag)
        now = self.ctx.clock()
        for other in self.images.images.values():
            source = other.source
            if isinstance(source, RegistrySource) and registry_name(source.reference) == want:
                if other.state == "ingesting":
                    return _ingesting(other.ref)
        ref = f"{registry}/{req.repository}:{req.tag}"
        try:
            check_ref(ref)
        except BadRequest:
            return None
        image = self.images.images.get(ref)
        if image is not None and image.state != "failed":
            return None  # ready, yet not this upstream tag (resolve_tag said so): not ours
        if image is not None and now - image.created_at < ON_DEMAND_RETRY_S:
            return None  # failed a moment ago: the front doors go upstream meanwhile
        origin = next(
            (n for n in sorted(self.ctx.cluster.origins()) if self.ctx.cluster.usable(n)), None
        )
        if origin is None:
            log.warning("on-demand ingest: no origin is up", tag=ref, node=node.node_id)
            return None
        source = RegistrySource(
            reference=f"{entry.host}/{req.repository}:{req.tag}",
            insecure=entry.insecure,
            ca_file=entry.ca_file,
            credentials_file=entry.credentials_file,
        )
        try:
            self.images.add_image(CreateImage(ref=ref, source=source, origin=origin))
        except (BadRequest, Conflict) as e:
            log.warning("on-demand ingest refused", tag=ref, error=e.message)
            return None
        log.info("image added on demand", image=ref, node=node.node_id, origin=origin)
        return _ingesting(ref)


def _ingesting(ref: str) -> ResolvedTag:
    return ResolvedTag(digest="", media_type="", ref=ref, state="ingesting")
