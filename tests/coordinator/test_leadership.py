"""A coordinator process on PostgreSQL leads, and steps down three ways (http/leadership.py).

One :class:`Leadership` on a loopback port, a second store on the same
database playing the other coordinator. It takes the lease and serves the
leader's app; then it stops leading when its renew finds another token
(deposed), when one of its writes is refused by the fence, or when its renews
go unanswered until its own deadline -- and serves the standby's 503 naming
whoever leads. The keeper's intervals are short so each happens in a
fraction of a second (the test waits on the outcome, never on time).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from coordinator_support import ADMIN, JOIN, open_state
from rainbowd.coordinator.core import Coordinator
from rainbowd.coordinator.enrollment import Tokens
from rainbowd.coordinator.http import leadership as leadership_module
from rainbowd.coordinator.http.leadership import Leadership
from rainbowd.coordinator.state import FencedError, StateError
from rainbowd.coordinator.state.lease import LeaderRow, acquire, read_leader
from rainbowd.coordinator.state.postgres import PostgresStore
from rainbowd.coordinator.state.sql import SqlStore
from rainbowd.core.leader import LEADER_HEADER
from rainbowd.core.lease import LeaseKeeper
from waiting import wait_until

pytestmark = pytest.mark.backends("postgresql")
OTHER = "http://other.example:7700"
JSON_ADMIN = {"Authorization": f"Bearer {ADMIN}", "Accept": "application/json"}
#: how long the tests give each change of role (they end as soon as it happens)
WAIT_S = 15.0
#: clients asking health at once while the role changes (more of them meet the switch)
POLLERS = 4


@dataclass
class Running:
    lead: Leadership
    other: SqlStore


def keeper(lease_s: float = 30.0) -> LeaseKeeper:
    """Fast turns: renew and try every 0.1 s; a lease long enough that only the test ends it."""
    return LeaseKeeper(lease_s=lease_s, renew_s=0.1, poll_s=0.1, margin_s=lease_s / 4)


@pytest.fixture
async def running(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Running]:
    store, other = open_state(tmp_path), open_state(tmp_path)
    assert isinstance(store, PostgresStore)
    lease_s = getattr(request, "param", 30.0)
    lead = Leadership(
        store,
        lambda: Coordinator(store, join_token=JOIN, admin_token=ADMIN),
        Tokens(join=JOIN, admin=ADMIN),
        host="127.0.0.1",
        port=0,
        keeper=keeper(lease_s),
    )
    task = asyncio.create_task(lead.run())
    try:
        await wait_until(lambda: lead.coordinator is not None, timeout=WAIT_S, what="it to lead")
        yield Running(lead, other)
    finally:
        lead.stop()
        await task
        store.close()
        other.close()


async def get(url: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    """One request on a new connection (a switch of role must never refuse or reset one)."""
    timeout = aiohttp.ClientTimeout(total=WAIT_S)
    async with aiohttp.ClientSession(timeout=timeout) as s, s.get(url, headers=JSON_ADMIN) as r:
        return r.status, dict(r.headers), await r.json()


async def stands_by_naming(lead: Leadership, leader: str) -> bool:
    status, _, doc = await get(f"{lead.url}/v1/health")
    return status == 200 and (doc["role"], doc["leader"]) == ("standby", leader)


def take_lease(other: SqlStore) -> int | None:
    """The other coordinator takes the lease: its time ran out on the database's clock."""
    other.execute_unfenced("UPDATE leader SET expires_at = now() - interval '1 second'")
    return acquire(other, "other", OTHER, 30.0)


async def test_it_leads_and_steps_down_when_its_renew_finds_another_token(
    running: Running,
) -> None:
    lead = running.lead
    status, headers, doc = await get(f"{lead.url}/v1/health")
    assert (doc["role"], doc["leader"]) == ("leader", lead.url)
    assert (await get(f"{lead.url}/v1/nodes"))[0] == 200
    row = read_leader(running.other)
    assert (row.holder, row.url, row.token, row.live) == (lead.holder, lead.url, 1, True)
    [event] = [e for e in running.other.security_events() if e[3] == "leader_takeover"]
    assert event[2] == lead.url and "token 1" in event[4]

    assert take_lease(running.other) == 2
    await wait_until(lambda: stands_by_naming(lead, OTHER), timeout=WAIT_S, what="it to stand by")
    assert lead.coordinator is None and not lead.keeper.leading
    status, headers, doc = await get(f"{lead.url}/v1/nodes")
    assert status == 503 and headers[LEADER_HEADER] == OTHER and "not the leader" in doc["error"]


async def test_a_write_refused_by_the_fence_makes_it_step_down_at_once(running: Running) -> None:
    lead = running.lead
    lead.keeper.renew_s = 3600.0  # no renew will notice: only the fence can
    coordinator = lead.coordinator
    assert coordinator is not None
    assert take_lease(running.other) == 2
    with pytest.raises(FencedError):
        coordinator.store.set_meta("late", "write of the deposed leader")
    await wait_until(lambda: stands_by_naming(lead, OTHER), timeout=WAIT_S, what="it to stand by")
    assert running.other.get_meta("late") == ""


@pytest.mark.parametrize("running", [1.2], indirect=True)  # a short lease: its own deadline
async def test_unanswered_renews_make_it_step_down_by_its_own_clock(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    lead = running.lead

    def unreachable(store: SqlStore, token: int, lease_s: float) -> bool:
        raise StateError("state database: connection timed out (played by the test)")

    monkeypatch.setattr(leadership_module, "renew", unreachable)
    await wait_until(
        lambda: not lead.keeper.leading and lead.coordinator is None,
        timeout=WAIT_S,
        what="it to stop by its own deadline",
    )
    # nobody else took the lease: it stopped by its own clock, not because it was deposed
    assert read_leader(running.other).holder == lead.holder


async def test_a_change_of_role_never_refuses_or_drops_a_connection(running: Running) -> None:
    """Health asked without pause, each on a new connection, while it steps down and leads again.

    The apps of the two roles share one listening socket and overlap at a switch
    (http/leadership.py): every request gets its answer, none a refused or reset
    connection (a CI run once lost one to a takeover).
    """
    lead = running.lead
    roles: list[str] = []
    errors: list[BaseException] = []
    polling = True

    async def poll() -> None:
        while polling:
            try:
                status, _, doc = await get(f"{lead.url}/v1/health")
                assert status == 200
                roles.append(str(doc["role"]))
            except (aiohttp.ClientError, AssertionError, TimeoutError) as e:
                errors.append(e)

    pollers = [asyncio.create_task(poll()) for _ in range(POLLERS)]
    try:
        assert take_lease(running.other) == 2
        await wait_until(lambda: "standby" in roles, timeout=WAIT_S, what="it to stand by")
        running.other.execute_unfenced("UPDATE leader SET expires_at = now() - interval '1 second'")
        await wait_until(
            lambda: lead.coordinator is not None and roles[-1:] == ["leader"],
            timeout=WAIT_S,
            what="it to lead again",
        )
    finally:
        polling = False
        await asyncio.gather(*pollers)
    assert errors == []
    assert roles[0] == "leader" and "standby" in roles and roles[-1] == "leader"


async def test_a_takeover_names_the_leader_whose_lease_lapsed_between_its_acquire_and_read(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    lead = running.lead
    assert take_lease(running.other) == 2
    await wait_until(lambda: stands_by_naming(lead, OTHER), timeout=WAIT_S, what="it to stand by")
    reads: list[LeaderRow] = []

    def lapsed_on_read(store: SqlStore) -> LeaderRow:
        """The acquire found the lease held; by this read it had lapsed (played by the test)."""
        row = read_leader(store)
        reads.append(row)
        return LeaderRow(holder=row.holder, url=row.url, token=row.token, live=False)

    monkeypatch.setattr(leadership_module, "read_leader", lapsed_on_read)
    await wait_until(lambda: len(reads) > 0, timeout=WAIT_S, what="a read after a lost acquire")
    assert lead.role.leader_url == ""  # a lapsed leader is named to nobody...
    running.other.execute_unfenced("UPDATE leader SET expires_at = now() - interval '1 second'")
    await wait_until(lambda: lead.coordinator is not None, timeout=WAIT_S, what="it to lead")
    events = [e for e in running.other.security_events() if e[3] == "leader_takeover"]
    assert "token 3" in events[-1][4]
    assert f"the last leader seen: {OTHER}" in events[-1][4]  # ...but the takeover names it
