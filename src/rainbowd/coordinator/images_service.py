"""The images service: the image table, ingests by an origin, and the chunk manifests.

``rbd images add`` creates an image in state ``ingesting`` and queues an
``IngestAssignment`` to an origin node; the origin's report brings the image
record and the chunk manifests of its layers (checked in
coordinator/images.py) and makes the image ``ready`` -- and the origin the
first holder of every layer. The manifests known here are what every
transfer assignment carries, so no unverifiable work is ever handed out.
"""

from __future__ import annotations

import msgspec
import structlog

from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.digest import short
from rainbowd.core.messages import (
    CreateImage,
    ImageList,
    ImageView,
    IngestAssignment,
    IngestDone,
    RegistrySource,
    TaskFailed,
)
from rainbowd.core.sources import SourceError, check_source, describe

from .cluster import Node
from .context import Schedule, ServiceContext
from .errors import BadRequest, Conflict, Forbidden, NotFound
from .evidence import COORDINATOR
from .holdings_service import HoldingsService
from .images import check_ingest, check_ref, image_view
from .jobs_service import JobsService
from .state import StoredImage

log = structlog.get_logger(__name__)


class ImagesService:
    """Images and their ingest; see the module docstring."""

    def __init__(
        self,
        ctx: ServiceContext,
        images: dict[str, StoredImage],
        manifests: dict[str, ChunkManifest],
        jobs: JobsService,
        holdings: HoldingsService,
        schedule: Schedule,
    ) -> None:
        self.ctx = ctx
        self.images = images
        self.manifests = manifests
        self.jobs = jobs
        self.holdings = holdings
        self.schedule = schedule

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
            holders = sorted(nid for nid, n in self.ctx.cluster.nodes.items() if need <= n.holdings)
        return image_view(image, holders)

    def add_image(self, req: CreateImage) -> ImageView:
        ctx = self.ctx
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
        origins = ctx.cluster.origins()
        if req.origin:
            self._check_origin(req.origin, "origin", origins)
            origin = req.origin
        elif len(origins) == 1:
            origin = origins[0]
        elif not origins:
            raise BadRequest(
                "no node with the origin role is enrolled; start an agent with the origin role"
            )
        else:
            raise BadRequest(f"several origins ({', '.join(origins)}): say which one with origin")
        standbys = self._standby_origins(req, origin, origins)
        image = StoredImage(
            ref=req.ref,
            state="ingesting",
            source=req.source,
            origin=origin,
            ingest_id=ctx.new_id("i"),
            created_at=ctx.clock(),
            compression=req.compression,
            standby_origins=standbys,
        )
        self.images[req.ref] = image
        ctx.store.save_image(image)
        self.queue_ingest(image)
        log.info(
            "image ingest assigned",
            image=req.ref,
            origin=origin,
            ingest=image.ingest_id,
            source=describe(req.source),
            compression=req.compression,
        )
        return self.image_view(req.ref)

    def _check_origin(self, node_id: str, what: str, origins: list[str]) -> None:
        """``node_id`` is an enrolled node with the origin role, not quarantined."""
        node = self.ctx.cluster.get(node_id)
        if node is None or "origin" not in node.info.roles:
            raise BadRequest(
                f"{what} {node_id!r} is not a node with the origin role "
                f"(origins: {', '.join(origins) or 'none'})"
            )
        if node.quarantined:
            raise BadRequest(f"{what} {node_id} is quarantined")

    def _standby_origins(self, req: CreateImage, origin: str, origins: list[str]) -> list[str]:
        """The standby origins asked for: enrolled origin nodes, not quarantined, each once."""
        out: list[str] = []
        for nid in req.standby_origins:
            self._check_origin(nid, "standby origin", origins)
            if nid == origin or nid in out:
                raise BadRequest(f"standby origin {nid} is named twice (or is the origin)")
            out.append(nid)
        return out

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
        running = sorted(j.job_id for j in self.jobs.jobs.values() if j.running and j.image == ref)
        if running:
            raise Conflict(
                f"image {ref} is being distributed by running job(s) {', '.join(running)}; "
                "wait for them to finish"
            )
        del self.images[ref]
        self.ctx.store.delete_image(ref)
        log.warning("image removed by admin", image=ref, state=image.state)

    def queue_ingest(self, image: StoredImage) -> None:
        ctx = self.ctx
        node = ctx.cluster.get(image.origin)
        if node is None:
            image.state, image.error = "failed", f"origin {image.origin} is no longer enrolled"
            ctx.store.save_image(image)
            return
        node.mailbox.put(
            IngestAssignment(
                ingest_id=image.ingest_id,
                ref=image.ref,
                source=image.source,
                chunk_size=ctx.settings.chunk_size,
                compression=image.compression,
            )
        )
        ctx.store.save_seq(node.node_id, node.mailbox.seq)

    def add_manifests(self, manifests: list[ChunkManifest]) -> None:
        """Know these layers' chunk manifests (and tell the scheduler their sizes)."""
        for m in manifests:
            self.manifests.setdefault(m.digest, m)
            self.ctx.scheduler.set_layer_size(m.digest, m.size, m.chunk_size)

    # -- ingest reports -------------------------------------------------
    def ingest_done(self, node: Node, ingest_id: str, m: IngestDone) -> None:
        ctx = self.ctx
        now = ctx.clock()
        image = self._ingest(node, ingest_id)
        if image.state == "ready":
            self._took_over(node, image, m, now)  # a standby origin's read, or a repeat
            return
        if image.state != "ingesting":
            raise Conflict(f"image {image.ref} is {image.state}; ingest {ingest_id} is over")
        try:
            manifests = check_ingest(m.image, m.manifests)
        except BadRequest as e:
            image.state, image.error = "failed", e.message
            ctx.store.save_image(image)
            log.warning("ingest report rejected", image=image.ref, error=e.message)
            raise
        image.record = msgspec.structs.replace(m.image, ref=image.ref)
        image.manifests = manifests
        image.state, image.error = "ready", ""
        self.add_manifests(manifests)
        ctx.store.save_image(image)
        log.info("image ready", image=image.ref, layers=len(manifests), size=image.record.size)
        if self.holdings.add(node, [mf.digest for mf in manifests], now):
            ctx.save_node(node)
        self.schedule(now)

    def _took_over(self, node: Node, image: StoredImage, m: IngestDone, now: float) -> None:
        """The ingest of a ready image by the origin that took it over (origin_standby.py).

        It read the image again from the same source: it must be the same image
        (layer for layer, chunk manifest for chunk manifest), and then the new
        origin holds every layer. A repeated report changes nothing.
        """
        assert image.record is not None
        want = [lr.digest for lr in image.record.layers]
        if set(want) <= node.holdings:
            return
        got = [lr.digest for lr in m.image.layers]
        same = got == want and {mf.digest: mf for mf in m.manifests} == {
            mf.digest: mf for mf in image.manifests
        }
        if not same:
            why = (
                f"standby origin {node.node_id} read a different image from "
                f"{describe(image.source)} for {image.ref} (layers {_names(got)}, recorded "
                f"{_names(want)}): the source changed; add the image again"
            )
            log.error("origin takeover read a different image", image=image.ref, node=node.node_id)
            self.ctx.store.add_security_event(COORDINATOR, node.node_id, "origin_mismatch", why)
            raise Conflict(why)
        log.warning("standby origin holds the image", image=image.ref, origin=node.node_id)
        if self.holdings.add(node, want, now):
            self.ctx.save_node(node)
        self.schedule(now)

    def ingest_failed(self, node: Node, ingest_id: str, m: TaskFailed) -> None:
        image = self._ingest(node, ingest_id)
        if image.state == "ready":  # a standby origin's read after a takeover
            log.error(
                "standby origin could not read the image again; it holds none of it",
                image=image.ref,
                origin=node.node_id,
                reason=m.reason,
            )
            return
        if image.state != "ingesting":
            return
        image.state, image.error = "failed", m.reason or "ingest failed (no reason given)"
        self.ctx.store.save_image(image)
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


def _names(digests: list[str]) -> str:
    return ", ".join(short(d) for d in digests) or "none"
