"""The job driver (rainbowd.core.sched.jobdriver): each rule that turns a report or fault
into scheduler calls.

Pure: a real PieceScheduler, time passed in, no clock and no sleep. The
coordinator's services and the simulator both call these rules, so each is
pinned here once; whole runs with injected faults are in tests/bench/test_sim_faults.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from rainbowd.core.sched.jobdriver import (
    IO_AVOID_INTERVALS,
    MAX_LAYER_FAILURES,
    REST_INTERVALS,
    VERIFY_AVOID_SECONDS,
    Blame,
    Charge,
    Failure,
    FailureBudget,
    JobDriver,
)
from rainbowd.core.sched.pieces import PieceScheduler
from rainbowd.core.sched.reasons import TransferReason
from rainbowd.core.sched.records import Transfer

MB = 1e6
L1, L2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
#: the heartbeat interval the tests run with (seconds)
INTERVAL = 2.0
#: the reason of a transfer taken back from an agent
ADOPTED = TransferReason.adopted()


@dataclass
class Timing:
    heartbeat_interval: float = INTERVAL


def cluster(policy: str = "paper", **seeders: float) -> JobDriver:
    """A driver over: the given seeders (name=speed) holding L1 and L2, and demanders d1, d2."""
    s = PieceScheduler(policy)
    d = JobDriver(s, Timing())
    for name, speed in seeders.items():
        d.node_up(name, speed, [L1, L2])
    d.node_up("d1", 1 * MB)
    d.node_up("d2", 1 * MB)
    return d


def first(d: JobDriver, now: float = 0.0) -> Transfer:
    (t,) = d.plan(now)
    return t


# -- what a failure says ---------------------------------------------------------
@pytest.mark.parametrize(
    ("failure", "charge", "blame"),
    [
        (Failure("io"), Charge.COUNT, Blame.SUSPECT),
        (Failure("unreachable"), Charge.COUNT, Blame.SUSPECT),
        (Failure("io", not_held=True), Charge.COUNT, Blame.NONE),
        (Failure("verify", seeder_fault=True), Charge.COUNT, Blame.BAD_CHUNKS),
        (Failure("verify"), Charge.COUNT, Blame.NONE),  # our own check failed: not the seeder
        (Failure("security", seeder_fault=True), Charge.COUNT, Blame.HOST_KEY),
        (Failure("security"), Charge.COUNT, Blame.TRUST_BEHIND),
        (Failure("relay"), Charge.FREE, Blame.RELAY),
        (Failure("disk"), Charge.FINAL, Blame.NONE),
        (Failure("cancelled"), Charge.COUNT, Blame.NONE),
        (Failure("internal"), Charge.COUNT, Blame.NONE),
    ],
)
def test_each_failure_kind_has_one_charge_and_one_blame(
    failure: Failure, charge: Charge, blame: Blame
) -> None:
    assert (failure.charge, failure.blame) == (charge, blame)


def test_only_reports_about_the_seeder_need_evidence() -> None:
    assert Failure("io").accuses_seeder
    assert Failure("security").accuses_seeder
    assert Failure("verify", seeder_fault=True).accuses_seeder
    assert Failure("disk", not_held=True).accuses_seeder
    assert not Failure("relay").accuses_seeder
    assert not Failure("disk").accuses_seeder


# -- suspect and avoid -----------------------------------------------------------
def test_an_unreachable_seeder_is_suspect_and_avoided_until_it_reports() -> None:
    d = cluster(fast=50 * MB, slow=5 * MB)
    d.demand("d1", [L1], "j", 0.0)
    t = first(d)
    assert t.seeder == "fast"
    out = d.failed(t, Failure("unreachable"), 1.0)
    assert out.was_active and out.blame is Blame.SUSPECT and out.charge is Charge.COUNT
    assert d.scheduler.is_suspect("fast")
    # re-planned at once, on the other seeder
    assert first(d, 1.0).seeder == "slow"
    # d2 gets no work from the suspect either
    d.demand("d2", [L1], "j", 1.0)
    assert d.plan(1.0) == []
    # its heartbeat clears the suspicion: d2 is served; d1 still avoids it for 2 intervals
    assert d.reported("fast")
    assert not d.reported("fast")  # once
    assert first(d, 1.5).demander == "d2"
    assert d.scheduler.is_active(t.transfer_id) is False


def test_the_pair_avoids_each_other_for_two_intervals_after_io() -> None:
    d = cluster(fast=50 * MB)
    d.demand("d1", [L1], "j", 0.0)
    t = first(d)
    d.failed(t, Failure("io"), 10.0)
    d.reported("fast")
    until = 10.0 + IO_AVOID_INTERVALS * INTERVAL
    assert d.plan(until - 0.01) == []
    assert first(d, until).seeder == "fast"


def test_a_relay_whose_upstream_failed_is_not_blamed() -> None:
    d = cluster(fast=50 * MB)
    d.demand("d1", [L1], "j", 0.0)
    t = first(d)
    out = d.failed(t, Failure("relay"), 5.0)
    assert out.charge is Charge.FREE and out.blame is Blame.RELAY
    assert not d.scheduler.is_suspect("fast")
    # the pair rests one interval, then the relay may serve again
    assert d.plan(5.0 + REST_INTERVALS * INTERVAL - 0.01) == []
    assert first(d, 5.0 + REST_INTERVALS * INTERVAL).seeder == "fast"


def test_bad_chunks_part_the_pair_for_a_minute_and_penalty_halves_the_speed() -> None:
    d = cluster(bad=50 * MB, good=5 * MB)
    d.demand("d1", [L1], "j", 0.0)
    t = first(d)
    assert t.seeder == "bad"
    d.failed(t, Failure("verify", seeder_fault=True), 1.0)
    assert not d.scheduler.is_suspect("bad")  # it answers: it is not dead
    assert first(d, 1.0).seeder == "good"
    assert d.penalize("bad") == 25 * MB
    d2 = cluster(bad=50 * MB)
    d2.demand("d1", [L1], "j", 0.0)
    d2.failed(first(d2), Failure("verify", seeder_fault=True), 1.0)
    assert d2.plan(1.0 + VERIFY_AVOID_SECONDS - 0.01) == []
    assert first(d2, 1.0 + VERIFY_AVOID_SECONDS).seeder == "bad"


def test_no_blame_for_a_seeder_already_out() -> None:
    d = cluster(fast=50 * MB)
    d.demand("d1", [L1], "j", 0.0)
    out = d.failed(first(d), Failure("io"), 1.0, blame=False)
    assert out.blame is Blame.NONE and not d.scheduler.is_suspect("fast")
    assert first(d, 1.0).seeder == "fast"


def test_a_failure_of_a_dropped_transfer_still_blames_but_frees_nothing() -> None:
    d = cluster(fast=50 * MB)
    d.demand("d1", [L1], "j", 0.0)
    t = first(d)
    assert d.node_down("d1") == [t]  # the coordinator dropped it
    out = d.failed(t, Failure("io"), 1.0)
    assert not out.was_active and d.scheduler.is_suspect("fast")


# -- budgets ---------------------------------------------------------------------
def test_a_budget_fails_the_node_on_the_fifth_failure_of_one_layer() -> None:
    b = FailureBudget()
    for i in range(1, MAX_LAYER_FAILURES):
        assert b.charge(L1, Charge.COUNT) == i
        assert not b.exhausted(L1, Charge.COUNT)
    assert b.charge(L2, Charge.COUNT) == 1  # per layer
    assert b.charge(L1, Charge.COUNT) == MAX_LAYER_FAILURES
    assert b.exhausted(L1, Charge.COUNT)


def test_free_failures_cost_nothing_and_final_ones_everything() -> None:
    b = FailureBudget()
    for _ in range(2 * MAX_LAYER_FAILURES):
        assert b.charge(L1, Charge.FREE) == 0
        assert not b.exhausted(L1, Charge.FREE)
    assert b.charge(L1, Charge.FINAL) == 1
    assert b.exhausted(L1, Charge.FINAL)


def test_a_failed_node_stops_demanding_what_no_other_job_needs() -> None:
    d = cluster(fast=50 * MB)
    d.demand("d1", [L1, L2], "j1", 0.0)
    d.release("d1", [L1, L2], keep={L2})
    assert d.scheduler.pending() == [("d1", L2)]


# -- jobs and reports ------------------------------------------------------------
def test_demands_follow_image_order_and_done_measures_the_seeder() -> None:
    d = cluster(fast=50 * MB)
    d.demand("d1", [L2, L1], "j", 0.0)
    t = first(d)
    assert t.layer == L2
    assert d.done(t.transfer_id, 4.0, int(40 * MB)) == t
    assert d.scheduler.speed("fast") == pytest.approx(10 * MB)
    assert d.holds_layer(t) and d.scheduler.holds("d1", L2)
    assert d.done(t.transfer_id, 5.0, 1) is None  # a late report changes nothing


def test_a_piece_done_is_not_the_layer() -> None:
    s = PieceScheduler("swarm")
    d = JobDriver(s, Timing())
    s.set_layer_size(L1, 64 * 1024 * 1024, 1024 * 1024)
    assert len(s.pieces(L1)) > 1
    d.node_up("o", 50 * MB, [L1])
    d.node_up("d1", 50 * MB)
    d.demand("d1", [L1], "j", 0.0)
    started = d.plan(0.0)
    assert started and all(t.end_chunk for t in started)
    t = started[0]
    d.done(t.transfer_id, 1.0, s.piece_of(t).size)
    assert not d.holds_layer(t)
    whole = Transfer("w", L1, "o", "d1", "j", 0.0, ADOPTED, 1.0)
    assert d.holds_layer(whole)  # a whole-layer transfer done is the layer


def test_an_unusable_transfer_drops_its_demand() -> None:
    d = cluster(fast=50 * MB)
    d.demand("d1", [L1], "j", 0.0)
    d.unusable(first(d))
    assert d.scheduler.pending() == [] and d.scheduler.active() == []


# -- adoption --------------------------------------------------------------------
def test_a_dropped_transfer_the_agent_still_runs_is_taken_back() -> None:
    d = cluster(fast=50 * MB)
    d.demand("d1", [L1], "j", 0.0)
    t = first(d)
    d.node_down("d1")  # its long-poll dropped; the agent pulls on
    assert d.readopt(t, held=False)
    d.node_up("d1", 1 * MB)
    assert d.scheduler.is_active(t.transfer_id)
    d.demand("d2", [L1], "j", 1.0)
    assert d.plan(1.0) == []  # the seeder is locked again: nothing sent twice


def test_no_readoption_of_a_held_or_replanned_piece() -> None:
    d = cluster(fast=50 * MB, slow=5 * MB)
    d.demand("d1", [L1], "j", 0.0)
    t = first(d)
    d.node_down("d1")
    assert not d.readopt(t, held=True)
    d.node_up("d1", 1 * MB)
    again = first(d, 1.0)
    assert again.demander == "d1"
    assert not d.readopt(t, held=False)  # another transfer brings it now


def test_an_unknown_transfer_is_adopted_unless_the_layer_is_on_its_way() -> None:
    d = cluster(fast=50 * MB)
    t = d.adopt_reported("x1", L1, "fast", "d1", "j", 3.0)
    assert t is not None and t.reason.render().startswith("adopted")
    assert t.seeder_speed_bps == 50 * MB
    assert d.scheduler.is_active("x1")
    assert d.adopt_reported("x2", L1, "fast", "d1", "j", 3.0) is None


def test_after_a_restart_a_stored_transfer_is_locked_before_nodes_report() -> None:
    d = cluster(fast=50 * MB)
    d.node_down("d1")
    t = Transfer("t-old", L1, "fast", "d1", "j", 0.0, ADOPTED, 50 * MB)
    assert d.adopt(t) == t
    d.node_up("d1", 1 * MB)
    d.demand("d1", [L1], "j", 1.0)
    assert d.plan(1.0) == []  # it is still pulling: no second copy
    assert d.lost("t-old").transfer_id == "t-old"  # never delivered: planned again
    assert first(d, 1.0).demander == "d1"


def test_an_absent_transfer_completes_if_held_else_is_released() -> None:
    d = cluster(fast=50 * MB)
    d.demand("d1", [L1], "j", 0.0)
    d.demand("d2", [L2], "j", 0.0)
    t = first(d)
    assert d.absent(t, held=True, now=1.0)
    assert d.scheduler.holds(t.demander, t.layer)
    u = first(d, 1.0)
    assert not d.absent(u, held=False, now=2.0)
    assert (u.demander, u.layer) in d.scheduler.pending()


def test_orphans_are_the_transfers_of_demanders_not_up() -> None:
    d = cluster(fast=50 * MB, slow=5 * MB)
    d.demand("d1", [L1], "j", 0.0)
    d.demand("d2", [L1], "j", 0.0)
    started = d.plan(0.0)
    assert len(started) == 2
    gone = d.orphans(lambda nid: nid != "d2")
    assert [t.demander for t in gone] == ["d2"]
    assert [t.demander for t in d.scheduler.active()] == ["d1"]
