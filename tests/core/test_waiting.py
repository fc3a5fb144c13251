"""The planner's index of waiting demanders (rainbowd.core.sched.waiting) and the walk that skips.

Two kinds of check: the index against a plain sorted list (order, and the
filter never hiding a demander it admits), and the planner with the skipping
walk against the plain walk (``Planner.skip_hopeless`` off) on random event
sequences: the same transfers, in the same order, at every step.
"""

from __future__ import annotations

import heapq
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rainbowd.core.sched.pieces import PieceScheduler
from rainbowd.core.sched.policies import Planner
from rainbowd.core.sched.records import Transfer
from rainbowd.core.sched.waiting import BLOCK, CLOSED, Admits, Bar, Hope, WaitIndex

MB = 1e6


# -- the index ------------------------------------------------------------------
def test_the_index_keeps_keys_in_order_over_many_blocks() -> None:
    rng = random.Random(1)
    hopes: dict[str, Hope] = {}
    index: WaitIndex[tuple[float, str]] = WaitIndex(hopes)
    plain: list[tuple[float, str]] = []
    for step in range(6 * BLOCK * 4):
        if plain and rng.random() < 0.35:
            key = plain.pop(rng.randrange(len(plain)))
            index.remove(key)
        else:
            nid = f"n{step}"
            hopes[nid] = Hope(rng.uniform(1, 10), rng.uniform(0, 100), rng.uniform(0, 5))
            key = (float(rng.randint(0, 50)), nid)
            plain.append(key)
            index.add(key)
        plain.sort()
        assert len(index) == len(plain)
    assert index.keys() == plain
    with pytest.raises(KeyError):
        index.remove((-1.0, "nobody"))


def test_a_moved_key_is_found_as_if_removed_and_added() -> None:
    """``move`` (a re-keyed demander) keeps the order, and ``first`` exact, near or far."""
    rng = random.Random(3)
    hopes, index, keys = _filled(rng, 4 * BLOCK)
    for step in range(8 * BLOCK):
        old = rng.choice(keys)
        # mostly a small step (inside its block), sometimes anywhere, past either end too
        at = old[0] + rng.uniform(-0.01, 0.01) if step % 3 else rng.uniform(-0.2, 1.2)
        new = (at, old[1])
        # its values change with its key, often past every other demander's (the block's
        # bounds must take them in, or first() would step over it)
        down, need, room, since = _values(rng)
        if step % 2:
            down, need = rng.uniform(0.1, 1), rng.uniform(100, 120)
        hopes[old[1]] = Hope(down, need, room, since)
        index.move(old, new)
        keys[keys.index(old)] = new
        keys.sort()
        assert index.keys() == keys and len(index) == len(keys)
        admits = _filter(rng.uniform(0.1, 10), rng.uniform(0, 120), rng.uniform(0, 100))
        low = (rng.uniform(-0.3, 1.3), "")
        want = next((k for k in keys if k >= low and admits(*hopes[k[1]])), None)
        assert index.first(low, False, admits) == want
    with pytest.raises(KeyError):
        index.move((-1.0, "nobody"), (0.5, "nobody"))


def _values(rng: random.Random) -> tuple[float, float, float, float]:
    """A demander's values: down, need_s, room, since."""
    return rng.uniform(1, 10), rng.uniform(0, 100), rng.uniform(0, 5), rng.uniform(0, 100)


def _filled(
    rng: random.Random, n: int
) -> tuple[dict[str, Hope], WaitIndex[tuple[float, str]], list[tuple[float, str]]]:
    """An index of ``n`` demanders with random keys in [0, 1) and values; its hopes and keys."""
    hopes: dict[str, Hope] = {}
    index: WaitIndex[tuple[float, str]] = WaitIndex(hopes)
    keys: list[tuple[float, str]] = []
    for i in range(n):
        nid = f"n{i:04d}"
        hopes[nid] = Hope(*_values(rng))
        keys.append((rng.uniform(0, 1), nid))
        index.add(keys[-1])
    return hopes, index, keys


def _filter(lo: float, need: float, since_by: float) -> Admits:
    """A filter in the bar's shape: slow enough, needing enough, waiting since early enough."""

    def admits(down: float, need_s: float, _room: float, since: float) -> bool:
        return down <= lo and need_s >= need and since <= since_by

    return admits


def test_first_finds_exactly_the_next_admitted_key() -> None:
    """Skipping blocks never hides an admitted demander, whatever the bounds went through."""
    rng = random.Random(2)
    hopes, index, keys = _filled(rng, 5 * BLOCK)
    # some leave (bounds stay loose), some change their values in place (bounds widen)
    for key in rng.sample(keys, BLOCK):
        index.remove(key)
        keys.remove(key)
    for key in rng.sample(keys, BLOCK):
        hopes[key[1]] = Hope(*_values(rng))
        index.widen(key, hopes[key[1]])
    keys.sort()
    for _ in range(200):
        admits = _filter(rng.uniform(1, 10), rng.uniform(0, 100), rng.uniform(0, 100))

        low = (rng.uniform(-0.1, 1.1), "")
        strict = rng.random() < 0.5
        if strict and rng.random() < 0.5:
            low = rng.choice(keys)
        want = next(
            (k for k in keys if (k > low if strict else k >= low) and admits(*hopes[k[1]])),
            None,
        )
        assert index.first(low, strict, admits) == want


def test_the_bar_admits_whoever_some_layer_could_serve() -> None:
    bar = Bar(best=2 * MB, need_s=50.0, any_share=False, any_floor=False, share=0.5)
    assert bar.admits(4 * MB, 0.0, 1 * MB)  # half its download fits the best free upload
    assert not bar.admits(5 * MB, 0.0, 1 * MB)  # too fast for every layer's free upload
    assert bar.admits(5 * MB, 60.0, 1 * MB)  # but it lacks so much that a slow one will do
    assert not bar.admits(4 * MB, 0.0, 3 * MB)  # the floor: more room than any seeder has
    assert Bar(2 * MB, 50.0, True, True, 0.5).admits(100 * MB, 0.0, 100 * MB)
    assert not CLOSED.admits(0.0, 1e9, 0.0)
    assert Bar(3 * MB, 50.0, False, False, 0.5).looser_than(bar)
    assert Bar(2 * MB, 40.0, False, False, 0.5).looser_than(bar)
    assert not Bar(1 * MB, 60.0, False, False, 0.5).looser_than(bar)


def test_the_bar_counts_a_wait_as_need_with_a_wait_credit() -> None:
    """A demander that waited 30 s at credit 2 needs 60 s: a slow seeder will do."""
    credit = Bar(2 * MB, 50.0, False, False, 0.5, now=100.0, credit=2.0)
    assert not credit.admits(5 * MB, 10.0, 1 * MB, since=80.0)  # waited 20 s: needs 40 s
    assert credit.admits(5 * MB, 10.0, 1 * MB, since=70.0)  # waited 30 s: needs 60 s
    assert not credit.admits(5 * MB, 10.0, 1 * MB)  # never waited (since = inf)
    no_credit = Bar(2 * MB, 50.0, False, False, 0.5, now=100.0)
    assert not no_credit.admits(5 * MB, 10.0, 1 * MB, since=0.0)


# -- the walk: skipping against asking everyone ---------------------------------
def _run(
    policy: str, seed: int, skip: bool, nodes: int = 40, defer: bool = True
) -> list[list[tuple[str, ...]]]:
    """One random cluster driven to the end; every schedule() call's transfers, as text.

    The clock is the event queue's (no sleeping): a transfer takes its
    piece's size over the lesser of its two nodes' speeds; some fail, some
    pairs are kept apart, some nodes go down and come back.
    """
    rng = random.Random(seed)
    s = PieceScheduler(policy)
    planner = s.inner._pass
    assert isinstance(planner, Planner)
    planner.skip_hopeless = skip
    planner.defer_refresh = defer
    sizes = [rng.choice((300_000, 2_000_000, 9_000_000)) for _ in range(rng.randint(1, 4))]
    layers = [(f"L{i}", size) for i, size in enumerate(sizes)]
    for layer, size in layers:
        s.set_layer_size(layer, size, 256 * 1024)
    s.add_node("origin", rng.uniform(1, 4) * MB, [lr for lr, _ in layers])
    up, down = {"origin": 4 * MB}, {}
    for i in range(nodes):
        nid = f"n{i:02d}"
        up[nid] = rng.choice((0.1, 0.5, 1.0, 2.0, 4.0)) * MB * rng.uniform(0.8, 1.2)
        down[nid] = max(up[nid], rng.choice((0.5, 1.0, 4.0)) * MB)
        s.add_node(nid, up[nid], download_bps=down[nid])
    for nid in down:
        for layer, _ in layers:
            s.demand(nid, layer, "j", 0.0)
    log: list[list[tuple[str, ...]]] = []
    events: list[tuple[float, int, str]] = []
    seq = 0
    now = 0.0
    downed: list[str] = []

    def schedule() -> None:
        nonlocal seq
        out: list[Transfer] = s.schedule(now)
        log.append(
            [(t.transfer_id, t.layer, f"{t.first_chunk}", t.seeder, t.demander) for t in out]
        )
        for t in out:
            size = s.piece_of(t).size
            rate = min(up[t.seeder], down[t.demander])
            heapq.heappush(events, (now + size / rate, seq, t.transfer_id))
            seq += 1

    schedule()
    while events:
        now, _, tid = heapq.heappop(events)
        if not s.is_active(tid):
            continue
        roll = rng.random()
        if roll < 0.05:
            t = s.fail(tid)
            s.avoid(t.demander, t.seeder, now + 3.0)
        else:
            s.complete(tid, now, bytes_moved=1)
        if rng.random() < 0.02:
            victim = rng.choice(sorted(down))
            s.node_down(victim)
            downed.append(victim)
        elif downed and rng.random() < 0.3:
            s.add_node(downed.pop(0))
        schedule()
        if not events and downed:
            for nid in downed:
                s.add_node(nid)
            downed.clear()
            now += 10.0
            schedule()
        if not events and s.pending():
            now += 10.0  # starving demanders take any seeder after their patience
            schedule()
    return log


@pytest.mark.parametrize("policy", ["swarm", "relay", "slots", "fastest", "deadline"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_skipping_walk_starts_what_the_plain_walk_starts(policy: str, seed: int) -> None:
    plain = _run(policy, seed, skip=False)
    skipping = _run(policy, seed, skip=True)
    assert sum(map(len, plain)) > 40
    assert skipping == plain


@pytest.mark.parametrize("policy", ["swarm", "relay", "slots", "fastest", "deadline"])
@pytest.mark.parametrize("seed", [4, 5, 6])
def test_re_keying_at_the_walk_starts_what_re_keying_at_each_change_starts(
    policy: str, seed: int
) -> None:
    """Demanders re-keyed once before each walk (``defer_refresh``) or at every change:
    the same transfers in the same order, starving checks and slack horizon included."""
    at_once = _run(policy, seed, skip=True, defer=False)
    deferred = _run(policy, seed, skip=True, defer=True)
    assert sum(map(len, at_once)) > 40
    assert deferred == at_once


@pytest.mark.parametrize("seed", [9, 11, 12])
def test_a_demander_before_a_layers_cut_is_still_met_by_another_layers_run(seed: int) -> None:
    """Per-layer bars (waiting.LayerBars): a demander met in one layer's run and served
    through another whose run starts above it (``need_share``) is kept by the cut bar;
    with each run filtered by its own layer's bar alone these seeds start other transfers."""
    plain = _run("swarm", seed, skip=False)
    skipping = _run("swarm", seed, skip=True)
    assert skipping == plain
