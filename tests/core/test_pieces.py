"""Pieces: layers as runs of chunks (rainbowd.core.sched.pieces) and the ``swarm`` policy's rules.

Pure: the scheduler is driven with explicit times (a fake clock), no I/O.
"""

from __future__ import annotations

import dataclasses

import pytest

from rainbowd.core.sched.piece_layout import piece_chunks, split_layer
from rainbowd.core.sched.pieces import PieceScheduler
from rainbowd.core.sched.policies import RULES
from rainbowd.core.sched.reasons import TransferReason
from rainbowd.core.sched.records import Transfer
from rainbowd.core.sched.scheduler import SchedulerError

#: the reason of a transfer taken back from an agent
ADOPTED = TransferReason.adopted()

MB = 1_000_000
CHUNK = 1 << 20
LAYER = "sha256:" + "a" * 64
SMALL = "sha256:" + "b" * 64


def swarm(
    *nodes: tuple[str, float, float, tuple[str, ...]], size: int = 16 * CHUNK
) -> PieceScheduler:
    """A ``swarm`` scheduler with LAYER (``size`` bytes, 1 MiB chunks) and ``nodes``.

    Each node is (id, upload B/s, download B/s, layers held).
    """
    s = PieceScheduler("swarm")
    s.set_layer_size(LAYER, size, CHUNK)
    for nid, up, down, held in nodes:
        s.add_node(nid, up, held, download_bps=down)
    return s


def test_a_layer_is_split_into_runs_of_whole_chunks() -> None:
    pieces = split_layer(LAYER, 10 * CHUNK + 5, CHUNK, 4)
    assert [(p.first, p.end) for p in pieces] == [(0, 4), (4, 8), (8, 11)]
    assert [p.size for p in pieces] == [4 * CHUNK, 4 * CHUNK, 2 * CHUNK + 5]
    assert len({p.key for p in pieces}) == 3
    # a layer that fits one piece keeps its own digest as its key: whole-layer behaviour
    (whole,) = split_layer(SMALL, 3 * CHUNK, CHUNK, 4)
    assert (whole.key, whole.first, whole.end) == (SMALL, 0, 0)


def test_piece_size_follows_the_layer_not_only_the_constant() -> None:
    # at least piece_bytes of chunks; at most layer_pieces pieces per layer
    assert piece_chunks(512 * 1024, 128 * 1024) == 4
    assert piece_chunks(512 * 1024, 128 * 1024, 64 * 128 * 1024, 8) == 8
    assert piece_chunks(0, CHUNK) == 0  # whole layers
    assert piece_chunks(512 * 1024, 4 * CHUNK) == 1  # never less than a chunk


def test_pieces_grow_so_the_coordinator_keeps_up_with_the_reports() -> None:
    """Pieces of P bytes bring R / P done reports a second at the cluster's rate R:
    at ``report_cost_s`` each, P >= R * cost / report_load (swarm: load 1.0)."""
    assert RULES["swarm"].report_load == 1.0
    s = PieceScheduler("swarm")
    s.report_cost_s = 0.0025
    # R = min(summed uploads 90 + 10 x 4, summed downloads 10 x 40) = 130 MB/s
    s.add_node("origin", 90 * MB, download_bps=1 * MB)
    for i in range(10):
        s.add_node(f"n{i}", 4 * MB, download_bps=40 * MB)
    s.set_layer_size(LAYER, 64 * CHUNK, CHUNK)
    # 130 MB/s x 2.5 ms = 325,000 B: a piece of one 1 MiB chunk is enough
    assert {p.end - p.first for p in s.pieces(LAYER)} == {1}
    for i in range(10, 40):  # 40 nodes at 4 MB/s up: R = 250 MB/s ...
        s.add_node(f"n{i}", 4 * MB, download_bps=40 * MB)
    s.report_cost_s = 0.01  # ... and a slower coordinator: 2.5 MB a piece, 3 chunks
    s.set_layer_size(SMALL, 30 * CHUNK, CHUNK)
    assert [p.end - p.first for p in s.pieces(SMALL)] == [3] * 10
    # not charged (the simulator's ideal coordinator): one chunk a piece, as before
    s.report_cost_s = 0.0
    other = "sha256:" + "c" * 64
    s.set_layer_size(other, 30 * CHUNK, CHUNK)
    assert len(s.pieces(other)) == 30


def test_a_restarted_scheduler_splits_a_layer_as_the_piece_it_adopts_back() -> None:
    """Pieces sized otherwise after a restart: split as the stored transfer's piece was."""
    s = PieceScheduler("swarm")
    s.add_node("origin", 10 * MB, [LAYER], download_bps=10 * MB)
    s.add_node("n1", 10 * MB, download_bps=10 * MB)
    s.set_layer_size(LAYER, 10 * CHUNK, CHUNK)
    assert len(s.pieces(LAYER)) == 10  # one chunk a piece here; the last run had three
    stored = Transfer("t1", LAYER, "origin", "n1", "j", 0.0, ADOPTED, 0.0, 0.0, 3, 6)
    assert s.split_as(LAYER, 3)
    assert [(p.first, p.end) for p in s.pieces(LAYER)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert s.holds("origin", LAYER) and not s.holds("n1", LAYER)
    t = s.adopt(stored)
    assert (t.first_chunk, t.end_chunk) == (3, 6)
    # in use now: not split again
    assert not s.split_as(LAYER, 1)
    assert s.split_as(LAYER, 3)  # already so


def test_a_layer_partly_held_is_not_split_again() -> None:
    s = PieceScheduler("swarm")
    s.add_node("origin", 10 * MB, [LAYER], download_bps=10 * MB)
    s.add_node("n1", 10 * MB, download_bps=10 * MB)
    s.set_layer_size(LAYER, 4 * CHUNK, CHUNK)
    s.inner.add_holding("n1", s.pieces(LAYER)[0].key)
    assert not s.split_as(LAYER, 2)
    assert len(s.pieces(LAYER)) == 4


def test_pieces_are_one_chunk_when_no_node_is_known_yet() -> None:
    s = PieceScheduler("swarm")
    s.set_layer_size(LAYER, 8 * CHUNK, CHUNK)
    assert len(s.pieces(LAYER)) == 8


def test_whole_layer_policies_are_unchanged() -> None:
    s = PieceScheduler("relay")
    s.set_layer_size(LAYER, 64 * CHUNK, CHUNK)
    assert len(s.pieces(LAYER)) == 1
    s.add_node("origin", 10 * MB, [LAYER])
    s.add_node("n1", 10 * MB)
    s.demand("n1", LAYER, "j", 0.0)
    (t,) = s.schedule(0.0)
    assert (t.layer, t.first_chunk, t.end_chunk) == (LAYER, 0, 0)


def test_several_seeders_feed_one_demander_different_pieces_of_one_layer() -> None:
    s = swarm(
        ("origin", 2 * MB, 2 * MB, (LAYER,)),
        ("peer", 2 * MB, 2 * MB, (LAYER,)),
        ("fast", 2 * MB, 8 * MB, ()),
    )
    s.demand("fast", LAYER, "j", 0.0)
    ts = s.schedule(0.0)
    assert {t.seeder for t in ts} == {"origin", "peer"}
    assert all(t.demander == "fast" and t.layer == LAYER for t in ts)
    ranges = [(t.first_chunk, t.end_chunk) for t in ts]
    assert len(set(ranges)) == len(ranges) and all(end > first for first, end in ranges)
    assert not s.holds("fast", LAYER)


def test_a_node_holds_the_layer_only_with_every_piece_and_seeds_the_pieces_it_has() -> None:
    s = swarm(("origin", 4 * MB, 4 * MB, (LAYER,)), ("a", 4 * MB, 4 * MB, ()), size=8 * CHUNK)
    s.demand("a", LAYER, "j", 0.0)
    first = s.schedule(0.0)
    assert first
    done = s.complete(first[0].transfer_id, 1.0, first[0].end_chunk * CHUNK)
    assert s.holds_piece("a", done)
    assert not s.holds("a", LAYER) and s.holders(LAYER) == ["origin"]
    # a newcomer may be fed that piece by "a", a partial holder (its download has room for
    # the origin and "a" at once; the origin alone goes first to the node lacking most)
    s.add_node("b", 4 * MB, download_bps=8 * MB)
    s.demand("b", LAYER, "j", 1.0)
    from_a = [t for t in s.schedule(1.0) if t.seeder == "a"]
    assert from_a and all(s.holds_piece("a", t) for t in from_a)
    # finish everything "a" still lacks: then it holds the layer
    t_now = 2.0
    while not s.holds("a", LAYER):
        for t in s.active():  # "b"'s too: they hold the origin's upload
            s.complete(t.transfer_id, t_now)
        s.schedule(t_now)
        t_now += 1.0
        assert t_now < 100
    assert "a" in s.holders(LAYER)


def test_equal_demanders_get_one_transfer_each_before_any_gets_a_second() -> None:
    """Within a rank class the walk goes breadth first: a fresh piece for each node.

    The origin's upload covers two striped pieces. Served until its download was full,
    "a" took both and "b" none, and on 1,000 equal nodes the first walk became a chain
    (each node taking both pieces the node ahead of it relays; Walker._walk).
    """
    s = swarm(
        ("origin", 8 * MB, 8 * MB, (LAYER,)),
        ("a", 8 * MB, 8 * MB, ()),
        ("b", 8 * MB, 8 * MB, ()),
    )
    s.demand("a", LAYER, "j", 0.0)
    s.demand("b", LAYER, "j", 0.0)
    ts = s.schedule(0.0)
    assert sorted(t.demander for t in ts if t.seeder == "origin") == ["a", "b"]


def test_a_failed_piece_is_demanded_again_alone() -> None:
    s = swarm(("origin", 4 * MB, 4 * MB, (LAYER,)), ("a", 4 * MB, 4 * MB, ()), size=2 * CHUNK)
    s.demand("a", LAYER, "j", 0.0)
    ts = s.schedule(0.0)
    assert len(ts) == 2  # both pieces at once (striped: test_short_pieces_are_striped...)
    for t in ts[1:]:
        s.complete(t.transfer_id, 1.0)
    failed = s.fail(ts[0].transfer_id)
    again = [t for t in s.schedule(2.0) if t.demander == "a"]
    assert [(t.first_chunk, t.end_chunk) for t in again] == [(failed.first_chunk, failed.end_chunk)]


def test_adopt_names_the_piece_by_its_chunk_range() -> None:
    s = swarm(("origin", 4 * MB, 4 * MB, (LAYER,)), ("a", 4 * MB, 4 * MB, ()))
    p = s.pieces(LAYER)[1]
    t = s.adopt(Transfer("x1", LAYER, "origin", "a", "j", 0.0, ADOPTED, 0.0, 0.0, p.first, p.end))
    assert (t.layer, t.first_chunk, t.end_chunk) == (LAYER, p.first, p.end)
    assert s.is_active("x1") and s.receiving("a", LAYER) is not None
    s.demand("a", LAYER, "j", 0.0)
    assert all((x.first_chunk, x.end_chunk) != (p.first, p.end) for x in s.schedule(0.0))
    with pytest.raises(SchedulerError):
        s.adopt(Transfer("x2", LAYER, "origin", "a", "j", 0.0, ADOPTED, 0.0, 0.0, 3, 5))


def test_a_layer_held_before_its_size_is_known_is_split_when_it_is() -> None:
    s = PieceScheduler("swarm")
    s.add_node("origin", 4 * MB, [LAYER])
    s.set_layer_size(LAYER, 16 * CHUNK, CHUNK)
    assert len(s.pieces(LAYER)) > 1 and s.holds("origin", LAYER)
    # one with a demand open stays whole: re-keying would lose the demand
    s2 = PieceScheduler("swarm")
    s2.add_node("origin", 4 * MB, [SMALL])
    s2.add_node("a", 4 * MB)
    s2.demand("a", SMALL, "j", 0.0)
    s2.set_layer_size(SMALL, 16 * CHUNK, CHUNK)
    assert len(s2.pieces(SMALL)) == 1 and s2.pending() == [("a", SMALL)]


def test_fast_nodes_are_fed_first_and_slow_ones_are_not_urgent_at_the_start() -> None:
    # the paper's rule, kept: the origin's upload goes to the fast nodes first; the slow
    # ones have slack (the fast nodes will feed them) and take only what is left over
    s = swarm(
        ("origin", 3 * MB, 3 * MB, (LAYER,)),
        ("fast-1", 3 * MB, 3 * MB, ()),
        ("fast-2", 3 * MB, 3 * MB, ()),
        *((f"slow-{i}", 0.2 * MB, 0.2 * MB, ()) for i in range(8)),
    )
    for nid in ["slow-0", "fast-1", "slow-1", "fast-2", *(f"slow-{i}" for i in range(2, 8))]:
        s.demand(nid, LAYER, "j", 0.0)
    ts = s.schedule(0.0)
    from_origin = [t for t in ts if t.seeder == "origin"]
    assert from_origin and from_origin[0].demander.startswith("fast")
    assert all("urgent" not in t.reason.render() for t in ts)


def test_slow_uploads_feed_demanders_that_lack_much() -> None:
    # upload-bound: the demander downloads at 2 MB/s, the seeders upload 1 and 0.2; a slow seeder's
    # piece ends long before the demander could finish the rest, so it is used
    s = swarm(
        ("origin", 1 * MB, 1 * MB, (LAYER,)),
        ("slowup", 0.2 * MB, 1 * MB, (LAYER,)),
        ("a", 0.1 * MB, 2 * MB, ()),
        size=64 * CHUNK,
    )
    s.demand("a", LAYER, "j", 0.0)
    seeders = {t.seeder for t in s.schedule(0.0)}
    assert seeders == {"origin", "slowup"}


def test_short_pieces_are_striped_so_two_run_beside_each_other() -> None:
    """A piece short at full rate reserves half the download: a second one overlaps its gaps."""
    s = swarm(("origin", 16 * MB, 16 * MB, (LAYER,)), ("a", 8 * MB, 8 * MB, ()))
    s.demand("a", LAYER, "j", 0.0)
    ts = s.schedule(0.0)  # 1 MiB pieces take 0.13 s at 8 MB/s: striped
    assert len(ts) == 2 and {t.seeder for t in ts} == {"origin"}
    assert all("planned at 4.0 MB/s" in t.reason.render() for t in ts), [
        t.reason.render() for t in ts
    ]


def test_long_pieces_and_the_last_one_take_the_whole_download() -> None:
    # 1 MiB at 0.25 MB/s is 4.2 s: finishing it sooner makes a seeder sooner, no striping
    slow = swarm(("origin", 16 * MB, 16 * MB, (LAYER,)), ("b", MB // 4, MB // 4, ()))
    slow.demand("b", LAYER, "j", 0.0)
    (t,) = slow.schedule(0.0)
    assert "planned at 0.2 MB/s" in t.reason.render(), t.reason.render()  # 0.25 MB/s, as printed
    # a one-piece layer: nothing else to ask for, so the transfer takes what there is
    one = swarm(("origin", 16 * MB, 16 * MB, (LAYER,)), ("c", 8 * MB, 8 * MB, ()), size=CHUNK)
    one.demand("c", LAYER, "j", 0.0)
    (t,) = one.schedule(0.0)
    assert "planned at 8.0 MB/s" in t.reason.render(), t.reason.render()


def test_a_starving_demander_fills_its_download_with_any_seeders_not_one() -> None:
    """A demander far faster than every peer, its one fast seeder taken, waits; then it
    takes every peer with room, not one slow transfer per check -- but not a peer so slow
    that its piece would outlast its wait (a new hostage). (Starving, ``starve_fill``, or,
    first, by the wait credit: after a patience of waiting a piece ending within it will
    do; either says how long it waited.)"""
    from rainbowd.core.sched.policies import RULES

    patience = RULES["swarm"].patience_s
    s = swarm(
        ("origin", 10 * MB, 10 * MB, (LAYER,)),
        *((f"peer-{i}", 0.5 * MB, 0.5 * MB, (LAYER,)) for i in range(4)),
        ("crawl", 0.05 * MB, 0.05 * MB, (LAYER,)),  # a 1 MiB piece takes 21 s from it
        ("hog", 10 * MB, 10 * MB, ()),  # ranks first and takes the origin's whole upload
        ("fast", 0.1 * MB, 50 * MB, ()),  # min_share of 50 MB/s: no peer qualifies
    )
    s.demand("hog", LAYER, "j", 0.0)
    s.demand("fast", LAYER, "j", 0.0)
    first = s.schedule(0.0)
    assert {t.seeder for t in first if t.demander == "hog"} == {"origin"}
    assert not [t for t in first if t.demander == "fast"]
    # nothing ends (the fake clock only moves): after its patience it is starving
    late = [t for t in s.schedule(patience) if t.demander == "fast"]
    assert {t.seeder for t in late} == {f"peer-{i}" for i in range(4)}, [
        t.reason.render() for t in late
    ]
    assert all("waited" in t.reason.render() for t in late)


def test_rarest_first_leaves_only_tiny_layers_last_not_one_chunk_pieces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A one-chunk piece of a split layer goes by its copies like any piece; only a whole
    layer of one chunk no bigger than a piece (a copy costs a round trip) goes last.

    (``swarm``'s pieces before session 13 here, 512 KiB or 1/16 of the layer: its own are
    one chunk now, where no layer is tiny.)
    """
    older = dataclasses.replace(RULES["swarm"], piece_bytes=CHUNK // 2, layer_pieces=16)
    monkeypatch.setitem(RULES, "swarm", older)
    many = "sha256:" + "c" * 64  # 32 chunks: 2-chunk pieces, more copies
    few = "sha256:" + "d" * 64  # 3 chunks: 1-chunk pieces, fewer copies
    s = PieceScheduler("swarm")
    s.set_layer_size(many, 32 * CHUNK, CHUNK)
    s.set_layer_size(few, 3 * CHUNK, CHUNK)
    s.set_layer_size(SMALL, 10_000, CHUNK)  # tiny: one chunk, under a piece
    s.add_node("origin", 100 * MB, [many, few, SMALL])
    s.add_node("peer", 100 * MB, [many])
    s.add_node("a", 1 * MB, download_bps=1 * MB)
    for layer in (SMALL, many, few):
        s.demand("a", layer, "j", 0.0)
    first = s.schedule(0.0)[0]
    assert first.layer == few and first.end_chunk == first.first_chunk + 1
    # the tiny layer waits for every piece, however rare it is
    b = PieceScheduler("swarm")
    b.set_layer_size(many, 32 * CHUNK, CHUNK)
    b.set_layer_size(SMALL, 10_000, CHUNK)
    b.add_node("origin", 100 * MB, [many, SMALL])
    b.add_node("peer", 100 * MB, [many])
    b.add_node("a", 1 * MB, download_bps=1 * MB)
    for layer in (SMALL, many):
        b.demand("a", layer, "j", 0.0)
    assert b.schedule(0.0)[0].layer == many


def test_swarm_moves_pieces_of_one_chunk_each_and_the_rarest_first_whatever_its_size() -> None:
    """``swarm`` schedules the unit that is checked: every piece is one chunk, never relayed
    (a relay forwards whole chunks), and a small layer is a piece like any other."""
    many = "sha256:" + "c" * 64
    s = PieceScheduler("swarm")
    s.set_layer_size(many, 5 * CHUNK + 1, CHUNK)
    s.set_layer_size(SMALL, 10_000, CHUNK)
    s.add_node("origin", 100 * MB, [many, SMALL])
    s.add_node("peer", 100 * MB, [many])
    s.add_node("a", 1 * MB, download_bps=1 * MB)
    s.add_node("b", 1 * MB, download_bps=1 * MB)
    for layer in (many, SMALL):
        s.demand("a", layer, "j", 0.0)
    first = s.schedule(0.0)
    assert first[0].layer == SMALL  # one copy (the origin's) against two of every piece of many
    assert all(t.end_chunk - t.first_chunk <= 1 for t in first), first
    s.demand("b", many, "j", 0.0)
    # b's pieces come from holders only: a, receiving pieces of many, relays none of them
    assert {t.seeder for t in s.schedule(0.1) if t.demander == "b"} <= {"origin", "peer"}
