"""The coordinator client's error handling (the happy paths run in the coordinator tests)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from coordinator_support import ADMIN, start
from rainbowd.core.messages import Heartbeat
from rainbowd.lib.client import AdminClient, AgentClient, ApiError, CoordinatorUnreachable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_coordinator_is_named() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with AgentClient(url, node_id="n", credential="c", timeout=2) as a:
        with pytest.raises(CoordinatorUnreachable) as e:
            await a.heartbeat(Heartbeat())
    assert e.value.status == 0
    assert url in str(e.value) and "cannot reach" in str(e.value)
    assert isinstance(e.value, ApiError)


def test_api_error_is_readable() -> None:
    e = ApiError(409, "image x already exists", url="http://c/v1/images")
    assert str(e) == "coordinator answered 409: image x already exists (http://c/v1/images)"
    assert e.status == 409 and e.message == "image x already exists"


async def test_errors_carry_the_coordinators_message(tmp_path: Path) -> None:
    r = await start(tmp_path)
    try:
        async with AdminClient(r.url, ADMIN) as admin:
            with pytest.raises(ApiError) as e:
                await admin.job("j-missing")
            assert e.value.status == 404 and e.value.message == "no job 'j-missing'"
            with pytest.raises(ApiError) as e:
                await admin.image("no/such:ref")
            assert e.value.status == 404 and "no/such:ref" in e.value.message
            assert (await admin.images()).images == []
            with pytest.raises(ApiError) as e:
                await admin.remove_image("no/such:ref")
            assert e.value.status == 404 and "no/such:ref" in e.value.message
        # the long-poll's HTTP timeout exceeds its wait
        async with AgentClient(r.url, timeout=0.2) as a:
            from coordinator_support import register_request

            await a.register(register_request("n1"))
            batch = await a.assignments(0, 0, 0.5)
            assert batch.trust is not None
            empty = await a.assignments(batch.cursor, batch.trust.version, 0.5)
            assert empty.assignments == []
    finally:
        await r.stop()
