"""The demander side of the planner's indexes: who waits, keyed by speed and by need.

Why: the walk (walk.py) meets waiting demanders fastest first and, under the
slack rule, those with least slack first; per layer they stand sorted both ways
(by speed in a :class:`~rainbowd.core.sched.waiting.WaitIndex`, whose blocks
carry bounds so the walk can step over demanders no seeder could serve). A
demander's key is re-taken after any change to it (:meth:`DemanderIndex.refresh`).
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from typing import TYPE_CHECKING

from .. import reasons as rs
from ..waiting import Hope, WaitIndex
from .seeders import SeederIndex
from .state import _MIN_FREE_SHARE, INF, UNKNOWN_LAYER_BYTES, _down_speed, _WaitKey

if TYPE_CHECKING:
    from ..records import Demand, Node


class DemanderIndex(SeederIndex):
    """Waiting demanders per layer they want, by rank step and need, and by need alone."""

    #: re-key a demander in the indexes at the next walk, not at each change (off: at once,
    #: as before; tests compare the two). Between two walks a node changes several times
    #: (a transfer ends, its layer is held, its seeder frees up: each re-keys it in the
    #: index of every layer it wants), and a job's demands arrive one by one (re-keying it
    #: in all the layers before each): many-small, ~100 pieces per node, spent a third of
    #: its time there. Only the last key counts, so the walk starts the same transfers.
    defer_refresh = True

    def refresh(self, node: Node) -> None:
        """Re-key ``node`` as a seeder and as a demander after any change to it."""
        self._refresh_seeder(node)
        self._refresh_demander(node)

    def demand_added(self, node: Node, demand: Demand) -> None:
        self._clock = max(self._clock, demand.since)
        margin, late = self.rules.slack_margin, self.rules.own_urgent
        if margin is not None or late > 0:
            down = _down_speed(node)
            total, bound, since = self._demand_sums(node, demand, down)
            if margin is not None:
                self._plan_finish(node.node_id, demand.since + total / down * (1 + margin))
            if late > 0:  # late by its own bound (Rules.own_urgent): see _own_key
                self._own[node.node_id] = (since + late * bound, bound)
        self._refresh_demander(node)

    def _plan_finish(self, nid: str, end: float) -> None:
        """Move the horizon to ``end``, ``nid``'s planned finish, if later; keep who set it.

        The horizon is the latest planned finish of a current demander (the slack
        rule); its setter and the latest finish of any other demander are what
        ``setter_guard`` asks (Walker._setter). A node's planned finish only grows
        during a job (its demands are summed as they come).
        """
        if nid == self._horizon_setter:
            self._horizon = max(self._horizon, end)
        elif end > self._horizon:
            self._horizon_second = self._horizon
            self._horizon, self._horizon_setter = end, nid
        else:
            self._horizon_second = max(self._horizon_second, end)

    def _demand_sums(self, node: Node, demand: Demand, down: float) -> tuple[float, float, float]:
        """Bytes ``node`` wants, its own bound in seconds and its earliest demand, ``demand`` in.

        Summed over its demands in their order (bound: size / min(its download, the
        layer's fastest holder) per layer). A job's demands come one by one, a node
        wanting hundreds of pieces, and summing them all again at each was quadratic:
        a fifth of the simulator's time on drawn-2 at 1,000 nodes (py-spy, session
        29), and the coordinator's when a job starts. So the sums of the demands
        before ``demand`` are kept and ``demand``'s added, where they are still the
        sums a new pass would take: the node's demands are those plus
        ``demand`` (appended last: the same order, the same floats), its download is
        the same, and no holder or layer size changed since (``_sums_epoch``).
        """
        nid = node.node_id
        kept = self._sums.get(nid)
        if kept is not None and kept[0] == (len(node.demands) - 1, down, self._sums_epoch):
            total, bound, since = kept[1]
            size = self._size(demand.layer)
            total += size
            bound += size / min(down, self._fastest_holder.get(demand.layer, INF))
            since = min(since, demand.since)
        else:
            total, bound, since = 0.0, 0.0, demand.since
            for lr, d in node.demands.items():
                size = self._size(lr)
                total += size
                bound += size / min(down, self._fastest_holder.get(lr, INF))
                since = min(since, d.since)
        self._sums[nid] = ((len(node.demands), down, self._sums_epoch), (total, bound, since))
        return total, bound, since

    def flush(self) -> None:
        """Re-key every demander changed since the last walk (before anything reads the keys)."""
        stale = self._stale
        while stale:
            self._rekey(stale.popitem()[1])

    def _refresh_demander(self, node: Node) -> None:
        """``node`` changed: its place among the waiting now, its keys now or before the walk.

        What is kept at once is what the order of events decides: whether it waits
        (``_waiting``, in the order demanders began to wait, which the starving check
        follows) and the slack rule's horizon, dropped when a demander stops waiting
        once no demand is open (as the re-key did when it ran at every change).
        """
        nid = node.node_id
        was = nid in self._waiting
        if self._waits(node):
            if not was:
                self._waiting[nid] = None
                self._wait_since[nid] = self._clock
        elif was:
            del self._waiting[nid]
            del self._wait_since[nid]
            if not node.demands:
                self._own.pop(nid, None)
                self._sums.pop(nid, None)
            if not self._s.open_demands:
                self._horizon = self._horizon_second = 0.0
                self._horizon_setter = ""
        if self.defer_refresh and not self._walking:
            self._stale[nid] = node
        else:
            self._stale.pop(nid, None)
            self._rekey(node)

    def _waits(self, node: Node) -> bool:
        """Whether ``node`` has room for a download and wants a layer not in flight."""
        if not (node.up and not node.suspect and self._room(node)):
            return False
        pulling = node.pulling
        return any(lr not in pulling for lr in node.demands)

    def _rank(self, node: Node) -> float:
        """How fast ``node`` is as a demander (``rank`` rule: fastest first)."""
        down = _down_speed(node)
        return down if self.rules.rank == "down" else min(down, node.speed_bps)

    def _rank_step(self, node: Node) -> float:
        """:meth:`_rank` rounded down to a ``rank_step`` (geometric), so near-equal nodes tie.

        Ties are ordered by :meth:`_tie`.
        """
        rank = self._rank(node)
        step = self.rules.rank_step
        if step <= 0 or rank <= 0:
            return rank
        return (1 + step) ** math.floor(math.log(rank, 1 + step))

    def _tie(self, node: Node, need: float, down: float) -> float:
        """Its place among the demanders of its rank class (:meth:`_rank_step`): the lower first.

        Lacking most first (-need, its need in seconds) where its upload passes on at
        least ``lacking_least_below`` of its download: on a cluster of equal nodes the
        first transfers then spread over nodes that have nothing yet, so each new
        holder has an idle upload to pass on what it receives, instead of one node
        taking every fresh piece in turn. Below that share, lacking least first (+need,
        after every tie of the first kind): fed first, such a node's pieces hardly
        multiply, so what it is given counts only when it has all of it, and the class
        ends one node after another instead of all at once at the end.
        """
        if self.rules.rank_step <= 0:
            return 0.0
        if node.speed_bps < self.rules.lacking_least_below * down:
            return need
        return -need

    def _rekey(self, node: Node) -> None:
        """Take ``node``'s keys and hope again, in the index of every layer it wants.

        (Its slack key and its own-bound key, each the same in every layer it wants, go
        in one list each, ``_by_need`` and ``_by_own``: Walker._urgent, Walker._late.)
        """
        nid = node.node_id
        want: _WaitKey | None = None
        hope: Hope | None = None
        if nid in self._waiting:  # (_waits, decided at the change: _room may read the clock)
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
                tie = self._tie(node, need, down)
                own = self._own_key(nid, all_bytes / down)
                want = ((-self._rank_step(node), tie, nid), (-need, nid), tuple(wanted), own)
                hope = self._hope(node, all_bytes / down)
        have = self._wait_key.get(nid)
        assert (want is not None) == (nid in self._waiting), f"{nid}: changed unseen"
        if want == have:
            if hope is not None and hope != self._hopes[nid]:
                self._widen(nid, hope)
            return
        by_speed = self._by_speed
        # the layers it still wants keep their index entry, moved (WaitIndex.move)
        kept = set(want[2]).intersection(have[2]) if want and have else set()
        if want is not None:
            assert hope is not None
            self._hopes[nid] = hope  # (before the entries move: a block takes in the new hope)
        if have is not None:
            for layer in have[2]:
                index = by_speed[layer]
                if layer not in kept:
                    index.remove(have[0])
                    if not index:
                        del by_speed[layer]
                elif want is not None and want[0] != have[0]:
                    index.move(have[0], want[0])
                else:
                    index.widen(have[0], self._hopes[nid])
            del self._by_need[bisect_left(self._by_need, have[1])]
            if have[3] is not None:
                del self._by_own[bisect_left(self._by_own, have[3])]
        if want is None:
            self._wait_key.pop(nid, None)
            self._hopes.pop(nid, None)
        else:
            for layer in want[2]:
                if layer in kept:
                    continue
                if layer not in by_speed:
                    by_speed[layer] = WaitIndex(self._hopes)
                by_speed[layer].add(want[0])
            insort(self._by_need, want[1])
            if want[3] is not None:
                insort(self._by_own, want[3])
            self._wait_key[nid] = want

    def _own_key(self, nid: str, need_s: float) -> tuple[float, str] | None:
        """The key of ``nid`` late by its own bound: the latest it may start at full rate.

        (``Rules.own_urgent``; None where it is off.) Its own bound is issue 13's
        t_i* = max(S / d_i, S / u_origin), taken per layer of what it demands:
        sum(size / min(its download, the fastest holder's upload)), the fastest holder
        as known when the demand came (none yet: its download; :meth:`demand_added`).
        Urgent once, given its whole download from now on (``need_s``), it would end
        later than ``since + own_urgent x bound``: the key is that deadline less
        ``need_s``, and the walk meets it once the clock passes it (walk.py,
        ``_order``). Why: where every upload is booked (an upload-bound cluster), the
        walk hands each freed upload to the highest rank, and a node downloading fast
        but uploading slowly ranks last by min(up, down): a drawn shape (seed 5, a
        fifth of the nodes downloading at 125 Mbit/s, uploads 0.4-4 Mbit/s) left them
        without a byte for 50-65 s and ended them at 11 x their bound, and the starving
        check cannot help (when it looks, no upload is free). The slack rule protects
        only the horizon, which such a node never threatens.
        """
        own = self._own.get(nid)
        return None if own is None else (own[0] - need_s, nid)

    def _hope(self, node: Node, need_s: float) -> Hope:
        """The values of ``node`` that ``_serve`` weighs against a layer's best free upload.

        ``need_s`` is :meth:`_need_s` (summed by the caller, with the key's need).
        """
        room = self.free_down(node) if self.rules.slots else node.speed_bps
        if not self.rules.need_share:
            return Hope(_down_speed(node), 0.0, room)
        since = self._wait_since.get(node.node_id, INF) if self.rules.wait_credit > 0 else INF
        return Hope(_down_speed(node), need_s, room, since)

    def _widen(self, nid: str, hope: Hope) -> None:
        """A waiting demander whose key stays has new values (sizes, caps, what it lacks)."""
        self._hopes[nid] = hope
        speed_key, _, layers, _ = self._wait_key[nid]
        for layer in layers:
            self._by_speed[layer].widen(speed_key, hope)

    def layer_size_set(self) -> None:
        """A layer's size changed: a waiting demander's need in seconds may have moved."""
        self._sums_epoch += 1
        for nid in self._wait_key:
            node = self._s.nodes[nid]
            hope = self._hope(node, self._need_s(node))
            if hope != self._hopes[nid]:
                self._widen(nid, hope)

    def _room(self, node: Node) -> bool:
        """Whether ``node`` can take one more download now.

        ``min_share`` of its download free, or what :meth:`late_room` allows a node that
        is late. Read at each change to the node (``_refresh_demander``), with the
        scheduler's clock then (its last walk or demand: a clock a little behind finds
        a node late a little later): the re-key before the walk takes that decision as
        it was made (``_rekey``).
        """
        if not self.rules.slots:
            return not self._down_used.get(node.node_id)
        return self.min_room(node) or self.late_room(node) is not None

    def late_room(self, node: Node) -> tuple[str, float] | None:
        """The rule that gives ``node`` room under ``min_share`` (its reason's name), and its share.

        ``late_room_share`` of its download free where it is behind the slack rule's
        horizon (:meth:`_behind_horizon`), else ``own_room_share`` of it where it is
        late by its own bound (:meth:`_late_by_own_bound`); None if neither does. Its
        need (all it lacks) is summed once, and only where a share is free.
        """
        rules, free, down = self.rules, self.free_down(node), _down_speed(node)
        late, own = rules.late_room_share, rules.own_room_share
        late_free = late > 0 and free >= late * down
        own_free = own > 0 and free >= own * down
        if not (late_free or own_free):
            return None
        need_s = self._need_s(node)
        if late_free and self._behind_horizon(need_s):
            return rs.LATE_ROOM_SHARE, late
        if own_free and self._late_by_own_bound(node.node_id, need_s):
            return rs.OWN_ROOM_SHARE, own
        return None

    def _late_by_own_bound(self, nid: str, need_s: float) -> bool:
        """Whether a demander needing ``need_s`` at its full download ends past its own deadline.

        Its own-bound key (:meth:`_own_key`: the deadline less the need, all it lacks in
        flight included) is past: the late walk's test (Walker._late).
        """
        key = self._own_key(nid, need_s)
        return key is not None and key[0] <= self._clock

    def min_room(self, node: Node) -> bool:
        """Whether ``min_share`` of ``node``'s download is free (room without the late rule)."""
        share = max(self.rules.min_share, _MIN_FREE_SHARE)
        return self.free_down(node) >= share * _down_speed(node)

    def slack_guard(self) -> float:
        """The slack rule's guard: ``urgent_guard``, or the slack margin where it is None."""
        margin = self.rules.slack_margin
        guard = self.rules.urgent_guard
        return (margin or 0.0) if guard is None else guard

    def _behind_horizon(self, need_s: float) -> bool:
        """Whether a demander needing ``need_s`` would miss the slack rule's horizon.

        need * (1 + guard) >= horizon - now, its need being all it lacks (in flight
        included) at its download: the slack walk's test (Walker._order), which keys
        on what is not in flight yet. Never once the horizon has passed, nor without
        the slack rule.
        """
        if self.rules.slack_margin is None or self._horizon <= self._clock:
            return False
        return need_s * (1 + self.slack_guard()) >= self._horizon - self._clock
