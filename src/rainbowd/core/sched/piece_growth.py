"""Pieces that grow mid-job to the measured fixed cost of a transfer.

Pieces are cut when a layer's size is learnt, often before any transfer was
measured (pieces.py). On an idle host a transfer's assignment and report
cost milliseconds and one-chunk pieces are best; on a loaded one they cost
~1 s and most of a one-chunk piece's time would be spent on them
(transfer_cost.py). So the piece scheduler feeds every done report to a
:class:`PieceGrowth`, which measures that cost and, once it asks for pieces at
least twice what it asked at its last look and twice a layer's largest
piece, merges runs of that layer's pieces that no transfer moves and that
every node holds all or none of, and wants all or none of (:func:`plan_growth`):
every node's holding and demand then carry over whole. Pieces already in
motion or partly spread keep their size: merging them would lose track of
who holds what. Pieces only grow: a restarted coordinator splits a layer as
its longest piece in flight (``PieceScheduler.split_as``), and a transfer of
a shorter one is planned anew.
"""

from __future__ import annotations

from collections.abc import Callable

from .piece_layout import Piece
from .scheduler import Scheduler
from .transfer_cost import TransferCostMeter


def plan_growth(
    pieces: list[Piece],
    per_piece: int,
    sign: Callable[[Piece], object | None],
) -> list[list[Piece]]:
    """``pieces`` in runs to merge: consecutive, of equal ``sign``, at most ``per_piece`` chunks.

    ``sign(p)`` is None for a piece that must stay as it is (one in motion);
    otherwise pieces merge only with neighbours of the same sign (who holds
    it, who wants it), so every node's holding and demand carry over whole.
    """
    groups: list[list[Piece]] = []
    run: list[Piece] = []
    run_sign: object | None = None
    for p in pieces:
        s = sign(p)
        fits = bool(run) and p.end - run[0].first <= per_piece
        if s is not None and fits and s == run_sign:
            run.append(p)
            continue
        if run:
            groups.append(run)
        run, run_sign = [p], s
        if s is None:
            groups.append(run)
            run = []
    if run:
        groups.append(run)
    return groups


class PieceGrowth:
    """The measured cost of a transfer, and the growths of pieces it asked for (module docstring).

    ``cost_share``: the most of a piece's bytes' time its fixed cost may be
    (a policy's ``cost_share``; 0: pieces never grow).
    """

    def __init__(self, cost_share: float) -> None:
        self.cost_share = cost_share
        #: the fixed cost of a transfer, measured from done reports (transfer_cost.py)
        self.meter = TransferCostMeter()
        #: the piece size (bytes) the meter asked for when pieces last grew: they grow again
        #: only once it asks for twice that (a handful of times at most, up to the cap)
        self._grown_to = 1
        #: (layer, chunks a piece may have, pieces of the layer now) per growth, until
        #: :meth:`take` (the coordinator logs them)
        self._growths: list[tuple[str, int, int]] = []

    def observe(self, elapsed: float, seconds: float, nbytes: int) -> bool:
        """One done report (TransferCostMeter.add); True if pieces may grow now."""
        return self.cost_share > 0 and self.meter.add(elapsed, seconds, nbytes)

    def chunks(self, chunk_size: int) -> int:
        """Chunks per piece the measured cost asks for (1: nothing measured).

        A layer learnt after transfers were measured is cut at that size at once;
        the others grow to it (:meth:`grow`).
        """
        want = self.meter.piece_bytes(self.cost_share)
        return max(1, want // chunk_size) if chunk_size > 0 else 1

    def take(self) -> list[tuple[str, int, int]]:
        """The growths since the last call: (layer, chunks a piece may have, pieces now)."""
        out, self._growths = self._growths, []
        return out

    def grow(
        self, layers: dict[str, list[Piece]], by_key: dict[str, Piece], inner: Scheduler
    ) -> None:
        """Merge runs of untouched pieces up to the size the measured cost asks for.

        ``layers`` (layer -> its pieces) and ``by_key`` (piece key -> piece) are
        the piece scheduler's tables, ``inner`` its scheduler over pieces: all
        three change where pieces merge (module docstring).
        """
        want = self.meter.piece_bytes(self.cost_share)
        if want < 2 * self._grown_to:
            return  # nothing asks for twice the pieces the last look grew them to
        self._grown_to = want
        ready = []
        for layer, pieces in layers.items():
            chunk_size = inner.layer_chunks.get(pieces[0].key, 0)
            if len(pieces) < 2 or chunk_size <= 0:
                continue
            per = want // chunk_size
            if per >= 2 * max(p.end - p.first for p in pieces):
                ready.append((layer, per, chunk_size))
        if not ready:
            return
        busy = {t.layer for t in inner.active()}
        wanted: dict[str, set[str]] = {}
        for node, key in inner.pending():
            wanted.setdefault(key, set()).add(node)

        def sign(p: Piece) -> tuple[frozenset[str], frozenset[str]] | None:
            if p.key in busy:
                return None
            return frozenset(inner.holders_of(p.key)), frozenset(wanted.get(p.key, ()))

        for layer, per, chunk_size in ready:
            groups = plan_growth(layers[layer], per, sign)
            if any(len(g) > 1 for g in groups):
                layers[layer] = _merge(layer, groups, chunk_size, wanted, by_key, inner)
                self._growths.append((layer, per, len(layers[layer])))


def _merge(
    layer: str,
    groups: list[list[Piece]],
    chunk_size: int,
    wanted: dict[str, set[str]],
    by_key: dict[str, Piece],
    inner: Scheduler,
) -> list[Piece]:
    """``layer``'s pieces with each group made one piece, keyed as its first."""
    merged: list[Piece] = []
    for g in groups:
        head = g[0]
        if len(g) == 1:
            merged.append(head)
            continue
        whole = Piece(layer, head.key, head.first, g[-1].end, sum(p.size for p in g))
        holders = list(inner.holders_of(head.key))
        for p in g[1:]:
            for node in holders:
                inner.remove_holding(node, p.key)
            for node in wanted.get(p.key, ()):
                inner.cancel_demand(node, p.key)
            by_key.pop(p.key, None)
        by_key[head.key] = whole
        inner.set_layer_size(head.key, whole.size, chunk_size)
        merged.append(whole)
    return merged
