"""Shared helpers of tests/security: start a coordinator, send raw bodies, read strict JSON.

(No tests here; pytest collects nothing from this module.)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from aiohttp.test_utils import TestServer

from coordinator_support import ADMIN, JOIN, register_request
from rainbowd.coordinator.core import Coordinator
from rainbowd.coordinator.http.app import create_app
from rainbowd.coordinator.limits import EventBudget, server_options
from rainbowd.coordinator.state.sqlite import SqliteStore
from rainbowd.core.chunks import MIN_CHUNK_SIZE
from rainbowd.core.messages import JSON, to_wire
from waiting import FakeClock  # the coordinator's clock in these tests

__all__ = ["ADMIN", "JOIN", "Door", "FakeClock", "open_door", "strict_json"]


def strict_json(body: bytes) -> Any:
    """Parse ``body`` as JSON the way a browser does: NaN/Infinity are errors."""

    def refuse(name: str) -> Any:
        raise ValueError(f"not JSON: {name}")

    doc = json.loads(body, parse_constant=refuse)

    def walk(x: Any) -> None:
        if isinstance(x, float):
            assert math.isfinite(x), body[:200]
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(doc)
    return doc


@dataclass
class Door:
    """A real coordinator app on a loopback port (aiohttp TestServer), fake clock."""

    server: TestServer
    coordinator: Coordinator
    store: SqliteStore
    url: str
    state_dir: Path
    clock: FakeClock

    async def stop(self) -> None:
        await self.server.close()
        self.store.close()

    @property
    def port(self) -> int:
        port = self.server.port
        assert port is not None
        return port

    async def send(
        self,
        method: str,
        path: str,
        doc: Any = None,
        *,
        auth: str | None = None,
        ctype: str = JSON,
        raw: bytes | None = None,
    ) -> tuple[int, bytes]:
        """One request; the reply is asked for as JSON. Returns (status, body)."""
        headers = {"Accept": JSON, "Content-Type": ctype}
        if auth is not None:
            headers["Authorization"] = auth
        data = raw
        if data is None and doc is not None:
            data = json.dumps(doc).encode() if ctype == JSON else msgpack.packb(doc)
        async with (
            aiohttp.ClientSession() as s,
            s.request(method, self.url + path, data=data, headers=headers) as resp,
        ):
            return resp.status, await resp.read()

    async def enroll(self, node_id: str, **kw: Any) -> str:
        """Register ``node_id``; returns its ``Authorization`` header value."""
        status, body = await self.send(
            "POST", "/v1/register", to_wire(register_request(node_id, **kw))
        )
        assert status == 200, body
        return f"Bearer {node_id}:{strict_json(body)['credential']}"

    async def admin_get(self, path: str) -> Any:
        status, body = await self.send("GET", path, auth=f"Bearer {ADMIN}")
        assert status == 200, (path, body)
        return strict_json(body)


async def open_door(
    state_dir: Path,
    clock: FakeClock,
    *,
    keepalive_timeout: float = 30.0,
    body_timeout: float = 60.0,
) -> Door:
    store = SqliteStore(state_dir / "coordinator.sqlite")
    c = Coordinator(
        store,
        join_token=JOIN,
        admin_token=ADMIN,
        heartbeat_interval=5.0,
        chunk_size=MIN_CHUNK_SIZE,
        clock=clock,
    )
    app = create_app(c, body_timeout=body_timeout, event_budget=EventBudget(clock))
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server(**server_options(keepalive_timeout))
    return Door(server, c, store, str(server.make_url("")).rstrip("/"), state_dir, clock)
