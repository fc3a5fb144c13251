"""Pieces grow mid-job to the measured fixed cost of a transfer (core/sched/transfer_cost.py,
core/sched/piece_growth.py).

Pure: the meter and the scheduler are driven with explicit times (a fake clock), no I/O.
"""

from __future__ import annotations

import itertools
import math

import pytest

from rainbowd.core.sched.piece_growth import plan_growth
from rainbowd.core.sched.piece_layout import Piece
from rainbowd.core.sched.pieces import PieceScheduler
from rainbowd.core.sched.policies import RULES
from rainbowd.core.sched.transfer_cost import (
    MAX_PIECE_BYTES,
    MIN_SAMPLES,
    WINDOW,
    TransferCostMeter,
)

MB = 1_000_000
CHUNK = 1 << 20
LAYER = "sha256:" + "a" * 64


# -- the meter -----------------------------------------------------------------
def test_the_meter_says_nothing_until_it_has_enough_samples() -> None:
    m = TransferCostMeter()
    for _ in range(MIN_SAMPLES - 1):
        assert m.add(3.0, 1.0, CHUNK)
    assert (m.overhead_s(), m.rate_Bps(), m.piece_bytes(0.25)) == (0.0, 0.0, 0)
    m.add(3.0, 1.0, CHUNK)
    assert m.overhead_s() == 2.0 and m.rate_Bps() == CHUNK
    # P >= overhead * rate / share: 2 s x 1 MiB/s / 0.5 = 4 MiB
    assert m.piece_bytes(0.5) == 4 * CHUNK
    assert m.piece_bytes(0.0) == 0  # the rule is off


def test_the_meter_takes_medians_of_the_recent_samples_only() -> None:
    m = TransferCostMeter()
    for _ in range(WINDOW):
        m.add(10.0, 1.0, CHUNK)  # an old, slow phase ...
    for _ in range(WINDOW):
        m.add(1.1, 1.0, CHUNK)  # ... left the window
    assert m.samples == WINDOW
    assert m.overhead_s() == pytest.approx(0.1)
    # a minority of outliers does not move a median
    for _ in range(WINDOW // 3):
        m.add(100.0, 0.001, CHUNK)
    assert m.overhead_s() == pytest.approx(0.1) and m.rate_Bps() == pytest.approx(CHUNK)


@pytest.mark.parametrize(
    ("elapsed", "seconds", "nbytes"),
    [
        (1.0, math.nan, CHUNK),
        (math.inf, 1.0, CHUNK),
        (1.0, -1.0, CHUNK),
        (1.0, 0.0, CHUNK),  # an agent too old to say its pull time
        (0.0, 1.0, CHUNK),
        (1.0, 0.5, 0),  # a resumed pull that moved nothing
        (1.0, 5e-324, CHUNK),  # a rate that overflows to inf
    ],
)
def test_a_sample_that_says_nothing_is_not_kept(
    elapsed: float, seconds: float, nbytes: int
) -> None:
    m = TransferCostMeter()
    assert not m.add(elapsed, seconds, nbytes)
    assert m.samples == 0


def test_a_pull_time_longer_than_the_coordinators_own_measure_is_bounded_by_it() -> None:
    m = TransferCostMeter(window=1, min_samples=1)
    m.add(2.0, 50.0, CHUNK)  # the demander claims 50 s of a transfer assigned 2 s ago
    assert m.overhead_s() == 0.0 and m.rate_Bps() == CHUNK / 2.0


def test_the_piece_asked_for_is_capped_whatever_was_measured() -> None:
    m = TransferCostMeter(window=1, min_samples=1)
    m.add(1e6, 1e-6, CHUNK)  # a huge cost at a huge rate (a liar, or a broken clock)
    assert m.piece_bytes(0.25) == MAX_PIECE_BYTES


def test_a_meter_needs_a_window_that_holds_its_minimum() -> None:
    with pytest.raises(ValueError, match="min_samples"):
        TransferCostMeter(window=4, min_samples=5)


# -- which pieces merge ----------------------------------------------------------
def pieces(n: int) -> list[Piece]:
    return [Piece(LAYER, f"{LAYER}#{i}", i, i + 1, CHUNK) for i in range(n)]


def test_runs_merge_only_among_equal_neighbours_and_up_to_the_size() -> None:
    ps = pieces(10)
    signs = {3: None, 6: "held by another"}  # 3 in motion; 6 spread otherwise
    groups = plan_growth(ps, 4, lambda p: signs.get(p.first, "same"))
    assert [[p.first for p in g] for g in groups] == [
        [0, 1, 2],
        [3],
        [4, 5],
        [6],
        [7, 8, 9],
    ]
    # nothing in motion, one kind: runs of at most per_piece chunks
    runs = plan_growth(ps, 4, lambda p: "same")
    assert [len(g) for g in runs] == [4, 4, 2]


# -- the scheduler ---------------------------------------------------------------
def swarm_with(size: int) -> PieceScheduler:
    """``swarm``: LAYER in one-chunk pieces at the origin, "a" and "b" wanting it."""
    s = PieceScheduler("swarm")
    s.report_cost_s = 0.0  # pieces of one chunk, whatever the cluster
    s.add_node("origin", 4 * MB, download_bps=4 * MB)
    s.add_node("a", 4 * MB, download_bps=4 * MB)
    s.add_node("b", 4 * MB, download_bps=4 * MB)
    s.add_holding("origin", LAYER)
    s.set_layer_size(LAYER, size, CHUNK)
    s.demand("a", LAYER, "j", 0.0)
    s.demand("b", LAYER, "j", 0.0)
    return s


def test_untouched_pieces_grow_once_transfers_cost_more_than_their_bytes() -> None:
    assert RULES["swarm"].cost_share == 0.25
    s = swarm_with(32 * CHUNK)
    assert {p.end - p.first for p in s.pieces(LAYER)} == {1}
    moving = s.schedule(0.0)
    assert moving
    for _ in range(MIN_SAMPLES - 1):  # 2 s outside a 1 s pull of 1 MiB: ask for 8 MiB
        s.cost_meter.add(3.0, 1.0, CHUNK)
    done = s.complete(moving[0].transfer_id, 3.0, CHUNK, seconds=1.0)

    after = s.pieces(LAYER)
    assert [p.first for p in after] == sorted(p.first for p in after)
    assert after[0].first == 0 and all(x.end == y.first for x, y in itertools.pairwise(after))
    assert after[-1].end == 32
    assert max(p.end - p.first for p in after) == 8
    # pieces in motion or held by one demander keep their size and key
    kept = {(t.first_chunk, t.end_chunk) for t in moving}
    assert kept <= {(p.first, p.end) for p in after}
    assert s.holds_piece(done.demander, done)
    # holdings and demands carried over: the origin holds every piece, "a" and "b"
    # want what they lack, and new transfers move the grown pieces
    assert s.holders(LAYER) == ["origin"]
    later = s.schedule(3.0)
    assert any(t.end_chunk - t.first_chunk == 8 for t in later)
    now = 4.0
    while not (s.holds("a", LAYER) and s.holds("b", LAYER)):
        for t in s.active():
            s.complete(t.transfer_id, now, CHUNK, seconds=0.5)
        s.schedule(now)
        now += 1.0
        assert now < 200
    assert s.holders(LAYER) == ["a", "b", "origin"]


def test_pieces_keep_their_size_where_the_fixed_cost_is_small() -> None:
    s = swarm_with(32 * CHUNK)
    moving = s.schedule(0.0)
    for _ in range(MIN_SAMPLES - 1):  # 10 ms outside a 1 s pull: one chunk is plenty
        s.cost_meter.add(1.01, 1.0, CHUNK)
    s.complete(moving[0].transfer_id, 1.01, CHUNK, seconds=1.0)
    assert {p.end - p.first for p in s.pieces(LAYER)} == {1}
    assert len(s.pieces(LAYER)) == 32


def test_pieces_grow_only_when_the_measure_asks_for_twice_their_size() -> None:
    s = swarm_with(64 * CHUNK)
    moving = s.schedule(0.0)
    for _ in range(MIN_SAMPLES - 1):  # ask for 4 chunks (1 s outside, 1 MiB/s, share 0.25)
        s.cost_meter.add(2.0, 1.0, CHUNK)
    s.complete(moving[0].transfer_id, 2.0, CHUNK, seconds=1.0)
    sizes = [p.end - p.first for p in s.pieces(LAYER)]
    assert max(sizes) == 4
    n = len(sizes)
    # a little more cost (5 chunks' worth) is not worth re-cutting for
    for _ in range(WINDOW):
        s.cost_meter.add(2.25, 1.0, CHUNK)
    s.complete(moving[1].transfer_id, 3.0, CHUNK, seconds=1.0)
    assert len(s.pieces(LAYER)) == n


def test_each_growth_is_told_once() -> None:
    s = swarm_with(32 * CHUNK)
    moving = s.schedule(0.0)
    for _ in range(MIN_SAMPLES - 1):
        s.cost_meter.add(3.0, 1.0, CHUNK)
    s.complete(moving[0].transfer_id, 3.0, CHUNK, seconds=1.0)
    assert s.take_growths() == [(LAYER, 8, len(s.pieces(LAYER)))]
    assert s.take_growths() == []


def test_a_layer_learnt_after_the_measure_is_cut_at_its_size_at_once() -> None:
    s = swarm_with(32 * CHUNK)
    moving = s.schedule(0.0)
    for _ in range(MIN_SAMPLES - 1):  # ask for 4 chunks
        s.cost_meter.add(2.0, 1.0, CHUNK)
    s.complete(moving[0].transfer_id, 2.0, CHUNK, seconds=1.0)
    later = "sha256:" + "c" * 64
    s.add_holding("origin", later)
    s.set_layer_size(later, 16 * CHUNK, CHUNK)
    assert [p.end - p.first for p in s.pieces(later)] == [4] * 4
