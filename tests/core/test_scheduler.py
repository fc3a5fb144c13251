"""Algorithm 1 (policy "paper") as implemented by rainbowd.core.sched.scheduler.

Each test pins one rule of the scheduler; the last ones drive a whole
simulated cluster and check global invariants.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Iterable

import pytest

from rainbowd.core.sched import reasons as rs
from rainbowd.core.sched.jobdriver import Failure, JobDriver
from rainbowd.core.sched.pieces import PieceScheduler
from rainbowd.core.sched.reasons import TransferReason
from rainbowd.core.sched.records import Transfer
from rainbowd.core.sched.scheduler import DEFAULT_SPEED_BPS, POLICIES, Scheduler, SchedulerError

#: the reason of a transfer taken back from an agent
ADOPTED = TransferReason.adopted()

MB = 1e6
L1, L2, L3 = "sha256:" + "1" * 64, "sha256:" + "2" * 64, "sha256:" + "3" * 64


def pairs(transfers: list[Transfer]) -> set[tuple[str, str, str]]:
    """(seeder, demander, layer) of each transfer."""
    return {(t.seeder, t.demander, t.layer) for t in transfers}


def make(*nodes: tuple[str, float, tuple[str, ...]]) -> Scheduler:
    s = Scheduler("paper")
    for node_id, speed, holdings in nodes:
        s.add_node(node_id, speed, holdings)
    return s


# -- construction and errors ------------------------------------------------
def test_unknown_policy_is_refused() -> None:
    with pytest.raises(SchedulerError, match="unknown policy 'bittorrent'"):
        Scheduler("bittorrent")


def test_unknown_node_raises() -> None:
    s = make(("o", 10 * MB, (L1,)))
    with pytest.raises(SchedulerError, match="unknown node 'ghost'"):
        s.demand("ghost", L1, "j", 0.0)
    with pytest.raises(SchedulerError, match="ghost"):
        s.node_down("ghost")
    with pytest.raises(SchedulerError, match="ghost"):
        s.observe_speed("ghost", 5 * MB)
    with pytest.raises(SchedulerError, match="ghost"):
        s.speed("ghost")
    with pytest.raises(SchedulerError, match="ghost"):
        s.add_holding("ghost", L1)
    with pytest.raises(SchedulerError, match="ghost"):
        s.holds("ghost", L1)


def test_unknown_transfer_raises() -> None:
    s = make(("o", 10 * MB, (L1,)), ("a", 10 * MB, ()))
    with pytest.raises(SchedulerError, match="no active transfer 'nope'"):
        s.complete("nope", 1.0)
    with pytest.raises(SchedulerError, match="no active transfer 'nope'"):
        s.fail("nope")
    s.demand("a", L1, "j", 0.0)
    (t,) = s.schedule(0.0)
    s.complete(t.transfer_id, 1.0)
    # a transfer is finished once: completing or failing it again is an error
    with pytest.raises(SchedulerError):
        s.complete(t.transfer_id, 2.0)
    with pytest.raises(SchedulerError):
        s.fail(t.transfer_id)


def test_unknown_speed_gets_the_default() -> None:
    s = make(("o", 0.0, (L1,)), ("a", 3 * MB, ()))
    assert s.speed("o") == DEFAULT_SPEED_BPS
    assert s.speed("a") == 3 * MB


# -- choosing seeders --------------------------------------------------------
def test_fastest_idle_seeder_is_chosen() -> None:
    s = make(
        ("origin", 10 * MB, (L1,)),
        ("fast", 50 * MB, (L1,)),
        ("slow", 2 * MB, (L1,)),
        ("d", 10 * MB, ()),
    )
    assert s.demand("d", L1, "j1", 0.0)
    (t,) = s.schedule(0.0)
    assert (t.seeder, t.demander, t.layer, t.job_id) == ("fast", "d", L1, "j1")
    assert t.seeder_speed_bps == 50 * MB
    assert t.started_at == 0.0


def test_fastest_seeders_go_to_the_longest_waiting_demanders() -> None:
    s = make(
        ("s10", 10 * MB, (L1,)),
        ("s100", 100 * MB, (L1,)),
        ("s50", 50 * MB, (L1,)),
        ("a", 1 * MB, ()),
        ("b", 1 * MB, ()),
        ("c", 1 * MB, ()),
    )
    # demand order is c, a, b: not alphabetical, so order must come from time
    s.demand("c", L1, "j", 0.0)
    s.demand("a", L1, "j", 1.0)
    s.demand("b", L1, "j", 2.0)
    started = s.schedule(3.0)
    assert pairs(started) == {("s100", "c", L1), ("s50", "a", L1), ("s10", "b", L1)}
    # and they were handed out fastest first
    assert [t.seeder for t in started] == ["s100", "s50", "s10"]


def test_reason_names_policy_and_measured_speed() -> None:
    s = make(("o", 12 * MB, (L1,)), ("p", 7 * MB, (L1,)), ("a", 1 * MB, ()))
    s.demand("a", L1, "j", 0.0)
    (t,) = s.schedule(0.0)
    assert t.reason.render()
    assert t.reason.render().startswith("paper")
    assert "12.0 MB/s" in t.reason.render()
    assert "1 slower idle holder" in t.reason.render()


def test_every_transfer_has_a_distinct_id() -> None:
    s = make(("o", 10 * MB, (L1, L2)), *[(f"n{i}", 5 * MB, (L1,)) for i in range(5)])
    for i in range(5):
        s.demand(f"n{i}", L2, "j", float(i))
    ids = [t.transfer_id for t in s.schedule(0.0)]
    assert len(ids) == 1  # only "o" holds L2
    t = s.active()[0]
    s.complete(t.transfer_id, 1.0)
    ids += [t.transfer_id for t in s.schedule(1.0)]
    assert len(ids) == len(set(ids)) == 3


# -- one transfer per side ---------------------------------------------------
def test_a_seeder_serves_one_demander_at_a_time() -> None:
    s = make(("o", 10 * MB, (L1,)), ("a", 1 * MB, ()), ("b", 1 * MB, ()), ("c", 1 * MB, ()))
    for i, n in enumerate("abc"):
        s.demand(n, L1, "j", float(i))
    (t,) = s.schedule(0.0)
    assert (t.seeder, t.demander) == ("o", "a")
    # nothing else can start while the only seeder is busy
    assert s.schedule(1.0) == []
    assert s.schedule(2.0) == []
    assert [x.transfer_id for x in s.active()] == [t.transfer_id]
    assert s.pending() == [("a", L1), ("b", L1), ("c", L1)]


def test_a_demander_receives_one_transfer_at_a_time() -> None:
    s = make(("o", 10 * MB, (L1, L2, L3)), ("p", 10 * MB, (L1, L2, L3)), ("d", 1 * MB, ()))
    for layer in (L1, L2, L3):
        s.demand("d", layer, "j", 0.0)
    started = s.schedule(0.0)
    assert len(started) == 1
    assert started[0].layer == L1  # first layer of the image first
    assert s.schedule(0.5) == []


def test_a_node_may_send_while_it_receives() -> None:
    # upload and download are separate links: "a" seeds L1 while receiving L2
    s = make(("o", 10 * MB, (L2,)), ("a", 20 * MB, (L1,)), ("b", 1 * MB, ()))
    s.demand("a", L2, "j", 0.0)
    s.demand("b", L1, "j", 1.0)
    started = s.schedule(2.0)
    assert pairs(started) == {("o", "a", L2), ("a", "b", L1)}


def test_layers_are_demanded_in_image_order() -> None:
    s = make(("o", 10 * MB, (L1, L2, L3)), ("d", 1 * MB, ()))
    for layer in (L1, L2, L3):
        assert s.demand("d", layer, "j", 0.0)
    got = []
    now = 0.0
    for _ in range(3):
        (t,) = s.schedule(now)
        got.append(t.layer)
        now += 1.0
        s.complete(t.transfer_id, now)
    assert got == [L1, L2, L3]
    assert s.pending() == []
    assert s.schedule(now) == []


def test_a_seeder_serves_the_first_layer_in_image_order_it_holds() -> None:
    # the only idle seeder holds L2 and L3, not L1: the demander gets L2 first
    s = make(("p", 10 * MB, (L3, L2)), ("d", 1 * MB, ()))
    for layer in (L1, L2, L3):
        s.demand("d", layer, "j", 0.0)
    (t,) = s.schedule(0.0)
    assert t.layer == L2


# -- demanders become seeders ------------------------------------------------
def test_finished_demander_becomes_a_seeder_and_is_preferred_when_fastest() -> None:
    s = make(("origin", 1 * MB, (L1,)), ("a", 100 * MB, ()), ("b", 1 * MB, ()))
    s.demand("a", L1, "j", 0.0)
    (t,) = s.schedule(0.0)
    assert (t.seeder, t.demander) == ("origin", "a")
    done = s.complete(t.transfer_id, 10.0)
    assert done is t
    assert s.holds("a", L1)
    assert s.holders(L1) == ["a", "origin"]
    assert s.pending() == []
    s.demand("b", L1, "j", 11.0)
    (t2,) = s.schedule(11.0)
    assert (t2.seeder, t2.demander) == ("a", "b")


def test_finished_slow_demander_is_not_preferred() -> None:
    s = make(("origin", 50 * MB, (L1,)), ("a", 1 * MB, ()), ("b", 1 * MB, ()))
    s.demand("a", L1, "j", 0.0)
    (t,) = s.schedule(0.0)
    s.complete(t.transfer_id, 1.0)
    s.demand("b", L1, "j", 2.0)
    (t2,) = s.schedule(2.0)
    assert t2.seeder == "origin"


def test_waiting_demanders_take_seeders_as_they_free_up_fifo() -> None:
    s = make(
        ("o", 50 * MB, (L1,)),
        ("x", 1 * MB, ()),
        ("y", 1 * MB, ()),
        ("z", 2 * MB, ()),
        ("w", 1 * MB, ()),
    )
    s.demand("z", L1, "j", 0.0)
    s.demand("x", L1, "j", 1.0)
    s.demand("y", L1, "j", 2.0)
    s.demand("w", L1, "j", 3.0)
    (t,) = s.schedule(3.0)
    assert (t.seeder, t.demander) == ("o", "z")
    s.complete(t.transfer_id, 4.0)
    # o (fast) goes to x, the longest waiting; z (now a seeder, slower) to y
    assert pairs(s.schedule(4.0)) == {("o", "x", L1), ("z", "y", L1)}
    assert s.pending() == [("x", L1), ("y", L1), ("w", L1)]
    # w keeps waiting until a seeder frees up
    assert s.schedule(5.0) == []
    zy = next(t for t in s.active() if t.demander == "y")
    s.complete(zy.transfer_id, 6.0)
    (t3,) = s.schedule(6.0)
    assert t3.demander == "w"
    assert t3.seeder in {"z", "y"}


# -- demands -----------------------------------------------------------------
def test_demand_of_a_held_layer_is_refused() -> None:
    s = make(("o", 10 * MB, (L1,)), ("a", 1 * MB, (L2,)))
    assert s.demand("a", L2, "j", 0.0) is False
    assert s.demand("o", L1, "j", 0.0) is False
    assert s.pending() == []
    assert s.schedule(0.0) == []


def test_duplicate_demand_is_refused() -> None:
    s = make(("o", 10 * MB, (L1,)), ("a", 1 * MB, ()))
    assert s.demand("a", L1, "j1", 0.0) is True
    assert s.demand("a", L1, "j2", 1.0) is False
    assert s.pending() == [("a", L1)]
    (t,) = s.schedule(1.0)
    assert t.job_id == "j1"
    # still refused while the transfer is in flight
    assert s.demand("a", L1, "j3", 2.0) is False
    s.complete(t.transfer_id, 3.0)
    # and once held
    assert s.demand("a", L1, "j4", 4.0) is False


def test_holding_gained_elsewhere_drops_the_demand() -> None:
    s = make(("o", 10 * MB, (L1,)), ("a", 1 * MB, ()))
    s.demand("a", L1, "j", 0.0)
    s.add_holding("a", L1)
    assert s.pending() == []
    assert s.schedule(0.0) == []


def test_cancelled_demand_is_not_scheduled() -> None:
    s = make(("o", 10 * MB, (L1,)), ("a", 1 * MB, ()))
    s.demand("a", L1, "j", 0.0)
    s.cancel_demand("a", L1)
    assert s.pending() == []
    assert s.schedule(0.0) == []


def test_demand_nobody_holds_waits() -> None:
    s = make(("o", 10 * MB, (L1,)), ("a", 1 * MB, ()))
    s.demand("a", L2, "j", 0.0)
    assert s.schedule(0.0) == []
    assert s.pending() == [("a", L2)]
    s.add_node("late", 5 * MB, (L2,))
    (t,) = s.schedule(1.0)
    assert (t.seeder, t.demander, t.layer) == ("late", "a", L2)


def test_a_node_never_seeds_itself() -> None:
    # "a" is the fastest node, holds L1 and wants L2; "b" wants L1
    s = make(("o", 5 * MB, (L2,)), ("a", 100 * MB, (L1,)), ("b", 1 * MB, ()))
    s.demand("a", L2, "j", 0.0)
    s.demand("b", L1, "j", 1.0)
    started = s.schedule(1.0)
    assert all(t.seeder != t.demander for t in started)
    assert pairs(started) == {("a", "b", L1), ("o", "a", L2)}


# -- failures ----------------------------------------------------------------
def test_seeder_down_keeps_the_transfer_until_the_demander_reports() -> None:
    # ending it here would let another seeder send the layer while d still pulls it
    s = make(("slow", 1 * MB, (L1,)), ("fast", 80 * MB, (L1,)), ("d", 1 * MB, ()))
    s.demand("d", L1, "j", 0.0)
    (t,) = s.schedule(0.0)
    assert t.seeder == "fast"
    assert s.node_down("fast") == []
    assert s.active() == [t]
    assert s.schedule(0.5) == []  # no second transfer of L1 to d
    s.fail(t.transfer_id)  # d's pull failed: now it is re-planned
    (t2,) = s.schedule(1.0)
    assert (t2.seeder, t2.demander) == ("slow", "d")
    assert t2.transfer_id != t.transfer_id
    with pytest.raises(SchedulerError):
        s.complete(t.transfer_id, 2.0)


def test_seeder_down_aborts_transfers_to_demanders_down_too() -> None:
    s = make(("o", 1 * MB, (L1,)), ("d", 1 * MB, ()))
    s.demand("d", L1, "j", 0.0)
    assert len(s.schedule(0.0)) == 1
    s.node_down("d")
    assert s.active() == [] and s.pending() == [("d", L1)]
    s.add_node("d")
    (t2,) = s.schedule(1.0)
    assert s.node_down("o") == []
    assert [a.transfer_id for a in s.node_down("d")] == [t2.transfer_id]


def test_down_node_is_not_chosen_until_it_returns() -> None:
    s = make(("o", 1 * MB, (L1,)), ("fast", 80 * MB, (L1,)), ("a", 1 * MB, ()), ("b", 1 * MB, ()))
    s.node_down("fast")
    s.demand("a", L1, "j", 0.0)
    (t,) = s.schedule(0.0)
    assert t.seeder == "o"
    s.add_node("fast")  # back up, keeps its holdings and measured speed
    assert s.speed("fast") == 80 * MB
    s.demand("b", L1, "j", 1.0)
    (t2,) = s.schedule(1.0)
    assert t2.seeder == "fast"


def test_demander_down_frees_the_seeder_and_keeps_its_demand() -> None:
    s = make(("o", 10 * MB, (L1,)), ("d", 1 * MB, ()), ("e", 1 * MB, ()))
    s.demand("d", L1, "j", 0.0)
    s.demand("e", L1, "j", 1.0)
    (t,) = s.schedule(1.0)
    assert t.demander == "d"
    aborted = s.node_down("d")
    assert [a.transfer_id for a in aborted] == [t.transfer_id]
    # the seeder is free again and goes to the next demander
    (t2,) = s.schedule(2.0)
    assert (t2.seeder, t2.demander) == ("o", "e")
    # d keeps its demand but gets nothing while down
    assert ("d", L1) in s.pending()
    s.complete(t2.transfer_id, 3.0)
    assert s.schedule(3.0) == []
    s.add_node("d")
    (t3,) = s.schedule(4.0)
    assert t3.demander == "d"
    assert t3.seeder in {"o", "e"}


def test_node_down_aborts_what_it_receives_and_keeps_what_it_seeds() -> None:
    # "m" receives L2 from o while sending L1 to n
    s = make(("o", 10 * MB, (L2,)), ("m", 20 * MB, (L1,)), ("n", 1 * MB, ()))
    s.demand("m", L2, "j", 0.0)
    s.demand("n", L1, "j", 1.0)
    assert len(s.schedule(1.0)) == 2
    aborted = s.node_down("m")
    assert {(t.seeder, t.demander) for t in aborted} == {("o", "m")}
    # m -> n goes on until n reports (its pull fails at once when m is really gone)
    (kept,) = s.active()
    assert (kept.seeder, kept.demander) == ("m", "n")
    s.fail(kept.transfer_id)
    # n's demand waits: its only seeder is down
    assert s.schedule(2.0) == []
    assert s.pending() == [("m", L2), ("n", L1)]


def test_fail_frees_both_sides_and_the_demand_waits_again() -> None:
    s = make(("o", 10 * MB, (L1,)), ("d", 1 * MB, ()), ("e", 1 * MB, (L2,)), ("f", 1 * MB, ()))
    s.demand("d", L1, "j", 0.0)
    (t,) = s.schedule(0.0)
    failed = s.fail(t.transfer_id)
    assert failed is t
    assert s.active() == []
    assert not s.holds("d", L1)
    assert s.pending() == [("d", L1)]
    # the demander is free to receive and the seeder to send
    s.demand("f", L2, "j", 1.0)
    started = s.schedule(1.0)
    assert pairs(started) == {("o", "d", L1), ("e", "f", L2)}


def test_failed_transfer_does_not_change_speed() -> None:
    s = make(("o", 10 * MB, (L1,)), ("d", 1 * MB, ()))
    s.demand("d", L1, "j", 0.0)
    (t,) = s.schedule(0.0)
    s.fail(t.transfer_id)
    assert s.speed("o") == 10 * MB


# -- measured speed ----------------------------------------------------------
def test_observe_speed_reorders_seeders() -> None:
    s = make(("o", 10 * MB, (L1,)), ("a", 20 * MB, (L1,)), ("d", 1 * MB, ()), ("e", 1 * MB, ()))
    s.observe_speed("a", 1 * MB)
    assert s.speed("a") == 1 * MB
    s.demand("d", L1, "j", 0.0)
    (t,) = s.schedule(0.0)
    assert t.seeder == "o"
    assert "10.0 MB/s" in t.reason.render()


def test_observe_speed_ignores_non_positive_values() -> None:
    s = make(("o", 10 * MB, (L1,)))
    s.observe_speed("o", 0.0)
    s.observe_speed("o", -5.0)
    assert s.speed("o") == 10 * MB


def test_complete_with_bytes_measures_the_seeder() -> None:
    s = make(("a", 20 * MB, (L1,)), ("o", 10 * MB, (L1,)), ("d", 1 * MB, ()), ("e", 1 * MB, ()))
    s.demand("d", L1, "j", 0.0)
    (t,) = s.schedule(100.0)
    assert t.seeder == "a"
    # 50 MB in 10 s: a actually uploads at 5 MB/s
    s.complete(t.transfer_id, 110.0, bytes_moved=50_000_000)
    assert s.speed("a") == pytest.approx(5 * MB)
    assert s.speed("d") == 1 * MB  # the demander's speed is untouched
    s.demand("e", L1, "j", 111.0)
    (t2,) = s.schedule(111.0)
    # o (10 MB/s) now beats a (5 MB/s) and d (1 MB/s)
    assert t2.seeder == "o"


def test_complete_without_bytes_keeps_the_speed() -> None:
    s = make(("a", 20 * MB, (L1,)), ("d", 1 * MB, ()))
    s.demand("d", L1, "j", 0.0)
    (t,) = s.schedule(0.0)
    s.complete(t.transfer_id, 10.0)
    assert s.speed("a") == 20 * MB
    # zero elapsed time cannot measure anything either
    s2 = make(("a", 20 * MB, (L1,)), ("d", 1 * MB, ()))
    s2.demand("d", L1, "j", 0.0)
    (t2,) = s2.schedule(5.0)
    s2.complete(t2.transfer_id, 5.0, bytes_moved=1000)
    assert s2.speed("a") == 20 * MB


# -- whole-cluster simulation ---------------------------------------------------
class _Interval:
    heartbeat_interval = 2.0  # no failure here depends on it (none blames a seeder)


def simulate(
    seed: int, nodes: int = 20, layers: int = 3, fail_rate: float = 0.0
) -> tuple[float, int]:
    """Drive one cluster to completion; return (makespan, transfers completed).

    Transfer time is layer size / seeder speed. Every invariant is asserted
    as events happen. The scheduler is driven through the job driver the
    coordinator and the simulator use (rainbowd.core.sched.jobdriver); a failure is one
    that blames nobody ("internal"), so only the scheduler's rules show.
    """
    rng = random.Random(seed)
    layer_ids = [f"sha256:{i:064x}" for i in range(1, layers + 1)]
    sizes = {lid: rng.randint(1, 200) * 1_000_000 for lid in layer_ids}
    speeds = {f"n{i:02d}": rng.uniform(16 * MB, 125 * MB) for i in range(nodes)}
    s = PieceScheduler("paper")  # paper splits no layer: its pieces are the layers
    driver = JobDriver(s, _Interval())
    driver.node_up("origin", 125 * MB, layer_ids)
    for nid, sp in speeds.items():
        driver.node_up(nid, sp)
    for nid in rng.sample(sorted(speeds), len(speeds)):
        assert not any(s.holds(nid, lid) for lid in layer_ids)
        driver.demand(nid, layer_ids, "job", 0.0)
        assert [d for d in s.pending() if d[0] == nid] == [(nid, lid) for lid in layer_ids]

    events: list[tuple[float, int, str]] = []
    seq = 0
    seeding: dict[str, str] = {}  # node -> transfer
    receiving: dict[str, str] = {}
    moved: set[tuple[str, str]] = set()
    by_id: dict[str, Transfer] = {}
    now = 0.0
    slowest = min([*speeds.values(), 125 * MB])
    # bound: even fully serial, every try at every (node, layer) would fit
    limit = (nodes * layers + 1) * max(sizes.values()) / slowest * (1 + 20 * fail_rate)

    def start_all() -> None:
        nonlocal seq
        for t in driver.plan(now):
            assert t.seeder != t.demander
            assert t.seeder not in seeding, f"{t.seeder} seeds two transfers"
            assert t.demander not in receiving, f"{t.demander} receives two transfers"
            assert s.holds(t.seeder, t.layer)
            assert not s.holds(t.demander, t.layer)
            assert (t.demander, t.layer) not in moved
            assert t.reason.render().startswith("paper") and "MB/s" in t.reason.render()
            seeding[t.seeder] = t.transfer_id
            receiving[t.demander] = t.transfer_id
            by_id[t.transfer_id] = t
            heapq.heappush(events, (now + sizes[t.layer] / t.seeder_speed_bps, seq, t.transfer_id))
            seq += 1
        active = s.active()
        assert len({t.seeder for t in active}) == len(active)
        assert len({t.demander for t in active}) == len(active)
        # progress: while demands are open something is always moving
        if s.pending():
            assert active, "demands wait but nothing is transferring"

    start_all()
    completed = 0
    while events:
        now, _, tid = heapq.heappop(events)
        assert now <= limit
        t = by_id.pop(tid)
        del seeding[t.seeder]
        del receiving[t.demander]
        if fail_rate and rng.random() < fail_rate:
            driver.failed(t, Failure("internal"), now)
        else:
            assert driver.done(tid, now, sizes[t.layer]) is not None
            assert (t.demander, t.layer) not in moved, "layer transferred twice"
            moved.add((t.demander, t.layer))
            completed += 1
        start_all()

    for nid in speeds:
        for lid in layer_ids:
            assert s.holds(nid, lid), f"{nid} lacks {lid}"
    assert s.pending() == []
    assert s.active() == []
    assert moved == {(n, lid) for n in speeds for lid in layer_ids}
    assert 0 < now <= limit
    return now, completed


@pytest.mark.parametrize("seed", range(5))
def test_simulated_cluster_completes(seed: int) -> None:
    makespan, completed = simulate(seed)
    assert completed == 20 * 3
    assert makespan > 0


@pytest.mark.parametrize("seed", range(3))
def test_simulated_cluster_completes_despite_failures(seed: int) -> None:
    makespan, completed = simulate(seed, fail_rate=0.2)
    assert completed == 20 * 3
    assert makespan > 0


def test_simulation_beats_origin_alone() -> None:
    # fast seeders multiply: far quicker than the origin serving everyone
    makespan, _ = simulate(7, nodes=30, layers=2)
    rng = random.Random(7)
    sizes = [rng.randint(1, 200) * 1_000_000 for _ in range(2)]
    origin_alone = 30 * sum(sizes) / (125 * MB)
    assert makespan < origin_alone / 2


# -- faults: adoption, suspects, avoidance, penalties --------------------------
def _running(tid: str, layer: str, seeder: str, demander: str) -> Transfer:
    return Transfer(tid, layer, seeder, demander, "j", 0.0, ADOPTED, 1 * MB)


def test_adopted_transfer_locks_its_pair_and_blocks_a_second_copy() -> None:
    s = make(("o", 10 * MB, (L1,)), ("p", 50 * MB, (L1,)), ("d", 1 * MB, ()))
    s.node_down("o")
    s.node_down("d")  # restored nodes are down until they heartbeat
    s.demand("d", L1, "j", 0.0)
    t = _running("old", L1, "o", "d")
    assert s.adopt(t) is t and s.adopt(t) is t  # idempotent
    s.add_node("o")
    s.add_node("d")
    assert s.is_active("old") and s.receiving("d", L1) is t
    assert s.schedule(1.0) == []  # d already gets L1; p is idle but must not send it
    done = s.complete("old", 2.0, bytes_moved=10 * 1_000_000)
    assert done is t and s.holds("d", L1) and s.pending() == []
    assert s.speed("o") == pytest.approx(5 * MB)


def test_adopt_over_a_busy_seeder_keeps_the_other_lock() -> None:
    s = make(("o", 10 * MB, (L1, L2)), ("d", 1 * MB, ()), ("e", 1 * MB, ()))
    s.demand("e", L1, "j", 0.0)
    (t,) = s.schedule(0.0)
    a = s.adopt(_running("old", L2, "o", "d"))
    s.fail(a.transfer_id)
    assert s.is_active(t.transfer_id)
    s.complete(t.transfer_id, 1.0)
    assert s.active() == []
    with pytest.raises(SchedulerError):
        s.adopt(_running("x", L1, "ghost", "d"))
    with pytest.raises(SchedulerError, match="seeder and demander are both d"):
        s.adopt(_running("y", L1, "d", "d"))


def test_suspect_gets_no_new_work_until_it_reports() -> None:
    s = make(("fast", 80 * MB, (L1,)), ("slow", 1 * MB, (L1,)), ("d", 1 * MB, ()))
    s.demand("d", L1, "j", 0.0)
    (t,) = s.schedule(0.0)
    assert t.seeder == "fast"
    s.suspect("fast")
    assert s.is_suspect("fast") and s.is_active(t.transfer_id)  # running work is left alone
    s.fail(t.transfer_id)
    (t2,) = s.schedule(1.0)
    assert t2.seeder == "slow"
    s.complete(t2.transfer_id, 2.0)
    # a suspect is not a demander either
    s.demand("fast", L2, "j", 2.0)
    s.add_holding("slow", L2)
    assert s.schedule(2.0) == []
    s.add_node("fast")  # its heartbeat: cleared, keeps its speed
    assert not s.is_suspect("fast") and s.speed("fast") == 80 * MB
    (t3,) = s.schedule(3.0)
    assert (t3.seeder, t3.demander) == ("slow", "fast")


def test_avoided_pair_is_skipped_until_it_expires() -> None:
    s = make(
        ("fast", 80 * MB, (L1,)), ("slow", 1 * MB, (L1,)), ("d", 1 * MB, ()), ("e", 1 * MB, ())
    )
    s.avoid("d", "fast", until=10.0)
    s.avoid("d", "fast", until=5.0)  # never shortened
    s.demand("d", L1, "j", 0.0)
    s.demand("e", L1, "j", 1.0)
    assert pairs(s.schedule(1.0)) == {("slow", "d", L1), ("fast", "e", L1)}
    s2 = make(("fast", 80 * MB, (L1,)), ("d", 1 * MB, ()))
    s2.avoid("d", "fast", until=10.0)
    s2.demand("d", L1, "j", 0.0)
    assert s2.schedule(9.9) == []  # the only holder: d waits
    assert pairs(s2.schedule(10.0)) == {("fast", "d", L1)}


def test_penalize_halves_the_speed_and_reorders_seeders() -> None:
    s = make(("a", 80 * MB, (L1,)), ("b", 50 * MB, (L1,)), ("d", 1 * MB, ()))
    assert s.penalize("a") == 40 * MB
    s.demand("d", L1, "j", 0.0)
    (t,) = s.schedule(0.0)
    assert t.seeder == "b"


# -- the indexed scheduler decides exactly like the plain algorithm -------------
class ReferenceScheduler:
    """Algorithm 1 written plainly, as Scheduler was before it got its indexes.

    Every schedule() rebuilds the free demanders and the idle-seeder heap from
    scratch (O(seeders x demanders)); it is kept here only as the definition
    the indexed Scheduler must match, decision for decision.
    """

    def __init__(self) -> None:
        counter = itertools.count(1)
        self._new_id = lambda: f"t{next(counter)}"
        self._seq = itertools.count()
        self.speeds: dict[str, float] = {}
        self.up: dict[str, bool] = {}
        self.suspects: set[str] = set()
        self.holdings: dict[str, set[str]] = {}
        self.sending: dict[str, str | None] = {}
        self.receiving_: dict[str, str | None] = {}
        self.demands: dict[tuple[str, str], tuple[str, int]] = {}  # -> (job, seq)
        self.active_: dict[str, Transfer] = {}
        self.avoid_: dict[tuple[str, str], float] = {}

    def _known(self, nid: str) -> None:
        if nid not in self.speeds:
            raise SchedulerError(f"unknown node {nid!r}")

    def add_node(self, nid: str, speed: float = 0.0, holdings: Iterable[str] = ()) -> None:
        if nid not in self.speeds:
            self.speeds[nid] = speed or DEFAULT_SPEED_BPS
            self.holdings[nid], self.sending[nid], self.receiving_[nid] = set(), None, None
        self.up[nid] = True
        self.suspects.discard(nid)
        for layer in holdings:
            self.add_holding(nid, layer)

    def node_down(self, nid: str) -> list[Transfer]:
        self._known(nid)
        self.up[nid] = False
        aborted = [
            t
            for t in self.active_.values()
            if t.demander == nid or (t.seeder == nid and not self.up[t.demander])
        ]
        for t in aborted:
            self._release(t)
        return aborted

    def suspect(self, nid: str) -> None:
        self._known(nid)
        self.suspects.add(nid)

    def avoid(self, demander: str, seeder: str, until: float) -> None:
        self.avoid_[(demander, seeder)] = max(until, self.avoid_.get((demander, seeder), 0.0))

    def penalize(self, nid: str, factor: float = 0.5) -> float:
        self._known(nid)
        self.speeds[nid] = max(1.0, self.speeds[nid] * factor)
        return self.speeds[nid]

    def observe_speed(self, nid: str, bps: float) -> None:
        self._known(nid)
        if bps > 0:
            self.speeds[nid] = bps

    def add_holding(self, nid: str, layer: str) -> None:
        self._known(nid)
        self.holdings[nid].add(layer)
        self.demands.pop((nid, layer), None)

    def holders(self, layer: str) -> list[str]:
        return sorted(n for n, h in self.holdings.items() if layer in h)

    def demand(self, nid: str, layer: str, job: str, now: float) -> bool:
        self._known(nid)
        if layer in self.holdings[nid] or (nid, layer) in self.demands:
            return False
        self.demands[(nid, layer)] = (job, next(self._seq))
        return True

    def cancel_demand(self, nid: str, layer: str) -> None:
        self.demands.pop((nid, layer), None)

    def pending(self) -> list[tuple[str, str]]:
        return list(self.demands)

    def active(self) -> list[Transfer]:
        return list(self.active_.values())

    def receiving(self, nid: str, layer: str) -> Transfer | None:
        return next(
            (t for t in self.active_.values() if t.demander == nid and t.layer == layer), None
        )

    def adopt(self, t: Transfer) -> Transfer:
        if t.transfer_id in self.active_:
            return self.active_[t.transfer_id]
        self._known(t.seeder)
        self._known(t.demander)
        if t.seeder == t.demander:
            raise SchedulerError(f"transfer {t.transfer_id}: seeder and demander are both")
        self.active_[t.transfer_id] = t
        self.sending[t.seeder] = self.sending[t.seeder] or t.transfer_id
        self.receiving_[t.demander] = self.receiving_[t.demander] or t.transfer_id
        return t

    def _usable(self, nid: str) -> bool:
        return self.up[nid] and nid not in self.suspects

    def schedule(self, now: float) -> list[Transfer]:
        in_flight = {(t.demander, t.layer) for t in self.active_.values()}
        self.avoid_ = {k: v for k, v in self.avoid_.items() if v > now}
        wanted: dict[str, list[tuple[str, str, int]]] = {}  # node -> [(layer, job, seq)]
        for (nid, layer), (job, seq) in self.demands.items():
            if (nid, layer) not in in_flight and self._usable(nid) and not self.receiving_[nid]:
                wanted.setdefault(nid, []).append((layer, job, seq))
        wanted_layers = {w[0] for ws in wanted.values() for w in ws}
        idle = [
            (-self.speeds[n], n)
            for n in self.speeds
            if self._usable(n) and not self.sending[n] and self.holdings[n] & wanted_layers
        ]
        heapq.heapify(idle)
        order = sorted(wanted, key=lambda nid: wanted[nid][0][2])
        started: list[Transfer] = []
        while idle and order:
            _, seeder = heapq.heappop(idle)
            for demander in order:
                if demander == seeder or (demander, seeder) in self.avoid_:
                    continue
                w = next((w for w in wanted[demander] if w[0] in self.holdings[seeder]), None)
                if w is None:
                    continue
                others = sum(1 for _, n in idle if w[0] in self.holdings[n])
                speed = self.speeds[seeder]
                numbers = {rs.SEEDER_BPS: speed, rs.SLOWER_IDLE: float(others)}
                reason = TransferReason(rule=rs.FASTEST_IDLE, policy="paper", numbers=numbers)
                t = Transfer(
                    self._new_id(), w[0], seeder, demander, w[1], now, reason, speed, speed
                )
                self.sending[seeder] = self.receiving_[demander] = t.transfer_id
                self.active_[t.transfer_id] = t
                started.append(t)
                order.remove(demander)
                break
        return started

    def complete(self, tid: str, now: float, bytes_moved: int = 0) -> Transfer:
        t = self._take(tid)
        if bytes_moved > 0 and now > t.started_at:
            self.observe_speed(t.seeder, bytes_moved / (now - t.started_at))
        self.add_holding(t.demander, t.layer)
        return t

    def fail(self, tid: str) -> Transfer:
        return self._take(tid)

    def _take(self, tid: str) -> Transfer:
        if tid not in self.active_:
            raise SchedulerError(f"no active transfer {tid!r}")
        t = self.active_[tid]
        self._release(t)
        return t

    def _release(self, t: Transfer) -> None:
        self.active_.pop(t.transfer_id, None)
        if self.sending[t.seeder] == t.transfer_id:
            self.sending[t.seeder] = None
        if self.receiving_[t.demander] == t.transfer_id:
            self.receiving_[t.demander] = None


def _same_state(
    ref: ReferenceScheduler, s: Scheduler, layers: list[str], step: int, nodes: list[str]
) -> None:
    where = f"after step {step}"
    assert s.active() == ref.active(), where
    assert s.pending() == ref.pending(), where
    for nid in nodes:
        assert s.speed(nid) == ref.speeds[nid], where
        assert s.is_suspect(nid) == (nid in ref.suspects), where
        assert s.active_for(nid) == [t for t in ref.active() if nid in (t.seeder, t.demander)], (
            where
        )
        assert s.is_demanding(nid) == (
            any(t.demander == nid for t in ref.active()) or any(n == nid for n, _ in ref.pending())
        ), where
        for layer in layers:
            assert s.receiving(nid, layer) == ref.receiving(nid, layer), where
    for layer in layers:
        assert s.holders(layer) == ref.holders(layer), where


def _random_run(seed: int, steps: int = 600) -> int:
    """Apply one random event sequence to both schedulers; returns transfers started."""
    rng = random.Random(seed)
    layers = [f"sha256:{i:064x}" for i in range(1, rng.randint(2, 5))]
    ref, s = ReferenceScheduler(), Scheduler("paper")
    nodes: list[str] = []
    now = 0.0
    started = 0
    # few distinct speeds, so ties (broken by node id) are common
    speeds = [0.0, 1 * MB, 2 * MB, 5 * MB, 5 * MB, 10 * MB]

    def both(name: str, *args: object) -> object:
        outcomes = []
        for target in (ref, s):
            try:
                outcomes.append(("ok", getattr(target, name)(*args)))
            except SchedulerError:
                outcomes.append(("error", None))
        assert outcomes[0] == outcomes[1], f"{name}{args}: {outcomes[0]} != {outcomes[1]}"
        return outcomes[1][1]

    for step in range(steps):
        now += rng.choice([0.0, 0.0, 0.1, 1.0])
        op = rng.random()
        node = rng.choice(nodes) if nodes else "n0"
        other = rng.choice(nodes) if nodes else "n0"
        if node not in ref.speeds:  # only before the first node exists
            node = other = "n0"
        layer = rng.choice(layers)
        active = ref.active()
        if op < 0.10 or not nodes:
            nid = f"n{len(nodes)}" if rng.random() < 0.7 or not nodes else node
            held = [lr for lr in layers if rng.random() < (0.5 if not nodes else 0.1)]
            both("add_node", nid, rng.choice(speeds), held)
            if nid not in nodes:
                nodes.append(nid)
        elif op < 0.35:
            both("demand", node, layer, f"j{rng.randint(1, 3)}", now)
        elif op < 0.55:
            started += len(both("schedule", now))  # type: ignore[arg-type]
        elif op < 0.70 and active:
            t = rng.choice(active)
            moved = rng.choice([0, 1_000_000, 7_777_777])
            both("complete", t.transfer_id, now, moved)
        elif op < 0.76 and active:
            both("fail", rng.choice(active).transfer_id)
        elif op < 0.79:
            both("node_down", node)
        elif op < 0.81:
            both("suspect", node)
        elif op < 0.85:
            # mostly a pair that matters: a holder of a layer the demander waits for
            wants = [lr for n, lr in ref.pending() if n == node]
            holders = [h for lr in wants for h in ref.holders(lr)] or [other]
            both("avoid", node, rng.choice(holders), now + rng.choice([0.0, 0.5, 2.0, 20.0]))
        elif op < 0.87:
            both("penalize", node)
        elif op < 0.89:
            both("observe_speed", node, rng.choice([-1.0, 0.0, 3 * MB, 7 * MB]))
        elif op < 0.92:
            both("cancel_demand", node, layer)
        elif op < 0.95:
            both("add_holding", node, layer)
        elif op < 0.97:
            tid = rng.choice([f"a{step}", *(t.transfer_id for t in active)])
            if active and rng.random() < 0.7:
                # a second transfer to a busy demander, of a layer it waits for: the
                # lock stays with the first; once that ends, this layer is still in flight
                demander = rng.choice(active).demander
                wants = [lr for n, lr in ref.pending() if n == demander] or [layer]
                other, layer = demander, rng.choice(wants)
            both("adopt", Transfer(tid, layer, node, other, "j", now, ADOPTED, 1 * MB))
        else:
            both("add_node", node)  # a heartbeat: back up, no longer suspect
        # every node now and then; the ones just touched each step
        _same_state(ref, s, layers, step, list(ref.speeds) if step % 50 == 0 else [node, other])
    _same_state(ref, s, layers, steps, list(ref.speeds))
    return started


@pytest.mark.parametrize("seed", range(40))
def test_indexed_scheduler_matches_the_reference(seed: int) -> None:
    assert _random_run(seed) > 0


def test_indexed_scheduler_matches_the_reference_on_a_large_cluster() -> None:
    # the shape of a distribution job: one origin, many demanders, three layers
    rng = random.Random(99)
    layers = [f"sha256:{i:064x}" for i in range(1, 4)]
    ref, s = ReferenceScheduler(), Scheduler("paper")
    for target in (ref, s):
        target.add_node("origin", 10 * MB, layers)
    names = [f"n{i:03d}" for i in range(300)]
    for nid in names:
        sp = rng.choice([1 * MB, 2 * MB, 4 * MB])
        for target in (ref, s):
            target.add_node(nid, sp)
            for layer in layers:
                target.demand(nid, layer, "j", 0.0)
    now = 0.0
    while ref.active() or ref.pending():
        got = s.schedule(now)
        assert got == ref.schedule(now)
        active = ref.active()
        assert s.active() == active
        if not active:
            break
        t = min(active, key=lambda t: (t.started_at + 1 / t.seeder_speed_bps, t.transfer_id))
        now = max(now, t.started_at + 1e7 / t.seeder_speed_bps)
        if rng.random() < 0.05:
            assert s.fail(t.transfer_id) == ref.fail(t.transfer_id)
        else:
            assert s.complete(t.transfer_id, now, 10_000_000) == ref.complete(
                t.transfer_id, now, 10_000_000
            )
    assert s.pending() == ref.pending() == []


def test_a_layer_still_in_flight_is_not_sent_again_once_the_lock_frees() -> None:
    # d receives L1 (it holds the lock) while an adopted transfer also brings it L2;
    # when L1 is done, d is free again: it must get L3, not a second copy of L2
    s = make(("o", 10 * MB, (L1, L2, L3)), ("p", 5 * MB, (L2,)), ("d", 1 * MB, ()))
    for layer in (L1, L2, L3):
        s.demand("d", layer, "j", 0.0)
    (t1,) = s.schedule(0.0)
    assert t1.layer == L1
    s.adopt(_running("old", L2, "p", "d"))
    s.complete(t1.transfer_id, 1.0)
    (t3,) = s.schedule(1.0)
    assert (t3.seeder, t3.layer) == ("o", L3)
    assert s.receiving("d", L2) is not None and s.is_demanding("d")


@pytest.mark.parametrize("policy", POLICIES)
def test_a_removed_holding_is_no_longer_seeded_from(policy: str) -> None:
    """Eviction or image removal: the node leaves the layer's holders and idle-seeder list.

    Under every policy: the capacity-aware planner keeps its own index of free
    holders, which must forget the layer too (it once did not, and kept
    handing out a seeder that answered "not held").
    """
    s = Scheduler(policy)
    s.add_node("origin", 60 * MB, [L1])
    s.add_node("fast", 100 * MB, [L1])
    s.add_node("d", 100 * MB)  # best fit would take "fast" (100 of 100 MB/s)
    s.remove_holding("fast", L1)
    s.remove_holding("fast", L1)  # idempotent
    assert s.holders(L1) == ["origin"] and not s.holds("fast", L1)
    s.demand("d", L1, "j", 0.0)
    [t] = s.schedule(0.0)
    assert t.seeder == "origin"
