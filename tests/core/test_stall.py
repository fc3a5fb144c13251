"""StallWatch: a pull is given up only after ``stall_s`` without progress, never for being slow."""

from __future__ import annotations

import pytest

from rainbowd.core.stall import StallWatch


def test_steady_progress_never_stalls_however_long_it_takes() -> None:
    w = StallWatch(stall_s=10.0, started_at=0.0)
    for t in range(0, 1000, 9):  # a chunk every 9 s for ~17 minutes
        assert not w.seen(t, float(t))


def test_no_progress_for_stall_s_stalls() -> None:
    w = StallWatch(stall_s=10.0, started_at=100.0)
    assert not w.seen(0, 100.0)
    assert not w.seen(5, 104.0)
    assert not w.seen(5, 113.9)
    assert w.left(113.9) == pytest.approx(0.1)
    assert w.seen(5, 114.0)


def test_nothing_at_all_stalls_from_the_start() -> None:
    w = StallWatch(stall_s=3.0, started_at=0.0)
    assert not w.seen(0, 2.9)
    assert w.seen(0, 3.0)


def test_a_count_that_goes_back_is_not_progress() -> None:
    w = StallWatch(stall_s=3.0, started_at=0.0)
    w.seen(7, 1.0)
    w.seen(8, 2.0)  # grew at 2.0
    assert not w.seen(3, 4.5)  # fell back (a partial discarded): not progress ...
    assert w.seen(6, 5.0)  # ... and no growth until it passes 8: stalled 3 s after 2.0


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_stall_s_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="stall_s"):
        StallWatch(stall_s=bad, started_at=0.0)
