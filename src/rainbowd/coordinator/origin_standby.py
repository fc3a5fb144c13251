"""The registry standby: another origin takes an image over when its origin dies (issue 16).

PAPER.md ("Fault handling") runs the registry with a standby that takes over
when the primary dies. In rbd the registry's part is played by the image's
origin agent, so an image may name **standby origins**
(``rbd images add REF --from SOURCE --origin A --standby-origin B``): origin
nodes that can read the same source -- the same registry, with credentials on
their own host, or the same archive or OCI layout path on storage they share.

When an image's origin is down (liveness.py marked it so after missed
heartbeats), quarantined or no longer enrolled, while the image still matters
-- its ingest has not ended, or a running job distributes it -- the first
standby that is up takes over (:meth:`OriginStandby.fail_over`, run on every
liveness pass):

* it becomes the image's origin; the origin it replaced goes to the end of the
  standby list (it may take the image back one day);
* it is sent the ingest under a **new ingest id**, so a late report of the dead
  origin's ingest is refused;
* an image still ingesting becomes ready by the standby's ingest as it would
  have by the first; a ready image is read again, images_service.py checks the
  standby read the same layers and chunk manifests, and the standby becomes a
  holder of every layer -- demanders waiting for layers only the dead origin
  held are fed again, and peers that already hold layers feed them meanwhile;
* the takeover is an ``origin_takeover`` event in ``rbd events`` and a warning
  in the log: the paper's alert.

Why a standby reads the source again only when it takes over, rather than
ingesting every image up front: that would double the upstream's egress for
every image, for a failure that is rare. An idle ready image is left alone: a
job that uses it later triggers the takeover on the next pass.

For :data:`RESTART_GRACE_INTERVALS` heartbeat intervals after this coordinator
started (a restart, or a takeover of the coordinator itself) nothing is taken
over: every node counts as down until its first heartbeat reaches this process.
"""

from __future__ import annotations

import structlog

from .cluster import MISSED_HEARTBEATS
from .context import ServiceContext
from .evidence import COORDINATOR
from .images_service import ImagesService
from .jobs_service import JobsService
from .state import StoredImage

log = structlog.get_logger(__name__)

#: heartbeat intervals after start-up before an origin counts as down (as liveness.py
#: waits before it reaps transfers whose demanders did not come back)
RESTART_GRACE_INTERVALS = MISSED_HEARTBEATS
#: the security-event kind of a takeover (``rbd events``)
TAKEOVER_EVENT = "origin_takeover"


class OriginStandby:
    """Moves images whose origin is gone to their first live standby origin."""

    def __init__(
        self, ctx: ServiceContext, images: ImagesService, jobs: JobsService, started_at: float
    ) -> None:
        self.ctx = ctx
        self.images = images
        self.jobs = jobs
        self.started_at = started_at
        #: images already warned about having no live standby (not repeated every pass)
        self._stranded: set[str] = set()

    def fail_over(self, now: float) -> list[str]:
        """Take over every image that needs it; returns their refs."""
        grace = RESTART_GRACE_INTERVALS * self.ctx.settings.heartbeat_interval
        if now - self.started_at <= grace:
            return []
        moved: list[str] = []
        for image in list(self.images.images.values()):
            if not image.standby_origins or self.ctx.cluster.usable(image.origin):
                self._stranded.discard(image.ref)
                continue
            if not self._matters(image):
                continue
            standby = next((s for s in image.standby_origins if self.ctx.cluster.usable(s)), None)
            if standby is None:
                if image.ref not in self._stranded:
                    self._stranded.add(image.ref)
                    log.error(
                        "origin down and no standby origin up",
                        image=image.ref,
                        origin=image.origin,
                        standbys=image.standby_origins,
                    )
                continue
            self._take_over(image, standby)
            moved.append(image.ref)
        return moved

    def _matters(self, image: StoredImage) -> bool:
        """Still ingesting, or distributed by a running job."""
        if image.state == "ingesting":
            return True
        if image.state != "ready":
            return False
        return any(j.running and j.image == image.ref for j in self.jobs.jobs.values())

    def _take_over(self, image: StoredImage, standby: str) -> None:
        ctx = self.ctx
        old = image.origin
        rest = [s for s in image.standby_origins if s != standby]
        image.standby_origins = rest + ([old] if ctx.cluster.get(old) is not None else [])
        image.origin = standby
        image.ingest_id = ctx.new_id("i")
        ctx.store.save_image(image)
        self.images.queue_ingest(image)
        detail = (
            f"origin {old} of image {image.ref} is down ({image.state}); standby origin "
            f"{standby} takes over and reads it again (ingest {image.ingest_id})"
        )
        ctx.store.add_security_event(COORDINATOR, standby, TAKEOVER_EVENT, detail)
        log.warning(
            "standby origin takes over",
            image=image.ref,
            origin=standby,
            replaced=old,
            state=image.state,
            ingest=image.ingest_id,
        )
