"""A coordinator's role on the wire (coordinator/http/role.py, standby.py; issue 16).

The leader's health says ``role: leader``; once its role flips to standby
(it stepped down) every /v1/ request but health is a 503 naming the leader in
``RBD-Leader``; a standby's own app does the same and serves its metrics
(``rbd_coordinator_is_leader 0``) under the metrics token.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from coordinator_support import ADMIN, Running, enroll, start
from rainbowd.coordinator.enrollment import Tokens
from rainbowd.coordinator.http.app import LIVENESS_ENDED
from rainbowd.coordinator.http.role import ROLE, Role
from rainbowd.coordinator.http.standby import create_standby_app
from rainbowd.coordinator.metrics import CoordinatorMetrics
from rainbowd.core.leader import LEADER_HEADER
from waiting import FakeClock, settle

#: a failure deadline: the loop ends at its next turn, half a heartbeat interval on
LOOP_END_TIMEOUT_S = 10.0
JSON_ADMIN = {"Authorization": f"Bearer {ADMIN}", "Accept": "application/json"}


async def get(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], dict[str, object]]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, dict(r.headers), json.loads(await r.read() or b"{}")


async def test_the_leaders_health_names_it_and_a_stepped_down_one_answers_503(
    coord: Running,
) -> None:
    role = coord.server.app[ROLE]
    role.leader_url = coord.url
    status, _, doc = await get(f"{coord.url}/v1/health", JSON_ADMIN)
    assert status == 200 and (doc["role"], doc["leader"]) == ("leader", coord.url)
    assert (await get(f"{coord.url}/v1/nodes", JSON_ADMIN))[0] == 200
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{coord.url}/metrics", headers=JSON_ADMIN) as r:
            assert "rbd_coordinator_is_leader 1.0" in await r.text()

    role.leading, role.leader_url = False, "http://other:7700"  # it stepped down
    status, headers, doc = await get(f"{coord.url}/v1/nodes", JSON_ADMIN)
    assert status == 503 and headers[LEADER_HEADER] == "http://other:7700"
    assert "not the leader" in str(doc["error"]) and "http://other:7700" in str(doc["error"])
    status, _, doc = await get(f"{coord.url}/v1/health", JSON_ADMIN)
    assert status == 200 and (doc["role"], doc["leader"]) == ("standby", "http://other:7700")

    role.leader_url = ""  # no leader known: no header
    status, headers, doc = await get(f"{coord.url}/v1/jobs", JSON_ADMIN)
    assert status == 503 and LEADER_HEADER not in headers and "no leader" in str(doc["error"])


#: heartbeat interval of the step-down test: the liveness loop turns every half of it
FAST_HEARTBEAT_S = 0.05


async def test_a_stepped_down_leaders_liveness_loop_ends_and_marks_nobody_down(
    state_backend: str, tmp_path: Path
) -> None:
    """The loop ends on the role's flip, not when the app is torn down (it may serve on)."""
    clock = FakeClock()
    r = await start(tmp_path, heartbeat_interval=FAST_HEARTBEAT_S, clock=clock)
    try:
        agent = await enroll(r.url, "n1")
        await agent.close()
        assert r.coordinator.cluster.nodes["n1"].up
        ended = r.server.app[LIVENESS_ENDED]
        assert not ended.is_set()
        r.server.app[ROLE].leading = False  # it stepped down
        async with asyncio.timeout(LOOP_END_TIMEOUT_S):
            await ended.wait()
        clock.advance(1000 * FAST_HEARTBEAT_S)  # no heartbeat for ages: nobody looks
        await settle()
        assert r.coordinator.cluster.nodes["n1"].up
    finally:
        await r.stop()


@pytest.fixture
async def standby() -> AsyncIterator[tuple[str, Role]]:
    role = Role(leading=False, leader_url="http://leader:7700")
    metrics = CoordinatorMetrics()
    metrics.is_leader.set(0)
    app = create_standby_app(role, Tokens(join="j", admin=ADMIN, metrics="m-token"), metrics)
    server = TestServer(app)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), role
    finally:
        await server.close()


@pytest.mark.backends("sqlite")  # (no state store: once is enough)
async def test_a_standby_answers_503_with_the_leader_and_serves_health_and_metrics(
    standby: tuple[str, Role],
) -> None:
    url, role = standby
    for path in ("/v1/nodes", "/v1/heartbeat", "/v1/assignments?cursor=0", "/v1/jobs/x"):
        status, headers, doc = await get(url + path, JSON_ADMIN)
        assert status == 503 and headers[LEADER_HEADER] == "http://leader:7700", path
    status, _, doc = await get(f"{url}/v1/health", {"Accept": "application/json"})
    assert status == 200 and (doc["role"], doc["leader"]) == ("standby", "http://leader:7700")
    role.leader_url = "http://newer:7700"  # the leadership loop read a newer row
    assert (await get(f"{url}/v1/nodes", JSON_ADMIN))[1][LEADER_HEADER] == "http://newer:7700"

    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/metrics", headers={"Authorization": "Bearer m-token"}) as r:
            assert r.status == 200
            assert "rbd_coordinator_is_leader 0.0" in await r.text()
        async with s.get(f"{url}/metrics", headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with s.get(f"{url}/console") as r:
            assert r.status == 404
