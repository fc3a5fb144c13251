"""The coordinator's HTTP API (aiohttp): routing, body codec, auth headers, errors.

Every route is a thin wrapper: decode and validate the body
(:func:`rainbowd.core.messages.decode`), authenticate, call one
:class:`~rainbowd.coordinator.core.Coordinator` method, encode the reply.
Any refusal becomes a 4xx ``ErrorReply`` with a message saying why; an
unexpected exception becomes a logged 500, never a dropped connection.

Bodies are msgpack or JSON. The reply is what ``Accept`` asks for
(``application/msgpack``, as agents and the CLI send, or ``application/json``);
without a preference it follows the body, and a GET without one is JSON, so
``curl http://HOST:7700/v1/health`` is readable as it stands.

At the door (coordinator/limits.py, rainbowd.core.wirebounds): every field of a
body is bounded (400 naming the field); an ``Authorization`` header that is
not ASCII is 401; a body that does not arrive within ``BODY_READ_TIMEOUT`` is
408 and the connection is closed; holdings that are no layer of a known image
are dropped before the core sees them.

Routes (prefix ``/v1``)::

    agent (Authorization: Bearer <node_id>:<credential>; register uses its body)
    POST register                 RegisterRequest -> RegisterReply
    POST heartbeat                Heartbeat -> HeartbeatReply
    GET  assignments?cursor=N&trust_version=V&wait=S   -> AssignmentBatch (long-poll;
                                  a poll whose connection drops mid-wait marks the node down)
    POST transfers/{id}/progress  TransferProgress -> 204
    POST transfers/{id}/done      TransferDone -> 204
    POST transfers/{id}/failed    TransferFailed -> 204
    POST reports                  ReportBatch -> 204, or ReportBatchReply if an item was not
                                  applied (progress, done and failed reports of many
                                  transfers at once, each done/failed with its report id:
                                  coordinator/http/report_batch.py; what agents send)
    POST ingests/{id}/done        IngestDone -> 204
    POST ingests/{id}/failed      TaskFailed -> 204
    POST loads/{id}/done          LoadDone -> 204
    POST loads/{id}/failed        TaskFailed -> 204
    POST pulls                    PullRequest -> PullReply (its registry front door lacks an
                                  image: the node joins or starts a pull job; pulls.py)
    POST events                   SecurityEvent -> 204 (429 past the node's event budget; 403
                                  for a claim about a peer with no transfer behind it:
                                  coordinator/evidence.py)
    GET  trust                    -> TrustList (an agent's server meets a client key it
                                  does not know: its list may be behind)
    POST tags/resolve             ResolveTag -> ResolvedTag, 404 when the registry has no
                                  upstream or no ready image has the tag (a node's registry
                                  front door; coordinator/upstreams.py)

    admin (Authorization: Bearer <admin token>)
    GET  nodes                    -> NodeList
    GET  security-events?after=ID&limit=N -> SecurityEventList (refused keys, bad chunks):
                                  one page, oldest first; without after= the newest N
                                  (default 100, at most 1000; coordinator/limits.py)
    POST nodes/{id}/clear-quarantine -> NodeView
    DELETE nodes/{id}             -> 204
    GET  images                   -> ImageList
    POST images                   CreateImage -> ImageView
    GET  images/{ref}             -> ImageView
    DELETE images/{ref}           -> 204 (409 while a running job uses it; layers stay)
    GET  jobs                     -> JobList
    POST jobs                     CreateJob -> JobView
    GET  jobs/{id}                -> JobView
    GET  jobs/{id}/transfers      -> ActiveTransferList (in flight; the console's live edges)

    GET  /console                 the web console (static page; its data needs the admin token)

    GET  health                   (no auth) -> {"v": 1, "status": "ok", "role": "leader",
                                  "leader": URL, ...}; a standby coordinator answers every
                                  other /v1/ route 503 + RBD-Leader: URL (http/role.py)

    GET  /metrics                 (Bearer <metrics token> or <admin token>) -> Prometheus
                                  text exposition (coordinator/metrics.py)
    cluster operations (ops) and build contexts: see coordinator/http/ops_routes.py
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from rainbowd.core.digest import is_digest
from rainbowd.core.messages import (
    MAX_BODY,
    CreateImage,
    CreateJob,
    EvictRequest,
    Heartbeat,
    IngestDone,
    LoadDone,
    MessageError,
    PullRequest,
    RegisterRequest,
    ResolveTag,
    SecurityEvent,
    SecurityEventList,
    SecurityEventView,
    TaskFailed,
    TransferDone,
    TransferFailed,
    TransferProgress,
)
from rainbowd.core.wirebounds import MAX_QUERY_INT

from .. import limits
from ..core import MAX_WAIT, Coordinator
from ..errors import BadRequest, CoordinatorError
from ..metrics import CONTENT_TYPE_LATEST
from ..state import FencedError
from . import console
from .common import (
    BODY_TIMEOUT,
    COORDINATOR,
    RequestTimeout,
    admin,
    agent,
    authorization,
    body,
    coord,
    error_reply,
    no_content,
    reply,
)
from .ops_routes import add_op_routes
from .report_batch import reports_handler
from .report_ids import ReportLedger
from .role import ROLE, Role, health_reply, leader_gate, not_leader

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: report ids applied (a retried report is applied once)
REPORT_LEDGER: web.AppKey[ReportLedger] = web.AppKey("report_ledger", ReportLedger)
#: set when the server shuts down: cancelled long-polls are then not agents vanishing
CLOSING: web.AppKey[asyncio.Event] = web.AppKey("closing", asyncio.Event)
EVENT_BUDGET: web.AppKey[limits.EventBudget] = web.AppKey("event_budget", limits.EventBudget)


class _TooManyRequests(CoordinatorError):
    status = 429


def _known_holdings(c: Coordinator, what: str, holdings: list[str]) -> list[str]:
    """Malformed digests are refused; well-formed ones of no known layer are ignored."""
    bad = [d for d in holdings if not is_digest(d)]
    if bad:
        raise BadRequest(f"{what}: holdings are not sha256 digests: {bad[:3]}")
    return limits.known_layers(holdings, c.manifests)


def _query(request: web.Request, name: str, default: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"query parameter {name}={raw!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise BadRequest(f"query parameter {name}={raw!r} is not a finite number")
    return value


def _query_int(request: web.Request, name: str) -> int:
    raw = request.query.get(name, "0")
    if not (raw.isascii() and raw.isdigit()) or len(raw) > len(str(MAX_QUERY_INT)):
        raise BadRequest(
            f"query parameter {name}={raw[:40]!r} must be an integer in 0..{MAX_QUERY_INT}"
        )
    value = int(raw)
    if value > MAX_QUERY_INT:
        raise BadRequest(f"query parameter {name}={raw!r} must be at most {MAX_QUERY_INT}")
    return value


def _query_flag(request: web.Request, name: str, default: bool = True) -> bool:
    """A yes/no query parameter: ``1`` or ``0`` (absent: ``default``)."""
    raw = request.query.get(name)
    if raw is None:
        return default
    if raw not in ("0", "1"):
        raise BadRequest(f"query parameter {name}={raw[:40]!r} must be 0 or 1")
    return raw == "1"


# --------------------------------------------------------------------------
# middleware: every error is an ErrorReply
# --------------------------------------------------------------------------
@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except CoordinatorError as e:
        resp = error_reply(request, e.status, e.message)
        if isinstance(e, RequestTimeout):
            # send the 408, then close at once: aiohttp would otherwise linger reading
            # the rest of the body the client is not sending
            resp.force_close()
            await resp.prepare(request)
            await resp.write_eof()
            if request.transport is not None:
                request.transport.close()  # after the buffered reply is written
        return resp
    except MessageError as e:
        return error_reply(request, 400, str(e))
    except FencedError:
        # deposed mid-request: nothing of it reached the database, and this process is
        # about to stand by (http/leadership.py); the client takes it to the leader
        return not_leader(request, "")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        elif e.status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        elif e.status == 413:
            message = f"request body too large (limit {MAX_BODY} bytes)"
        else:
            message = e.text or e.reason
        return error_reply(request, e.status, message)
    except asyncio.CancelledError:
        raise
    except ConnectionResetError as e:
        # the client went away mid-request (its own timeout, a restart): nothing of ours
        # failed, and nobody is left to read a reply
        log.info("client gone", method=request.method, path=request.path, error=str(e))
        return error_reply(request, 400, f"connection lost: {e}")
    except Exception as e:
        log.exception("internal error", method=request.method, path=request.path)
        message = f"internal error ({type(e).__name__}); see the coordinator log"
        return error_reply(request, 500, message)


# --------------------------------------------------------------------------
# agent routes
# --------------------------------------------------------------------------
async def register(request: web.Request) -> web.Response:
    req = await body(request, RegisterRequest)
    c = coord(request)
    req.holdings = _known_holdings(c, "register", req.holdings)
    return reply(request, c.register(req))


async def heartbeat(request: web.Request) -> web.Response:
    node = agent(request)
    hb = await body(request, Heartbeat)
    c = coord(request)
    hb.holdings = _known_holdings(c, "heartbeat", hb.holdings)
    # the scheduler pass a heartbeat may need runs once, after every heartbeat and
    # report read in this turn of the loop (Dispatch.schedule_soon), as for report
    # batches: 100 agents beating every second asked for 100 passes a second
    with c.dispatch.one_schedule(soon=True):
        hb_reply = c.heartbeat(node, hb)
    return reply(request, hb_reply)


async def assignments(request: web.Request) -> web.Response:
    node = agent(request)
    c = coord(request)
    cursor = _query_int(request, "cursor")
    trust_version = _query_int(request, "trust_version")
    wait = max(0.0, min(_query(request, "wait", 0.0), MAX_WAIT))
    deadline = time.monotonic() + wait
    epoch = c.poll_opened(node)
    dropped = False
    try:
        while True:
            batch = c.poll(node, cursor, trust_version)
            if batch is not None:
                return reply(request, batch)
            left = deadline - time.monotonic()
            if left <= 0:
                return reply(request, c.empty_batch(cursor))
            await node.mailbox.wait(left)
    except asyncio.CancelledError:
        # with handler_cancellation the server cancels us when the client's
        # connection is lost; at shutdown it cancels every handler, which is
        # not the agent's doing
        dropped = not request.app[CLOSING].is_set()
        raise
    finally:
        c.poll_closed(node, epoch, dropped=dropped)


async def transfer_report(request: web.Request) -> web.Response:
    node = agent(request)
    c = coord(request)
    tid = request.match_info["id"]
    what = request.match_info["what"]
    if what == "progress":
        c.transfer_progress(node, tid, await body(request, TransferProgress))
    elif what == "done":
        c.transfer_done(node, tid, await body(request, TransferDone))
    else:
        c.transfer_failed(node, tid, await body(request, TransferFailed))
    return no_content()


async def ingest_report(request: web.Request) -> web.Response:
    node = agent(request)
    c = coord(request)
    iid = request.match_info["id"]
    if request.match_info["what"] == "done":
        c.ingest_done(node, iid, await body(request, IngestDone))
    else:
        c.ingest_failed(node, iid, await body(request, TaskFailed))
    return no_content()


async def load_report(request: web.Request) -> web.Response:
    node = agent(request)
    c = coord(request)
    lid = request.match_info["id"]
    if request.match_info["what"] == "done":
        c.load_done(node, lid, await body(request, LoadDone))
    else:
        c.load_failed(node, lid, await body(request, TaskFailed))
    return no_content()


async def evict(request: web.Request) -> web.Response:
    node = agent(request)
    return reply(request, coord(request).evict(node, await body(request, EvictRequest)))


async def pull(request: web.Request) -> web.Response:
    node = agent(request)
    return reply(request, coord(request).pull(node, await body(request, PullRequest)))


async def trust(request: web.Request) -> web.Response:
    agent(request)
    return reply(request, coord(request).cluster.trust())


async def resolve_tag(request: web.Request) -> web.Response:
    node = agent(request)
    return reply(request, coord(request).resolve_tag(node, await body(request, ResolveTag)))


async def security_event(request: web.Request) -> web.Response:
    node = agent(request)
    ev = await body(request, SecurityEvent)
    budget = request.app[EVENT_BUDGET]
    if not budget.take(node.node_id):
        if budget.refused_in_a_row(node.node_id) == 1:  # once per flood, not per event
            log.warning(
                "security events refused: node is past its event budget",
                node=node.node_id,
                burst=budget.burst,
                per_second=budget.rate_per_s,
            )
        raise _TooManyRequests(
            f"security events from {node.node_id}: more than {budget.burst} in a burst "
            f"(then one per {1 / budget.rate_per_s:g} s); this one was not recorded, retry "
            f"in {budget.retry_after(node.node_id):.0f} s"
        )
    coord(request).security_event(node, ev)
    return no_content()


# --------------------------------------------------------------------------
# admin routes
# --------------------------------------------------------------------------
async def list_nodes(request: web.Request) -> web.Response:
    return reply(request, admin(request).node_views())


async def list_security_events(request: web.Request) -> web.Response:
    """One page of the security event log (see the module docstring)."""
    c = admin(request)
    limit = _query_int(request, "limit") if "limit" in request.query else 0
    limit = limit or limits.EVENTS_PAGE_DEFAULT
    if limit > limits.EVENTS_PAGE_MAX:
        raise BadRequest(
            f"query parameter limit={limit} is above {limits.EVENTS_PAGE_MAX}; "
            "page with after=<id of the last event>"
        )
    after = _query_int(request, "after") if "after" in request.query else None
    rows = c.store.security_event_page(after=after, limit=limit + 1 if after is not None else limit)
    more = after is not None and len(rows) > limit
    events = [
        SecurityEventView(id=i, at=at, reporter=r, peer=p, kind=k, detail=d)
        for i, at, r, p, k, d in rows[:limit]
    ]
    total = c.store.security_event_count()
    return reply(request, SecurityEventList(events=events, total=total, more=more))


async def clear_quarantine(request: web.Request) -> web.Response:
    return reply(request, admin(request).clear_quarantine(request.match_info["id"]))


async def remove_node(request: web.Request) -> web.Response:
    admin(request).remove_node(request.match_info["id"])
    return no_content()


async def list_images(request: web.Request) -> web.Response:
    return reply(request, admin(request).image_views())


async def add_image(request: web.Request) -> web.Response:
    c = admin(request)
    return reply(request, c.add_image(await body(request, CreateImage)), 201)


async def get_image(request: web.Request) -> web.Response:
    return reply(request, admin(request).image_view(request.match_info["ref"]))


async def remove_image(request: web.Request) -> web.Response:
    admin(request).remove_image(request.match_info["ref"])
    return no_content()


async def list_jobs(request: web.Request) -> web.Response:
    return reply(request, admin(request).job_views(transfers=_query_flag(request, "transfers")))


async def create_job(request: web.Request) -> web.Response:
    c = admin(request)
    return reply(request, c.create_job(await body(request, CreateJob)), 201)


async def get_job(request: web.Request) -> web.Response:
    transfers = _query_flag(request, "transfers")
    return reply(request, admin(request).job_view(request.match_info["id"], transfers=transfers))


async def health(request: web.Request) -> web.Response:
    c = coord(request)
    doc: dict[str, Any] = {
        "nodes": len(c.cluster.nodes),
        "nodes_up": sum(1 for n in c.cluster.nodes.values() if n.up),
        "trust_version": c.cluster.trust_version,
    }
    return health_reply(request, request.app[ROLE], doc)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition; refusals in plain text too (scrapers and curl show them)."""
    c = coord(request)
    try:
        c.check_metrics(authorization(request))
    except CoordinatorError as e:
        return web.Response(status=e.status, text=e.message + "\n")
    return web.Response(body=c.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


# --------------------------------------------------------------------------
# the application
# --------------------------------------------------------------------------
#: set when the app's liveness loop has ended (a step-down, or the app's cleanup)
LIVENESS_ENDED: web.AppKey[asyncio.Event] = web.AppKey("liveness_ended", asyncio.Event)


def _save_piece_lines(c: Coordinator, now: float | None = None) -> None:
    """Write the job rows piece reports left for later (jobs_service.py); a failure is logged."""
    try:
        c.save_piece_lines(now)
    except Exception:
        log.exception("saving the job rows of finished pieces failed")


async def _liveness_loop(c: Coordinator, role: Role, ended: asyncio.Event) -> None:
    """Mark nodes down when they miss heartbeats (checked twice per interval), while leading,
    and write the job rows piece reports left for later (JobsService.save_piece_lines).

    It ends at its first turn after the role flips to standby (a step-down,
    http/leadership.py), whatever becomes of the app: a stepped-down
    coordinator's view of the nodes is stale, its writes would only be refused
    by the fence, and the process may serve on with this app's listener.
    """
    try:
        while True:
            await asyncio.sleep(c.heartbeat_interval / 2)
            if not role.leading:
                log.info("liveness checks end: this coordinator no longer leads")
                return
            try:
                c.check_liveness()
            except Exception:
                log.exception("liveness check failed")
            _save_piece_lines(c, c.clock())
    finally:
        ended.set()


def create_app(
    c: Coordinator,
    *,
    body_timeout: float = limits.BODY_READ_TIMEOUT,
    event_budget: limits.EventBudget | None = None,
    role: Role | None = None,
) -> web.Application:
    """The API; serve it with ``web.AppRunner(app, **limits.server_options())``.

    ``role``: shared with the leadership loop (http/leadership.py), which sets
    it to standby when this coordinator must stop; default: always the leader
    (SQLite, tests).
    """
    # report ids (report_ids.py) inside the error middleware: its refusals are replies
    ledger = ReportLedger(c.store)
    ids = ledger.middleware(lambda header: c.authenticate_node(header).node_id)
    gate_and_ids = [leader_gate, errors_middleware, ids]
    app = web.Application(client_max_size=MAX_BODY, middlewares=gate_and_ids)
    app[COORDINATOR] = c
    app[ROLE] = role = role if role is not None else Role()
    app[REPORT_LEDGER] = ledger
    app[CLOSING] = asyncio.Event()
    app[LIVENESS_ENDED] = asyncio.Event()
    app[BODY_TIMEOUT] = body_timeout
    app[EVENT_BUDGET] = event_budget if event_budget is not None else limits.EventBudget(c.clock)

    async def closing(app: web.Application) -> None:
        app[CLOSING].set()

    app.on_shutdown.append(closing)

    async def liveness(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_liveness_loop(c, role, app[LIVENESS_ENDED]))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if role.leading:
            _save_piece_lines(c)  # a standby's writes would be fenced off anyway
        await c.host_key_checks.close()

    app.cleanup_ctx.append(liveness)
    r = app.router
    r.add_post("/v1/register", register)
    r.add_post("/v1/heartbeat", heartbeat)
    r.add_get("/v1/assignments", assignments)
    r.add_post("/v1/transfers/{id}/{what:progress|done|failed}", transfer_report)
    r.add_post("/v1/reports", reports_handler(ledger))
    r.add_post("/v1/ingests/{id}/{what:done|failed}", ingest_report)
    r.add_post("/v1/loads/{id}/{what:done|failed}", load_report)
    r.add_post("/v1/events", security_event)
    r.add_get("/v1/trust", trust)
    r.add_post("/v1/tags/resolve", resolve_tag)
    r.add_post("/v1/evictions", evict)
    r.add_post("/v1/pulls", pull)
    r.add_get("/v1/nodes", list_nodes)
    r.add_get("/v1/security-events", list_security_events)
    r.add_post("/v1/nodes/{id}/clear-quarantine", clear_quarantine)
    r.add_delete("/v1/nodes/{id}", remove_node)
    r.add_get("/v1/images", list_images)
    r.add_post("/v1/images", add_image)
    r.add_get("/v1/images/{ref:.+}", get_image)
    r.add_delete("/v1/images/{ref:.+}", remove_image)
    r.add_get("/v1/jobs", list_jobs)
    r.add_post("/v1/jobs", create_job)
    r.add_get("/v1/jobs/{id}", get_job)
    r.add_get("/v1/health", health)
    r.add_routes(console.routes())
    r.add_get("/metrics", metrics)

    add_op_routes(r)
    return app
