"""Which role this coordinator process plays, and what a standby answers (issue 16).

A coordinator that does not lead answers every request under ``/v1/`` except
``GET /v1/health`` with HTTP 503, an ``ErrorReply`` saying it is not the
leader (and naming the leader if it knows it), and the header
:data:`~rainbowd.core.report_id.LEADER_HEADER` with the leader's URL (absent
when none is known): agents and ``rbd`` follow it (the words and the header are
rainbowd.core.leader's, shared with the clients). ``/v1/health`` reports
``role`` (``leader`` or ``standby``) and ``leader`` (a URL, "" if unknown).

The gate is a middleware on both apps (the leader's, coordinator/http/app.py,
and the standby's, coordinator/http/standby.py): the leader's answers 503 too
from the moment it steps down until its app is torn down.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
from aiohttp import web

from rainbowd.core.leader import LEADER_HEADER, NOT_LEADER_STATUS, not_leader_error
from rainbowd.core.messages import JSON, MSGPACK, PROTOCOL_VERSION

from .common import error_reply, reply_type

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: the one path under /v1/ a standby serves itself
HEALTH_PATH = "/v1/health"


@dataclass
class Role:
    """This process's role now; the leadership loop (coordinator/http/leadership.py) moves it.

    ``leader_url``: the leader's URL as the lease row names it ("" unknown);
    while leading, this process's own.
    """

    leading: bool = True
    leader_url: str = ""

    @property
    def name(self) -> str:
        return "leader" if self.leading else "standby"


ROLE: web.AppKey[Role] = web.AppKey("role", Role)


def not_leader(request: web.Request, leader_url: str) -> web.Response:
    """The 503 of a coordinator that does not lead, naming the leader if known."""
    resp = error_reply(request, NOT_LEADER_STATUS, not_leader_error(leader_url))
    if leader_url:
        resp.headers[LEADER_HEADER] = leader_url
    return resp


@web.middleware
async def leader_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every /v1/ request but health is the leader's: a standby answers 503 (see above)."""
    role = request.app[ROLE]
    if role.leading or not request.path.startswith("/v1/") or request.path == HEALTH_PATH:
        return await handler(request)
    return not_leader(request, role.leader_url)


def health_reply(request: web.Request, role: Role, doc: dict[str, Any]) -> web.Response:
    """``GET /v1/health``: ``doc`` with the version, status, role and leader; JSON or msgpack."""
    full = {"v": PROTOCOL_VERSION, "status": "ok", **doc}
    full.update(role=role.name, leader=role.leader_url)
    if reply_type(request) == JSON:
        return web.Response(body=json.dumps(full).encode(), content_type=JSON)
    return web.Response(body=msgpack.packb(full, use_bin_type=True), content_type=MSGPACK)
