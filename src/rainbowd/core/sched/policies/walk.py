"""The walk over waiting demanders: who is served in what order, and who starves.

Why: the order is the policy's main lever (fastest-node-first, least slack
first: rules.py). The walk merges the per-layer indexes of demanders.py by key
over the layers some seeder has free upload for (merge.py), and serves starving
demanders (patience) with any seeder that has room.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from .. import reasons as rs
from ..reasons import Turn
from .merge import Merger
from .state import (
    _MIN_FREE_SHARE,
    _UPLOAD_RESUM_S,
    INF,
    STARVE_CHECKS_PER_PATIENCE,
    _SpeedKey,
)

if TYPE_CHECKING:
    from ..records import Node, Transfer


class Walker(Merger):
    """:meth:`plan`: walk the waiting demanders in service order and serve each in turn."""

    def plan(self, now: float) -> list[Transfer]:
        """Start every transfer the rules allow now (rules.py)."""
        started: list[Transfer] = []
        self._clock = max(self._clock, now)
        self.flush()
        if not self._wait_key:
            return started
        self._walking = True
        try:
            self._walk(now, started)
        finally:
            self._walking = False
        return started

    def _walk(self, now: float, started: list[Transfer]) -> None:
        """:meth:`plan`'s walk: every change on the way is re-keyed at once.

        A demander is served until no seeder fits or its download is full; with
        ``breadth_first`` a fastest-first turn gets one transfer, and the walk fills
        the demanders of a rank class only once every one of them has had its turn
        (``Rules.breadth_first``). Urgent demanders are filled at their turn.
        """
        visited: set[tuple[str, bool]] = set()  # (node, in the urgent phase)
        served: list[tuple[Node, Turn]] = []  # of this rank class, to fill when it ends
        rank_class: float | None = None
        for nid, turn in self._order(now):
            phase = (nid, turn.name == rs.URGENT)
            if phase in visited:
                continue
            visited.add(phase)
            node = self._s.nodes[nid]
            if not (self.rules.breadth_first and turn.name == rs.FASTEST_FIRST):
                self._fill(node, now, turn, started)
                continue
            if turn.value != rank_class:
                self._fill_class(served, now, started)
                rank_class = turn.value
            t = self._serve(node, now, turn)
            if t is not None:
                started.append(t)
                served.append((node, turn))
        self._fill_class(served, now, started)
        if self.rules.slots:
            self._feed_starving(now, started)

    def _fill(self, node: Node, now: float, turn: Turn, started: list[Transfer]) -> None:
        """Serve ``node`` until no seeder fits or it stops waiting (its download is full)."""
        while True:
            t = self._serve(node, now, turn)
            if t is None:
                return
            started.append(t)
            if node.node_id not in self._wait_key:
                return

    def _fill_class(
        self, served: list[tuple[Node, Turn]], now: float, started: list[Transfer]
    ) -> None:
        """Fill, in walk order, the demanders of a rank class that had their one transfer."""
        for node, turn in served:
            if node.node_id in self._wait_key:
                self._fill(node, now, turn, started)
        served.clear()

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
            turn = Turn(rs.STARVING, rs.PATIENCE_S, self.rules.patience_s)
            t = self._serve(node, now, turn, starving=True)
            while t is not None:
                started.append(t)
                if not self.rules.starve_fill or node.node_id not in self._wait_key:
                    break
                t = self._serve(node, now, turn, starving=True, within_s=self.rules.patience_s)

    def _order(self, now: float) -> Iterator[tuple[str, Turn]]:
        """Waiting demanders in service order, each with why it comes there (its turn).

        Urgent first: by least slack (the slack rule), then those late by their own
        bound (``own_urgent``: DemanderIndex._own_key); then fastest first.

        Only demanders wanting a layer some holder has free upload for are
        met: the per-layer indexes are merged by key, and a layer drops out of
        the merge once its free holders are used up. Walking by key (not by
        position) keeps the walk right while demanders leave the indexes.
        """
        margin = self.rules.slack_margin
        # The slack walk, upload_urgent's cut with it, ends with the horizon, which passes
        # early where the upload binds (upload-bound: at ~100 s of ~180). Kept on after it,
        # the median went over its goal (upload-bound at 100 nodes 1.19 / 1.89 / 2.13 ->
        # 1.19 / 2.00 / 2.08 x T* / median / p90; bench/RESULTS.md, session 32).
        if margin is not None and self._horizon > now:
            # urgent: need * (1 + margin) >= horizon - now, i.e. -need <= -(horizon - now)/(1+m)
            cut_s = (self._horizon - now) / (1 + self.slack_guard())
            if self.rules.upload_urgent > 0:
                cut_s = max(cut_s, self._upload_bound_s(now) * self.rules.upload_urgent)
            stop = (-cut_s, "\uffff")
            yield from self._setter(now, stop)
            yield from self._urgent(stop)
        yield from self._late(now)
        # demanders too fast for a layer's free uploads (min_share of their speed) are skipped
        share = max(self.rules.min_share, _MIN_FREE_SHARE) if self.rules.slots else 0.0

        def start(layer: str) -> _SpeedKey:
            best = self._best_free(layer)
            if share <= 0 or best >= share * self._fastest_holder.get(layer, INF):
                return (-INF, -INF, "")  # every demander gets its least share (Fitter._fits)
            return (-best / share, -INF, "")

        for (neg_speed, _, _), nid in self._merge(self._by_speed, start, (INF, INF, "")):
            yield nid, Turn(rs.FASTEST_FIRST, rs.DEMANDER_BPS, -neg_speed)

    def _setter(self, now: float, stop: tuple[float, str]) -> Iterator[tuple[str, Turn]]:
        """The horizon's setter, kept at its pace (``setter_guard``; rules.py says why).

        Urgent once need * (1 + setter_guard) >= horizon - now, its need what it
        waits for at its download (the slack walk's key), if the cut left it out,
        and only:

        * while the cluster's upload could deliver every open demand before the
          horizon (where the downloads bind): where the upload binds (upload-bound)
          every download is alike, and serving one first took the origin from the
          ramp (1.13 -> 1.72 x T*);
        * while it is the one slowest: every other demander's planned finish is
          earlier than its own by more than the lag the rule allows it, (1 +
          slack_margin) / (1 + setter_guard). Where others are as slow, they end as
          late, and favouring one cost the ramp (homogeneous 1.44 -> 1.49 x T*, a
          drawn shape with two nodes at 6.7 Mbit/s 1.27 -> 1.36).

        Only that one demander: making the walk's first key urgent instead made
        every demander urgent in turn (bench/RESULTS.md, sessions 37 and 38).
        """
        guard, margin = self.rules.setter_guard, self.rules.slack_margin
        nid = self._horizon_setter
        key = self._wait_key.get(nid)
        if guard is None or margin is None or key is None or key[1] <= stop:
            return
        if self._horizon_second * (1 + margin) > self._horizon * (1 + guard):
            return  # not alone: another demander plans to end within its allowed lag
        need_s = -key[1][0]
        if need_s * (1 + guard) >= self._horizon - now >= self._upload_bound_s(now):
            if self._waits_seedable(nid):
                yield nid, Turn(rs.URGENT, rs.SETTER_NEED_S, need_s)

    def _urgent(self, stop: tuple[float, str]) -> Iterator[tuple[str, Turn]]:
        """The slack walk: the demanders with least slack first, up to ``stop``.

        Those waiting for a seedable layer, by key (-need s, id) in the one list
        ``_by_need``, walked by key, not by position, as :meth:`_late_by_key` walks its
        list. Until session 34 the keys stood per layer and were merged over the
        seedable layers; the same demanders come in the same order, since a layer
        found without a free seeder cannot get one back during a walk (:meth:`_merge`),
        so a demander met in the merge of one of its seedable layers is one that
        waits for a seedable layer when the walk reaches its key.
        """
        keys = self._by_need
        i = 0
        while i < len(keys) and keys[i] <= stop:
            key = keys[i]
            if self._waits_seedable(key[1]):
                yield key[1], Turn(rs.URGENT, rs.NEED_S, -key[0])
            i = bisect_right(keys, key)

    def _late(self, now: float) -> Iterator[tuple[str, Turn]]:
        """The demanders late by their own bound (``own_urgent``), in the order they are served.

        Late: the key (the latest start at full download, DemanderIndex._own_key) is
        past, and some layer it waits for has a holder with free upload; none where the
        rule is off. In key order, least laxity first, unless ``own_shortest_first``:
        then the one lacking the fewest seconds at its download first (its deadline less
        its key). Why not least laxity for the late: rules.py, late by its own bound;
        measured: swarm.py.

        The keys stand in one list, not per layer as the other walks' do (a node's key
        is the same in every layer it wants): the walk asks each late node whether it
        waits for a seedable layer, instead of merging one copy of its key per piece.
        In key order the list is walked by key, not by position, so a demander re-keyed
        while it is served (it leaves the list or moves behind the walk) is not met twice.
        """
        stop = (now, "\uffff")
        if self.rules.own_shortest_first:
            keys = self._by_own[: bisect_right(self._by_own, stop)]
            # seconds lacking: its deadline less its key (one key per node: no duplicates)
            lacking = sorted(
                (self._own[nid][0] - key, nid) for key, nid in keys if self._waits_seedable(nid)
            )
            order: Iterable[str] = [nid for _, nid in lacking]
        else:
            order = self._late_by_key(stop)
        for nid in order:
            yield nid, Turn(rs.URGENT, rs.OWN_BOUND_S, self._own[nid][1])

    def _late_by_key(self, stop: tuple[float, str]) -> Iterator[str]:
        """The late demanders waiting for a seedable layer, by key up to ``stop`` (least laxity)."""
        keys = self._by_own
        i = 0
        while i < len(keys) and keys[i] <= stop:
            key = keys[i]
            if self._waits_seedable(key[1]):
                yield key[1]
            i = bisect_right(keys, key)

    def _waits_seedable(self, nid: str) -> bool:
        """Whether waiting demander ``nid`` wants a layer some holder has free upload for."""
        return any(self._seedable(layer) for layer in self._wait_key[nid][2])

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
            total = sum(n.speed_bps for n in self._s.nodes.values() if n.up and not n.suspect)
            open_bytes = sum(self._size(lr) * n for lr, n in self._s.open_demands.items())
            self._upload_bound = open_bytes / total if total > 0 else 0.0
            self._upload_summed_at = now
        return max(0.0, self._upload_bound - (now - self._upload_summed_at))

    def _starving(self, now: float) -> Iterator[Node]:
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
        self._starve_check_at = now + self.rules.patience_s / STARVE_CHECKS_PER_PATIENCE
        for nid in list(self._waiting):
            node = self._s.nodes[nid]
            if node.pulling:
                self._idle_seen.pop(nid, None)
                continue
            first = next(iter(node.demands.values()), None)
            if first is None:
                continue
            idle_since = max(first.since, self._idle_seen.setdefault(nid, now))
            if now - idle_since >= self.rules.patience_s:
                yield node
