"""Booked as shared: a demander books of its download what its seeder's shared upload gives.

(rules.py, "booked as shared"; the arithmetic: rainbowd.core.sched.policies.sharing.)
"""

from __future__ import annotations

import dataclasses

import pytest

from rainbowd.core.sched.policies import RULES, Planner
from rainbowd.core.sched.policies.sharing import shared_rate
from rainbowd.core.sched.reasons import SHARED_BPS
from rainbowd.core.sched.records import Transfer
from rainbowd.core.sched.scheduler import Scheduler

MB = 1e6
L1, L2, L3 = ("sha256:" + c * 64 for c in "123")


@pytest.mark.parametrize(
    ("capacity", "caps", "share"),
    [
        (10.0, [], 10.0),  # alone on the link
        (10.0, [20.0, 20.0, 20.0], 2.5),  # four equal flows
        (10.0, [1.0, 1.0], 8.0),  # the others take less than an equal share: it gets the rest
        (10.0, [1.0, 20.0], 4.5),  # one capped below the level, one above it
        (10.0, [5.0], 5.0),  # a cap at the level exactly
        (0.0, [1.0], 0.0),
    ],
)
def test_shared_rate_is_the_max_min_water_level(
    capacity: float, caps: list[float], share: float
) -> None:
    assert shared_rate(capacity, caps) == pytest.approx(share)


def test_the_shares_fill_the_link() -> None:
    caps = [0.5, 3.0, 7.0, 0.2]
    level = shared_rate(12.0, caps)
    assert sum(min(c, level) for c in caps) + level == pytest.approx(12.0)


def cluster(fair_share_s: float) -> tuple[Scheduler, Planner]:
    """Three nodes pull L2 from "a" at the 5 MB/s their downloads had left; then their
    other pulls end.

    a's flows were booked at 5 MB/s each, but the three downloads are free again: on
    the link each of the three now takes an equal share of a's 40 MB/s, whatever the
    bookings say.
    """
    s = Scheduler("slots")
    planner = s._pass
    assert isinstance(planner, Planner)
    planner.rules = dataclasses.replace(RULES["slots"], fair_share_s=fair_share_s)
    for layer in (L1, L2, L3):
        s.set_layer_size(layer, 40_000_000)
    s.add_node("a", 40 * MB, (L2,))
    s.add_node("c", 10 * MB, (L3,))
    for i in range(3):
        s.add_node(f"b{i}", 5 * MB, (L1,))
        s.add_node(f"x{i}", 10 * MB)
        s.demand(f"x{i}", L1, "j", 0.0)
        s.demand(f"x{i}", L2, "j", 0.0)
    first = s.schedule(0.0)
    assert sorted((t.seeder[0], t.layer) for t in first) == [("a", L2)] * 3 + [("b", L1)] * 3
    assert planner.free_up(s.nodes["a"]) == pytest.approx(25 * MB)
    for t in first:
        if t.layer == L1:
            s.complete(t.transfer_id, 5.0)
    return s, planner


def serve_d(s: Scheduler) -> dict[str, Transfer]:
    """ "d" (20 MB/s down) wants L2 (a has 25 MB/s free) and L3 (only c, 10 MB/s, holds it)."""
    s.add_node("d", 20 * MB)
    s.demand("d", L2, "j", 5.0)
    s.demand("d", L3, "j", 5.0)
    return {t.seeder: t for t in s.schedule(5.0)}


def test_a_demander_books_the_share_and_asks_another_seeder_for_the_rest() -> None:
    s, planner = cluster(2.0)
    got = serve_d(s)
    assert set(got) == {"a", "c"}
    reason = got["a"].reason
    assert reason is not None
    # a's 40 MB/s shared by its flows to x0..x2 (each could take 10) and to d: 10 each
    assert reason.numbers[SHARED_BPS] == pytest.approx(10 * MB)
    assert "10.0 MB/s of it expected beside the seeder's other flows" in reason.render()
    # the rest of d's download went to c; a's upload is booked at the planned 20 MB/s
    assert planner.free_down(s.nodes["d"]) == pytest.approx(0.0)
    assert planner.free_up(s.nodes["a"]) == pytest.approx(5 * MB)


def test_off_the_demander_books_the_planned_rate_and_waits_for_the_rest() -> None:
    s, planner = cluster(0.0)
    got = serve_d(s)
    assert set(got) == {"a"}
    reason = got["a"].reason
    assert reason is not None and SHARED_BPS not in reason.numbers
    assert planner.free_down(s.nodes["d"]) == pytest.approx(0.0)


def test_a_transfer_shorter_than_fair_share_s_at_its_share_keeps_its_booking() -> None:
    # 40 MB at the shared 10 MB/s is 4 s: booked as shared up to fair_share_s 4 s, not at 5
    assert set(serve_d(cluster(4.0)[0])) == {"a", "c"}
    s, _ = cluster(5.0)
    got = serve_d(s)
    assert set(got) == {"a"}
    reason = got["a"].reason
    assert reason is not None and SHARED_BPS not in reason.numbers


def test_a_shared_booking_is_given_back_when_the_transfer_ends() -> None:
    s, planner = cluster(2.0)
    got = serve_d(s)
    for t in got.values():
        s.complete(t.transfer_id, 20.0)
    assert planner.free_down(s.nodes["d"]) == pytest.approx(20 * MB)
