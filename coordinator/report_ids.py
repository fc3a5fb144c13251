"""Applied report ids: an agent's report retried after a lost answer is applied once.

Agents retry final reports on connection errors and 5xx
(agent/report_sender.py), each attempt with the same id in the
``Rbd-Report-Id`` header (rainbowd/report_id.py). This module remembers which
ids were applied, per node, in the coordinator's own SQLite file (so a
restart does not forget them), and wraps the report routes:

* an id already applied for this node and route is answered 204 and not
  applied again (the first attempt's answer was lost, or the coordinator
  restarted after writing it);
* an id whose first attempt is still being applied is answered 503 (retry
  later): two attempts never run side by side;
* otherwise the id is *written first* and the report applied after. A disk
  that refuses writes (full, read-only) thus refuses the report with a 500
  before anything in memory changed, and the agent's retry, once the disk
  takes writes again, is applied exactly once. If applying fails or is
  refused (any non-2xx answer), the id is forgotten again, so a retry is
  judged afresh.

Bounds: at most :data:`KEEP_PER_NODE` ids per node (the oldest are dropped),
so one node sending made-up ids can only push out its own. Reports without
the header (older agents) are applied as before. A malformed id is a 400.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from pathlib import Path

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from rainbowd.report_id import MAX_REPORT_ID, REPORT_ID_HEADER, valid

from .errors import BadRequest, CoordinatorError

log = structlog.get_logger(__name__)

#: ids remembered per node: a retry follows its first attempt within the agent's
#: backoff cap (10 s), or after a coordinator restart during which the node sent
#: nothing else; a node sends a few final reports per layer, so this is ample
KEEP_PER_NODE = 1000
#: trim a node's ids every this many new ones (not on every insert: it is a scan)
PRUNE_EVERY = 100
#: the routes whose POSTs carry report ids (agent final reports and security events)
REPORT_ROUTES = re.compile(
    r"/v1/(?:(?:transfers|ingests|loads)/[^/]+/(?:done|failed)|ops/[^/]+/(?:started|result)|events)"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS applied_reports (
    node_id TEXT NOT NULL, route TEXT NOT NULL, report_id TEXT NOT NULL,
    PRIMARY KEY (node_id, route, report_id));
"""

#: from an Authorization header to the node it authenticates (raises 401 if none)
Authenticate = Callable[[str | None], str]


class ReportLedger:
    """The report ids applied, in table ``applied_reports`` of the state database."""

    def __init__(self, db_path: Path, keep_per_node: int = KEEP_PER_NODE) -> None:
        self.keep_per_node = keep_per_node
        self._db = sqlite3.connect(db_path, isolation_level=None, timeout=5.0)
        self._db.executescript(_SCHEMA)
        self._inflight: set[tuple[str, str, str]] = set()
        self._added: dict[str, int] = {}
        #: duplicates answered without applying (shown in logs; tests read it)
        self.duplicates = 0

    def close(self) -> None:
        self._db.close()

    def applied(self, node: str, route: str, report_id: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM applied_reports WHERE node_id = ? AND route = ? AND report_id = ?",
            (node, route, report_id),
        ).fetchone()
        return row is not None

    def claim(self, node: str, route: str, report_id: str) -> None:
        """Write the id (before the report is applied); sqlite3.Error if the disk refuses."""
        self._db.execute(
            "INSERT OR IGNORE INTO applied_reports(node_id, route, report_id) VALUES (?, ?, ?)",
            (node, route, report_id),
        )
        n = self._added.get(node, 0) + 1
        self._added[node] = n
        if n % PRUNE_EVERY == 0:
            self._prune(node)

    def release(self, node: str, route: str, report_id: str) -> None:
        """Forget an id whose report was not applied (best effort: logged if it fails)."""
        try:
            self._db.execute(
                "DELETE FROM applied_reports WHERE node_id = ? AND route = ? AND report_id = ?",
                (node, route, report_id),
            )
        except sqlite3.Error as e:
            log.error(
                "report id not forgotten; a retry of it will be taken as applied",
                node=node,
                route=route,
                report_id=report_id,
                error=str(e),
            )

    def count(self, node: str) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM applied_reports WHERE node_id = ?", (node,)
        ).fetchone()
        return int(row[0])

    def _prune(self, node: str) -> None:
        self._db.execute(
            "DELETE FROM applied_reports WHERE node_id = ? AND rowid NOT IN "
            "(SELECT rowid FROM applied_reports WHERE node_id = ? ORDER BY rowid DESC LIMIT ?)",
            (node, node, self.keep_per_node),
        )

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
            key = (node, request.path, rid)
            if key in self._inflight:
                raise Busy(f"report {rid} of node {node} is being applied now; retry later")
            if self.applied(*key):
                self.duplicates += 1
                log.info(
                    "report already applied; not applied again",
                    node=node,
                    route=request.path,
                    report_id=rid,
                )
                return web.Response(status=204)
            self.claim(*key)
            self._inflight.add(key)
            try:
                resp = await handler(request)
            except BaseException:
                self.release(*key)
                raise
            finally:
                self._inflight.discard(key)
            if not 200 <= resp.status < 300:
                self.release(*key)
            return resp

        return report_ids


class Busy(CoordinatorError):
    """The same report is being applied right now: the agent retries (503 is retryable)."""

    status = 503
