"""Which coordinator a client asks next (lib/coordinators.py), on a fake clock."""

from __future__ import annotations

import pytest

from rainbowd.core.leader import is_not_leader, not_leader_error
from rainbowd.lib.coordinators import (
    BACKOFF_CAP,
    BACKOFF_START,
    MAX_COORDINATORS,
    CoordinatorList,
    CoordinatorListError,
    parse_urls,
)

A, B, C = "http://a:7700", "http://b:7700", "https://c:7700"


def coords(*urls: str) -> CoordinatorList:
    # jitter at its top: pauses are exactly the schedule's caps
    return CoordinatorList(list(urls), rng=lambda: 1.0)


def test_parse_takes_a_string_a_comma_list_or_a_list() -> None:
    assert parse_urls("http://a:7700/") == ("http://a:7700",)
    assert parse_urls(f" {A} , {B},{C}") == (A, B, C)
    assert parse_urls([A, B]) == (A, B)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("", "at least one"),
        ([], "at least one"),
        ("a:7700", "must start with http(s)://"),
        ("ftp://a", "must start with http(s)://"),
        ("http://", "must start with http(s)://"),
        (f"{A},", "empty entry"),
        (f"{A},HTTP://A:7700/", "listed twice"),
        ([A, 7], "not a URL string"),
        (",".join(f"http://h{i}:1" for i in range(MAX_COORDINATORS + 1)), "at most"),
    ],
)
def test_parse_refuses_with_a_reason(value: object, words: str) -> None:
    with pytest.raises(CoordinatorListError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_urls(value)  # type: ignore[arg-type]


def test_one_url_is_one_attempt_as_before() -> None:
    c = coords(A)
    walk = c.walk()
    assert walk.first == A
    assert walk.next(A, now=0.0, deadline=10.0) is None
    assert c.current == A


def test_round_robin_then_backoff_doubling_to_the_cap_until_the_deadline() -> None:
    c = coords(A, B, C)
    walk = c.walk()
    now, steps = 0.0, []
    url = walk.first
    while (step := walk.next(url, now=now, deadline=30.0)) is not None:
        url, pause = step
        steps.append((url, pause))
        now += pause
    # a pause only after each whole round failed, doubling from BACKOFF_START up to BACKOFF_CAP
    assert steps[:6] == [
        (B, 0.0),
        (C, 0.0),
        (A, BACKOFF_START),
        (B, 0.0),
        (C, 0.0),
        (A, 2 * BACKOFF_START),
    ]
    assert max(p for _, p in steps) == BACKOFF_CAP
    assert now < 30.0 and now + BACKOFF_CAP >= 30.0  # gave up only when the next pause overran


def test_jitter_spreads_pauses_between_half_and_all_of_the_cap() -> None:
    low = CoordinatorList([A, B], rng=lambda: 0.0).walk()
    low.next(A, now=0.0, deadline=9.0)
    assert low.next(B, now=0.0, deadline=9.0) == (A, BACKOFF_START / 2)


def test_a_named_leader_in_the_list_is_next_at_once_and_remembered() -> None:
    c = coords(A, B, C)
    walk = c.walk()
    assert walk.next(A, now=0.0, deadline=5.0, leader=C) == (C, 0.0)
    assert c.current == C  # the next call starts there
    c.answered(C)
    assert c.walk().first == C


def test_standbys_sending_the_client_in_circles_back_off() -> None:
    c = coords(A, B)
    walk = c.walk()
    assert walk.next(A, now=0.0, deadline=5.0, leader=B) == (B, 0.0)
    assert walk.next(B, now=0.0, deadline=5.0, leader=A) == (A, BACKOFF_START)


def test_known_matches_the_configured_spelling_only() -> None:
    c = coords(A, B)
    assert c.known("HTTP://B:7700/") == B
    assert c.known("http://evil:7700") is None
    assert c.known("http://b:7701") is None
    assert c.known("") is None


def test_a_failure_does_not_undo_a_leader_another_call_found() -> None:
    c = coords(A, B, C)
    walk = c.walk()  # started at A
    c.answered(C)  # meanwhile another call reached the leader
    walk.next(A, now=0.0, deadline=5.0)
    assert c.current == C


def test_the_standby_words_tell_a_standby_from_the_leaders_own_503() -> None:
    assert is_not_leader(503, not_leader_error("http://b:7700"))
    assert is_not_leader(503, not_leader_error())
    assert is_not_leader(503, "whatever", "http://b:7700")
    assert not is_not_leader(503, "report r1 is being applied; retry")
    assert not is_not_leader(500, not_leader_error())
