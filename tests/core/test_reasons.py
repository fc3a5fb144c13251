"""A transfer's reason is a record: the rule and the numbers that chose its seeder.

rainbowd.core.sched.reasons: the policies set it, ``render`` gives the line the
scheduler used to write, and the record crosses the state file and the admin
API with the bounds of every other stored field.
"""

from __future__ import annotations

import math

import msgspec
import pytest

from rainbowd.core.sched import reasons as rs
from rainbowd.core.sched.reasons import MAX_REASON_NUMBERS, TransferReason, Turn
from rainbowd.core.sched.records import Transfer
from rainbowd.core.sched.scheduler import Scheduler

MB = 1e6
L1 = "sha256:" + "1" * 64


def reason(rule: str, policy: str = "swarm", turn: str = "", **numbers: float) -> TransferReason:
    return TransferReason(rule=rule, policy=policy, turn=turn, numbers=numbers)


# -- rendering ---------------------------------------------------------------
def test_paper_renders_algorithm_1s_line_with_the_cap_only_when_it_binds() -> None:
    plain = reason(rs.FASTEST_IDLE, "paper", seeder_bps=12e6, slower_idle=1.0)
    assert plain.render() == (
        "paper: fastest idle seeder holding the layer (12.0 MB/s measured; "
        "1 slower idle holder(s) left)"
    )
    capped = reason(
        rs.FASTEST_IDLE, "paper", seeder_bps=12e6, slower_idle=0.0, download_cap_bps=3e6
    )
    assert capped.render() == (
        "paper: fastest idle seeder holding the layer (12.0 MB/s measured; "
        "0 slower idle holder(s) left; expected 3.0 MB/s, the demander's download cap)"
    )


def test_each_rule_and_turn_renders_its_numbers() -> None:
    fastest = reason(rs.FASTEST_IDLE, "fastest", rs.FASTEST_FIRST, seeder_bps=5e6, demander_bps=2e6)
    assert fastest.render() == (
        "fastest: fastest idle seeder holding the layer (5.0 MB/s); "
        "fastest waiting demander first (2.0 MB/s)"
    )
    fit = reason(
        rs.BEST_FIT,
        "slots",
        rs.URGENT,
        seeder_bps=2.5e6,
        free_up_bps=2.5e6,
        free_down_bps=8e6,
        planned_bps=2.5e6,
        need_s=20.04,
    )
    assert fit.render() == (
        "slots: best-fit seeder, 2.5 of its 2.5 MB/s upload free for 8.0 MB/s of free "
        "download; planned at 2.5 MB/s; urgent: needs 20.0 s of download, little slack"
    )
    setter = reason(rs.BEST_FIT, "swarm", rs.URGENT, setter_need_s=80.0, planned_bps=1e6)
    assert setter.render().endswith(
        "; urgent: needs 80.0 s of download, the slowest, which set the horizon: kept at its pace"
    )
    direct = reason(
        rs.DIRECT, "deadline", rs.STARVING, seeder_bps=8e6, size_bytes=10_000.0, direct_s=0.5,
        patience_s=5.0,
    )  # fmt: skip
    assert direct.render("origin") == (
        "deadline: direct -- the layer is small (10000 B), so origin (8.0 MB/s) sends it "
        "straight to every demander within 0.5 s; waited 5 s or more with nothing in flight"
    )
    assert "so the seeder (8.0 MB/s)" in direct.render()  # no name given
    relay = reason(
        rs.RELAY, "relay", rs.FASTEST_FIRST, seeder_bps=8e6, free_up_bps=8e6,
        free_down_bps=4e6, inbound_bps=4e6, planned_bps=4e6, lag_s=0.25, demander_bps=4e6,
    )  # fmt: skip
    assert relay.render("n7") == (
        "relay: cut-through relay -- n7 is still receiving the layer (inbound planned at "
        "4.0 MB/s) and serves its chunks as they land; the best fit among the layer's "
        "holders and relays for 4.0 MB/s of free download; 8.0 of its 8.0 MB/s upload free; "
        "planned at 4.0 MB/s (no faster than its inbound), first chunk 0.2 s behind a "
        "complete copy; fastest waiting demander first (4.0 MB/s)"
    )


def test_adopted_and_legacy_reasons_render_as_before() -> None:
    assert TransferReason.adopted().render() == (
        "adopted: the agent was already pulling it (unknown to this coordinator)"
    )
    old = TransferReason.legacy("swarm: best-fit seeder, as an old rbd wrote it")
    assert (old.rule, old.render()) == (rs.LEGACY, "swarm: best-fit seeder, as an old rbd wrote it")


def test_a_rule_or_turn_this_rbd_does_not_know_still_renders() -> None:
    newer = reason("rarest-piece", "swarm", "lucky", copies=3.0, planned_bps=1e6)
    assert newer.render() == "swarm: rarest-piece (copies 3, planned_bps 1e+06); lucky"
    assert reason("plain", "").render() == "plain"


# -- the record on the wire and in the state file -------------------------------
def test_a_transfer_with_its_reason_survives_json_and_msgpack() -> None:
    why = reason(rs.BEST_FIT, turn=rs.FASTEST_FIRST, planned_bps=4e6, demander_bps=8e6)
    t = Transfer("t1", L1, "s", "d", "j", 1.0, why, 8e6, 4e6, 2, 5)
    for codec in (msgspec.json, msgspec.msgpack):
        back = codec.decode(codec.encode(t), type=Transfer)
        assert back == t and back.reason.numbers == {"planned_bps": 4e6, "demander_bps": 8e6}
    doc = msgspec.json.decode(msgspec.json.encode(t))
    assert doc["reason"] == {
        "rule": "best-fit",
        "policy": "swarm",
        "turn": "fastest-first",
        "numbers": {"planned_bps": 4e6, "demander_bps": 8e6},
        "text": "",
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"rule": "x" * 257},  # a Name
        {"rule": "best-fit", "numbers": {"planned_bps": math.nan}},  # only finite numbers
        {"rule": "best-fit", "numbers": {"planned_bps": math.inf}},
        {"rule": "best-fit", "numbers": {"n" * 257: 1.0}},
        {"rule": "best-fit", "numbers": {f"n{i}": 1.0 for i in range(MAX_REASON_NUMBERS + 1)}},
        {"rule": "legacy", "text": "x" * 5000},  # a Text
        {"policy": "swarm"},  # no rule
    ],
)
def test_a_reason_out_of_bounds_is_refused(bad: dict[str, object]) -> None:
    """Checked when decoded (msgpack carries NaN and inf as they are)."""
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode(bad), type=TransferReason)


# -- the policies set it -------------------------------------------------------
def test_a_fast_demander_handed_a_fast_seeder_carries_the_rule_and_its_rates() -> None:
    s = Scheduler("slots")
    s.set_layer_size(L1, 10_000_000)
    s.add_node("fast-seed", 8 * MB, [L1])
    s.add_node("slow-seed", 1 * MB, [L1])  # below min_share of the demander: not a fit
    s.add_node("fast", 8 * MB)
    s.demand("fast", L1, "j", 0.0)
    (t,) = s.schedule(0.0)
    assert (t.seeder, t.demander) == ("fast-seed", "fast")
    assert (t.reason.rule, t.reason.policy, t.reason.turn) == (
        rs.BEST_FIT,
        "slots",
        rs.FASTEST_FIRST,
    )
    assert t.reason.numbers == {
        rs.SEEDER_BPS: 8 * MB,
        rs.FREE_UP_BPS: 8 * MB,
        rs.FREE_DOWN_BPS: 8 * MB,
        rs.PLANNED_BPS: 8 * MB,
        rs.DEMANDER_BPS: 8 * MB,
    }
    assert t.reason.render().startswith("slots: best-fit seeder, 8.0 of its 8.0 MB/s")


def test_paper_records_the_seeder_it_took_and_the_slower_ones_it_left() -> None:
    s = Scheduler("paper")
    s.add_node("o", 12 * MB, [L1])
    s.add_node("p", 7 * MB, [L1])
    s.add_node("a", 1 * MB, max_download_bps=3 * MB)
    s.demand("a", L1, "j", 0.0)
    (t,) = s.schedule(0.0)
    assert t.seeder == "o" and t.expected_bps == 3 * MB
    assert (t.reason.rule, t.reason.policy, t.reason.turn) == (rs.FASTEST_IDLE, "paper", "")
    assert t.reason.numbers == {
        rs.SEEDER_BPS: 12 * MB,
        rs.SLOWER_IDLE: 1.0,
        rs.DOWNLOAD_CAP_BPS: 3 * MB,
    }


def test_a_turn_is_the_walks_rule_and_its_one_number() -> None:
    turn = Turn(rs.URGENT, rs.NEED_S, 12.5)
    assert (turn.name, turn.number, turn.value) == ("urgent", "need_s", 12.5)
