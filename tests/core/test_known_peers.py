"""Known peers: a seeder the demander pulled from before is taken where it offers nearly as much.

(rules.py, "known peers"; the memory: rainbowd.core.sched.policies.peers.)
"""

from __future__ import annotations

import dataclasses

import pytest

from rainbowd.core.sched.policies import RULES, Planner
from rainbowd.core.sched.policies.peers import PulledFrom
from rainbowd.core.sched.reasons import PULLED_BEFORE
from rainbowd.core.sched.records import Transfer
from rainbowd.core.sched.scheduler import Scheduler

MB = 1e6
L1, L2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


def cluster(peer_share: float, demander_bps: float, a_bps: float, b_bps: float) -> Scheduler:
    """ "d" has pulled L1 from "a"; now it wants L2, which "a" and "b" both hold."""
    s = Scheduler("slots")
    assert isinstance(s._pass, Planner)
    s._pass.rules = dataclasses.replace(RULES["slots"], peer_share=peer_share)
    for layer in (L1, L2):
        s.set_layer_size(layer, 10_000_000)
    s.add_node("a", a_bps, (L1, L2))
    s.add_node("b", b_bps, (L2,))
    s.add_node("d", demander_bps)
    s.demand("d", L1, "j", 0.0)
    (t,) = s.schedule(0.0)
    assert (t.seeder, t.demander) == ("a", "d")
    s.complete(t.transfer_id, 1.0)
    return s


def next_pull(s: Scheduler, now: float = 1.0) -> Transfer:
    s.demand("d", L2, "j", now)
    (t,) = s.schedule(now)
    return t


def test_a_known_seeder_that_covers_the_download_goes_before_a_tighter_stranger() -> None:
    # both cover d's 4 MB/s; "b" (5) fits more tightly than "a" (10), but d has a's connection
    t = next_pull(cluster(0.7, 4 * MB, 10 * MB, 5 * MB))
    assert t.seeder == "a"
    assert t.reason is not None and t.reason.numbers[PULLED_BEFORE] == 1.0
    assert "a seeder it pulled from before (its connection is open)" in t.reason.render()
    off = next_pull(cluster(0.0, 4 * MB, 10 * MB, 5 * MB))
    assert off.seeder == "b"  # best fit alone
    assert off.reason is not None and PULLED_BEFORE not in off.reason.numbers


def test_where_none_covers_a_known_seeder_is_taken_only_with_its_share_of_the_largest() -> None:
    # d downloads 20 MB/s; nobody covers it; "b" offers 10, the known "a" 8
    assert next_pull(cluster(0.7, 20 * MB, 8 * MB, 10 * MB)).seeder == "a"  # 8 >= 0.7 x 10
    assert next_pull(cluster(0.9, 20 * MB, 8 * MB, 10 * MB)).seeder == "b"  # 8 < 0.9 x 10
    assert next_pull(cluster(0.0, 20 * MB, 8 * MB, 10 * MB)).seeder == "b"


def test_a_demander_that_went_down_forgets_whom_it_pulled_from() -> None:
    s = cluster(0.7, 4 * MB, 10 * MB, 5 * MB)
    s.node_down("d")
    s.add_node("d", 4 * MB)  # back up: its connections are new ones
    assert next_pull(s, 2.0).seeder == "b"


def test_the_memory_keeps_the_most_recent_seeders_per_demander() -> None:
    m = PulledFrom(kept=2)
    m.pulled("d", "a")
    m.pulled("d", "b")
    m.pulled("d", "a")  # a is the most recent now
    m.pulled("d", "c")  # pushes out b, the oldest
    assert list(m.of("d")) == ["a", "c"]
    assert list(m.of("e")) == []
    m.forget("d")
    assert list(m.of("d")) == []
    with pytest.raises(ValueError, match="kept 0"):
        PulledFrom(kept=0)
