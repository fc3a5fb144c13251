"""The merge of the per-layer wait indexes: waiting demanders by key, over seedable layers.

Why a merge: demanders.py keeps a demander's key in the index of every layer it
waits for, so the walk (walk.py) meets, in key order, only the demanders
wanting a layer some holder has free upload for, and a layer drops out once
its free holders are used up. Demanders that cannot clear a layer's bar
(rainbowd.core.sched.waiting) are stepped over without asking them.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator

from ..waiting import CLOSED, Admits, Bar, LayerBars, WaitIndex
from .fit import Fitter
from .state import _K, INF, MIN_TRANSFER_BPS


class Merger(Fitter):
    """:meth:`_merge`: the keys of a per-layer index in order, over the seedable layers."""

    #: a walk steps over waiting demanders that cannot clear the bar (rainbowd.core.sched.waiting);
    #: off, it asks every one, as before (tests compare the two). Until session 22 only once
    #: more demanders waited than there were layers they waited for; always since: 100
    #: demanders walking ~330 one-chunk pieces (upload-bound at 100 nodes) were asked one by
    #: one, 12.4 M merge steps for 18,200 transfers, most for crumbs of upload no demander
    #: could take; the simulator's run went from 84 to 36 s (drawn-2 98 -> 79 s, many-small
    #: 29 -> 32 s, the gate's suite 420 -> 319 CPU s). At 1,000 nodes the demanders outnumber
    #: the pieces, so it was on already (upload-bound at 1,000: 179 -> 29 s, f5cde52).
    skip_hopeless = True

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
        without asking them. Each run has its own layer's bar, or the bar summed
        over the layers whose run would not reach the demander (waiting.LayerBars).
        A transfer planned on the way changes the bars; if one admits more than
        before, every run restarts after the key just walked (the keys before it
        are behind the walk).
        """
        filtering = self.skip_hopeless and self.rules.direct_s <= 0
        begun = self._begun
        # each layer's run: the key it is past (inclusive unless the flag is set)
        runs: dict[str, tuple[_K, bool]] = {}
        for layer in index:
            if self._seedable(layer):
                runs[layer] = (start(layer), False)
        # the layers whose run starts at a cut (above the lowest key), with their cut
        cut = {layer: low[0] for layer, (low, _) in runs.items() if low[0] > -INF}
        bars = self._bars(index, runs, cut) if filtering else None
        heap: list[tuple[_K, str]] = []
        for layer, (low, _) in runs.items():
            first = index[layer].first(low, False, _admits(bars, layer, low[0]))
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
            if bars is not None and self._begun != begun:
                begun = self._begun
                looser = self._bars(index, runs, cut)
                restart = looser.looser_than(bars)
                bars = looser
                if restart:
                    heap = self._restart(index, runs, key, stop, bars)
                    continue
            run = index.get(layer)
            nxt = run.first(key, True, _admits(bars, layer, key[0])) if run is not None else None
            if nxt is not None and nxt <= stop:
                heapq.heappush(heap, (nxt, layer))

    def _restart(
        self,
        index: dict[str, WaitIndex[_K]],
        runs: dict[str, tuple[_K, bool]],
        at: _K,
        stop: _K,
        bars: LayerBars,
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
            nxt = keys.first(low, strict, bars.admits(layer, low[0]))
            if nxt is not None and nxt <= stop:
                heap.append((nxt, layer))
        heapq.heapify(heap)
        return heap

    def _bars(
        self,
        index: dict[str, WaitIndex[_K]],
        runs: dict[str, tuple[_K, bool]],
        cut: dict[str, float],
    ) -> LayerBars:
        """What each layer of ``index`` with a free seeder offers a demander (waiting.LayerBars).

        ``cut``: the layers whose run started at a cut, with it; they, and the layers with a
        free seeder but no run (it came during the walk, or their run ended: cut at +inf),
        make the summed bars.
        """
        share = self.rules.min_share
        need_share = self.rules.need_share
        free_get, relays_get = self._free.get, self._relays.get
        fastest_get, size = self._fastest_holder.get, self._size
        bars: dict[str, Bar] = {}
        cuts: list[tuple[float, str]] = []
        for layer in index:
            # _seedable and _best_free, inlined (this runs per layer after every transfer)
            held, relayed = free_get(layer), relays_get(layer)
            if held:
                free = -held[0][0]
                if relayed and -relayed[0][0] > free:
                    free = -relayed[0][0]
            elif relayed:
                free = -relayed[0][0]
            else:
                continue
            fastest = fastest_get(layer, INF)
            bars[layer] = Bar(
                free,
                size(layer) / free if need_share and free > 0 else INF,
                share <= 0 or share * fastest <= free,
                min(MIN_TRANSFER_BPS, fastest) <= free,
                share,
                self._clock,
                self.rules.wait_credit,
            )
            if layer not in runs:
                cuts.append((INF, layer))
            elif layer in cut:
                cuts.append((cut[layer], layer))
        cuts.sort()
        # after[i]: summed over the cut layers from the i-th on, as Bar sums (max, min, or)
        after = [CLOSED]
        best, need_s, any_share, any_floor = -INF, INF, False, False
        for _, layer in reversed(cuts):
            bar = bars[layer]
            best = max(best, bar.best)
            need_s = min(need_s, bar.need_s)
            any_share = any_share or bar.any_share
            any_floor = any_floor or bar.any_floor
            after.append(
                Bar(best, need_s, any_share, any_floor, share, self._clock, self.rules.wait_credit)
            )
        after.reverse()
        return LayerBars(bars, [c for c, _ in cuts], after)


def _admit_all(down: float, need_s: float, room: float, since: float) -> bool:
    """The plain walk's filter (``Planner.skip_hopeless`` off): every demander is asked."""
    return True


def _admits(bars: LayerBars | None, layer: str, at: float) -> Admits:
    """The filter of ``layer``'s run from key ``at`` on: its bars', or none (the plain walk)."""
    return _admit_all if bars is None else bars.admits(layer, at)
