"""Read models: what ``rbd nodes``, the console and ``GET /metrics`` see of the cluster.

Functions of the cluster registry, the scheduler and the jobs, with no
side effects; the services own the state, these only look at it.
"""

from __future__ import annotations

from collections.abc import Iterable

from rainbowd.core.messages import NodeList, NodeView
from rainbowd.core.sched.pieces import PieceScheduler

from .cluster import Cluster
from .errors import NotFound
from .jobs import Job
from .metrics import JOB_STATES, NODE_STATES, MetricsSnapshot


def node_views(cluster: Cluster, scheduler: PieceScheduler) -> NodeList:
    busy = {x for t in scheduler.active() for x in (t.seeder, t.demander)}
    return NodeList(
        nodes=[
            n.view(scheduler.speed(nid), nid in busy, scheduler.is_suspect(nid))
            for nid, n in sorted(cluster.nodes.items())
        ]
    )


def node_view(cluster: Cluster, scheduler: PieceScheduler, node_id: str) -> NodeView:
    for v in node_views(cluster, scheduler).nodes:
        if v.node_id == node_id:
            return v
    raise NotFound(unknown_node(cluster, node_id))


def unknown_node(cluster: Cluster, node_id: str) -> str:
    """The error message for a node id nobody enrolled."""
    known = ", ".join(sorted(cluster.nodes)) or "none"
    return f"no node {node_id!r} (enrolled: {known})"


def metrics_snapshot(
    cluster: Cluster, scheduler: PieceScheduler, jobs: Iterable[Job]
) -> MetricsSnapshot:
    """The state gauges of ``GET /metrics`` (nodes and jobs by state, queue, polls)."""
    nodes = dict.fromkeys(NODE_STATES, 0)
    parked = 0
    for nid, n in cluster.nodes.items():
        parked += n.polls
        if n.quarantined:
            nodes["quarantined"] += 1
        elif not n.up:
            nodes["down"] += 1
        elif scheduler.is_suspect(nid):
            nodes["suspect"] += 1
        else:
            nodes["up"] += 1
    by_state = dict.fromkeys(JOB_STATES, 0)
    for job in jobs:
        by_state[job.state] = by_state.get(job.state, 0) + 1
    active = scheduler.active()
    # a demand stays pending while its transfer runs; the queue is what waits
    served = {(t.demander, t.layer) for t in active}
    waiting = sum(1 for d in scheduler.pending() if d not in served)
    return MetricsSnapshot(
        nodes=tuple(nodes.items()),
        jobs=tuple(by_state.items()),
        pending_demands=waiting,
        active_transfers=len(active),
        polls_parked=parked,
    )
