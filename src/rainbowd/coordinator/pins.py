"""Which layers a node must keep: the coordinator's side of store eviction.

An agent with a store limit evicts least recently used layers (see
rainbowd.core.eviction), but only the coordinator knows what the cluster still
needs from that node. This module answers that question from the
coordinator's bookkeeping; pure code, no I/O.

A layer is pinned on a node when

* a running job has the node as a target that is not final yet and the job's
  image has the layer (it is about to be received, is held and waiting for the
  rest, or is being loaded into Docker -- the load streams it from the store);
* the node is the seeder of an active transfer of the layer (a demander is, or
  is about to be, reading it);
* the node is the origin of an image in the image table that has the layer:
  the origin is the first seeder, and the layer can come back from nowhere
  else without a new ingest.

The heartbeat reply carries these pins so the agent plans around them, and an
eviction request is checked against them once more, at the moment it arrives,
since a job created after the last heartbeat pins layers too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from rainbowd.core.sched.records import Transfer

from .jobs import Job
from .state import StoredImage


def pinned_layers(
    node_id: str,
    jobs: Iterable[Job],
    images: Mapping[str, StoredImage],
    active: Iterable[Transfer],
) -> dict[str, str]:
    """Layer digest -> why ``node_id`` must keep it (the first reason found)."""
    pins: dict[str, str] = {}
    for t in active:
        if t.seeder == node_id:
            pins.setdefault(t.layer, f"seeding it to {t.demander} (transfer {t.transfer_id})")
    for job in jobs:
        p = job.nodes.get(node_id)
        if not job.running or p is None or p.final:
            continue
        for layer in p.layers:
            pins.setdefault(layer, f"job {job.job_id} ({job.image}) needs it on {node_id}")
    for image in images.values():
        if image.origin != node_id or image.record is None:
            continue
        for lr in image.record.layers:
            pins.setdefault(lr.digest, f"origin of image {image.ref}")
    return pins
