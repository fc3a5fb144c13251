"""HTTP routes of cluster operations (coordinator/ops.py) and of build contexts.

Routes (prefix ``/v1``)::

    admin (Authorization: Bearer <admin token>)
    POST ops                      CreateOp -> OpView (201)
    GET  ops                      -> OpList
    GET  ops/{id}                 -> OpView
    PUT  contexts/{digest}        raw tar (application/x-tar), at most MAX_CONTEXT bytes -> 204

    agent (Authorization: Bearer <node_id>:<credential>)
    POST ops/{id}/started         OpStarted -> 204
    POST ops/{id}/result          OpResult -> 204
    GET  contexts/{digest}        -> the tar, only to a node with a running build using it

A context is larger than a control message (MAX_BODY), so its upload is read
here in pieces with its own limit instead of through the app's body limit.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from rainbowd.core.messages import CreateOp, OpResult, OpStarted
from rainbowd.lib.buildcontext import MAX_CONTEXT

from ..errors import BadRequest, CoordinatorError
from .common import BODY_TIMEOUT, RequestTimeout, admin, agent, body, coord, no_content, reply


class _TooLarge(CoordinatorError):
    status = 413


class _UploadStalled(RequestTimeout):
    pass


def body_timeout(request: web.Request) -> float:
    return request.app[BODY_TIMEOUT]


async def create_op(request: web.Request) -> web.Response:
    c = admin(request)
    return reply(request, c.ops.create(await body(request, CreateOp)), 201)


async def list_ops(request: web.Request) -> web.Response:
    return reply(request, admin(request).ops.views())


async def get_op(request: web.Request) -> web.Response:
    return reply(request, admin(request).ops.view(request.match_info["id"]))


async def op_report(request: web.Request) -> web.Response:
    node = agent(request)
    c = coord(request)
    op_id = request.match_info["id"]
    if request.match_info["what"] == "started":
        await body(request, OpStarted)
        c.ops.started(node, op_id)
    else:
        c.ops.result(node, op_id, await body(request, OpResult))
    return no_content()


async def put_context(request: web.Request) -> web.Response:
    c = admin(request)
    digest = request.match_info["digest"]
    c.ops.context_path(digest)  # a bad digest is refused before the body is read
    if request.content_length is not None and request.content_length > MAX_CONTEXT:
        raise _TooLarge(
            f"build context of {request.content_length} bytes exceeds the {MAX_CONTEXT} byte limit"
        )
    pieces: list[bytes] = []
    size = 0
    while True:
        try:  # each piece must come within the body timeout: a stalled upload is closed
            piece = await asyncio.wait_for(request.content.read(1 << 20), body_timeout(request))
        except TimeoutError:
            raise _UploadStalled(
                f"build context upload stalled for {body_timeout(request):g} s; send it again"
            ) from None
        if not piece:
            break
        size += len(piece)
        if size > MAX_CONTEXT:
            raise _TooLarge(f"build context exceeds the {MAX_CONTEXT} byte limit")
        pieces.append(piece)
    if not size:
        raise BadRequest("build context upload is empty")
    c.ops.save_context(digest, b"".join(pieces))
    return no_content()


async def get_context(request: web.Request) -> web.StreamResponse:
    node = agent(request)
    path = coord(request).ops.context_for(node, request.match_info["digest"])
    return web.FileResponse(path, headers={"Content-Type": "application/x-tar"})


def add_op_routes(r: web.UrlDispatcher) -> None:
    r.add_post("/v1/ops", create_op)
    r.add_get("/v1/ops", list_ops)
    r.add_get("/v1/ops/{id}", get_op)
    r.add_post("/v1/ops/{id}/{what:started|result}", op_report)
    r.add_put("/v1/contexts/{digest}", put_context)
    r.add_get("/v1/contexts/{digest}", get_context)
