"""What each node holds, as the node itself last said: the coordinator follows it both ways.

A node is the authority on its own store. Its registration and every
heartbeat list the complete layers it holds, and the coordinator's view
follows that list:

* **Added** when listed (or reported done, or ingested).
* **Dropped** when a registration or heartbeat no longer lists a layer the
  coordinator had recorded more than :data:`HOLDING_GRACE_INTERVALS` heartbeat
  intervals earlier. The grace covers a heartbeat built just before a pull
  finished and delivered after its done report: it may not list the layer
  yet, and must not undo the report. A dropped layer stops being seeded from
  the node (``Scheduler.remove_holding``); a running job whose node counted it
  done and still waits for other layers demands it again.
* **Dropped at once** when a demander, with a transfer from the node behind it
  (coordinator/evidence.py), reports that the node answered ``not_held``. If
  that was a lie, the node's next heartbeat lists the layer again.
* **Checked when a job ends**: a node counted done for a layer it then
  stopped listing is put back to pending and pulls it again (once; losing it
  again fails the node, naming the layer, rather than looping). A layer it
  evicted with the coordinator's consent after it finished (store limits,
  coordinator/pins.py) is not held against it.
* **A layer nobody holds** (an origin that found its only copy corrupt stops
  listing it, see agent/agent.py) fails, after :data:`ORPHAN_GRACE_INTERVALS`
  heartbeat intervals, every job node still waiting for it, with an error
  naming the layer: nothing could ever send it. (The grace lets a false
  ``not_held`` claim be corrected by the holder's next heartbeat first.)

Pure bookkeeping on the coordinator's objects; holdings_service.py (and, at a
job's end, jobs_service.py) applies it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import structlog

from rainbowd.core.digest import short
from rainbowd.core.sched.pieces import PieceScheduler

from .cluster import Node
from .jobs import Job, NodeProgress

log = structlog.get_logger(__name__)

#: a layer recorded this many heartbeat intervals ago or less is not dropped for being
#: missing from a heartbeat (that heartbeat may have been built before it was recorded)
HOLDING_GRACE_INTERVALS = 2.0
#: a layer a running job waits for and no node holds fails those nodes after this many
#: heartbeat intervals (time for a holder wrongly dropped to list it again)
ORPHAN_GRACE_INTERVALS = 3.0

Changed = list[tuple[Job, NodeProgress]]


def unlisted(node: Node, listed: Iterable[str], now: float, grace: float) -> list[str]:
    """Layers recorded for ``node`` that it did not list, recorded longer than ``grace`` ago."""
    keep = set(listed)
    return sorted(
        d for d in node.holdings if d not in keep and now - node.holding_since.get(d, 0.0) > grace
    )


def drop(
    node: Node,
    layers: list[str],
    scheduler: PieceScheduler,
    jobs: Iterable[tuple[Job, NodeProgress]],
    now: float,
    why: str,
) -> Changed:
    """``node`` no longer holds ``layers``: stop seeding them from it, demand them again.

    Returns the (job, node) entries that changed, for the caller to persist.
    """
    gone = [d for d in layers if d in node.holdings]
    if not gone:
        return []
    for d in gone:
        node.holdings.discard(d)
        node.holding_since.pop(d, None)
        scheduler.remove_holding(node.node_id, d)
    log.warning(
        "node no longer holds layers",
        node=node.node_id,
        layers=[short(d) for d in gone],
        why=why,
    )
    changed: Changed = []
    for job, p in jobs:
        lost = [d for d in gone if p.lose(d)]
        for d in lost:
            scheduler.demand(node.node_id, d, job.job_id, now)
        if lost:
            changed.append((job, p))
    return changed


def recheck_done(
    job: Job, nodes: Mapping[str, Node], scheduler: PieceScheduler, now: float
) -> Changed:
    """At a job's end: reopen done nodes missing a layer; returns the entries changed."""
    changed: Changed = []
    for p in job.nodes.values():
        node = nodes.get(p.node_id)
        if p.state != "done" or node is None:
            continue
        missing = sorted(d for d in p.unheld if d not in node.holdings)
        if not missing:
            continue
        names = ", ".join(missing)
        if p.reopen(missing):
            log.warning(
                "node counted done lacks layers; pulling them again",
                job=job.job_id,
                node=p.node_id,
                layers=[short(d) for d in missing],
            )
            for d in missing:
                scheduler.demand(p.node_id, d, job.job_id, now)
        else:
            p.fail(f"node {p.node_id} lost layer(s) {names} again after receiving them", now)
        changed.append((job, p))
    return changed


class OrphanWatch:
    """Layers running jobs wait for that no usable node holds, and since when."""

    def __init__(self) -> None:
        self._since: dict[str, float] = {}

    def check(
        self,
        jobs: Iterable[tuple[Job, NodeProgress]],
        nodes: Mapping[str, Node],
        now: float,
        grace: float,
    ) -> list[tuple[Job, NodeProgress, str]]:
        """(job, node, error) for each job node to fail: it waits for a layer nobody has."""
        waiting = [(j, p) for j, p in jobs if p.receiving]
        needed = {d for _, p in waiting for d in p.missing()}
        held: set[str] = set()
        for n in nodes.values():
            if not n.quarantined:
                held |= n.holdings & needed
        orphans = needed - held
        self._since = {d: self._since.get(d, now) for d in orphans}
        expired = {d for d, since in self._since.items() if now - since > grace}
        out: list[tuple[Job, NodeProgress, str]] = []
        for job, p in waiting:
            lost = [d for d in p.missing() if d in expired]
            if lost:
                out.append(
                    (
                        job,
                        p,
                        f"layer {lost[0]} is held by no node any more (its last holder stopped "
                        "listing it: corrupt or deleted); add the image again to re-ingest it",
                    )
                )
        return out
