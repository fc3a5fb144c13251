"""Algorithm 1 (policy "paper") as implemented by rainbowd.scheduler.

Each test pins one rule of the scheduler; the last ones drive a whole
simulated cluster and check global invariants.
"""

from __future__ import annotations

import heapq
import random

import pytest

from rainbowd.scheduler import DEFAULT_SPEED_BPS, Scheduler, SchedulerError, Transfer

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
    assert t.reason
    assert t.reason.startswith("paper")
    assert "12.0 MB/s" in t.reason
    assert "1 slower idle holder" in t.reason


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
    assert "10.0 MB/s" in t.reason


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
def simulate(
    seed: int, nodes: int = 20, layers: int = 3, fail_rate: float = 0.0
) -> tuple[float, int]:
    """Drive one cluster to completion; return (makespan, transfers completed).

    Transfer time is layer size / seeder speed. Every invariant is asserted
    as events happen.
    """
    rng = random.Random(seed)
    layer_ids = [f"sha256:{i:064x}" for i in range(1, layers + 1)]
    sizes = {lid: rng.randint(1, 200) * 1_000_000 for lid in layer_ids}
    speeds = {f"n{i:02d}": rng.uniform(16 * MB, 125 * MB) for i in range(nodes)}
    s = Scheduler("paper")
    s.add_node("origin", 125 * MB, layer_ids)
    for nid, sp in speeds.items():
        s.add_node(nid, sp)
    for nid in rng.sample(sorted(speeds), len(speeds)):
        for lid in layer_ids:
            assert s.demand(nid, lid, "job", 0.0)

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
        for t in s.schedule(now):
            assert t.seeder != t.demander
            assert t.seeder not in seeding, f"{t.seeder} seeds two transfers"
            assert t.demander not in receiving, f"{t.demander} receives two transfers"
            assert s.holds(t.seeder, t.layer)
            assert not s.holds(t.demander, t.layer)
            assert (t.demander, t.layer) not in moved
            assert t.reason.startswith("paper") and "MB/s" in t.reason
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
            s.fail(tid)
        else:
            s.complete(tid, now, bytes_moved=sizes[t.layer])
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
    return Transfer(tid, layer, seeder, demander, "j", 0.0, "before the restart", 1 * MB)


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
