"""Applied report ids: an agent's report retried after a lost answer is applied once.

Agents retry final reports on connection errors and 5xx
(agent/control/report_sender.py, agent/control/report_batch.py), each attempt with the same
id: in the ``Rbd-Report-Id`` header of a single report, or in the item of a
batch (``POST /v1/reports``, coordinator/http/report_batch.py). This module
remembers which ids were applied, per node and route (a batch item counts
under the route of its single form, ``/v1/transfers/{id}/done``), and wraps
the single report routes:

* an id already applied for this node and route is answered 204 (a batch
  item: 208) and not applied again (the first attempt's answer was lost, or
  the coordinator restarted after writing it);
* an id whose first attempt is still being applied is answered 503 (retry
  later): two attempts never run side by side;
* otherwise the report is applied in one transaction of the state database
  (:meth:`StateStore.transaction`) that writes the id *first*, then the
  state the report changes: after a kill -9 either both are on disk (a retry
  is a duplicate) or neither is (a retry is applied, once). A disk that
  refuses writes refuses the report with a 500; if it refused the id's own
  write, before anything in memory changed. If applying is refused (any
  non-2xx answer), the id is forgotten again, so a retry is judged afresh.

Checking an id is one indexed SELECT on the state store's own connection
(it sees the open transaction's rows too); writing one is an INSERT in the
transaction the report needs anyway, so neither costs a commit of its own
(before: a second connection, a commit and an fsync per report). A report
applied in memory whose transaction then failed to COMMIT keeps its id in
memory (at most :data:`MAX_UNCOMMITTED`): a retry is not applied twice by
this process, and the database, which lacks both the id and the state, agrees
after a restart.

Bounds: at most :data:`KEEP_PER_NODE` ids per node (the oldest are dropped),
so one node sending made-up ids can only push out its own. Reports without
the header (older agents) are applied as before. A malformed id is a 400.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import TypeVar

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from rainbowd.core.report_id import MAX_REPORT_ID, REPORT_ID_HEADER, valid

from ..errors import BadRequest, CoordinatorError
from ..state import StateError, StateStore
from .common import BODY_TIMEOUT, read_body

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: ids remembered per node: a retry follows its first attempt within the agent's
#: backoff cap (10 s), or after a coordinator restart during which the node sent
#: nothing else; a node sends a few final reports per piece, so this is ample
KEEP_PER_NODE = 1000
#: trim a node's stored ids every this many new ones (not on every insert: it is a scan)
PRUNE_EVERY = 100
#: ids of reports applied whose transaction then failed to commit, kept in memory (the
#: oldest dropped past this): a disk refusing writes for a while, not for ever
MAX_UNCOMMITTED = 10_000
#: the routes whose POSTs carry report ids (agent final reports and security events)
REPORT_ROUTES = re.compile(
    r"/v1/(?:(?:transfers|ingests|loads)/[^/]+/(?:done|failed)|ops/[^/]+/(?:started|result)|events)"
)

#: from an Authorization header to the node it authenticates (raises 401 if none)
Authenticate = Callable[[str | None], str]


def transfer_route(transfer_id: str, what: str) -> str:
    """The route a transfer's ``what`` (done/failed) report is keyed by, batched or not."""
    return f"/v1/transfers/{transfer_id}/{what}"


class ReportLedger:
    """The report ids applied, in table ``applied_reports`` of the state database."""

    def __init__(self, store: StateStore, keep_per_node: int = KEEP_PER_NODE) -> None:
        self.store = store
        self.keep_per_node = keep_per_node
        self._inflight: set[tuple[str, str, str]] = set()
        self._added: dict[str, int] = {}
        #: ids claimed in the open transaction (they become uncommitted if its COMMIT fails)
        self._claimed: list[tuple[str, str, str]] = []
        #: ids whose reports were applied in memory but whose transaction did not commit
        self._uncommitted: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        #: duplicates answered without applying (shown in logs; tests read it)
        self.duplicates = 0

    def applied(self, node: str, route: str, report_id: str) -> bool:
        """Applied: written (committed or in the open transaction), or applied uncommitted."""
        key = (node, route, report_id)
        return key in self._uncommitted or self.store.has_report_id(*key)

    def claim(self, node: str, route: str, report_id: str) -> None:
        """Write the id (before the report is applied), inside the report's transaction.

        StateError if the database refuses the write (then nothing changed).
        """
        self.store.add_report_id(node, route, report_id)
        self._claimed.append((node, route, report_id))
        n = self._added.get(node, 0) + 1
        self._added[node] = n
        if n % PRUNE_EVERY == 0:
            self.store.prune_report_ids(node, self.keep_per_node)

    def release(self, node: str, route: str, report_id: str) -> None:
        """Forget an id whose report was not applied (its row: best effort, logged if it fails)."""
        key = (node, route, report_id)
        if key in self._claimed:
            self._claimed.remove(key)
        self._uncommitted.pop(key, None)
        try:
            self.store.delete_report_id(*key)
        except StateError as e:
            log.error(
                "report id not forgotten; a retry of it will be taken as applied",
                node=node,
                route=route,
                report_id=report_id,
                error=str(e),
            )

    def count(self, node: str) -> int:
        """Ids stored for ``node``."""
        return self.store.count_report_ids(node)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """The store's transaction around applying reports; see the module docstring.

        If its COMMIT fails, the reports applied in it (their ids claimed and not
        released) stay applied in memory: their ids are kept here, so a retry is
        not applied twice by this process.
        """
        if self.store.in_transaction:
            yield
            return
        self._claimed.clear()
        try:
            with self.store.transaction():
                yield
        except StateError:
            for key in self._claimed:
                self._uncommitted[key] = None
            while len(self._uncommitted) > MAX_UNCOMMITTED:
                self._uncommitted.popitem(last=False)
            raise
        finally:
            self._claimed.clear()

    @contextmanager
    def applying(self, node: str, route: str, report_id: str) -> Iterator[None]:
        """Claim the id, run the body (which applies the report), release it if that raises.

        The caller holds the report's transaction open around this.
        """
        key = (node, route, report_id)
        self.claim(*key)
        self._inflight.add(key)
        try:
            yield
        except BaseException:
            self.release(*key)
            raise
        finally:
            self._inflight.discard(key)

    def duplicate(self, node: str, route: str, report_id: str) -> bool:
        """True (and logged) if this id was applied; Busy if it is being applied right now."""
        if (node, route, report_id) in self._inflight:
            raise Busy(f"report {report_id} of node {node} is being applied now; retry later")
        if not self.applied(node, route, report_id):
            return False
        self.duplicates += 1
        log.info(
            "report already applied; not applied again",
            node=node,
            route=route,
            report_id=report_id,
        )
        return True

    def middleware(self, authenticate: Authenticate) -> Middleware:
        """aiohttp middleware applying each report id once (inside the error middleware)."""

        @web.middleware
        async def report_ids(request: web.Request, handler: Handler) -> web.StreamResponse:
            rid = request.headers.get(REPORT_ID_HEADER)
            if rid is None or request.method != "POST" or not REPORT_ROUTES.fullmatch(request.path):
                return await handler(request)
            if not valid(rid):
                raise BadRequest(
                    f"header {REPORT_ID_HEADER} {rid[:80]!r}: use 8..{MAX_REPORT_ID} characters "
                    "of A-Z a-z 0-9 . _ -"
                )
            node = authenticate(request.headers.get("Authorization"))
            # the whole body first: the handler then runs without awaiting, inside the
            # transaction (no other request's writes can join it)
            await read_body(request, request.app[BODY_TIMEOUT])
            if self.duplicate(node, request.path, rid):
                return web.Response(status=204)
            try:
                with self.transaction(), self.applying(node, request.path, rid):
                    resp: web.StreamResponse = no_wait(handler(request))
                    if not 200 <= resp.status < 300:
                        raise _Refused(resp)  # the id is released, the transaction committed
            except _Refused as r:
                return r.response
            return resp

        return report_ids


def no_wait(run: Awaitable[T]) -> T:
    """Run ``run`` to its end without letting it suspend (it runs inside a transaction).

    A report handler that awaited something not ready (a body not read yet, I/O)
    would let other requests run and their writes join its transaction: that is
    a bug, raised here as one (a 500) instead of a silent loss of durability.
    """
    if not isinstance(run, Coroutine):
        raise TypeError(f"a report handler must be a coroutine, not {type(run).__name__}")
    try:
        run.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    run.close()
    raise RuntimeError("a report handler awaited inside its transaction")


class _Refused(Exception):
    """A handler's non-2xx answer, carried out of the transaction so the id is released."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__(response.status)
        self.response = response


class Busy(CoordinatorError):
    """The same report is being applied right now: the agent retries (503 is retryable)."""

    status = 503
