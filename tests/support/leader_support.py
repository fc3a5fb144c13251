"""Stand-ins for a cluster of coordinators: a standby and a dead one (issue 16).

The standby is :func:`standby_stand_in`, a tiny aiohttp app speaking the
standby's side of the protocol (core/leader.py: 503, "not the leader",
``RBD-Leader``), standing in for the real standby (coordinator/) until it
lands; a dead coordinator is a closed loopback port.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.test_utils import TestServer

from rainbowd.core.leader import LEADER_HEADER, not_leader_error
from rainbowd.core.messages import MSGPACK, ErrorReply, encode


def dead_url() -> str:
    """A loopback URL nobody listens on: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@dataclass
class Standby:
    """What a stand-in standby saw: requests, and the Authorization headers they carried."""

    url: str
    seen: list[str] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)


async def standby_stand_in(leader: Callable[[], str]) -> tuple[Standby, TestServer]:
    """A coordinator that does not lead: 503 + ``RBD-Leader: leader()`` (absent when "")."""

    async def refuse(request: web.Request) -> web.Response:
        me.seen.append(f"{request.method} {request.path}")
        me.auth.append(request.headers.get("Authorization", ""))
        if request.method == "GET" and request.path == "/v1/health":
            return web.json_response({"ok": True, "leader": False})
        named = leader()
        headers = {LEADER_HEADER: named} if named else {}
        body = encode(ErrorReply(error=not_leader_error(named)))
        return web.Response(status=503, body=body, content_type=MSGPACK, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    me = Standby(str(server.make_url("")).rstrip("/"))
    return me, server
