"""The scheduler's records: a transfer, a node, a demand.

Why a module of their own: the scheduler (scheduler.py) keeps these records
and its capacity-aware policies (policies/) read them, through the narrow
view of view.py. Kept beside both rather than in the scheduler, so the
policies never import the scheduler and the two form no import cycle.
:class:`Transfer` is also the one record of a transfer from the scheduler to
the coordinator's state file (ARCHITECTURE.md, "Its records").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from ..wirebounds import Digest, Finite, Name
from .reasons import TransferReason

#: a seeder's place in Algorithm 1's idle-holder lists: faster first, then by node id
SeederKey = tuple[float, str]


class Transfer(msgspec.Struct):
    """One layer (or piece of it) moving from ``seeder`` to ``demander``: the transfer record.

    The one record of a transfer's identity and plan from the scheduler to the
    state file: the scheduler creates it, the coordinator's dispatch tracks it
    (``Tracked`` adds only its own lifecycle fields), the state store persists it
    as it is (``StateStore.save_transfer``), and the demander's
    ``TransferAssignment`` is derived from it in one place
    (``rainbowd.coordinator.piece_wire.assignment_for``). A msgspec struct, not a
    dataclass, so that store can decode and bound-check a stored row as this very
    type: the field types are the bounded wire types (rainbowd.core.wirebounds),
    which msgspec checks only when decoding, never when the scheduler builds one.
    """

    transfer_id: Name
    layer: Digest  # the layer's digest (inside PieceScheduler's inner scheduler: a piece key)
    seeder: Name
    demander: Name
    job_id: Name
    started_at: Finite
    reason: TransferReason  # why this seeder: the rule and its numbers (reasons.py)
    seeder_speed_bps: Finite
    #: the rate the demander is expected to receive at: the seeder's speed, capped by
    #: the demander's configured download limit (0 = not computed: taken back from an agent)
    expected_bps: Finite = 0.0
    #: the chunks it moves, [first_chunk, end_chunk) of the layer; end_chunk 0 = the whole
    #: layer (a piece of a split layer otherwise: rainbowd.core.sched.pieces)
    first_chunk: int = 0
    end_chunk: int = 0


@dataclass
class Demand:
    """``node_id`` needs ``layer`` for ``job_id`` since ``since``; ``seq`` orders demands."""

    node_id: str
    layer: str
    job_id: str
    since: float
    seq: int


@dataclass
class Node:
    """A node as the scheduler sees it: speeds, caps, holdings, demands, what is in flight.

    The scheduler keeps these; a policy reads them (view.py), and the planner moves
    ``speed_bps`` (its estimate) when a transfer it planned ends or fails.
    """

    node_id: str
    speed_bps: float
    up: bool = True
    suspect: bool = False  # unreachable for a demander; no new work until it reports
    holdings: set[str] = field(default_factory=set)
    sending: str | None = None  # transfer id while seeding
    receiving: str | None = None  # transfer id while demanding
    # -- indexes (scheduler.py's and paper.py's module docstrings, "Cost") --
    # layer -> its open demand, in arrival order (= image layer order)
    demands: dict[str, Demand] = field(default_factory=dict)
    # layer -> active transfers bringing it here (more than one only through adopt)
    pulling: dict[str, int] = field(default_factory=dict)
    # active transfers it sends or receives, in start order
    transfers: dict[str, Transfer] = field(default_factory=dict)
    # bumped whenever its standing as a waiting demander changes: older heap entries are stale
    version: int = 0
    # its key in the idle-holder lists of its layers; None while it cannot seed
    idle_key: SeederKey | None = None
    # configured caps (0 = none): its speed estimate never exceeds its upload cap
    max_upload_bps: float = 0.0
    max_download_bps: float = 0.0
    #: its download estimate (bytes/s); 0 = unknown: taken to be its upload speed, the one
    #: number older agents report (links are often asymmetric, so agents now send both)
    down_bps: float = 0.0

    def clamp(self, bps: float) -> float:
        """``bps`` as an upload speed of this node: never above its configured cap."""
        return min(bps, self.max_upload_bps) if self.max_upload_bps > 0 else bps

    @property
    def free_demander(self) -> bool:
        return self.up and not self.suspect and self.receiving is None

    @property
    def free_seeder(self) -> bool:
        return self.up and not self.suspect and self.sending is None

    def first_wanted(self) -> Demand | None:
        """Its longest-waiting demand not already in flight (it ranks the node as a demander)."""
        return next((d for layer, d in self.demands.items() if layer not in self.pulling), None)
