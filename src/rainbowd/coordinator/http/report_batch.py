"""``POST /v1/reports``: several transfer reports of one agent in one request.

With pieces (policy ``swarm``) a job is thousands of transfers, each ending in
a done report, and every active transfer reports progress twice a second. One
request per report cost the coordinator more in HTTP handling and socket
writes than in applying the reports, and one SQLite commit per statement more
than the writes themselves (issue 13: a core saturated at 100 nodes). So an
agent sends what it has to say in one :class:`~rainbowd.core.messages.ReportBatch`
(agent/control/report_batch.py), and the coordinator applies it here:

* the node is authenticated once; each item is decoded and checked on its
  own (types, finite numbers, ranges, sizes, the id's form), so a malformed
  item is refused alone (400) and the others are applied;
* a node may only report about its own transfers (403 for the item);
* done and failed items carry report ids, kept by the same ledger as the
  single routes and under the same route key, so an item is applied once
  however it is retried (coordinator/http/report_ids.py); progress items carry
  none (a lost or repeated one does no harm);
* the whole batch is one transaction of the state database: one commit, and
  each item's id lands with the state it guards; and one scheduler pass after
  all its items, on the event loop's next turn, shared with every other batch
  handled in this turn (:meth:`Dispatch.one_schedule`), not one per done report.

The reply is 204 when every item was taken (applied, or already applied);
otherwise a :class:`~rainbowd.core.messages.ReportBatchReply` with one result per
item. A failure that is not an item's own (the database refusing writes) is
the whole request's 500: the agent retries every final item of it with its
id, and those applied meanwhile are recognised as such.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from aiohttp import web

from rainbowd.core.messages import (
    MAX_REPORT_ITEMS,
    DoneItem,
    FailedItem,
    Msg,
    ProgressItem,
    ReportBatchReply,
    ReportItem,
    ReportResult,
    decode,
)

from ..cluster import Node
from ..core import Coordinator
from ..errors import CoordinatorError
from .common import BODY_TIMEOUT, agent, body_type, coord, read_body, reply
from .report_ids import ReportLedger, transfer_route

#: an item applied / one applied before (a retry: not applied again)
APPLIED = ReportResult(status=200)
ALREADY_APPLIED = ReportResult(status=208)
#: longest error text of one refused item (the reply stays small whatever the items)
MAX_ITEM_ERROR = 500


class _LooseBatch(Msg, kw_only=True):
    """A batch whose items are decoded one by one (see :func:`_item`)."""

    items: Annotated[list[Any], msgspec.Meta(max_length=MAX_REPORT_ITEMS)]


def _item(raw: Any) -> ReportItem | ReportResult:
    """One item, checked as if it came alone; a 400 result saying why if it is malformed."""
    try:
        item: ReportItem = msgspec.convert(raw, ReportItem)
    except (msgspec.ValidationError, ValueError) as e:
        return ReportResult(status=400, error=f"report item: {e}"[:MAX_ITEM_ERROR])
    return item


def apply_batch(
    c: Coordinator, ledger: ReportLedger, node: Node, items: list[Any]
) -> list[ReportResult]:
    """Apply ``items`` (raw) in order, in one transaction; one result each."""
    results: list[ReportResult] = []
    with ledger.transaction(), c.dispatch.one_schedule(soon=True):
        for raw in items:
            item = _item(raw)
            if isinstance(item, ReportResult):
                results.append(item)
                continue
            try:
                results.append(_apply(c, ledger, node, item))
            except CoordinatorError as e:
                results.append(ReportResult(status=e.status, error=e.message[:MAX_ITEM_ERROR]))
    return results


def _apply(c: Coordinator, ledger: ReportLedger, node: Node, item: ReportItem) -> ReportResult:
    if isinstance(item, ProgressItem):
        c.transfer_progress(node, item.transfer_id, item.progress)
        return APPLIED
    what = "done" if isinstance(item, DoneItem) else "failed"
    key = (node.node_id, transfer_route(item.transfer_id, what), item.report_id)
    if ledger.duplicate(*key):
        return ALREADY_APPLIED
    with ledger.applying(*key):
        if isinstance(item, FailedItem):
            c.transfer_failed(node, item.transfer_id, item.failed)
        else:
            c.transfer_done(node, item.transfer_id, item.done)
    return APPLIED


def reports_handler(ledger: ReportLedger) -> Any:
    """The route's handler, bound to the app's ledger."""

    async def reports(request: web.Request) -> web.Response:
        node = agent(request)
        ctype = body_type(request)
        batch = decode(await read_body(request, request.app[BODY_TIMEOUT]), _LooseBatch, ctype)
        results = apply_batch(coord(request), ledger, node, batch.items)
        if all(200 <= r.status < 300 for r in results):
            return web.Response(status=204)
        return reply(request, ReportBatchReply(results=results))

    return reports
