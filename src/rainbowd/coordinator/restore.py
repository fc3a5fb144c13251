"""Coordinator restart: reload the cluster, images, jobs and transfers from SQLite.

Transfers in flight are persisted; a restarted coordinator adopts them back
into the scheduler (their seeder and demander stay locked) before any node is
heard from (coordinator/dispatch.py). Every node is down until its first
heartbeat, so nothing is scheduled for it before the coordinator knows what
it holds and pulls. Running jobs demand again what their nodes lack.
"""

from __future__ import annotations

import structlog

from .context import ServiceContext
from .dispatch import Dispatch
from .images_service import ImagesService
from .jobs import Job
from .jobs_service import JobsService

log = structlog.get_logger(__name__)


def restore(
    ctx: ServiceContext,
    images: ImagesService,
    jobs: JobsService,
    dispatch: Dispatch,
    started_at: float,
) -> None:
    """Reload nodes (down until they heartbeat), images and jobs from SQLite."""
    store, cluster, driver = ctx.store, ctx.cluster, ctx.driver
    for info, seq in store.load_nodes():
        node = cluster.add(info, seq)
        node.down_since = started_at
        # restored holdings count as recorded now: a heartbeat built before this process
        # led (retried across a takeover, or sent before a restart) may predate a transfer
        # the last leader recorded, and must not drop it (holdings.HOLDING_GRACE_INTERVALS)
        node.holding_since = dict.fromkeys(node.holdings, started_at)
        driver.node_up(
            node.node_id,
            info.speed_hint_bps,
            node.holdings,
            max_upload_bps=info.max_upload_bps,
            max_download_bps=info.max_download_bps,
            download_bps=info.download_hint_bps,
        )
        driver.node_down(node.node_id)  # down until its first heartbeat
    for image in store.load_images():
        images.images[image.ref] = image
        images.add_manifests(image.manifests)
        if image.state == "ingesting":
            images.queue_ingest(image)
    now = ctx.clock()
    adopted = dispatch.restore_transfers()
    for view in store.load_jobs():
        job_image = images.images.get(view.image)
        if job_image is None or job_image.record is None:
            log.warning("job references a missing image; dropped", job=view.job_id)
            continue
        layers = [(lr.digest, lr.size) for lr in job_image.record.layers]
        holdings = {nid: n.holdings for nid, n in cluster.nodes.items()}
        job = Job.from_view(view, layers, holdings)
        job.image_bytes = job.image_bytes or job_image.record.uncompressed_size
        jobs.jobs[job.job_id] = job
        if job.running:
            jobs.start_job_nodes(job, now)
            if job.settle(now):
                jobs.job_finished(job)
            store.save_job(job.view())
    for t in adopted:
        jobs.transfer_started(t.demander, t.layer)
    log.info(
        "state restored",
        transfers_adopted=len(adopted),
        nodes=len(cluster.nodes),
        images=len(images.images),
        jobs=len(jobs.jobs),
        trust_version=cluster.trust_version,
    )
