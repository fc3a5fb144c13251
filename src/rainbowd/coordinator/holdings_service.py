"""The holdings service: what each node holds, kept in step with what it says, and eviction.

The rules are in coordinator/holdings.py (follow the node both ways) and
coordinator/pins.py (what a node must not evict); this service applies them
to the cluster registry, the scheduler and the jobs: a newly held layer
advances the node's jobs (a node holding every layer goes on to load), a
lost one is demanded again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import structlog

from rainbowd.core.digest import is_digest, short
from rainbowd.core.messages import EvictReply, EvictRequest

from . import holdings
from .cluster import Node
from .context import ServiceContext
from .errors import BadRequest
from .jobs_service import JobsService
from .pins import pinned_layers
from .state import StoredImage

log = structlog.get_logger(__name__)

#: (node id, layer) -> True while a cluster op deletes that layer there (ops.py)
Withheld = Callable[[str, str], bool]


class HoldingsService:
    """Holdings and store eviction; see the module docstring."""

    def __init__(
        self,
        ctx: ServiceContext,
        jobs: JobsService,
        images: Mapping[str, StoredImage],
        withheld: Withheld,
    ) -> None:
        self.ctx = ctx
        self.jobs = jobs
        self.images = images
        self.withheld = withheld

    def add(self, node: Node, layers: Iterable[str], now: float) -> bool:
        """Record layers ``node`` now holds; advance its jobs. True if anything was new."""
        new = [
            d
            for d in dict.fromkeys(layers)
            if d not in node.holdings and not self.withheld(node.node_id, d)
        ]
        if not new:
            return False
        for layer in new:
            node.holdings.add(layer)
            node.holding_since[layer] = now
            self.ctx.scheduler.add_holding(node.node_id, layer)
        for job, p in list(self.jobs.jobs_of(node.node_id)):
            changed = [layer for layer in new if p.hold(layer)]
            if changed and p.all_held():
                self.jobs.node_has_all(job, p, now)
            if changed:
                self.jobs.job_changed(job, p)
        return True

    def follow(self, node: Node, listed: list[str], now: float) -> bool:
        """Drop the layers ``node`` stopped listing (holdings.py); True if any were."""
        grace = holdings.HOLDING_GRACE_INTERVALS * self.ctx.settings.heartbeat_interval
        gone = holdings.unlisted(node, listed, now, grace)
        if gone:
            self.lost(node, gone, now, "its registration or heartbeat no longer lists")
        return bool(gone)

    def lost(self, node: Node, layers: list[str], now: float, why: str) -> None:
        jobs = list(self.jobs.jobs_of(node.node_id))
        for job, p in holdings.drop(node, layers, self.ctx.scheduler, jobs, now, why):
            self.jobs.job_changed(job, p)
        self.ctx.save_node(node)

    # -- store eviction (agents with a store limit; see pins.py) ---------
    def pins(self, node: Node) -> list[str]:
        """Layers ``node`` must not evict right now, sorted."""
        return sorted(self.pinned(node))

    def pinned(self, node: Node) -> dict[str, str]:
        return pinned_layers(
            node.node_id,
            self.jobs.jobs.values(),
            self.images,
            self.ctx.scheduler.active_for(node.node_id),
        )

    def evict(self, node: Node, req: EvictRequest) -> EvictReply:
        """Let ``node`` delete the unpinned layers it asks for; forget that it holds them.

        The holdings are dropped (here and in the scheduler, so the node is no
        longer offered as their seeder) before the agent deletes a byte; a
        refused layer stays held and the reason goes back to the agent.
        """
        bad = [d for d in req.layers if not is_digest(d)]
        if bad:
            raise BadRequest(f"evict: layers are not sha256 digests: {bad[:3]}")
        pinned = self.pinned(node)
        accepted: list[str] = []
        refused: dict[str, str] = {}
        for layer in dict.fromkeys(req.layers):
            if layer in pinned:
                refused[layer] = pinned[layer]
                continue
            accepted.append(layer)
            node.holdings.discard(layer)
            self.ctx.scheduler.remove_holding(node.node_id, layer)
        if accepted:
            self.ctx.save_node(node)
        log.info(
            "layers evicted by node",
            node=node.node_id,
            accepted=[short(d) for d in accepted],
            refused={short(d): why for d, why in refused.items()},
        )
        return EvictReply(accepted=accepted, refused=refused)
