"""A node's demand sums (its bytes, own bound, earliest demand) kept between demands.

DemanderIndex._demand_sums adds each new demand to the sums of the ones before
it instead of summing every demand again (quadratic in a node's pieces). These
tests hold it to the full pass: the same own-bound deadline and slack horizon,
to the last bit, after every demand, across holders appearing, speeds moving,
demands ending and a second job.
"""

from __future__ import annotations

import dataclasses

from rainbowd.core.sched.policies import RULES, Planner
from rainbowd.core.sched.scheduler import Scheduler

MB = 1e6
LAYERS = [f"sha256:{i:064x}" for i in range(1, 41)]


def cluster(keep_sums: bool) -> tuple[Scheduler, Planner]:
    """An origin holding every layer, three demanders; ``keep_sums`` off sums every time."""
    s = Scheduler("swarm")
    assert isinstance(s._pass, Planner)
    planner = s._pass
    planner.rules = dataclasses.replace(RULES["swarm"], own_urgent=2.5, slack_margin=0.2)
    for i, layer in enumerate(LAYERS):
        s.set_layer_size(layer, 100_000 + 7_919 * i)  # sizes whose sums round
    s.add_node("o", 3 * MB, tuple(LAYERS[:30]))
    for n, speed in (("a", 1.3 * MB), ("b", 0.7 * MB), ("c", 2.9 * MB)):
        s.add_node(n, speed, download_bps=speed * 3.1)
    if not keep_sums:
        original = planner._demand_sums

        def full_pass(*args, **kw):  # type: ignore[no-untyped-def]
            planner._sums.clear()
            return original(*args, **kw)

        planner._demand_sums = full_pass  # type: ignore[method-assign]
    return s, planner


def states(keep_sums: bool) -> list[tuple[object, ...]]:
    """The planner's own-bound deadlines and horizon after each step of one story."""
    s, planner = cluster(keep_sums)
    seen: list[tuple[object, ...]] = []

    def look() -> None:
        seen.append((dict(planner._own), planner._horizon))

    for i, layer in enumerate(LAYERS[:20]):  # a job's demands, one by one, times apart
        for n in ("a", "b", "c"):
            s.demand(n, layer, "j1", 0.1 * i)
            look()
    started = s.schedule(3.0)  # transfers: holders change as they end
    assert started
    ended = [t for t in started if t.demander != "c"][:3]  # c's demands stay as they were
    assert ended
    for t in ended:
        s.complete(t.transfer_id, 4.0)
    s.add_node("b", 0.9 * MB, download_bps=4 * MB)  # b's speed moved
    s.add_node("late", 5 * MB, tuple(LAYERS))  # a faster holder of every layer
    for layer in LAYERS[20:]:  # a second job's demands
        for n in ("a", "b", "c"):
            s.demand(n, layer, "j2", 5.0)
            look()
    return seen


def test_kept_sums_equal_a_full_pass_after_every_demand() -> None:
    kept, full = states(True), states(False)
    assert len(kept) == len(full) == 120
    assert kept == full
    # and the story moved them: the deadlines are not all the first ones
    assert len({repr(k) for k in kept}) > 100


def test_sums_are_kept_only_while_they_hold() -> None:
    s, planner = cluster(True)
    s.demand("a", LAYERS[0], "j", 0.0)
    s.demand("a", LAYERS[1], "j", 0.0)
    (key, _) = planner._sums["a"]
    assert key == (2, planner._sums["a"][0][1], planner._sums_epoch)
    epoch = planner._sums_epoch
    s.add_node("h", 9 * MB, (LAYERS[1],))  # a new, faster holder: the sums are stale
    assert planner._sums_epoch > epoch
