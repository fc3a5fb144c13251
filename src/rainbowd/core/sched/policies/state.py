"""The planner's state: its constants, what it reserved per transfer, and its base class.

Why a file of its own: every concern of the planner (seeders.py, demanders.py,
fit.py, walk.py, planner.py) reads and writes the same reservations and
indexes; they live here, in one ``__init__``, so no concern owns another's
state. The rules these serve are described in rules.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from ...chunks import DEFAULT_CHUNK_SIZE
from ..waiting import Hope, WaitIndex
from .peers import PulledFrom

if TYPE_CHECKING:
    from ..records import Node
    from ..view import SchedulerView
    from .rules import Rules

#: a transfer shorter than this says more about set-up delays than about link speed
MIN_OBSERVE_S = 1.0
#: layers of unknown size count as this many bytes in a demander's need
UNKNOWN_LAYER_BYTES = 8 * 1024 * 1024
#: a seeder with less free upload than this share of its speed takes no new upload
_MIN_FREE_SHARE = 0.02
#: no bound yet (a layer no node holds has no fastest holder; no demander was met)
INF = float("inf")
#: a waiting demander's keys: by speed (its rank step, then its need), by need, the
#: layers it waits for, and by when it is late by its own bound (None: own_urgent off)
_SpeedKey = tuple[float, float, str]
_K = TypeVar("_K", tuple[float, str], _SpeedKey)
_WaitKey = tuple[_SpeedKey, tuple[float, str], tuple[str, ...], tuple[float, str] | None]
#: failures in a row after which a seeder's estimate is halved (each further one halves it again)
FAILURES_TO_SLOW = 2
#: what each failure from the FAILURES_TO_SLOW-th on multiplies a seeder's estimate by
FAILED_FACTOR = 0.5
#: the least achieved/planned ratio one observation counts as: a transfer that crawled
#: (a stall, a sleeping laptop) moves the estimate towards 5 % of it at most, never to 0
MIN_OBSERVED_RATIO = 0.05
#: no estimate or planned rate is below this (bytes/s): they divide sizes and rates
MIN_SPEED_BPS = 1.0
#: a reservation below this (bytes/s) is float dust from adding and taking back rates
RESERVED_DUST_BPS = 1e-6
#: free holders (and relays) of a layer best fit looks at for one demander: past the ones
#: ``avoid`` keeps from it (a handful at most) any would do, and looking further costs
#: every walk
FIT_TRIES = 8
#: free holders (and relays) of a layer looked through for a seeder the demander already
#: pulled from (rules.py, known peers): a wider window than FIT_TRIES, since a known one
#: usually sits a few places from the tightest fit (simulator, lab-cost paper x0.25: 32
#: against 8, 91.4 against 91.6 s)
PEER_TRIES = 32
#: the fastest free holders of a small layer the direct rule asks (its seeder must send
#: the layer's fan-out within direct_s; if none of the fastest can, slower ones cannot)
DIRECT_TRIES = 4
#: the horizon's setter (Rules.setter_guard) takes only a piece this many nodes hold in
#: full: never one whose only copy is its first seeder's (the origin's, in a job's
#: ramp), which the fast nodes are to spread. Served from the start without it, the
#: setter took two of the origin's pieces at 0 s (ci: the fast nodes' median end 0.90
#: -> 1.55 s), and 13 of its 97 pieces from the origin where the origin binds every
#: node (random-asymmetric: median slowdown 2.01 -> 2.80; with it 2.67, and the guard
#: of 0.18 takes it back to 2.01: bench/RESULTS.md, session 38)
SETTER_HOLDERS = 2
#: starving checks per patience: a demander is found starving at most patience_s / this late
STARVE_CHECKS_PER_PATIENCE = 2
#: the least rate a transfer is planned at (unless the fastest holder of its layer, or the
#: demander's free download, has less): twice the agent's MIN_CHUNK_RATE_BPS
#: (agent/dataplane/puller.py), below which a pull gives up on a chunk. Without it a seeder with 2 %
#: of its upload free took a transfer at that 2 %: 1 KB/s for a 4 MiB chunk
MIN_TRANSFER_BPS = 32 * 1024
#: what joins a layer's digest and a piece's first chunk in the piece's scheduling key
#: (rainbowd.core.sched.pieces); a whole layer's key, its digest, has none
PIECE_MARK = "#"
#: seconds between two sums of the cluster's upload (Planner._upload_bound_s); the sum walks
#: every node, and speeds move slowly against this
_UPLOAD_RESUM_S = 1.0
#: fixed seconds one relay hop is planned to add beyond a chunk's wire time: the relay's
#: wake-up, its serve-side check, the demander's check and write. A margin, not the
#: measurement: the lab's first-round chains now show 5-43 ms (bench/sim/calibrate.py),
#: but hops on a loaded host cost more, and at 10,000 simulated nodes planning with
#: 0.15 s did better than with 0.05 s (1.40 against 1.42 x T*; bench/RESULTS.md)
RELAY_HOP_S = 0.15


@dataclass
class _Plan:
    """What the planner reserved for one active transfer."""

    up: float  # of the seeder's upload
    down: float  # of the demander's download
    planned: float  # the rate it was planned at (bytes/s)
    seeder_limited: bool  # the seeder's free upload set that rate
    direct: bool = False  # a small layer sent directly (reserves nothing)
    urgent: bool = False  # planned for an urgent demander (counts against urgent_share)
    #: seconds the demander's chunks trail what a complete holder would send it: a hop per
    #: relay on the way (0 when the seeder holds the layer)
    lag: float = 0.0


class PlannerState:
    """What the planner keeps between calls, and the sizes and room it reads of a node.

    The base of the planner's classes (seeders.py -> demanders.py -> fit.py -> merge.py
    -> walk.py -> planner.py): each adds one concern over the same state.
    """

    def __init__(self, rules: Rules, scheduler: SchedulerView) -> None:
        self.rules = rules
        self._s = scheduler
        self._up_used: dict[str, float] = {}
        self._down_used: dict[str, float] = {}
        self._urgent_used: dict[str, float] = {}  # seeder -> upload reserved for urgent ones
        self._direct_bytes: dict[str, int] = {}  # seeder -> bytes of direct transfers in flight
        self._plans: dict[str, _Plan] = {}
        # demander -> the seeders it pulled from, whose connections it keeps (known peers)
        self._pulled_from = PulledFrom()
        self._receiving: dict[str, int] = {}  # layer -> transfers of it in flight
        self._failures: dict[str, int] = {}  # seeder -> failures in a row
        self._prior: dict[str, float] = {}  # node -> its first speed estimate (the hint)
        # layer -> holders with free upload, sorted by (-free upload, node id)
        self._free: dict[str, list[tuple[float, str]]] = {}
        self._seed_key: dict[str, tuple[float, str]] = {}
        # layer -> the fastest speed any holder of it had when it became one: min_share is
        # taken of min(demander speed, this), so a demander faster than every holder
        # (a huge hint, a capped origin) is not starved waiting for a seeder that cannot exist
        self._fastest_holder: dict[str, float] = {}
        # layer -> relays of it (receiving it, free upload), sorted by (-relay rate, node id)
        self._relays: dict[str, list[tuple[float, str]]] = {}
        self._relay_keys: dict[str, dict[str, tuple[float, str]]] = {}  # node -> layer -> key
        # waiting demanders (free download, a wanted layer not in flight), per layer they want
        # layer -> sorted (-rank step, -need s, id); rainbowd.core.sched.waiting: in blocks,
        # with bounds on the values below, so a walk steps over demanders no seeder could serve
        self._hopes: dict[str, Hope] = {}  # waiting demander -> what decides if it can be served
        self._by_speed: dict[str, WaitIndex[_SpeedKey]] = {}
        # every waiting demander's (-need s, id), sorted: the slack walk's (Walker._urgent),
        # one list, not one per layer, for the reason _by_own below is (session 34: kept per
        # piece, its upkeep was a tenth of the scheduler's time on drawn-2 at 1,000 nodes)
        self._by_need: list[tuple[float, str]] = []
        self._wait_key: dict[str, _WaitKey] = {}
        # own_urgent (DemanderIndex._own_key): demander -> (the latest it should end, since
        # + own_urgent x its own bound; that bound, s); every waiting demander's sorted (that
        # deadline - the seconds it needs at its full download, id): the own-bound urgent
        # walk's (Walker._late), one list, not one per layer: a node's key is the same in
        # every layer it wants (session 31: kept per piece, drawn-2's walk spent 22 % of its
        # time at 300 nodes merging the hundreds of copies of each late node's key)
        self._own: dict[str, tuple[float, float]] = {}
        self._by_own: list[tuple[float, str]] = []
        # demander -> ((its demands then, its download then, _sums_epoch then), (bytes it
        # wanted, its own bound s, its earliest demand)): DemanderIndex._demand_sums
        self._sums: dict[str, tuple[tuple[int, float, int], tuple[float, float, float]]] = {}
        self._sums_epoch = 0  # moves when a holder or a layer's size changes
        # the waiting demanders in the order they last began to wait (the starving check's
        # order), kept at once; the re-keying of the indexes above waits for the next walk
        # (demanders.py, :meth:`DemanderIndex.flush`): demanders -> their record
        self._waiting: dict[str, None] = {}
        self._stale: dict[str, Node] = {}
        self._walking = False  # inside plan(): every change is re-keyed at once
        self._begun = 0  # transfers planned so far (a walk's bar is re-taken after each)
        self._horizon = 0.0  # latest planned finish of a current demander (slack rule)
        self._horizon_setter = ""  # the demander whose planned finish set it
        self._horizon_second = 0.0  # the latest planned finish of any other demander
        self._upload_bound = 0.0  # _upload_bound_s as last summed
        self._upload_summed_at = -INF  # when it was summed
        self._starve_check_at = 0.0  # when _starving next walks the waiting demanders
        # demander -> when _starving first saw it waiting with nothing in flight (patience
        # counts from there, not from its demand: a node that just finished a piece of a
        # job an hour old has not waited an hour)
        self._idle_seen: dict[str, float] = {}
        #: waiting demander -> when it began to wait, by the planner's clock (wait_credit)
        self._wait_since: dict[str, float] = {}
        #: the latest time the planner was told (a plan's, a completion's, a demand's)
        self._clock = 0.0

    def free_up(self, node: Node) -> float:
        return node.speed_bps - self._up_used.get(node.node_id, 0.0)

    def free_down(self, node: Node) -> float:
        """Download room: its speed estimate, or its configured download cap if lower."""
        return _down_speed(node) - self._down_used.get(node.node_id, 0.0)

    def _size(self, layer: str) -> int:
        return self._s.layer_sizes.get(layer) or UNKNOWN_LAYER_BYTES

    def _chunk_size(self, layer: str) -> int:
        return self._s.layer_chunks.get(layer, DEFAULT_CHUNK_SIZE)

    def _one_chunk(self, layer: str) -> bool:
        return self._size(layer) <= self._chunk_size(layer)

    def _tiny(self, layer: str) -> bool:
        """A layer rarest first leaves last: a copy of it costs a round trip (fit.py, _scarcity).

        A whole layer of one chunk; where layers are split into pieces, also no bigger
        than a piece. A one-chunk *piece* of a split layer, or a one-chunk layer of
        megabytes (4 MiB chunks), is as scarce as any other piece.
        """
        if not self._one_chunk(layer):
            return False
        if self.rules.piece_bytes <= 0:
            return True
        return PIECE_MARK not in layer and self._size(layer) <= self.rules.piece_bytes

    def _copies(self, layer: str) -> int:
        """Holders of ``layer`` plus transfers of it in flight (rarest first)."""
        return len(self._s.holders_of(layer)) + self._receiving.get(layer, 0)

    def _need_s(self, node: Node) -> float:
        """Seconds ``node`` needs to download all it still lacks (in flight included)."""
        return sum(self._size(lr) for lr in node.demands) / _down_speed(node)


def _down_speed(node: Node) -> float:
    """What ``node`` can download at: its speed estimate, or its download cap if lower.

    Shares of a demander's speed (min_share, room) are taken of this: a capped
    demander must not wait for room it can never have.
    """
    cap = node.max_download_bps
    down = node.down_bps or node.speed_bps
    return min(down, cap) if cap > 0 else down
