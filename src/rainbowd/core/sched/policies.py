"""Capacity-aware scheduling policies (everything but ``paper``), behind :class:`Scheduler`.

Why: on a mixed cluster the bound T* (PAPER.md, "The physical limit") is
usually set by the slowest *download*, while Algorithm 1 lets one seeder
serve one demander at a time and treats a 4 Mbit/s node like a 32 Mbit/s one.
Most upload capacity then sits idle and the slowest nodes start last. The
policies here plan with *bandwidth*, not with locks:

* **slots** -- a transfer reserves a rate, ``min(seeder's free upload,
  demander's free download)``; a seeder runs as many uploads as its estimated
  capacity covers, and a demander pulls several layers at once from different
  seeders while its download has room. A new transfer must get at least
  ``min_share`` of the demander's speed, so slow seeders are not handed fast
  demanders (they would hold the layer hostage for its whole length).
* **best fit** -- a demander takes the seeder whose free upload covers its
  free download most tightly (or, if none covers it, the one with most room),
  so big free uploads stay for fast demanders.
* **fastest-node-first** -- demanders are served in order of speed, so
  seeding capacity grows fastest. With ``rank_step`` speeds within one
  geometric step tie, and a tie goes to the demander lacking most: on equal
  nodes the first pieces then spread over nodes with idle uploads, which pass
  them on at once, instead of one node taking every fresh piece in turn
  (simulator, homogeneous profile at 100 nodes: 1.78 -> 1.71 x T*;
  upload-bound, where the origin fed the fastest node piece after piece:
  1.51 -> 1.49 x with ``upload_urgent``).
* **least slack first** -- a node whose remaining bytes over its speed come
  close to the horizon (the latest any current demander could finish,
  ``since + need * (1 + margin)``) is *urgent* and goes before everyone else:
  the slowest downloads decide T*, so they must start early, and they take
  little of a seeder's upload. Where the *upload* sets T* the downloads alone
  put the horizon too near and every node looks urgent within seconds; with
  ``upload_urgent`` the cut is at least that share of the seconds the whole
  cluster's upload needs for every open demand (``Planner._upload_bound_s``).
* **stripe** -- while a demander has more to ask for, a transfer that is
  short at full rate reserves only ``stripe`` of its download, so two run side
  by side and each covers the other's set-up and report gap
  (``Planner._reserve_down``).
* **direct** -- a layer so small that a seeder can send it to many demanders
  within ``direct_s`` seconds goes straight from that seeder to all of them at
  once, reserving nothing (the DID crossover: a tree only adds hops).
* **cut-through relay** (``relay``) -- a node with an active incoming transfer
  of layer L is a *relay* holder of L: it may seed L while still receiving it,
  at no more than its inbound transfer's planned rate and its free upload (the
  agent serves chunks as they land; agent/dataplane/relay.py). Store-and-forward costs
  one whole layer time per level of the tree; a relay adds only a chunk. A
  complete holder that covers the demander's free download is still taken
  first (it cannot stall); then the tightest-fitting relay; then the most
  room of either. A hop forwards whole verified chunks, so each one adds a
  chunk's time on the link *into* the relay plus a fixed cost
  (``RELAY_HOP_S``) to how far the last node of a chain trails a complete
  copy: a relay is offered only while that lag stays within the lag budget.
  Without the bound best fit builds one long chain (each node's upload
  exactly covers the next node's download): in the lab a 100-hop chain left
  the tail waiting 20 s for its first chunk. The budget is ``relay_lag_s`` up
  to 100 nodes and one more ``relay_lag_s`` per tenfold beyond (``log10(nodes)
  - 1`` times it): between chains the layer is stored and forwarded, so a
  deeper chain per generation means fewer generations. (Simulator, paper
  profile with 64 KiB chunks, budget at 10,000 nodes: 3 s gave 1.53 x T*,
  4 s 1.46 x, 5 s 1.47 x; at 100 nodes 1.5 s gave 1.06 x and 2 s 1.10 x.)
  Small chunks shorten every hop: the slow nodes' chains (a 256 KiB chunk
  takes 0.5 s at 4 Mbit/s) went from 1.62 to 1.53 x T* at 10,000 nodes with
  64 KiB, the same budget; with this budget 256 / 128 / 64 KiB give 1.61 /
  1.51 / 1.47 x.
* **rarest layer first** -- a demander asks for the layer with the fewest
  copies (holders plus transfers in flight) before the others. Every node
  wants the image's layers in the same order; without this the origin spends
  its upload on the first layer while the big one waits there alone (in the
  simulator at 1,000 nodes, with least slack first, the 8 MB layer had 2
  holders at 8.5 s while the 2 MB one had 993).
* **measured speeds** -- a completed transfer that ran ``MIN_OBSERVE_S`` or
  longer moves the estimate of the side that limited it (EWMA of achieved /
  planned rate); repeated failures halve a seeder's estimate, so slow or
  failing peers drop out of ``min_share`` and best fit.

``fastest`` keeps Algorithm 1's locks (one upload, one download per node)
and changes only the demander order: it isolates that one rule.

The planner keeps standing indexes so a :meth:`Planner.plan` call costs about
the transfers it starts: per layer, the holders with free upload sorted by
free upload; the waiting demanders sorted by speed and by need. It reads the
scheduler's node records (holdings, demands, what is in flight) and starts
transfers through it, so every other rule of :class:`~rainbowd.core.sched.scheduler.Scheduler`
(avoided pairs, suspects, adopt, node down) holds unchanged.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from ..chunks import DEFAULT_CHUNK_SIZE
from .waiting import CLOSED, Admits, Bar, Hope, WaitIndex

if TYPE_CHECKING:
    from .scheduler import Scheduler, Transfer, _Demand, _Node

#: a transfer shorter than this says more about set-up delays than about link speed
MIN_OBSERVE_S = 1.0
#: layers of unknown size count as this many bytes in a demander's need
UNKNOWN_LAYER_BYTES = 8 * 1024 * 1024
#: a seeder with less free upload than this share of its speed takes no new upload
_MIN_FREE_SHARE = 0.02
INF = float("inf")
URGENT = "urgent"
#: a waiting demander's keys: by speed (its rank step, then its need), by need, and the
#: layers it waits for
_SpeedKey = tuple[float, float, str]
_K = TypeVar("_K", tuple[float, str], _SpeedKey)
_WaitKey = tuple[_SpeedKey, tuple[float, str], tuple[str, ...]]
#: failures in a row after which a seeder's estimate is halved (each further one halves it again)
FAILURES_TO_SLOW = 2
#: the least rate a transfer is planned at (unless the fastest holder of its layer, or the
#: demander's free download, has less): twice the agent's MIN_CHUNK_RATE_BPS
#: (agent/dataplane/puller.py), below which a pull gives up on a chunk. Without it a seeder with 2 %
#: of its upload free took a transfer at that 2 %: 1 KB/s for a 4 MiB chunk
MIN_TRANSFER_BPS = 32 * 1024
#: seconds between two sums of the cluster's upload (Planner._upload_bound_s); the sum walks
#: every node, and speeds move slowly against this
_UPLOAD_RESUM_S = 1.0
#: fixed seconds one relay hop is planned to add beyond a chunk's wire time: the relay's
#: wake-up, its serve-side check, the demander's check and write. A margin, not the
#: measurement: the lab's first-round chains now show 5-43 ms (bench/sim/calibrate.py),
#: but hops on a loaded host cost more, and at 10,000 simulated nodes planning with
#: 0.15 s did better than with 0.05 s (1.40 against 1.42 x T*; bench/RESULTS.md)
RELAY_HOP_S = 0.15


@dataclass(frozen=True)
class Rules:
    """One policy: which of the planner's rules it uses (module docstring)."""

    name: str
    summary: str
    slots: bool = True  # several uploads per seeder / downloads per demander, by rate
    slack_margin: float | None = None  # least slack first with this margin; None = off
    urgent_share: float = 0.25  # most of a seeder's upload that urgent demanders may take
    min_share: float = 0.5  # least rate a new transfer gets, as a share of the demander's speed
    direct_s: float = 0.0  # direct rule: seconds a seeder may spend on small layers; 0 = off
    ewma: float = 0.0  # weight of one observation in the speed estimate; 0 = off
    #: seconds a demander with nothing in flight waits for a seeder meeting min_share;
    #: after that any seeder will do (min_share is for speed, never for starvation)
    patience_s: float = 5.0
    #: a demander found starving (``patience_s``) takes every seeder that fits, until its
    #: download is full, not one transfer per starving check (Planner._feed_starving)
    starve_fill: bool = False
    relay: bool = False  # cut-through: nodes still receiving a layer may seed it (needs slots)
    #: most seconds the end of a relay chain may trail a complete copy (first chunk's lag)
    relay_lag_s: float = 2.0
    #: a demander asks first for the layer with the fewest copies (holders + in flight)
    rarest_first: bool = False
    #: urgent only once waiting longer would miss the horizon: need * (1 + guard) >= horizon - now
    #: (None: the slack margin itself, which makes the slowest demanders urgent from the start)
    urgent_guard: float | None = None
    #: a slow seeder may feed a demander whose other open demands keep it busy longer than the
    #: transfer takes: the least rate is also at most size / (the demander's need in seconds)
    need_share: bool = False
    #: what ranks waiting demanders ("fastest first"): "down" (its download), "min" (the
    #: lower of its upload and download: how fast it can pass the image on)
    rank: str = "down"
    #: split layers into pieces of about this many bytes (whole chunks; 0 = whole layers), so
    #: several seeders feed one demander and partial holders seed (rainbowd.core.sched.pieces)
    piece_bytes: int = 0
    #: with piece_bytes: split each layer into about this many pieces instead, where that
    #: gives pieces larger than piece_bytes (a piece's time is then a small share of the
    #: layer's, whatever the image's size; 0 = piece_bytes alone)
    layer_pieces: int = 0
    #: demanders whose ranks lie within this geometric step tie (0 = exact ranks), and ties
    #: go to the one lacking most (Planner._rank_step)
    rank_step: float = 0.0
    #: the slack rule's cut is at least this share of the seconds the cluster's whole upload
    #: needs for every open demand (0 = off): where the upload binds, nobody is urgent in the
    #: first seconds, and near the end the nodes lacking most go first before their own
    #: download becomes the bound (Planner._upload_bound_s)
    upload_urgent: float = 0.0
    #: most share of a demander's download one transfer reserves while the demander has more
    #: to ask for and the transfer would take under ``stripe_s`` at full rate (1 = no cap):
    #: two short transfers in flight overlap each other's set-up and report gaps
    #: (Planner._reserve_down)
    stripe: float = 1.0
    #: pieces taking longer than this at full rate are not striped (see ``stripe``)
    stripe_s: float = 0.0


RULES: dict[str, Rules] = {
    r.name: r
    for r in (
        Rules(
            "fastest",
            "Algorithm 1's locks, demanders fastest first",
            slots=False,
            min_share=0.0,
        ),
        Rules(
            "slots",
            "uploads sized to capacity, several layers per demander, best fit, fastest first",
        ),
        Rules(
            "relay",
            "slots + cut-through relay (lag-bounded) + rarest layer first + least slack first",
            relay=True,
            min_share=0.8,
            relay_lag_s=1.5,
            patience_s=15.0,
            rarest_first=True,
            slack_margin=0.3,
            urgent_share=0.25,
        ),
        Rules(
            "swarm",
            "relay over pieces: several seeders per layer, slow uploads used, urgent only at need",
            relay=True,
            min_share=0.5,
            relay_lag_s=1.5,
            patience_s=5.0,
            rarest_first=True,
            slack_margin=0.2,
            urgent_guard=0.05,
            urgent_share=1.0,
            need_share=True,
            rank="min",
            rank_step=0.5,
            upload_urgent=0.6,
            starve_fill=True,
            stripe=0.5,
            stripe_s=2.0,
            piece_bytes=512 * 1024,
            layer_pieces=16,
        ),
        Rules(
            "deadline",
            "slots + least slack first + direct small layers + measured speeds (EWMA)",
            slack_margin=0.3,
            urgent_share=0.5,
            direct_s=0.5,
            ewma=0.5,
        ),
    )
}


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


class Planner:
    """The capacity-aware planner behind one :class:`Scheduler` (see the module docstring)."""

    #: a walk steps over waiting demanders that cannot clear the bar (rainbowd.core.sched.waiting);
    #: off, it asks every one, as before (tests compare the two)
    skip_hopeless = True
    #: ... once more demanders wait than this many times the layers they wait for: the bar
    #: is a sum over those layers, re-taken after each transfer planned, and asking a few
    #: demanders costs less (many-small at 100 nodes, 40 layers in ~100 pieces: 1.4 x the
    #: CPU time with the bar always on; upload-bound at 1,000, 21 pieces: 179 -> 29 s)
    skip_from = 1.0

    def __init__(self, rules: Rules, scheduler: Scheduler) -> None:
        self.rules = rules
        self._s = scheduler
        self._up_used: dict[str, float] = {}
        self._down_used: dict[str, float] = {}
        self._urgent_used: dict[str, float] = {}  # seeder -> upload reserved for urgent ones
        self._direct_bytes: dict[str, int] = {}  # seeder -> bytes of direct transfers in flight
        self._plans: dict[str, _Plan] = {}
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
        # layer -> sorted (-need s, id): the urgent walk's, short (only the urgent are met)
        self._by_need: dict[str, list[tuple[float, str]]] = {}
        self._wait_key: dict[str, _WaitKey] = {}
        self._begun = 0  # transfers planned so far (a walk's bar is re-taken after each)
        self._horizon = 0.0  # latest planned finish of a current demander (slack rule)
        self._upload_bound = 0.0  # _upload_bound_s as last summed
        self._upload_summed_at = -INF  # when it was summed
        self._starve_check_at = 0.0  # when _starving next walks the waiting demanders
        # demander -> when _starving first saw it waiting with nothing in flight (patience
        # counts from there, not from its demand: a node that just finished a piece of a
        # job an hour old has not waited an hour)
        self._idle_seen: dict[str, float] = {}

    # -- indexes ---------------------------------------------------------
    def refresh(self, node: _Node) -> None:
        """Re-key ``node`` as a seeder and as a demander after any change to it."""
        self._refresh_seeder(node)
        self._refresh_demander(node)

    def holding_added(self, node: _Node, layer: str) -> None:
        self._fastest_holder[layer] = max(self._fastest_holder.get(layer, 0.0), node.speed_bps)
        key = self._seed_key.get(node.node_id)
        if key is not None:
            insort(self._free.setdefault(layer, []), key)

    def holding_removed(self, node: _Node, layer: str) -> None:
        """``node`` deleted ``layer``: it leaves the layer's free holders (it cannot seed it)."""
        key = self._seed_key.get(node.node_id)
        idle = self._free.get(layer)
        if key is not None and idle:
            i = bisect_left(idle, key)
            if i < len(idle) and idle[i] == key:
                del idle[i]
        # min_share is taken of the fastest holder: one that is gone must not count
        # (a demander would wait for a seeder that no longer exists)
        rest = [
            self._s._nodes[h].speed_bps
            for h in self._s._holders.get(layer, ())
            if h != node.node_id
        ]
        if rest:
            self._fastest_holder[layer] = max(rest)
        else:
            self._fastest_holder.pop(layer, None)

    def demand_added(self, node: _Node, demand: _Demand) -> None:
        if self.rules.slack_margin is not None:
            total = sum(self._size(lr) for lr in node.demands)
            finish = demand.since + total / _down_speed(node) * (1 + self.rules.slack_margin)
            self._horizon = max(self._horizon, finish)
        self._refresh_demander(node)

    def free_up(self, node: _Node) -> float:
        return node.speed_bps - self._up_used.get(node.node_id, 0.0)

    def free_down(self, node: _Node) -> float:
        """Download room: its speed estimate, or its configured download cap if lower."""
        return _down_speed(node) - self._down_used.get(node.node_id, 0.0)

    def _refresh_seeder(self, node: _Node) -> None:
        nid = node.node_id
        self._prior.setdefault(nid, node.speed_bps)
        free = self.free_up(node)
        seeds = node.up and not node.suspect
        if not self.rules.slots:
            seeds = seeds and not self._up_used.get(nid)
        want = (-free, nid) if seeds and free >= _MIN_FREE_SHARE * node.speed_bps else None
        if self.rules.relay:
            self._refresh_relay(node, free, seeds)
        have = self._seed_key.get(nid)
        if want == have:
            return
        for layer in node.holdings:
            self._fastest_holder[layer] = max(self._fastest_holder.get(layer, 0.0), node.speed_bps)
            idle = self._free.setdefault(layer, [])
            if have is not None:
                del idle[bisect_left(idle, have)]
            if want is not None:
                insort(idle, want)
        if want is None:
            self._seed_key.pop(nid, None)
        else:
            self._seed_key[nid] = want

    def _refresh_relay(self, node: _Node, free: float, seeds: bool) -> None:
        """Re-key ``node`` as a relay of each layer it is receiving (and does not hold)."""
        nid = node.node_id
        want: dict[str, tuple[float, str]] = {}
        if seeds:
            for t in node.transfers.values():
                if t.demander != nid or t.layer in node.holdings:
                    continue
                plan = self._plans.get(t.transfer_id)
                if plan is None or plan.direct:
                    continue
                if self._one_chunk(t.layer):
                    continue  # a relay forwards whole chunks: of one chunk, only the hop's cost
                if plan.lag + self.hop_s(t.layer, plan.planned) > self.lag_budget():
                    continue  # one more hop would trail too far behind (module docstring)
                rate = min(free, plan.planned)
                if rate >= _MIN_FREE_SHARE * node.speed_bps:
                    key = (-rate, nid)
                    if key < want.get(t.layer, (0.0, "")):
                        want[t.layer] = key
        have = self._relay_keys.get(nid, {})
        if want == have:
            return
        for layer, key in have.items():
            relays = self._relays[layer]
            del relays[bisect_left(relays, key)]
            if not relays:
                del self._relays[layer]
        for layer, key in want.items():
            insort(self._relays.setdefault(layer, []), key)
        if want:
            self._relay_keys[nid] = want
        else:
            self._relay_keys.pop(nid, None)

    def lag_budget(self) -> float:
        """Seconds a relay chain's tail may trail a complete copy (module docstring)."""
        return self.rules.relay_lag_s * max(1.0, math.log10(max(len(self._s._nodes), 1)) - 1)

    def hop_s(self, layer: str, rate: float) -> float:
        """Seconds one hop at ``rate`` adds to a chain's lag: a chunk's wire time + fixed cost."""
        return self._chunk_size(layer) / max(rate, 1.0) + RELAY_HOP_S

    def relay_rate(self, node: _Node, layer: str) -> float:
        """The rate ``node`` can relay ``layer`` at (0: it is not a relay of it)."""
        key = self._relay_keys.get(node.node_id, {}).get(layer)
        return -key[0] if key is not None else 0.0

    def _seedable(self, layer: str) -> bool:
        """Some holder (or relay) of ``layer`` has free upload."""
        return bool(self._free.get(layer)) or bool(self._relays.get(layer))

    def _best_free(self, layer: str) -> float:
        """The largest free upload (relay rate) any seeder of ``layer`` offers."""
        return max(-lst[0][0] for lst in (self._free.get(layer), self._relays.get(layer)) if lst)

    def _rank(self, node: _Node) -> float:
        """How fast ``node`` is as a demander (``rank`` rule: fastest first)."""
        down = _down_speed(node)
        return down if self.rules.rank == "down" else min(down, node.speed_bps)

    def _rank_step(self, node: _Node) -> float:
        """:meth:`_rank` rounded down to a ``rank_step`` (geometric), so near-equal nodes tie.

        Ties go to the demander that lacks the most (its need in seconds): on a
        cluster of equal nodes the first transfers then spread over nodes that
        have nothing yet, so each new holder has an idle upload to pass on what
        it receives, instead of one node taking every fresh piece in turn.
        """
        rank = self._rank(node)
        step = self.rules.rank_step
        if step <= 0 or rank <= 0:
            return rank
        return (1 + step) ** math.floor(math.log(rank, 1 + step))

    def _refresh_demander(self, node: _Node) -> None:
        nid = node.node_id
        want: _WaitKey | None = None
        hope: Hope | None = None
        if node.up and not node.suspect and self._room(node):
            # one pass for the key's need (layers not in flight) and the hope's (all it lacks)
            sizes, pulling = self._s.layer_sizes, node.pulling
            wanted: list[str] = []
            waiting_bytes = all_bytes = 0
            for lr in node.demands:
                size = sizes.get(lr) or UNKNOWN_LAYER_BYTES  # (_size)
                all_bytes += size
                if lr not in pulling:
                    wanted.append(lr)
                    waiting_bytes += size
            if wanted:
                down = _down_speed(node)
                need = waiting_bytes / down
                tie = -need if self.rules.rank_step > 0 else 0.0  # (rank_step: ties by need)
                want = ((-self._rank_step(node), tie, nid), (-need, nid), tuple(wanted))
                hope = self._hope(node, all_bytes / down)
        have = self._wait_key.get(nid)
        if want == have:
            if hope is not None and hope != self._hopes[nid]:
                self._widen(nid, hope)
            return
        if have is not None:
            for layer in have[2]:
                by_speed = self._by_speed[layer]
                by_speed.remove(have[0])
                by_need = self._by_need[layer]
                del by_need[bisect_left(by_need, have[1])]
                if not by_speed:
                    del self._by_speed[layer], self._by_need[layer]
        if want is None:
            self._wait_key.pop(nid, None)
            self._hopes.pop(nid, None)
        else:
            assert hope is not None
            self._hopes[nid] = hope
            for layer in want[2]:
                if layer not in self._by_speed:
                    self._by_speed[layer] = WaitIndex(self._hopes)
                    self._by_need[layer] = []
                self._by_speed[layer].add(want[0])
                insort(self._by_need[layer], want[1])
            self._wait_key[nid] = want
        if not self._s._demands:
            self._horizon = 0.0

    def _hope(self, node: _Node, need_s: float) -> Hope:
        """The values of ``node`` that ``_serve`` weighs against a layer's best free upload.

        ``need_s`` is :meth:`_need_s` (summed by the caller, with the key's need).
        """
        room = self.free_down(node) if self.rules.slots else node.speed_bps
        return Hope(_down_speed(node), need_s if self.rules.need_share else 0.0, room)

    def _widen(self, nid: str, hope: Hope) -> None:
        """A waiting demander whose key stays has new values (sizes, caps, what it lacks)."""
        self._hopes[nid] = hope
        speed_key, _, layers = self._wait_key[nid]
        for layer in layers:
            self._by_speed[layer].widen(speed_key, hope)

    def layer_size_set(self) -> None:
        """A layer's size changed: a waiting demander's need in seconds may have moved."""
        for nid in self._wait_key:
            node = self._s._nodes[nid]
            hope = self._hope(node, self._need_s(node))
            if hope != self._hopes[nid]:
                self._widen(nid, hope)

    def _room(self, node: _Node) -> bool:
        """Whether ``node`` can take one more download now."""
        if not self.rules.slots:
            return not self._down_used.get(node.node_id)
        share = max(self.rules.min_share, _MIN_FREE_SHARE)
        return self.free_down(node) >= share * _down_speed(node)

    def _size(self, layer: str) -> int:
        return self._s.layer_sizes.get(layer) or UNKNOWN_LAYER_BYTES

    # -- planning --------------------------------------------------------
    def plan(self, now: float) -> list[Transfer]:
        """Start every transfer the rules allow now (see the module docstring)."""
        started: list[Transfer] = []
        if not self._wait_key:
            return started
        visited: set[tuple[str, bool]] = set()  # (node, in the urgent phase)
        for nid, why in self._order(now):
            phase = (nid, why.startswith(URGENT))
            if phase in visited:
                continue
            visited.add(phase)
            node = self._s._nodes[nid]
            while True:
                t = self._serve(node, now, why)
                if t is None:
                    break
                started.append(t)
                if nid not in self._wait_key:
                    break
        if self.rules.slots:
            self._feed_starving(now, started)
        return started

    def _feed_starving(self, now: float, started: list[Transfer]) -> None:
        """Serve the starving demanders (:meth:`_starving`), any seeder with room will do.

        With ``starve_fill`` a starving demander takes transfers until no seeder
        fits or its download is full; without it, one, and it waits for the next
        check (half a patience) for the next one. Who starves is a demander whose
        download is far above every peer's upload (min_share of it: only the origin
        qualifies, and its upload is spoken for) and whose upload ranks it last: the
        walk hands each freed upload to others first, so such a node lives on the
        starving checks alone. The first transfer takes any seeder (liveness); the
        ones filling up behind it must end within ``patience_s`` at the seeder's
        free upload, so a crawling seeder does not take a piece hostage.

        Simulator, 100 nodes: a drawn shape (seed 5: uploads 0.3..4.2 Mbit/s, a
        fifth of the nodes downloading at 125 Mbit/s, the rest at 6) took 2.30 x T*,
        p90 slowdown 30, the fast downloaders finishing last; filled, 1.65 x and
        19.7. Filling without the patience bound gave 1.56 x there, but upload-bound
        at 1,000 nodes (4 MiB pieces from crumbs of upload) went 1.70 -> 1.79 x, and
        the drawn seed 11 1.40 -> 1.45; with it, 1.70 and 1.39. The suite at 100:
        random-pareto 1.21 -> 1.24 x T*, the other 15 shapes unchanged
        (bench/RESULTS.md).
        """
        for node in self._starving(now):
            why = f"waited {self.rules.patience_s:g} s or more with nothing in flight"
            t = self._serve(node, now, why, starving=True)
            while t is not None:
                started.append(t)
                if not self.rules.starve_fill or node.node_id not in self._wait_key:
                    break
                t = self._serve(node, now, why, starving=True, within_s=self.rules.patience_s)

    def _order(self, now: float) -> Iterator[tuple[str, str]]:
        """Waiting demanders in service order, each with why it comes there.

        Only demanders wanting a layer some holder has free upload for are
        met: the per-layer indexes are merged by key, and a layer drops out of
        the merge once its free holders are used up. Walking by key (not by
        position) keeps the walk right while demanders leave the indexes.
        """
        margin = self.rules.slack_margin
        if margin is not None and self._horizon > now:
            # urgent: need * (1 + margin) >= horizon - now, i.e. -need <= -(horizon - now)/(1+m)
            guard = margin if self.rules.urgent_guard is None else self.rules.urgent_guard
            cut_s = (self._horizon - now) / (1 + guard)
            if self.rules.upload_urgent > 0:
                cut_s = max(cut_s, self._upload_bound_s(now) * self.rules.upload_urgent)
            cut = (-cut_s, "\uffff")
            for (neg_need, _), nid in self._merge_plain(self._by_need, cut):
                yield nid, URGENT + f": needs {-neg_need:.1f} s of download, little slack"
        # demanders too fast for a layer's free uploads (min_share of their speed) are skipped
        share = max(self.rules.min_share, _MIN_FREE_SHARE) if self.rules.slots else 0.0

        def start(layer: str) -> _SpeedKey:
            best = self._best_free(layer)
            if share <= 0 or best >= share * self._fastest_holder.get(layer, INF):
                return (-INF, -INF, "")  # every demander gets its least share (see _least)
            return (-best / share, -INF, "")

        for (neg_speed, _, _), nid in self._merge(self._by_speed, start, (INF, INF, "")):
            yield nid, f"fastest waiting demander first ({-neg_speed / 1e6:.1f} MB/s)"

    def _upload_bound_s(self, now: float) -> float:
        """Seconds the cluster's whole upload needs for every open demand (T*'s upload term).

        The horizon of the slack rule is at least this far off: where the upload
        sets the bound (every node's upload capped below its download), the
        downloads alone would put the horizon too near, and every node would
        look urgent from the first seconds, serving slow uploaders (who pass
        nothing on) before fast ones. The upload sum is re-taken at most once
        per ``_UPLOAD_RESUM_S`` (it walks every node and every open demand); in between
        it counts down with the clock.
        """
        if now - self._upload_summed_at >= _UPLOAD_RESUM_S:
            total = sum(n.speed_bps for n in self._s._nodes.values() if n.up and not n.suspect)
            open_bytes = sum(self._size(lr) * n for lr, n in self._s._demand_count.items())
            self._upload_bound = open_bytes / total if total > 0 else 0.0
            self._upload_summed_at = now
        return max(0.0, self._upload_bound - (now - self._upload_summed_at))

    def _merge_plain(
        self, index: dict[str, list[tuple[float, str]]], stop: tuple[float, str]
    ) -> Iterator[tuple[tuple[float, str], str]]:
        """The keys of ``index`` up to ``stop`` in order, over the layers with a free seeder.

        The urgent walk's: it meets only the demanders with little slack, so it
        asks each (``_merge`` is the speed walk's, which steps over the hopeless).
        """
        heap: list[tuple[tuple[float, str], str]] = []
        for layer, keys in index.items():
            if self._seedable(layer) and keys[0] <= stop:
                heap.append((keys[0], layer))
        heapq.heapify(heap)
        while heap:
            key, layer = heapq.heappop(heap)
            if not self._seedable(layer):
                continue  # its free holders are used up
            yield key, key[-1]
            keys = index.get(layer, [])
            i = bisect_right(keys, key)
            if i < len(keys) and keys[i] <= stop:
                heapq.heappush(heap, (keys[i], layer))

    def _merge(
        self,
        index: dict[str, WaitIndex[_K]],
        start: Callable[[str], _K],
        stop: _K,
    ) -> Iterator[tuple[_K, str]]:
        """The keys of ``index`` in order, over the layers with a free seeder, from ``start``.

        A layer's run starts at ``start(layer)`` and ends past ``stop``, or
        when the layer is found without a free seeder (it cannot get one back
        during a walk: only a transfer of it can add a relay of it). Demanders
        that cannot clear the bar (rainbowd.core.sched.waiting.Bar) are left out: ``_serve``
        would find no seeder for them, so the walk starts the same transfers
        without asking them. A transfer planned on the way changes the bar;
        if it admits more than before, every run restarts after the key just
        walked (the keys before it are behind the walk).
        """
        filtering = (
            self.skip_hopeless
            and self.rules.direct_s <= 0
            and len(self._wait_key) >= self.skip_from * len(index)
        )
        bar = self._bar(index) if filtering else CLOSED
        admits = bar.admits if filtering else _admit_all
        begun = self._begun
        # each layer's run: the key it is past (inclusive unless the flag is set)
        runs: dict[str, tuple[_K, bool]] = {}
        heap: list[tuple[_K, str]] = []
        for layer, keys in index.items():
            if self._seedable(layer):
                low = start(layer)
                runs[layer] = (low, False)
                first = keys.first(low, False, admits)
                if first is not None and first <= stop:
                    heap.append((first, layer))
        heapq.heapify(heap)
        while heap:
            key, layer = heapq.heappop(heap)
            if not self._seedable(layer):
                del runs[layer]  # its free holders are used up
                continue
            runs[layer] = (key, True)
            yield key, key[-1]
            if filtering and self._begun != begun:
                begun = self._begun
                looser = self._bar(index)
                restart = looser.looser_than(bar)
                bar, admits = looser, looser.admits
                if restart:
                    heap = self._restart(index, runs, key, stop, admits)
                    continue
            run = index.get(layer)
            nxt = run.first(key, True, admits) if run is not None else None
            if nxt is not None and nxt <= stop:
                heapq.heappush(heap, (nxt, layer))

    def _restart(
        self,
        index: dict[str, WaitIndex[_K]],
        runs: dict[str, tuple[_K, bool]],
        at: _K,
        stop: _K,
        admits: Admits,
    ) -> list[tuple[_K, str]]:
        """The merge's heap again, every run past ``at`` (or its own start, if that is later)."""
        heap: list[tuple[_K, str]] = []
        for layer, (low, strict) in list(runs.items()):
            keys = index.get(layer)
            if keys is None or not self._seedable(layer):
                del runs[layer]
                continue
            if low <= at:
                low, strict = at, True
            nxt = keys.first(low, strict, admits)
            if nxt is not None and nxt <= stop:
                heap.append((nxt, layer))
        heapq.heapify(heap)
        return heap

    def _bar(self, index: dict[str, WaitIndex[_K]]) -> Bar:
        """What the layers of ``index`` with a free seeder offer a demander (waiting.Bar)."""
        share = self.rules.min_share
        best, need_s = -INF, INF
        any_share = any_floor = False
        for layer in index:
            if not self._seedable(layer):
                continue
            free = self._best_free(layer)
            fastest = self._fastest_holder.get(layer, INF)
            best = max(best, free)
            if share <= 0 or share * fastest <= free:
                any_share = True
            if min(MIN_TRANSFER_BPS, fastest) <= free:
                any_floor = True
            if self.rules.need_share and free > 0:
                need_s = min(need_s, self._size(layer) / free)
        return Bar(best, need_s, any_share, any_floor, share)

    def _starving(self, now: float) -> Iterator[_Node]:
        """Waiting demanders with nothing in flight for ``patience_s``: liveness over speed.

        Patience counts from when a walk first saw the demander idle (or its
        demand, if later): counting from the demand alone made every node that
        finished a piece late in a long job "starving" at once, and it took any
        seeder, a 0.5 Mbit/s one for its last 4 MiB included (simulator,
        upload-bound: the last node waited 70 s on that one piece).

        min_share keeps slow seeders from fast demanders, but estimates can be
        wrong or stale; no demander may wait for ever because of them. This
        walks every waiting demander, so it runs at most twice per patience.
        """
        if now < self._starve_check_at:
            return
        self._starve_check_at = now + self.rules.patience_s / 2
        for nid in list(self._wait_key):
            node = self._s._nodes[nid]
            if node.pulling:
                self._idle_seen.pop(nid, None)
                continue
            first = next(iter(node.demands.values()), None)
            if first is None:
                continue
            idle_since = max(first.since, self._idle_seen.setdefault(nid, now))
            if now - idle_since >= self.rules.patience_s:
                yield node

    def _serve(
        self,
        node: _Node,
        now: float,
        why: str,
        *,
        starving: bool = False,
        within_s: float = 0.0,
    ) -> Transfer | None:
        """Start one more transfer into ``node`` if a seeder fits; None if none does.

        ``starving``: no least rate (min_share) but the floor; ``within_s`` (> 0): the
        transfer must end within that many seconds at its seeder's free upload.
        """
        if node.node_id not in self._wait_key:
            return None
        free, relays, pulling = self._free, self._relays, node.pulling
        wanted = [
            d
            for lr, d in node.demands.items()
            if lr not in pulling and (free.get(lr) or relays.get(lr))  # (_seedable)
        ]
        if not wanted:
            return None
        # direct small layers first: they reserve nothing and make the node a seeder of them
        if self.rules.direct_s > 0:
            if self.rules.rarest_first:
                wanted.sort(key=self._scarcity)
            for d in wanted:
                waiting = self._by_speed.get(d.layer)
                seeder = self._direct_seeder(node, d.layer, len(waiting) if waiting else 0)
                if seeder is not None:
                    return self._begin(seeder, node, d, now, why, direct=True)
        room = self.free_down(node) if self.rules.slots else node.speed_bps
        urgent = why.startswith(URGENT)
        need_s = self._hopes[node.node_id].need_s  # _need_s as of its last refresh (0: unused)
        # the layers whose best free upload reaches the least rate (a fit needs no less); the
        # others are left before sorting: on upload-bound at 1,000 nodes 98 % of the demanders
        # a walk met had none
        fits: list[tuple[_Demand, float]] = []
        for d in wanted:
            least = 0.0 if starving else self._least(node, d.layer, need_s)
            if within_s > 0:
                least = max(least, self._size(d.layer) / within_s)
            # never a trickle: at least MIN_TRANSFER_BPS, or all the fastest holder has
            floor = min(MIN_TRANSFER_BPS, self._fastest_holder.get(d.layer, INF), room)
            least = max(least, floor)
            if self._best_free(d.layer) >= least:
                fits.append((d, least))
        if len(fits) > 1 and self.rules.rarest_first and self.rules.direct_s <= 0:
            fits.sort(key=lambda f: self._scarcity(f[0]))
        for d, least in fits:
            if urgent:
                # within the urgent share; beyond it, an urgent one waits for the common walk
                seeder = self._urgent_fit(node, d.layer, room, least)
            else:
                seeder = self._fit(node, d.layer, room, least)
            if seeder is not None:
                return self._begin(seeder, node, d, now, why, urgent=urgent)
        return None

    def _scarcity(self, d: _Demand) -> tuple[bool, int]:
        """Rarest first: fewest copies first, one-chunk layers last (a copy of one costs a
        round trip; scarcity means nothing there)."""
        return (self._one_chunk(d.layer), self._copies(d.layer))

    def _chunk_size(self, layer: str) -> int:
        return self._s.layer_chunks.get(layer, DEFAULT_CHUNK_SIZE)

    def _one_chunk(self, layer: str) -> bool:
        return self._size(layer) <= self._chunk_size(layer)

    def _copies(self, layer: str) -> int:
        """Holders of ``layer`` plus transfers of it in flight (rarest first)."""
        return len(self._s._holders.get(layer, ())) + self._receiving.get(layer, 0)

    def _need_s(self, node: _Node) -> float:
        """Seconds ``node`` needs to download all it still lacks (in flight included)."""
        return sum(self._size(lr) for lr in node.demands) / _down_speed(node)

    def _least(self, node: _Node, layer: str, need_s: float = 0.0) -> float:
        """The least rate a new transfer of ``layer`` into ``node`` must get (min_share).

        A share of the demander's speed, or of the fastest holder's speed if that is
        lower: no seeder of the layer could give more, so waiting would be forever.
        With ``need_share``, at most ``size / need_s``: a transfer that ends before
        the demander could finish the rest of what it lacks delays nothing, so a
        slow upload may feed a demander that lacks much (``need_s``: _need_s).

        The speed walk steps over demanders by a bound on this (rainbowd.core.sched.waiting.Bar,
        from the node's Hope): a change to it must keep Bar.admits a bound, and
        tests/core/test_waiting.py compares that walk with the plain one.
        """
        fastest = self._fastest_holder.get(layer, INF)
        least = self.rules.min_share * min(_down_speed(node), fastest)
        if self.rules.need_share and need_s > 0:
            least = min(least, self._size(layer) / need_s)
        return least

    def _urgent_fit(self, node: _Node, layer: str, room: float, least: float) -> _Node | None:
        """For an urgent demander: the best-fit holder, if its urgent share has ``least`` left.

        Urgent (slow) demanders take at most ``urgent_share`` of a seeder's
        upload, so the fast nodes that grow the seeding capacity can keep some.
        (Searching further for a seeder with urgent share left was tried: in
        the simulator it took the fast seeders' upload from the fast nodes and
        was slower at 3,000 nodes, 1.53 against 1.47 x T*.)
        """
        seeder = self._fit(node, layer, room, least)
        if seeder is None:
            return None
        left = self.rules.urgent_share * seeder.speed_bps
        left -= self._urgent_used.get(seeder.node_id, 0.0)
        return seeder if left >= least else None

    def _relay_lag(self, seeder_id: str, layer: str, rate: float) -> float:
        """How far behind a complete copy a transfer relayed by ``seeder_id`` would start.

        The relay's own lag plus one hop at the rate of the relay's *inbound*
        transfer: the relay forwards a chunk once it has all of it, and that
        takes the chunk's time on the link bringing it in (the outbound link's
        speed sets how fast the demander goes after, not when it starts).
        """
        feed = self._s.receiving(seeder_id, layer)
        up_plan = self._plans.get(feed.transfer_id) if feed is not None else None
        if up_plan is None:
            return self.hop_s(layer, rate)
        return up_plan.lag + self.hop_s(layer, up_plan.planned)

    def _fit(self, node: _Node, layer: str, room: float, least: float) -> _Node | None:
        """Best fit: the tightest free upload >= ``room``, else the largest (if >= ``least``).

        With relays: a complete holder that fits first (it cannot stall), then
        the tightest relay that fits, then the most room of either.
        """
        lists = [self._free.get(layer) or []]
        if self.rules.relay:
            lists.append(self._relays.get(layer) or [])
        if self.rules.slots:
            for idle in lists:
                # entries with free upload >= room sit before this index; the last fits tightest
                i = bisect_right(idle, (-room, "\uffff"))
                for j in range(i - 1, max(-1, i - 9), -1):
                    if self._s._allowed(node.node_id, idle[j][1]):
                        return self._s._nodes[idle[j][1]]
        best: tuple[float, str] | None = None
        for idle in lists:
            for neg_free, sid in idle[:8]:
                if -neg_free < least:
                    break
                if self._s._allowed(node.node_id, sid):
                    if best is None or neg_free < best[0]:
                        best = (neg_free, sid)
                    break
        return None if best is None else self._s._nodes[best[1]]

    def _direct_seeder(self, node: _Node, layer: str, waiting: int) -> _Node | None:
        """A holder that can send this small layer to all ``waiting`` within ``direct_s``.

        That is where a tree only adds hops: one seeder reaches everyone who
        waits for the layer at once (the DID crossover, per layer).
        """
        size = self._s.layer_sizes.get(layer, 0)
        if size <= 0:
            return None
        for _, sid in self._free.get(layer, ())[:4]:
            seeder = self._s._nodes[sid]
            budget = self.rules.direct_s * seeder.speed_bps
            fan_out = self._direct_bytes.get(sid, 0) + size * max(1, waiting)
            if fan_out <= budget and self._s._allowed(node.node_id, sid):
                return seeder
        return None

    def _begin(
        self,
        seeder: _Node,
        node: _Node,
        d: _Demand,
        now: float,
        why: str,
        *,
        direct: bool = False,
        urgent: bool = False,
    ) -> Transfer:
        if direct:
            size = self._s.layer_sizes[d.layer]
            reason = (
                f"{self.rules.name}: direct -- the layer is small ({size} B), so "
                f"{seeder.node_id} ({seeder.speed_bps / 1e6:.1f} MB/s) sends it straight to "
                f"every demander within {self.rules.direct_s:g} s; {why}"
            )
            plan = _Plan(0.0, 0.0, seeder.speed_bps, True, direct=True)
        elif self.rules.slots:
            up, down = self.free_up(seeder), self._reserve_down(node, d.layer)
            if urgent:
                left = self.rules.urgent_share * seeder.speed_bps
                up = min(up, left - self._urgent_used.get(seeder.node_id, 0.0))
            rate = min(up, down)
            relayed = self.rules.relay and d.layer not in seeder.holdings
            if relayed:
                inbound = self.relay_rate(seeder, d.layer)
                rate = min(rate, inbound)
                lag = self._relay_lag(seeder.node_id, d.layer, rate)
                reason = (
                    f"{self.rules.name}: cut-through relay -- {seeder.node_id} is still "
                    f"receiving the layer (inbound planned at {inbound / 1e6:.1f} MB/s) and "
                    f"serves its chunks as they land; the best fit among the layer's holders "
                    f"and relays for {down / 1e6:.1f} MB/s of free download; "
                    f"{up / 1e6:.1f} of its {seeder.speed_bps / 1e6:.1f} MB/s upload free; "
                    f"planned at {rate / 1e6:.1f} MB/s (no faster than its inbound), first "
                    f"chunk {lag:.1f} s behind a complete copy; {why}"
                )
                plan = _Plan(rate, rate, rate, True, urgent=urgent, lag=lag)
                return self._s._start(
                    seeder, node, d, now, reason, plan_hook=lambda t: self._hold(t, plan)
                )
            reason = (
                f"{self.rules.name}: best-fit seeder, {up / 1e6:.1f} of its "
                f"{seeder.speed_bps / 1e6:.1f} MB/s upload free for {down / 1e6:.1f} MB/s of "
                f"free download; planned at {rate / 1e6:.1f} MB/s; {why}"
            )
            plan = _Plan(rate, rate, rate, up <= down, urgent=urgent)
        else:
            rate = min(seeder.speed_bps, node.speed_bps)
            reason = (
                f"{self.rules.name}: fastest idle seeder holding the layer "
                f"({seeder.speed_bps / 1e6:.1f} MB/s); {why}"
            )
            plan = _Plan(seeder.speed_bps, node.speed_bps, rate, seeder.speed_bps <= node.speed_bps)
        return self._s._start(seeder, node, d, now, reason, plan_hook=lambda t: self._hold(t, plan))

    def _reserve_down(self, node: _Node, layer: str) -> float:
        """How much of ``node``'s free download a new transfer of ``layer`` may reserve.

        All of it, except under ``stripe``: while the demander has more to ask for,
        a transfer short at full rate (under ``stripe_s``) reserves at most
        ``stripe`` of its download, so a second one runs beside it. One transfer at
        a time leaves the download idle between two pieces -- the report, the next
        assignment, a connection to a new seeder: ~40 ms in the simulator's
        overheads, 14 % of a 512 KiB piece at 16 Mbit/s -- and two in flight
        overlap those gaps. Long pieces keep the full rate: finishing one sooner
        makes a new seeder sooner, which is what the ramp needs (upload-bound, 4 MiB
        pieces: striping every piece took it from 1.46 to 1.66 x T*). Simulator,
        100 nodes, suite of 16 shapes with stripe 0.5 / stripe_s 2 s: ci 1.29 ->
        1.24 x T*, homogeneous 1.71 -> 1.57, random-pareto 1.41 -> 1.29, paper
        1.14 -> 1.10; random-asymmetric's median slowdown 2.43 -> 2.89 (9 -> 10 of
        16 shapes meet every goal).
        """
        down = self.free_down(node)
        if self.rules.stripe >= 1.0 or len(node.demands) <= len(node.pulling) + 1:
            return down  # nothing else to ask for: the last one takes what there is
        if self._size(layer) / max(1.0, down) >= self.rules.stripe_s:
            return down
        return min(down, self.rules.stripe * _down_speed(node))

    def _hold(self, t: Transfer, plan: _Plan) -> None:
        self._plans[t.transfer_id] = plan
        self._begun += 1
        self._receiving[t.layer] = self._receiving.get(t.layer, 0) + 1
        if plan.direct:
            self._direct_bytes[t.seeder] = self._direct_bytes.get(t.seeder, 0) + (
                self._s.layer_sizes.get(t.layer, 0)
            )
        self._up_used[t.seeder] = self._up_used.get(t.seeder, 0.0) + plan.up
        if plan.urgent:
            self._urgent_used[t.seeder] = self._urgent_used.get(t.seeder, 0.0) + plan.up
        self._down_used[t.demander] = self._down_used.get(t.demander, 0.0) + plan.down
        self._idle_seen.pop(t.demander, None)

    # -- transfers starting and ending ------------------------------------
    def started(self, t: Transfer) -> None:
        """A transfer the planner did not plan (adopted): reserve what it plausibly takes."""
        if t.transfer_id in self._plans:
            return
        seeder, node = self._s._nodes[t.seeder], self._s._nodes[t.demander]
        if self.rules.slots:
            rate = max(0.0, min(self.free_up(seeder), self.free_down(node)))
        else:
            rate = min(seeder.speed_bps, node.speed_bps)
        up = rate if self.rules.slots else seeder.speed_bps
        down = rate if self.rules.slots else node.speed_bps
        # (adopted after a restart: whether it was relayed is not known; taken as direct)
        self._hold(t, _Plan(up, down, max(rate, 1.0), True))

    def ended(self, t: Transfer) -> None:
        plan = self._plans.pop(t.transfer_id, None)
        if plan is None:
            return
        left = self._receiving.get(t.layer, 0) - 1
        if left > 0:
            self._receiving[t.layer] = left
        else:
            self._receiving.pop(t.layer, None)
        self._up_used[t.seeder] = max(0.0, self._up_used.get(t.seeder, 0.0) - plan.up)
        if plan.urgent:
            self._urgent_used[t.seeder] = self._urgent_used.get(t.seeder, 0.0) - plan.up
        self._down_used[t.demander] = max(0.0, self._down_used.get(t.demander, 0.0) - plan.down)
        if plan.direct:
            left = self._direct_bytes.get(t.seeder, 0) - self._s.layer_sizes.get(t.layer, 0)
            self._direct_bytes[t.seeder] = max(0, left)
        for x in (self._up_used, self._down_used):
            for nid in (t.seeder, t.demander):
                if x.get(nid, 1.0) < 1e-6:
                    x.pop(nid, None)

    def observe(self, t: Transfer, now: float, bytes_moved: int) -> float | None:
        """A completed transfer's rate moves the estimate of the side that limited it.

        Returns the new estimate of the node that changed (None: no change).
        Only transfers of ``MIN_OBSERVE_S`` or longer count, so set-up delays
        of small layers do not read as slow links.
        """
        self._failures.pop(t.seeder, None)
        plan = self._plans.get(t.transfer_id)
        seconds = now - t.started_at
        if self.rules.ewma <= 0 or plan is None or plan.direct or bytes_moved <= 0:
            return None
        if seconds < MIN_OBSERVE_S:
            return None
        if plan.planned <= 0:
            return None
        ratio = max(0.05, bytes_moved / seconds / plan.planned)
        node = self._s._nodes[t.seeder if plan.seeder_limited else t.demander]
        # a rate above plan only means others left room: it brings a slowed node back up to
        # its first estimate (the agent's hint), never beyond it
        seen = min(self._prior.setdefault(node.node_id, node.speed_bps), node.speed_bps * ratio)
        node.speed_bps = max(1.0, (1 - self.rules.ewma) * node.speed_bps + self.rules.ewma * seen)
        return node.speed_bps

    def failed(self, t: Transfer) -> float | None:
        """A failed transfer counts against its seeder; repeated failures halve its estimate."""
        n = self._failures.get(t.seeder, 0) + 1
        self._failures[t.seeder] = n
        if self.rules.ewma <= 0 or n < FAILURES_TO_SLOW:
            return None
        node = self._s._nodes[t.seeder]
        node.speed_bps = max(1.0, node.speed_bps / 2)
        return node.speed_bps


def _admit_all(down: float, need_s: float, room: float) -> bool:
    """The plain walk's filter (``Planner.skip_hopeless`` off): every demander is asked."""
    return True


def _down_speed(node: _Node) -> float:
    """What ``node`` can download at: its speed estimate, or its download cap if lower.

    Shares of a demander's speed (min_share, room) are taken of this: a capped
    demander must not wait for room it can never have.
    """
    cap = node.max_download_bps
    down = node.down_bps or node.speed_bps
    return min(down, cap) if cap > 0 else down
