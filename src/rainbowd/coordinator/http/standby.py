"""The app a standby coordinator serves: health, metrics, and 503 naming the leader.

A standby keeps no view of the cluster (it would be stale by the time it
leads: taking over rebuilds it from the database, coordinator/http/leadership.py),
so it answers everything under ``/v1/`` but health with the 503 of
coordinator/http/role.py, and ``GET /metrics`` with its own few metrics
(``rbd_coordinator_is_leader 0``), under the same tokens as the leader's.
"""

from __future__ import annotations

from aiohttp import web

from .. import auth
from ..enrollment import Tokens
from ..metrics import CONTENT_TYPE_LATEST, CoordinatorMetrics
from .common import error_reply
from .role import ROLE, Role, health_reply, leader_gate


def create_standby_app(role: Role, tokens: Tokens, metrics: CoordinatorMetrics) -> web.Application:
    """The standby's app (its ``role`` shared with the leadership loop, which updates it)."""
    app = web.Application(middlewares=[leader_gate])
    app[ROLE] = role

    async def health(request: web.Request) -> web.Response:
        return health_reply(request, role, {})

    async def scrape(request: web.Request) -> web.Response:
        token = auth.bearer(request.headers.get("Authorization"))
        if token is None or not (
            (tokens.metrics and auth.same_secret(token, tokens.metrics))
            or auth.same_secret(token, tokens.admin)
        ):
            return web.Response(status=401, text="metrics: send the metrics or admin token\n")
        headers = {"Content-Type": CONTENT_TYPE_LATEST}
        return web.Response(body=metrics.exposition(), headers=headers)

    async def elsewhere(request: web.Request) -> web.Response:
        # /v1/ paths never get here (the gate answers them); anything else is no endpoint
        return error_reply(request, 404, f"no such endpoint: {request.method} {request.path}")

    app.router.add_get("/v1/health", health)
    app.router.add_get("/metrics", scrape)
    app.router.add_route("*", "/{tail:.*}", elsewhere)
    return app
