"""The lease keeper's decisions on a fake clock (rainbowd.core.lease).

A standby tries to acquire every poll; a leader renews every third of the
lease; a leader whose renews go unanswered stops by its own clock before the
server's expiry could let another in; one whose renew updates no row stops at once.
"""

from __future__ import annotations

import pytest

from rainbowd.core.lease import (
    LEASE_S,
    MARGIN_S,
    RENEW_S,
    STANDBY_POLL_S,
    Action,
    LeaseKeeper,
)


def test_the_constants_leave_two_renews_before_the_leader_stops() -> None:
    assert RENEW_S == LEASE_S / 3
    assert 2 * RENEW_S < LEASE_S - MARGIN_S < LEASE_S
    assert LEASE_S + STANDBY_POLL_S <= 5.0  # issue 16: takeover p99 <= 5 s, before restore


def test_a_standby_tries_to_acquire_at_once_then_every_poll() -> None:
    k = LeaseKeeper()
    assert not k.leading
    step = k.step(100.0)
    assert step.action is Action.ACQUIRE
    k.acquire_failed(100.0)  # someone else holds it
    assert k.step(100.5).action is Action.WAIT
    assert k.step(100.5).wake_at == 100.0 + STANDBY_POLL_S
    assert k.step(100.0 + STANDBY_POLL_S).action is Action.ACQUIRE


def test_an_acquired_lease_is_renewed_every_third_and_the_deadline_moves_on() -> None:
    k = LeaseKeeper()
    assert k.step(0.0).action is Action.ACQUIRE
    k.acquired(0.0, token=7)
    assert k.leading and k.token == 7
    assert k.valid_until == LEASE_S - MARGIN_S
    assert k.step(0.5).action is Action.WAIT
    assert k.step(0.5).wake_at == RENEW_S
    t = 0.0
    for _ in range(10):  # renews answered at once: it leads on and on
        t += RENEW_S
        assert k.step(t).action is Action.RENEW
        k.renewed(t)
        assert k.valid_until == t + LEASE_S - MARGIN_S
    assert k.leading and k.token == 7


def test_unanswered_renews_stop_the_leader_before_the_server_lets_anyone_in() -> None:
    """The last renew that succeeded was sent at 1.0: the server's expiry is after 1.0 + lease."""
    k = LeaseKeeper()
    k.step(0.0)
    k.acquired(0.0, token=1)
    assert k.step(RENEW_S).action is Action.RENEW
    k.renewed(RENEW_S)  # sent at 1.0, answered
    server_expiry_at_least = RENEW_S + LEASE_S
    t = RENEW_S
    stopped_at = None
    while t < server_expiry_at_least + 1:
        t = round(t + 0.05, 2)
        step = k.step(t)
        if step.action is Action.RENEW:
            k.renew_failed(t)  # the database does not answer
        elif step.action is Action.STEP_DOWN:
            stopped_at = t
            break
    assert stopped_at is not None
    assert stopped_at == pytest.approx(RENEW_S + LEASE_S - MARGIN_S, abs=0.051)
    assert stopped_at < server_expiry_at_least
    assert not k.leading and k.token is None
    # a standby again: it tries to acquire after a poll
    assert k.step(stopped_at).action is Action.WAIT
    assert k.step(stopped_at + STANDBY_POLL_S).action is Action.ACQUIRE


def test_a_failed_renew_is_retried_sooner_than_the_next_renew() -> None:
    k = LeaseKeeper()
    k.step(0.0)
    k.acquired(0.0, token=1)
    k.renew_failed(RENEW_S)
    assert k.step(RENEW_S + 0.1).action is Action.WAIT
    assert k.step(RENEW_S + RENEW_S / 3).action is Action.RENEW
    k.renewed(RENEW_S + RENEW_S / 3)
    assert k.valid_until == pytest.approx(RENEW_S * 4 / 3 + LEASE_S - MARGIN_S)


def test_a_renew_that_updates_no_row_deposes_the_leader_at_once() -> None:
    k = LeaseKeeper()
    k.step(0.0)
    k.acquired(0.0, token=3)
    assert k.step(RENEW_S).action is Action.RENEW
    k.deposed(RENEW_S)
    assert not k.leading and k.token is None
    assert k.step(RENEW_S).action is Action.WAIT  # no step-down left to do: already done
    assert k.step(RENEW_S + STANDBY_POLL_S).action is Action.ACQUIRE


def test_a_late_answer_never_moves_the_deadline_back() -> None:
    k = LeaseKeeper()
    k.step(0.0)
    k.acquired(2.0, token=1)
    k.renewed(1.0)  # an answer about an older send: the later deadline stands
    assert k.valid_until == 2.0 + LEASE_S - MARGIN_S


def test_a_renew_interval_past_the_deadline_is_refused() -> None:
    with pytest.raises(ValueError, match="renew < lease - margin"):
        LeaseKeeper(lease_s=3.0, renew_s=2.8, margin_s=0.5)
