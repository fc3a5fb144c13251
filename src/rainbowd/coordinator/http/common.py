"""What every route module of the coordinator's HTTP API shares: app keys, codec, auth helpers.

app.py (the agent and admin routes), console.py and ops_routes.py all decode
bodies, encode replies and authenticate the same way. These helpers live here,
below all three, so none of them imports another for them: app.py adds the
console's and the ops routes, and nothing imports app.py back (before, the
console and the ops routes imported app.py's helpers, a cycle).
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

import msgspec
from aiohttp import web

from rainbowd.core.messages import JSON, MSGPACK, ErrorReply, decode, encode

from ..cluster import Node
from ..core import Coordinator
from ..errors import BadRequest, CoordinatorError, Unauthorized

T = TypeVar("T")

COORDINATOR: web.AppKey[Coordinator] = web.AppKey("coordinator", Coordinator)
BODY_TIMEOUT: web.AppKey[float] = web.AppKey("body_timeout", float)


class RequestTimeout(CoordinatorError):
    """The body did not arrive in time; the connection is closed after the reply."""

    status = 408


# --------------------------------------------------------------------------
# codec helpers
# --------------------------------------------------------------------------
def reply_type(request: web.Request) -> str:
    """What the client asked for (Accept); lacking that, what it sent; lacking both, JSON.

    rbd's clients (agents, the CLI) always send ``Accept: application/msgpack``;
    a person with curl (``Accept: */*``) reads the JSON form of a GET.
    """
    accept = request.headers.get("Accept", "")
    if JSON in accept:
        return JSON
    if MSGPACK in accept:
        return MSGPACK
    if request.body_exists and request.content_type != JSON:
        return MSGPACK  # a msgpack (or octet-stream) body: answer in kind
    return JSON


def reply(request: web.Request, msg: msgspec.Struct, status: int = 200) -> web.Response:
    ctype = reply_type(request)
    return web.Response(status=status, body=encode(msg, ctype), content_type=ctype)


def error_reply(request: web.Request, status: int, message: str) -> web.Response:
    return reply(request, ErrorReply(error=message), status)


def no_content() -> web.Response:
    return web.Response(status=204)


#: request key of a body already read (by the report-id middleware), so the handler's
#: read of it does not wait
_BODY: web.RequestKey[bytes] = web.RequestKey("rbd_body", bytes)


async def read_body(request: web.Request, timeout: float) -> bytes:
    """The whole body, read once (408 if it does not arrive within ``timeout``).

    Once read, a second call returns it without suspending: report handlers run
    inside a transaction that no other request may interleave with
    (coordinator/http/report_ids.py).
    """
    if _BODY in request:
        return request[_BODY]
    try:
        data = await asyncio.wait_for(request.read(), timeout)
    except TimeoutError:
        raise RequestTimeout(
            f"request body not received within {timeout:g} s; the connection is closed"
        ) from None
    request[_BODY] = data
    return data


def body_type(request: web.Request) -> str:
    """The body's codec: JSON or msgpack (415-like 400 for anything else)."""
    ctype = request.content_type
    if ctype not in (MSGPACK, JSON, "application/octet-stream"):
        raise BadRequest(f"unsupported Content-Type {ctype!r}: send {MSGPACK} or {JSON}")
    return JSON if ctype == JSON else MSGPACK


async def body(request: web.Request, kind: type[T]) -> T:
    ctype = body_type(request)
    data = await read_body(request, request.app[BODY_TIMEOUT])
    return decode(data, kind, ctype)


def coord(request: web.Request) -> Coordinator:
    return request.app[COORDINATOR]


def authorization(request: web.Request) -> str | None:
    """The Authorization header; one that is not ASCII is refused (401), never compared."""
    header = request.headers.get("Authorization")
    if header is not None and not header.isascii():
        raise Unauthorized(
            "the Authorization header is not ASCII: send 'Authorization: Bearer <token>' "
            "with the token exactly as the coordinator issued it"
        )
    return header


def agent(request: web.Request) -> Node:
    return coord(request).authenticate_node(authorization(request))


def admin(request: web.Request) -> Coordinator:
    c = coord(request)
    c.check_admin(authorization(request))
    return c
