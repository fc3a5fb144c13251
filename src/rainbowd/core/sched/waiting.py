"""The planner's index of waiting demanders, and the bar a demander must clear to be served.

Why: :meth:`rainbowd.core.sched.policies.Planner.plan` walks the waiting demanders of
every layer in service order and asks each whether a seeder fits it
(``Planner._serve``). The walk's cut (``start``) is by rank, but what
decides is the demander's least rate (``Fitter._fits``: a share of its
*download*, or of the layer over its need): on clusters where uploads are
scarce almost every demander the walk met failed. In the simulator, upload-
bound at 1,000 nodes made 2.8 M ``_serve`` calls, 97.8 % of them for nothing;
a ``plan()`` cost O(waiting demanders), a run O(nodes^2).

So the index keeps, per layer, the demanders' keys in sorted *blocks*, and
per block loose bounds on four values of its demanders (:class:`Hope`):
the least download speed, the largest need in seconds, the least free
download, the earliest time one began to wait (``wait_credit``). Before a
walk the planner sums up what the layers with free seeders offer
(:class:`Bar`); a block whose bounds cannot clear that bar holds nobody
``_serve`` could serve, and is stepped over whole. The bar is
a necessary condition only: a demander that clears it is still asked, so
the walk starts exactly the transfers the plain walk starts.

Bounds are loose on purpose: a block's least download is lowered when a
demander enters it, never raised when one leaves (that would need a
re-scan); a scan that meets a whole block re-computes them exactly.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

INF = float("inf")
#: keys per block: a walk that steps over a block costs one test, one that enters it up
#: to this many; a block of twice this is split (sqrt of the 10,000 nodes the simulator
#: runs, give or take)
BLOCK = 64
#: rounding allowance of the bar's need test (it divides where Fitter._fits multiplies)
_SLACK = 1e-9

#: a filter on a demander's values (down, need_s, room, since), or on a block's bounds on them
Admits = Callable[[float, float, float, float], bool]
#: a key of the index: sorted tuples whose last item is the demander's node id
K = TypeVar("K", bound=tuple[Any, ...])


class Hope(NamedTuple):
    """What decides whether a demander could be served (see ``Planner._serve``)."""

    down: float  # its download speed (min_share is taken of it)
    need_s: float  # seconds it needs to download all it lacks (need_share; 0 = unused)
    room: float  # its free download (the floor of a transfer's rate is at most this)
    #: when it began to wait (``wait_credit`` with ``need_share``: its need is at least the
    #: credit of the wait since; inf = no credit)
    since: float = INF


def credited_need(need_s: float, since: float, now: float, credit: float) -> float:
    """A demander's need in seconds with the wait credit: at least ``credit`` x its wait.

    ``since`` is inf where the credit is off (Hope.since), so the need stays as it is.
    One formula for ``Fitter._serve`` and :meth:`Bar.admits`: the bar must stay a bound.
    """
    return max(need_s, credit * (now - since)) if since < now else need_s


class Bar(NamedTuple):
    """What the layers with a free seeder offer, summed over every layer someone waits for.

    (A named tuple: a walk makes one per layer after each transfer it plans.)

    ``Planner._serve`` starts a transfer of layer L into demander N only if
    L's best free upload B_L is at least ``max(least, floor)``, where

    * ``least = min(share * min(N.down, fastest_L), size_L / need)`` (the
      second term with ``need_share`` only), ``need = max(N.need_s, credit x
      (now - N.since))`` (the second term with ``wait_credit`` only), and
    * ``floor = min(MIN_TRANSFER_BPS, fastest_L, N.room)``.

    For some layer, then: ``share * N.down <= B_L``, or ``share * fastest_L
    <= B_L``, or ``size_L / B_L <= need``; and ``N.room <= B_L`` or
    ``min(MIN_TRANSFER_BPS, fastest_L) <= B_L``. :meth:`admits` tests each of
    the two with the best value over all layers, so it never turns away a
    demander some layer could serve.
    """

    best: float  # the largest B_L (-inf: no layer has a free seeder)
    need_s: float  # the least size_L / B_L (inf: need_share off)
    any_share: bool  # some layer has B_L >= share * fastest_L: everyone clears the share
    any_floor: bool  # some layer has B_L >= min(MIN_TRANSFER_BPS, fastest_L)
    share: float  # the policy's min_share
    now: float = 0.0  # the walk's time (wait_credit)
    credit: float = 0.0  # the policy's wait_credit (0 = off)

    def admits(self, down: float, need_s: float, room: float, since: float = INF) -> bool:
        """Whether a demander with these values (or bounds on them) could clear the bar."""
        if self.best < 0:
            return False
        need_s = credited_need(need_s, since, self.now, self.credit)
        first = (
            self.any_share or self.share * down <= self.best or need_s * (1 + _SLACK) >= self.need_s
        )
        return first and (self.any_floor or room <= self.best)

    def looser_than(self, other: Bar) -> bool:
        """Whether this bar admits a demander ``other`` turned away."""
        return (
            self.best > other.best
            or self.need_s < other.need_s
            or (self.any_share and not other.any_share)
            or (self.any_floor and not other.any_floor)
        )


#: a bar no demander clears (no layer has a free seeder)
CLOSED = Bar(-INF, INF, False, False, 1.0)


@dataclass(frozen=True)
class LayerBars:
    """The bar of each layer's run in a walk: its own, or the sum over the cut layers.

    Why: one bar summed over every layer let through a demander that none of *its*
    layers could serve, as long as another layer had a big free upload (random-pareto
    at 1,000 nodes: 150 k of 166 k ``_serve`` calls found nothing, each wanted layer's
    best free upload below its least rate).

    A demander D met at key k is served through some layer L' it wants. If L' has a
    run that reaches k, L''s own bar admits D there, at the same key. A run need not
    reach k: it starts at its layer's *cut* (``Walker._order``: ``-best / share`` on the
    first item of the key), and with ``need_share`` a demander before the cut may still
    fit; and a layer that gets a free seeder during the walk has no run. Such an L' is
    *cut for k*: its cut lies above k[0] (or it has no run). Every run admits whoever
    clears the bar summed over the layers cut for the position its scan starts from
    (the layers cut for a later key are fewer). So D clears the filter of the run that
    meets it in the walk that asks everyone, or of L''s, at key k: the same demanders
    that could be served are met in the same order.
    """

    bars: dict[str, Bar]  # layer -> the bar of that layer alone
    cuts: list[float]  # the cut layers' cuts (first item of the key), ascending
    after: list[Bar]  # after[i]: summed over the cut layers from cuts[i] on (CLOSED at the end)

    def admits(self, layer: str, at: float) -> Admits:
        """The filter of ``layer``'s run for keys from ``at`` (their first item) on."""
        own, cut = self.bars.get(layer, CLOSED), self.after[bisect_right(self.cuts, at)]
        if cut.best < 0:
            return own.admits
        own_admits, cut_admits = own.admits, cut.admits

        def admits(down: float, need_s: float, room: float, since: float) -> bool:
            return own_admits(down, need_s, room, since) or cut_admits(down, need_s, room, since)

        return admits

    def looser_than(self, other: LayerBars) -> bool:
        """Whether some layer's bar admits a demander ``other``'s turned away.

        The summed bars follow: a layer joins the cut ones only by getting a free seeder
        (its bar is then looser than none).
        """
        was = other.bars
        return any(bar.looser_than(was.get(layer, CLOSED)) for layer, bar in self.bars.items())


#: the bounds of one block: least down, largest need_s, least room, earliest since
_Bounds = list[float]


def _bounds(hope: Hope) -> _Bounds:
    return list(hope)


def _widen(b: _Bounds, hope: Hope) -> None:
    down, need_s, room, since = hope
    if down < b[0]:
        b[0] = down
    if need_s > b[1]:
        b[1] = need_s
    if room < b[2]:
        b[2] = room
    if since < b[3]:
        b[3] = since


class WaitIndex(Generic[K]):
    """The waiting demanders of one layer: keys in sorted order, in blocks with bounds.

    ``hopes`` (node id -> :class:`Hope`) is shared by every index of the
    planner and kept by it; a demander's hope must be in it while its key is
    here, and :meth:`widen` must be told when it changes.
    """

    def __init__(self, hopes: dict[str, Hope]) -> None:
        self._hopes = hopes
        self._blocks: list[list[K]] = []
        self._firsts: list[K] = []  # the first key of each block
        self._bounds: list[_Bounds] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def keys(self) -> list[K]:
        """Every key, in order (O(keys): tests and debugging)."""
        return [k for block in self._blocks for k in block]

    def _block_of(self, key: K) -> int:
        b = bisect_right(self._firsts, key) - 1
        return b if b > 0 else 0

    def add(self, key: K) -> None:
        hope = self._hopes[key[-1]]
        self._len += 1
        firsts = self._firsts
        if not firsts:
            self._blocks.append([key])
            firsts.append(key)
            self._bounds.append(_bounds(hope))
            return
        b = bisect_right(firsts, key) - 1
        if b < 0:
            b = 0
        block = self._blocks[b]
        insort(block, key)
        firsts[b] = block[0]
        _widen(self._bounds[b], hope)
        if len(block) >= 2 * BLOCK:
            upper = block[BLOCK:]
            del block[BLOCK:]
            self._blocks.insert(b + 1, upper)
            firsts.insert(b + 1, upper[0])
            self._bounds.insert(b + 1, self._exact(upper))
            self._bounds[b] = self._exact(block)

    def _locate(self, key: K) -> tuple[int, list[K], int]:
        """The block ``key`` stands in, by number and itself, and its place there (KeyError)."""
        b = bisect_right(self._firsts, key) - 1
        if b < 0:
            b = 0
        block = self._blocks[b]
        i = bisect_left(block, key)
        if i == len(block) or block[i] != key:
            raise KeyError(key)
        return b, block, i

    def remove(self, key: K) -> None:
        b, block, i = self._locate(key)
        del block[i]
        self._len -= 1
        if not block:
            del self._blocks[b], self._firsts[b], self._bounds[b]
        elif i == 0:
            self._firsts[b] = block[0]

    def move(self, old: K, new: K) -> None:
        """:meth:`remove` ``old``, then :meth:`add` ``new``: a demander re-keyed in place.

        Why: a demander is re-keyed in every layer it wants after each transfer it
        starts (its need moves its key), hundreds of pieces of a big image; a new key
        that still falls inside the old one's block is swapped there, one search and
        no split (drawn-2 at 1,000 nodes: session 34). The blocks' layout is the
        index's own business: :meth:`first` answers the same whatever it is.
        """
        firsts = self._firsts
        b, block, i = self._locate(old)
        if (b == 0 or firsts[b] <= new) and (b + 1 == len(firsts) or new < firsts[b + 1]):
            del block[i]
            insort(block, new)
            firsts[b] = block[0]
            _widen(self._bounds[b], self._hopes[new[-1]])
            return
        self.remove(old)
        self.add(new)

    def widen(self, key: K, hope: Hope) -> None:
        """The demander of ``key`` now has ``hope``: its block's bounds take it in."""
        _widen(self._bounds[self._block_of(key)], hope)

    def _exact(self, block: list[K]) -> _Bounds:
        hopes = self._hopes
        first = hopes[block[0][-1]]
        b = _bounds(first)
        for key in block:
            _widen(b, hopes[key[-1]])
        return b

    def first(self, low: K, strict: bool, admits: Admits) -> K | None:
        """The first key at or after ``low`` (after it if ``strict``) whose demander ``admits``.

        Blocks whose bounds are not admitted are stepped over; a block scanned
        whole without a match gets exact bounds.
        """
        if not self._blocks:
            return None
        hopes = self._hopes
        b = self._block_of(low)
        block = self._blocks[b]
        i = bisect_right(block, low) if strict else bisect_left(block, low)
        if i > 0:
            # inside the block: its bounds cover these keys, so they may still say no
            if admits(*self._bounds[b]):
                for key in block[i:]:
                    if admits(*hopes[key[-1]]):
                        return key
            b += 1
        for j in range(b, len(self._blocks)):
            if not admits(*self._bounds[j]):
                continue
            block = self._blocks[j]
            for key in block:
                if admits(*hopes[key[-1]]):
                    return key
            self._bounds[j] = self._exact(block)
        return None
