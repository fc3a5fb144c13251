"""The scheduler: turns demands (node needs layer) into transfers (seeder -> demander).

Pure code, in the sans-IO style: no sockets, no clock, no tasks. The
coordinator feeds it events (a node came up, a layer is held, a transfer
finished) with the current time passed in, and asks :meth:`Scheduler.schedule`
for new transfers. Unit tests and the simulator drive this same class.

The scheduler holds one policy's pass, a
:class:`~rainbowd.core.sched.policy.PolicyPass`, and tells it every change of
the records: policy ``paper`` is Algorithm 1 of RainbowD applied per layer
(:class:`~rainbowd.core.sched.paper.PaperPass`, paper.py), the capacity-aware
policies are the planner of policies/. Either sees this class only as a
:class:`~rainbowd.core.sched.view.SchedulerView` and starts each transfer
through :meth:`Scheduler.start_transfer`; the locks a transfer
holds on its nodes are kept by
:class:`~rainbowd.core.sched.transfers.ActiveTransfers` (transfers.py).

Every transfer records why its seeder was chosen (``reason``, a
:class:`~rainbowd.core.sched.reasons.TransferReason`: the rule and the numbers
that decided it) so ``rbd job`` and the console can explain the plan.

Faults (PAPER.md, "Fault handling"): a node that is down or *suspect* (a
demander could not reach it; cleared by its next heartbeat, i.e. the next
:meth:`Scheduler.add_node`) is given no new work. A demander can be kept away
from one seeder for a while (:meth:`Scheduler.avoid`) and a seeder that sent
bad bytes is slowed down in the ranking (:meth:`Scheduler.penalize`). After a
coordinator restart the transfers agents are still running are taken back
with :meth:`Scheduler.adopt`, so no demander is handed a second transfer of a
layer it is already pulling.

Cost. The coordinator calls :meth:`Scheduler.schedule` after every event
(each heartbeat, report and job), and the simulator runs clusters of 10,000
nodes, so nothing here rescans the cluster per call: each record keeps its own
indexes (records.Node), and the policy's pass keeps standing indexes of its
own, told here whenever a node's standing as a seeder or demander changes
(paper.py's module docstring, "Cost").
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet

from .layers import LayerRecords
from .paper import PAPER, PaperPass
from .policies import RULES, Planner
from .policy import PolicyPass
from .reasons import TransferReason
from .records import Demand, Node, Transfer
from .transfers import ActiveTransfers

#: speed assumed for a node nothing is known about (bytes/s); 100 Mbit/s
DEFAULT_SPEED_BPS = 12.5e6

#: ``paper`` is Algorithm 1 (paper.py); the others are capacity-aware (policies/)
POLICIES = (PAPER, *RULES)
#: the best measured policy across the profile suite (bench/RESULTS.md, issue 13); ``paper``
#: and the others stay selectable
DEFAULT_POLICY = "swarm"


class SchedulerError(ValueError):
    """An event that contradicts the scheduler's state (unknown id, say)."""


class Scheduler:
    """Seeder/demander matching for one cluster. See the module docstring."""

    def __init__(
        self,
        policy: str = PAPER,
        *,
        default_speed_bps: float = DEFAULT_SPEED_BPS,
        new_id: Callable[[], str] | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise SchedulerError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
        self.policy = policy
        self.default_speed_bps = default_speed_bps
        counter = itertools.count(1)
        self._new_id = new_id or (lambda: f"t{next(counter)}")
        #: node id -> its record (records.Node); the policies read it (view.SchedulerView)
        self.nodes: dict[str, Node] = {}
        # holders, open demands and sizes per layer
        self._layers = LayerRecords()
        self._active = ActiveTransfers()
        # (demander, seeder) -> time until which that seeder is not used for that demander
        self._avoid: dict[tuple[str, str], float] = {}
        #: layer -> open demands of it (bounds the stale entries ``paper``'s heaps may
        #: keep; the planner sums the bytes still wanted with it)
        self.open_demands: Mapping[str, int] = self._layers.open_demands
        #: layer -> size in bytes, where known (the capacity-aware policies plan with it)
        self.layer_sizes: Mapping[str, int] = self._layers.sizes
        #: layer -> chunk size in bytes, where known (``relay`` bounds the lag of a chain with it)
        self.layer_chunks: Mapping[str, int] = self._layers.chunks
        #: the policy's pass: the planner of policies/, or Algorithm 1's (``paper``)
        self._pass: PolicyPass = (
            Planner(RULES[policy], self) if policy in RULES else PaperPass(self)
        )

    # -- nodes -----------------------------------------------------------
    def add_node(
        self,
        node_id: str,
        speed_bps: float = 0.0,
        holdings: Iterable[str] = (),
        *,
        max_upload_bps: float | None = None,
        max_download_bps: float | None = None,
        download_bps: float = 0.0,
    ) -> None:
        """Add (or bring back up) a node; its holdings make it a seeder.

        A known node keeps its measured speed (``speed_bps`` is only the first
        estimate, e.g. the agent's configured hint). ``max_upload_bps`` /
        ``max_download_bps`` are its configured bandwidth caps (0 = none; None =
        leave as they are): its speed estimate is clamped to the upload cap, and
        a transfer to it is expected at no more than its download cap.
        ``download_bps`` is the first estimate of its download speed (0 = unknown:
        its upload estimate stands in, as before agents sent both).
        """
        node = self.nodes.get(node_id)
        if node is None:
            node = Node(node_id, speed_bps or self.default_speed_bps, down_bps=download_bps)
            self.nodes[node_id] = node
        if max_upload_bps is not None:
            node.max_upload_bps = max(0.0, max_upload_bps)
        if max_download_bps is not None:
            node.max_download_bps = max(0.0, max_download_bps)
        node.speed_bps = node.clamp(node.speed_bps)
        node.up = True
        node.suspect = False
        self._touch(node)
        self._sync_idle(node)
        for layer in holdings:
            self.add_holding(node_id, layer)

    def node_down(self, node_id: str) -> list[Transfer]:
        """A node is gone: it gets no new work; the transfers that cannot go on are returned.

        Aborted (and returned) are the transfers it was receiving, and those it
        was seeding to a demander that is down as well. A transfer it was
        seeding to a live demander stays active: that demander's pull fails
        by itself (the connection is gone) and its report -- or its next
        heartbeat no longer listing the transfer -- ends it. Ending it here
        would free the demand while the demander may still be pulling the
        layer, and the next seeder would send the same layer a second time.
        Its own demands stay and wait for its return.
        """
        node = self._node(node_id)
        node.up = False
        self._touch(node)
        self._sync_idle(node)
        aborted = [
            t
            for t in node.transfers.values()
            if t.demander == node_id or (t.seeder == node_id and not self.nodes[t.demander].up)
        ]
        for t in aborted:
            self._release(t)
        return aborted

    def suspect(self, node_id: str) -> None:
        """A demander could not reach ``node_id``: no new work for it until :meth:`add_node`.

        Its running transfers are left alone (it may be alive and serving
        others); it just stops being chosen, so a dead seeder is not picked
        again in the seconds before its missed heartbeats mark it down.
        """
        node = self._node(node_id)
        node.suspect = True
        self._touch(node)
        self._sync_idle(node)

    def is_suspect(self, node_id: str) -> bool:
        return self._node(node_id).suspect

    def avoid(self, demander: str, seeder: str, until: float) -> None:
        """Do not pair ``demander`` with ``seeder`` before ``until`` (a failed pair)."""
        key = (demander, seeder)
        self._avoid[key] = max(until, self._avoid.get(key, 0.0))

    def penalize(self, node_id: str, factor: float = 0.5) -> float:
        """Scale a seeder's performance down (it sent bad bytes); returns the new speed."""
        node = self._node(node_id)
        node.speed_bps = max(1.0, node.speed_bps * factor)
        self._sync_idle(node)
        return node.speed_bps

    def observe_speed(self, node_id: str, bytes_per_second: float) -> None:
        """Measured upload performance of a node (its last distribution)."""
        if bytes_per_second > 0:
            node = self._node(node_id)
            node.speed_bps = node.clamp(bytes_per_second)
            self._sync_idle(node)

    def speed(self, node_id: str) -> float:
        return self._node(node_id).speed_bps

    def set_layer_size(self, layer: str, size: int, chunk_size: int = 0) -> None:
        """Tell the scheduler how big ``layer`` is (bytes) and how it is chunked.

        ``paper`` needs neither. The capacity-aware policies plan with the size;
        ``relay`` also with the chunk size, since a relay hop forwards whole
        verified chunks (each hop adds a chunk's time to the lag).
        """
        self._pass.sizes_changing()
        if self._layers.set_size(layer, size):
            self._pass.size_set()
        self._layers.set_chunk_size(layer, chunk_size)

    def add_holding(self, node_id: str, layer: str) -> None:
        node = self._node(node_id)
        if self._layers.add_holder(node, layer):
            self._pass.holding_added(node, layer)
        if self._layers.drop_demand(node, layer):
            self._touch(node)

    def remove_holding(self, node_id: str, layer: str) -> None:
        """``node_id`` deleted ``layer`` (store eviction, or an admin removed the image).

        It is no longer a seeder of it: it leaves the layer's holders and
        idle-seeder list. Its running transfers are left alone (the callers
        refuse to remove a layer a node is seeding). Unknown nodes are ignored.
        """
        node = self.nodes.get(node_id)
        if node is None or not self._layers.remove_holder(node, layer):
            return
        self._pass.holding_removed(node, layer)

    def holds(self, node_id: str, layer: str) -> bool:
        return layer in self._node(node_id).holdings

    def holders(self, layer: str) -> list[str]:
        return sorted(self._layers.holders_of(layer))

    def holders_of(self, layer: str) -> AbstractSet[str]:
        """The nodes holding ``layer``, unsorted and not copied (view.py: the planner's)."""
        return self._layers.holders_of(layer)

    # -- demands ---------------------------------------------------------
    def demand(self, node_id: str, layer: str, job_id: str, now: float) -> bool:
        """``node_id`` needs ``layer``; False if it holds it or already asked."""
        node = self._node(node_id)
        d = self._layers.add_demand(node, layer, job_id, now)
        if d is None:
            return False
        self._pass.demand_added(node, d)
        return True

    def cancel_demand(self, node_id: str, layer: str) -> None:
        node = self.nodes.get(node_id)
        if node is not None and self._layers.drop_demand(node, layer):
            self._touch(node)

    def pending(self) -> list[tuple[str, str]]:
        """(node, layer) demands not yet satisfied, in arrival order."""
        return self._layers.pending()

    def active(self) -> list[Transfer]:
        """Every active transfer, in start order (a copy: O(transfers))."""
        return self._active.all()

    def active_for(self, node_id: str) -> list[Transfer]:
        """Active transfers ``node_id`` sends or receives, in start order; [] for an unknown node.

        Costs what it returns, so per-node hot paths (a heartbeat checking the
        transfers of one agent) need not scan every transfer of the cluster.
        """
        node = self.nodes.get(node_id)
        return list(node.transfers.values()) if node is not None else []

    def is_demanding(self, node_id: str) -> bool:
        """Whether ``node_id`` receives a transfer or waits for a layer (O(its transfers))."""
        node = self.nodes.get(node_id)
        if node is None:
            return False
        return bool(node.demands) or any(t.demander == node_id for t in node.transfers.values())

    def is_active(self, transfer_id: str) -> bool:
        return transfer_id in self._active

    def adopt(self, t: Transfer) -> Transfer:
        """Take back a transfer that is already running (e.g. from before a restart).

        It is tracked like one :meth:`schedule` started, so its outcome is
        accepted by :meth:`complete`/:meth:`fail` and, above all, no second
        transfer of the same layer is started for its demander while it runs.
        Its nodes may be down (not heard from yet). A lock (seeder sending,
        demander receiving) already held by another transfer stays with that
        one: both run, as they do in reality.
        """
        known = self._active.get(t.transfer_id)
        if known is not None:
            return known
        seeder, demander = self._node(t.seeder), self._node(t.demander)
        if t.seeder == t.demander:
            raise SchedulerError(
                f"transfer {t.transfer_id}: seeder and demander are both {t.seeder}"
            )
        self._lock(t, seeder, demander)
        self._touch(demander)
        self._sync_idle(seeder)
        return t

    def receiving(self, node_id: str, layer: str) -> Transfer | None:
        """The active transfer bringing ``layer`` to ``node_id``, if any."""
        node = self.nodes.get(node_id)
        if node is None:
            return None
        return next(
            (t for t in node.transfers.values() if t.demander == node_id and t.layer == layer),
            None,
        )

    # -- the algorithm ---------------------------------------------------
    def schedule(self, now: float) -> list[Transfer]:
        """Start every transfer the policy allows right now (avoided pairs that ran out are
        dropped first); ``paper``'s pass is :meth:`PaperPass.plan`.
        """
        if self._avoid:
            self._avoid = {k: v for k, v in self._avoid.items() if v > now}
        return self._pass.plan(now)

    def allowed(self, demander_id: str, seeder_id: str) -> bool:
        """Whether ``seeder_id`` may serve ``demander_id`` now (not itself, not avoided)."""
        return demander_id != seeder_id and (demander_id, seeder_id) not in self._avoid

    def start_transfer(
        self,
        seeder: Node,
        demander: Node,
        demand: Demand,
        now: float,
        reason: TransferReason | None = None,
        plan_hook: Callable[[Transfer], None] | None = None,
    ) -> Transfer:
        """Create and lock a transfer; a planner gives ``reason`` and books it via ``plan_hook``.

        Without a ``reason`` it is Algorithm 1's (:meth:`PaperPass.reason`), which only
        ``paper`` can give.
        """
        expected = seeder.speed_bps
        if 0 < demander.max_download_bps < expected:
            expected = demander.max_download_bps
        if reason is None:
            reason = self._pass.reason(seeder, demander, demand)
            if reason is None:
                raise SchedulerError(f"policy {self.policy!r} starts transfers with a reason")
        t = Transfer(
            transfer_id=self._new_id(),
            layer=demand.layer,
            seeder=seeder.node_id,
            demander=demander.node_id,
            job_id=demand.job_id,
            started_at=now,
            reason=reason,
            seeder_speed_bps=seeder.speed_bps,
            expected_bps=expected,
        )
        if plan_hook is not None:
            plan_hook(t)
        self._lock(t, seeder, demander)
        self._touch(demander)
        self._pass.seeder_booked(seeder)
        return t

    # -- outcomes --------------------------------------------------------
    def complete(self, transfer_id: str, now: float, bytes_moved: int = 0) -> Transfer:
        """The demander verified the layer: it becomes a seeder of it.

        ``bytes_moved`` over the time since the transfer started is the
        seeder's measured speed from now on.
        """
        t = self._get(transfer_id)
        seconds = now - t.started_at
        if not self._pass.completed(t, now, bytes_moved) and bytes_moved > 0 and seconds > 0:
            rate = bytes_moved / seconds
            demander = self.nodes.get(t.demander)
            cap = demander.max_download_bps if demander is not None else 0.0
            if cap > 0 and rate >= 0.8 * cap:
                # the demander's own cap set the pace: this says little about the
                # seeder, except that it is at least this fast
                rate = max(rate, self._node(t.seeder).speed_bps)
            self.observe_speed(t.seeder, rate)
        self._release(t)
        self.add_holding(t.demander, t.layer)
        return t

    def fail(self, transfer_id: str) -> Transfer:
        """The transfer broke: both sides are free; the demand waits for a seeder again."""
        t = self._get(transfer_id)
        self._pass.failed(t)
        self._release(t)
        return t

    def _get(self, transfer_id: str) -> Transfer:
        t = self._active.get(transfer_id)
        if t is None:
            raise SchedulerError(f"no active transfer {transfer_id!r}")
        return t

    # -- bookkeeping -----------------------------------------------------
    def _lock(self, t: Transfer, seeder: Node, demander: Node) -> None:
        self._active.lock(t, seeder, demander)
        self._pass.started(t)

    def _release(self, t: Transfer) -> None:
        if not self._active.forget(t):
            return
        self._pass.ended(t)
        seeder, demander = self.nodes[t.seeder], self.nodes[t.demander]
        self._active.unlock(t, seeder, demander)
        self._touch(demander)
        self._sync_idle(seeder)

    def _touch(self, node: Node) -> None:
        """``node``'s standing as a demander changed: its version moves, the policy re-ranks it."""
        node.version += 1
        self._pass.demander_changed(node)

    def _sync_idle(self, node: Node) -> None:
        """``node``'s standing as a seeder changed (speed, up, sending): the policy re-ranks it."""
        self._pass.seeder_changed(node)

    def _node(self, node_id: str) -> Node:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise SchedulerError(f"unknown node {node_id!r}") from None
