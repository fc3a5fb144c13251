"""HTTP clients of the coordinator API: :class:`AgentClient` and :class:`AdminClient`.

Both speak msgpack (``application/msgpack``) with the typed messages of
:mod:`rainbowd.core.messages`, so a reply is validated before the caller sees it.
A refusal from the coordinator raises :class:`ApiError` carrying the HTTP
status and the coordinator's own message; not reaching the coordinator at
all raises :class:`CoordinatorUnreachable` (status 0) naming the URL (every
URL, when several are configured), so a log line says what to fix.

Both take one coordinator URL or several: with several, a call finds the
leader by itself, following a standby's ``RBD-Leader`` header only to a
configured URL (lib/coordinators.py, ``_Http._exchange``).

Auth headers: agents send ``Authorization: Bearer <node_id>:<credential>``
(the credential comes back once, in the :class:`RegisterReply`); the admin
client sends ``Authorization: Bearer <admin token>``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import aiohttp
import msgspec
import structlog

from rainbowd.core.leader import LEADER_HEADER, NOT_LEADER_STATUS, is_not_leader
from rainbowd.core.messages import (
    JSON,
    MSGPACK,
    AssignmentBatch,
    CreateImage,
    CreateJob,
    CreateOp,
    ErrorReply,
    EvictReply,
    EvictRequest,
    Heartbeat,
    HeartbeatReply,
    ImageList,
    ImageView,
    IngestDone,
    JobList,
    JobView,
    LoadDone,
    MessageError,
    NodeList,
    NodeView,
    OpList,
    OpResult,
    OpStarted,
    OpView,
    PullReply,
    PullRequest,
    RegisterReply,
    RegisterRequest,
    ReportBatch,
    ReportBatchReply,
    ResolvedTag,
    ResolveTag,
    SecurityEvent,
    SecurityEventList,
    TaskFailed,
    TransferDone,
    TransferFailed,
    TransferProgress,
    TrustList,
    decode,
    encode,
)
from rainbowd.core.report_id import REPORT_ID_HEADER

from .coordinators import CoordinatorList

T = TypeVar("T")
log = structlog.get_logger(__name__)

#: extra seconds the HTTP timeout of a long-poll allows beyond its wait
POLL_SLACK = 10.0
#: methods that change nothing, so sent twice they do no harm (after a broken connection)
SAFE_METHODS = frozenset({"GET", "HEAD"})
#: largest reply to a tag resolution: a digest, a media type and an image ref (each
#: bounded by wirebounds) fit many times over
RESOLVE_REPLY_LIMIT = 16 * 1024
#: with several coordinators, the longest wait for one's TCP connection before the next
#: is tried (a host that is down drops SYNs rather than refusing them)
CONNECT_TIMEOUT = 3.0
#: the least time an attempt is given, even when the call's deadline is about to pass
MIN_ATTEMPT = 0.05


class ApiError(Exception):
    """The coordinator refused a request (``status`` >= 400) or sent garbage."""

    def __init__(self, status: int, message: str, *, url: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.url = url

    def __str__(self) -> str:
        where = f" ({self.url})" if self.url else ""
        if self.status:
            return f"coordinator answered {self.status}: {self.message}{where}"
        return f"{self.message}{where}"


class CoordinatorUnreachable(ApiError):
    """No answer at all: connection refused, DNS failure, timeout. ``status`` is 0."""

    def __init__(self, message: str, *, url: str = "") -> None:
        super().__init__(0, message, url=url)


@dataclass(frozen=True)
class _Reply:
    """What one attempt brought back: the status, the body and the leader a standby named."""

    url: str
    status: int
    content_type: str
    body: bytes
    leader: str


class _Broken(Exception):
    """An attempt failed after the request may have reached the coordinator."""

    def __init__(self, error: CoordinatorUnreachable) -> None:
        super().__init__(str(error))
        self.error = error


class _NotSent(_Broken):
    """An attempt failed before the request reached any coordinator: always safe to retry."""


class _Http:
    """One aiohttp session to the coordinators plus the msgpack request/response dance.

    ``base_url`` is one URL or several (a list, or a comma-separated string): the
    coordinators of one cluster, one leading (lib/coordinators.py). Each call
    goes to the one that answered last and, if that one does not lead or cannot
    be reached, finds the leader by itself within the call's ``timeout``; one
    URL behaves exactly as a single coordinator always did.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        timeout: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.coordinators = CoordinatorList(base_url)
        self.timeout = timeout
        self._clock = clock
        self._sleep = sleep
        self._session: aiohttp.ClientSession | None = None

    @property
    def base_url(self) -> str:
        """The coordinator calls go to first: the one that answered last."""
        return self.coordinators.current

    @property
    def urls(self) -> tuple[str, ...]:
        """Every configured coordinator URL, in the configured order."""
        return self.coordinators.urls

    def _auth(self) -> str | None:
        return None

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        msg: msgspec.Struct | None = None,
        reply: type[T] | None = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
        report_id: str = "",
        limit: int = 0,
        read_only: bool = False,
    ) -> T | None:
        """Send ``msg`` (msgpack) and decode the reply as ``reply`` (None: ignore the body).

        ``report_id`` (rainbowd/report_id.py) makes a report safe to retry: the
        coordinator applies one id once. ``limit`` caps the reply's size (0: MAX_BODY,
        checked when decoding). ``read_only``: a POST that changes nothing, retried like a GET.
        """
        headers = {"Accept": MSGPACK}
        if report_id:
            headers[REPORT_ID_HEADER] = report_id
        data = None
        if msg is not None:
            data = encode(msg)
            headers["Content-Type"] = MSGPACK
        r = await self._exchange(
            method,
            path,
            data=data,
            headers=headers,
            params=params,
            timeout=timeout,
            idempotent=method in SAFE_METHODS or bool(report_id) or read_only,
            limit=limit,
        )
        if r.status >= 400:
            raise ApiError(r.status, _error_message(r.body, r.content_type, r.status), url=r.url)
        if reply is None or r.status == 204:
            return None
        try:
            return decode(r.body, reply, JSON if r.content_type == JSON else MSGPACK)
        except MessageError as e:
            raise ApiError(r.status, f"unreadable reply: {e}", url=r.url) from None

    async def raw(
        self,
        method: str,
        path: str,
        *,
        data: bytes | None = None,
        content_type: str = "application/octet-stream",
        limit: int = 0,
        timeout: float | None = None,
    ) -> bytes:
        """A request with a raw body and a raw reply (build contexts); ``limit`` caps the reply."""
        headers = {"Accept": MSGPACK}
        if data is not None:
            headers["Content-Type"] = content_type
        r = await self._exchange(
            method,
            path,
            data=data,
            headers=headers,
            timeout=timeout,
            limit=limit,
            idempotent=method in SAFE_METHODS,
        )
        if r.status >= 400:
            raise ApiError(
                r.status,
                _error_message(r.body, r.content_type, r.status),
                url=r.url,
            )
        return r.body

    async def _exchange(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str],
        idempotent: bool,
        data: bytes | None = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
        limit: int = 0,
        auth: bool = True,
        leads: bool = True,
    ) -> _Reply:
        """One call: the first answer of a coordinator that takes it, finding the leader.

        Tries the URL that answered last, then follows the walk
        (lib/coordinators.py) while the call's ``timeout`` lasts. What is retried
        elsewhere: a standby's 503 (not applied), a connection that never reached
        a server (refused, no route, connect timeout), and, only when
        ``idempotent``, an attempt that broke after the request may have arrived.
        ``leads``: an answer shows the coordinator leads (not for /health, which a
        standby answers too).
        """
        await self.open()
        assert self._session is not None
        if auth and (token := self._auth()):
            headers = {**headers, "Authorization": token}
        call_timeout = timeout if timeout is not None else self.timeout
        deadline = self._clock() + call_timeout
        walk = self.coordinators.walk()
        url = walk.first
        tried: dict[str, str] = {}
        many = len(self.urls) > 1
        while True:
            left = max(deadline - self._clock(), MIN_ATTEMPT)
            # several coordinators: a black-holed one costs CONNECT_TIMEOUT, not the whole call
            attempt = aiohttp.ClientTimeout(
                total=left, sock_connect=min(CONNECT_TIMEOUT, left) if many else None
            )
            leader: str | None = None
            try:
                r = await self._attempt(
                    method, f"{url}/v1/{path}", headers, data, params, attempt, limit
                )
            except _NotSent as e:
                failure: ApiError = e.error
            except _Broken as e:
                if not idempotent:
                    raise e.error from None
                failure = e.error
            else:
                message = ""
                if r.status == NOT_LEADER_STATUS:
                    message = _error_message(r.body, r.content_type, r.status)
                if not is_not_leader(r.status, message, r.leader):
                    if leads:
                        self.coordinators.answered(url)
                    return r
                failure = ApiError(r.status, message, url=f"{url}/v1/{path}")
                leader = self._follow(url, r.leader)
            tried[url] = str(failure)
            step = walk.next(url, now=self._clock(), deadline=deadline, leader=leader)
            if step is None:
                if not many:
                    raise failure
                raise CoordinatorUnreachable(
                    f"no coordinator took {method} /v1/{path} within {call_timeout:g}s; tried "
                    + "; ".join(f"{u}: {tried.get(u, 'not tried')}" for u in self.urls)
                )
            url, pause = step
            if pause:
                await self._sleep(pause)

    def _follow(self, standby: str, named: str) -> str | None:
        """The leader a standby named, if it is one of ours; else None (and why, logged)."""
        if not named:
            log.info("coordinator does not lead and knows no leader", coordinator=standby)
            return None
        leader = self.coordinators.known(named)
        if leader is None:
            log.warning(
                "coordinator names a leader that is not configured; not following it",
                coordinator=standby,
                named=named,
                configured=list(self.urls),
            )
        elif leader != self.coordinators.current:
            log.info("following the leader", standby=standby, leader=leader)
        return leader

    async def _attempt(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        data: bytes | None,
        params: dict[str, str] | None,
        timeout: aiohttp.ClientTimeout,
        limit: int,
    ) -> _Reply:
        """One request to one coordinator; connection failures as :class:`_Broken`/``_NotSent``."""
        assert self._session is not None
        try:
            async with self._session.request(
                method, url, data=data, headers=headers, params=params, timeout=timeout
            ) as resp:
                leader = resp.headers.get(LEADER_HEADER, "")
                if resp.status >= 400 or not limit:
                    body = await resp.read()
                else:
                    body = await _read_capped(resp, limit, url)
                return _Reply(url, resp.status, resp.content_type, body, leader)
        except aiohttp.ConnectionTimeoutError:
            raise _NotSent(
                CoordinatorUnreachable(
                    f"cannot reach the coordinator: no connection within {timeout.sock_connect:g}s",
                    url=url,
                )
            ) from None
        except TimeoutError:
            raise _Broken(
                CoordinatorUnreachable(
                    f"coordinator did not answer {method} within {timeout.total or 0:.0f}s", url=url
                )
            ) from None
        except aiohttp.ClientConnectorError as e:
            raise _NotSent(
                CoordinatorUnreachable(f"cannot reach the coordinator: {e}", url=url)
            ) from None
        except aiohttp.ClientError as e:
            raise _Broken(
                CoordinatorUnreachable(f"cannot reach the coordinator: {e}", url=url)
            ) from None

    async def call(
        self,
        method: str,
        path: str,
        reply: type[T],
        msg: msgspec.Struct | None = None,
        **kw: Any,
    ) -> T:
        out = await self.request(method, path, msg=msg, reply=reply, **kw)
        assert out is not None
        return out


async def _read_capped(resp: aiohttp.ClientResponse, limit: int, url: str) -> bytes:
    """A reply body of at most ``limit`` bytes (ApiError beyond: not retried)."""
    if (resp.content_length or 0) > limit:
        raise ApiError(resp.status, f"reply exceeds {limit} bytes", url=url)
    out = bytearray()
    async for piece in resp.content.iter_chunked(1 << 20):
        out += piece
        if len(out) > limit:
            raise ApiError(resp.status, f"reply exceeds {limit} bytes", url=url)
    return bytes(out)


def _error_message(body: bytes, ctype: str, status: int) -> str:
    try:
        return decode(body, ErrorReply, JSON if ctype == JSON else MSGPACK).error
    except MessageError:
        text = body[:200].decode(errors="replace").strip()
        return text or f"HTTP {status} with no explanation"


def _transfers_param(transfers: bool) -> dict[str, str] | None:
    """The query asking a job view without its transfer lists (None: the full view)."""
    return None if transfers else {"transfers": "0"}


def _seg(value: str) -> str:
    """An id as one URL path segment."""
    return quote(value, safe="")


class AgentClient(_Http):
    """What an agent says to the coordinator. Use as ``async with AgentClient(url) as c``."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        node_id: str = "",
        credential: str = "",
        timeout: float = 10.0,
    ) -> None:
        super().__init__(base_url, timeout)
        self.node_id = node_id
        self.credential = credential

    def set_credential(self, node_id: str, credential: str) -> None:
        self.node_id = node_id
        self.credential = credential

    def _auth(self) -> str | None:
        if self.node_id and self.credential:
            return f"Bearer {self.node_id}:{self.credential}"
        return None

    async def register(self, req: RegisterRequest) -> RegisterReply:
        """Enroll (join token in ``req``) or re-register (credential in ``req``).

        The reply's credential is remembered for every later call.
        """
        out = await self.call("POST", "register", RegisterReply, req)
        self.set_credential(out.node_id, out.credential)
        return out

    async def heartbeat(self, hb: Heartbeat, timeout: float | None = None) -> HeartbeatReply:
        """Send a heartbeat; ``timeout`` bounds the walk for the leader (default: the client's)."""
        return await self.call("POST", "heartbeat", HeartbeatReply, hb, timeout=timeout)

    async def assignments(self, cursor: int, trust_version: int, wait: float) -> AssignmentBatch:
        """Long-poll: returns at once when there is news, else after ``wait`` seconds."""
        params = {"cursor": str(cursor), "trust_version": str(trust_version), "wait": str(wait)}
        return await self.call(
            "GET",
            "assignments",
            AssignmentBatch,
            params=params,
            timeout=max(wait, 0.0) + max(self.timeout, POLL_SLACK),
        )

    async def transfer_progress(self, tid: str, m: TransferProgress) -> None:
        await self.request("POST", f"transfers/{_seg(tid)}/progress", msg=m)

    async def reports(self, batch: ReportBatch) -> ReportBatchReply | None:
        """Several transfer reports at once; None when every item was applied (204)."""
        return await self.request("POST", "reports", msg=batch, reply=ReportBatchReply)

    async def transfer_done(self, tid: str, m: TransferDone, report_id: str = "") -> None:
        await self.request("POST", f"transfers/{_seg(tid)}/done", msg=m, report_id=report_id)

    async def transfer_failed(self, tid: str, m: TransferFailed, report_id: str = "") -> None:
        await self.request("POST", f"transfers/{_seg(tid)}/failed", msg=m, report_id=report_id)

    async def ingest_done(self, iid: str, m: IngestDone, report_id: str = "") -> None:
        await self.request("POST", f"ingests/{_seg(iid)}/done", msg=m, report_id=report_id)

    async def ingest_failed(self, iid: str, m: TaskFailed, report_id: str = "") -> None:
        await self.request("POST", f"ingests/{_seg(iid)}/failed", msg=m, report_id=report_id)

    async def load_done(self, lid: str, m: LoadDone, report_id: str = "") -> None:
        await self.request("POST", f"loads/{_seg(lid)}/done", msg=m, report_id=report_id)

    async def load_failed(self, lid: str, m: TaskFailed, report_id: str = "") -> None:
        await self.request("POST", f"loads/{_seg(lid)}/failed", msg=m, report_id=report_id)

    async def security_event(self, ev: SecurityEvent, report_id: str = "") -> None:
        await self.request("POST", "events", msg=ev, report_id=report_id)

    async def pull(self, req: PullRequest, timeout: float | None = None) -> PullReply:
        """Ask for an image this node's front door lacks (coordinator/pulls.py)."""
        return await self.call("POST", "pulls", PullReply, req, timeout=timeout)

    async def trust(self) -> TrustList:
        """The coordinator's current trust list (see ChunkServer's refresh on unknown keys)."""
        return await self.call("GET", "trust", TrustList)

    async def resolve_tag(self, req: ResolveTag, timeout: float) -> ResolvedTag:
        """Which manifest a tag names (the registry front door's only way to learn it).

        ApiError 404 when the coordinator knows none. Read only, so retried at
        another coordinator within ``timeout``; the reply is capped at
        RESOLVE_REPLY_LIMIT bytes (a digest, a media type and a ref).
        """
        return await self.call(
            "POST",
            "tags/resolve",
            ResolvedTag,
            req,
            timeout=timeout,
            limit=RESOLVE_REPLY_LIMIT,
            read_only=True,
        )

    async def evict(self, req: EvictRequest) -> EvictReply:
        """Ask to delete layers from the store; delete only what the reply accepts."""
        return await self.call("POST", "evictions", EvictReply, req)

    async def op_started(self, op_id: str, report_id: str = "") -> None:
        await self.request(
            "POST", f"ops/{_seg(op_id)}/started", msg=OpStarted(), report_id=report_id
        )

    async def op_result(self, op_id: str, r: OpResult, report_id: str = "") -> None:
        await self.request("POST", f"ops/{_seg(op_id)}/result", msg=r, report_id=report_id)

    async def fetch_context(self, digest: str, limit: int, timeout: float = 120.0) -> bytes:
        """A build context tar (the caller checks its digest)."""
        return await self.raw("GET", f"contexts/{_seg(digest)}", limit=limit, timeout=timeout)


class AdminClient(_Http):
    """The admin API (what ``rbd`` uses). Use as ``async with AdminClient(url, token) as c``."""

    def __init__(
        self, base_url: str | Sequence[str], admin_token: str, timeout: float = 10.0
    ) -> None:
        super().__init__(base_url, timeout)
        self.admin_token = admin_token

    def _auth(self) -> str | None:
        return f"Bearer {self.admin_token}" if self.admin_token else None

    async def nodes(self) -> NodeList:
        return await self.call("GET", "nodes", NodeList)

    async def clear_quarantine(self, node_id: str) -> NodeView:
        return await self.call("POST", f"nodes/{_seg(node_id)}/clear-quarantine", NodeView)

    async def remove_node(self, node_id: str) -> None:
        await self.request("DELETE", f"nodes/{_seg(node_id)}")

    async def security_events(
        self, *, after: int | None = None, limit: int | None = None
    ) -> SecurityEventList:
        """One page: the newest ``limit`` events, or with ``after`` those after that id."""
        params = {}
        if after is not None:
            params["after"] = str(after)
        if limit is not None:
            params["limit"] = str(limit)
        return await self.call("GET", "security-events", SecurityEventList, params=params)

    async def images(self) -> ImageList:
        return await self.call("GET", "images", ImageList)

    async def add_image(self, req: CreateImage) -> ImageView:
        return await self.call("POST", "images", ImageView, req)

    async def image(self, ref: str) -> ImageView:
        return await self.call("GET", f"images/{quote(ref, safe='/:@')}", ImageView)

    async def remove_image(self, ref: str) -> None:
        """Forget an image (409 while a running job uses it); its layers stay on the nodes."""
        await self.request("DELETE", f"images/{quote(ref, safe='/:@')}")

    async def create_job(self, req: CreateJob) -> JobView:
        return await self.call("POST", "jobs", JobView, req)

    async def jobs(self, *, transfers: bool = True) -> JobList:
        """Every job; ``transfers=False``: without each node's finished transfers."""
        return await self.call("GET", "jobs", JobList, params=_transfers_param(transfers))

    async def job(self, job_id: str, *, transfers: bool = True) -> JobView:
        """One job; ``transfers=False``: without each node's finished transfers (a poll's
        view: they grow with every piece moved, and only a final report reads them)."""
        params = _transfers_param(transfers)
        return await self.call("GET", f"jobs/{_seg(job_id)}", JobView, params=params)

    async def wait_image(
        self, ref: str, *, timeout: float = 300.0, interval: float = 0.1
    ) -> ImageView:
        """Poll ``ref`` until its ingest ends; the view says "ready" or "failed" (and why).

        Raises TimeoutError if it is still ingesting after ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            view = await self.image(ref)
            while view.state == "ingesting":
                await asyncio.sleep(interval)
                view = await self.image(ref)
        return view

    async def ingest(self, req: CreateImage, *, timeout: float = 300.0) -> ImageView:
        """Add an image and wait until its ingest ends; the view says "ready" or "failed"."""
        await self.add_image(req)
        return await self.wait_image(req.ref, timeout=timeout)

    async def distribute(self, req: CreateJob, *, timeout: float = 600.0) -> JobView:
        """Create a job and wait until it is final ("done" or "failed")."""
        job = await self.create_job(req)
        return await self.wait_job(job.job_id, timeout=timeout)

    async def wait_job(
        self, job_id: str, *, timeout: float = 600.0, interval: float = 0.1
    ) -> JobView:
        """Poll a job until it is final ("done" or "failed"); TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            job = await self.job(job_id, transfers=False)
            while job.state == "running":
                await asyncio.sleep(interval)
                job = await self.job(job_id, transfers=False)
            # polled without the transfer lists; the final view carries them
            return await self.job(job_id)

    async def create_op(self, req: CreateOp) -> OpView:
        return await self.call("POST", "ops", OpView, req)

    async def ops(self) -> OpList:
        return await self.call("GET", "ops", OpList)

    async def op(self, op_id: str) -> OpView:
        return await self.call("GET", f"ops/{_seg(op_id)}", OpView)

    async def upload_context(self, digest: str, data: bytes, timeout: float = 120.0) -> None:
        """Upload a build context tar under its digest (the coordinator checks it)."""
        await self.raw(
            "PUT",
            f"contexts/{_seg(digest)}",
            data=data,
            content_type="application/x-tar",
            timeout=timeout,
        )

    async def wait_op(self, op_id: str, *, timeout: float, interval: float = 0.2) -> OpView:
        """Poll an operation until every node has reported; TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            op = await self.op(op_id)
            while op.state == "running":
                await asyncio.sleep(interval)
                op = await self.op(op_id)
        return op

    async def health(self) -> dict[str, Any]:
        """The unauthenticated health document (JSON) of the coordinator asked first.

        A standby answers it too, so an answer does not make that one the leader.
        """
        r = await self._exchange(
            "GET", "health", headers={"Accept": JSON}, idempotent=True, auth=False, leads=False
        )
        if r.status >= 400:
            raise ApiError(r.status, r.body.decode(errors="replace"), url=r.url)
        try:
            doc: dict[str, Any] = json.loads(r.body)
        except ValueError as e:
            raise ApiError(r.status, f"unreadable health document: {e}", url=r.url) from None
        return doc


__all__ = ["AdminClient", "AgentClient", "ApiError", "CoordinatorUnreachable"]
