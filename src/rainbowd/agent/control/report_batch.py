"""TransferReporter: an agent's transfer reports, as few requests as it takes.

With pieces a demander runs several transfers at once, each ending in a done
report within seconds; each also reported its progress every 0.5 s, one
request per transfer. That was most of the coordinator's work (issue 13: a
core saturated at 100 nodes). Here every report waiting to go leaves in one
``POST /v1/reports`` (coordinator/http/report_batch.py):

* a final report (done/failed) is queued and the sender woken at once: when
  no request is on the wire it leaves alone, without waiting (the scheduler
  hands out the next piece on it); the ones that end while a request is on
  the wire leave together in the next one. Its caller waits for the outcome,
  as with :class:`ReportSender`;
* progress of every active transfer whose bytes moved rides along with each
  batch of finals, and goes alone at most every :data:`PROGRESS_INTERVAL`.
  The coordinator needs no more at piece granularity: the heartbeat lists
  the same bytes (and shows the seeder alive, coordinator/transfers.py);
  progress only makes the live view fresher between heartbeats;
* each final carries its report id, the same on every attempt, so the
  coordinator applies it once however often it is sent.

Delivery is as for :class:`~rainbowd.agent.control.report_sender.ReportSender`,
whose counters and backoff schedule are shared: a request the coordinator
could not take (connection error, 5xx, 408/429) is retried with capped,
jittered exponential backoff, for each final at most ``give_up_after``
seconds from when it was queued; a final the coordinator refused (its own
4xx in the reply, or the request's 4xx) is logged and dropped; one it could
not take now (its 5xx/503) is retried alone after its own backoff.

A coordinator older than ``POST /v1/reports`` answers it 404; :class:`BatchOrSingle`
then sends each report on its own route, as agents did before (those routes
stay), so agents may be upgraded before their coordinator.

Clock and waiting are injectable: unit tests drive :meth:`TransferReporter.step`
on a fake clock without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from rainbowd.core.messages import (
    MAX_REPORT_ITEMS,
    DoneItem,
    FailedItem,
    ProgressItem,
    ReportBatch,
    ReportBatchReply,
    ReportResult,
    TransferDone,
    TransferFailed,
)
from rainbowd.core.report_id import new_report_id
from rainbowd.lib.client import AgentClient, ApiError, CoordinatorUnreachable

from .report_sender import ReportSender, retryable_status

log = structlog.get_logger(__name__)

#: a request carrying only progress goes at most this often (seconds): the coordinator's
#: default heartbeat interval, whose heartbeats carry the same bytes
PROGRESS_INTERVAL = 2.0

#: sends one batch; None when every item was applied (204)
Send = Callable[[ReportBatch], Awaitable[ReportBatchReply | None]]
#: the progress of every active transfer now
Progress = Callable[[], list[ProgressItem]]


@dataclass
class _Final:
    """A done/failed report on its way: its item (with its id), deadline and outcome."""

    what: str
    item: DoneItem | FailedItem
    deadline: float
    outcome: asyncio.Future[bool]
    tries: int = 0
    not_before: float = 0.0  # its own backoff after the coordinator could not take it


class TransferReporter:
    """Queues transfer reports and sends them in batches; see the module docstring."""

    def __init__(
        self,
        send: Send,
        progress: Progress,
        counts: ReportSender,
        *,
        interval: float = PROGRESS_INTERVAL,
    ) -> None:
        self.send = send
        self.progress = progress
        self.counts = counts  # counters, backoff, clock and give-up time shared with it
        self.interval = interval
        self._log = log.bind(node=counts.node_id)
        self._pending: list[_Final] = []
        self._wake = asyncio.Event()
        self._next_progress = 0.0
        self._paused_until = 0.0  # after a request the coordinator could not take
        self._failures = 0  # such requests in a row
        self._last_progress: dict[str, int] = {}  # transfer -> bytes_done last sent
        #: requests sent (tests and the bench read it)
        self.requests = 0

    # -- what the agent calls ------------------------------------------------
    async def done(self, what: str, transfer_id: str, m: TransferDone) -> bool:
        """Report a transfer done; True once the coordinator took it (see ReportSender.send)."""
        rid = new_report_id()  # one id for every attempt of this report
        return await self._final(what, DoneItem(transfer_id=transfer_id, report_id=rid, done=m))

    async def failed(self, what: str, transfer_id: str, m: TransferFailed) -> bool:
        """Report a transfer failed; True once the coordinator took it."""
        rid = new_report_id()
        return await self._final(what, FailedItem(transfer_id=transfer_id, report_id=rid, failed=m))

    async def _final(self, what: str, item: DoneItem | FailedItem) -> bool:
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append(
            _Final(what, item, self.counts.clock() + self.counts.give_up_after, fut)
        )
        self._wake.set()
        return await fut

    @property
    def pending(self) -> int:
        """Final reports not yet taken, refused or lost."""
        return len(self._pending)

    # -- the sending loop ------------------------------------------------------
    async def run(self) -> None:
        """Send batches until cancelled."""
        while True:
            if not await self.guarded_step():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._idle_for())

    async def guarded_step(self) -> bool:
        """:meth:`step`, backing off instead of raising: this loop must outlive any bug.

        (An exception out of :meth:`run` would stop the agent's task group, and
        every transfer with it; the reports wait and go on the next attempt.)
        """
        try:
            return await self.step()
        except Exception:
            self._failures += 1
            wait = self.counts.delay(self._failures)
            self._paused_until = self.counts.clock() + wait
            self._log.exception("sending transfer reports failed; retrying", retry_in=wait)
            return False

    def _idle_for(self) -> float:
        """Seconds until something may be due (a new final wakes the loop earlier)."""
        now = self.counts.clock()
        due = [self._next_progress, *(f.not_before for f in self._pending)]
        return max(0.0, max(self._paused_until, min(due)) - now)

    async def step(self) -> bool:
        """Send what is due now, in one request; False if nothing was."""
        self._wake.clear()
        now = self.counts.clock()
        if now < self._paused_until:
            return False
        finals = [f for f in self._pending if f.not_before <= now][:MAX_REPORT_ITEMS]
        progress = self._due_progress(now, {f.item.transfer_id for f in finals})
        progress = progress[: MAX_REPORT_ITEMS - len(finals)]
        if not finals and not progress:
            return False
        items = [f.item for f in finals] + progress
        self.requests += 1
        try:
            reply = await self.send(ReportBatch(items=items))
        except ApiError as e:
            self._not_sent(finals, e)
            return True
        self._failures = 0
        if reply is not None and len(reply.results) != len(items):
            odd = ApiError(502, f"reply has {len(reply.results)} results for {len(items)} items")
            self._not_sent(finals, odd)
            return True
        for i, f in enumerate(finals):
            if reply is None:
                self._taken(f)
            else:
                self._answered(f, reply.results[i].status, reply.results[i].error)
        return True

    def _due_progress(self, now: float, ending: set[str]) -> list[ProgressItem]:
        """Progress of transfers whose bytes moved since last sent.

        ``ending``: the transfers whose finals go in this batch (their progress is
        moot). With finals progress always rides along; alone, once per interval.
        """
        if not ending and now < self._next_progress:
            return []
        self._next_progress = now + self.interval
        current = self.progress()
        self._last_progress = {
            p.transfer_id: self._last_progress[p.transfer_id]
            for p in current
            if p.transfer_id in self._last_progress
        }
        out = []
        for p in current:
            if p.transfer_id in ending or self._last_progress.get(p.transfer_id) == (
                p.progress.bytes_done
            ):
                continue
            self._last_progress[p.transfer_id] = p.progress.bytes_done
            out.append(p)
        return out

    # -- outcomes --------------------------------------------------------------
    def _resolve(self, f: _Final, ok: bool) -> None:
        self._pending.remove(f)
        if not f.outcome.done():
            f.outcome.set_result(ok)

    def _taken(self, f: _Final) -> None:
        self.counts.sent += 1
        if f.tries:
            self._log.info("report delivered", report=f.what, attempts=f.tries + 1)
        self._resolve(f, True)

    def _refused(self, f: _Final, status: int, error: str) -> None:
        self.counts.refused += 1
        self._log.error(
            "report refused by coordinator; not retried",
            report=f.what,
            report_id=f.item.report_id,
            status=status,
            error=error,
        )
        self._resolve(f, False)

    def _retry_at(self, f: _Final, at: float, error: str) -> bool:
        """Count a failed attempt of ``f``; False (logged: lost) if ``at`` is past its deadline."""
        f.tries += 1
        if at > f.deadline:
            self.counts.lost += 1
            self._log.error(
                "report lost: coordinator did not take it",
                report=f.what,
                report_id=f.item.report_id,
                attempts=f.tries,
                seconds=round(self.counts.give_up_after),
                error=error,
            )
            self._resolve(f, False)
            return False
        self.counts.retries += 1
        return True

    def _answered(self, f: _Final, status: int, error: str) -> None:
        """The coordinator's result for one item of a batch it read."""
        if 200 <= status < 300:
            self._taken(f)
        elif not retryable_status(status):
            self._refused(f, status, error)
        else:
            now = self.counts.clock()
            wait = self.counts.delay(f.tries + 1)
            if self._retry_at(f, now + wait, error):
                f.not_before = now + wait
                self._log.warning(
                    "report not taken; retrying",
                    report=f.what,
                    report_id=f.item.report_id,
                    attempt=f.tries,
                    retry_in=round(wait, 2),
                    status=status,
                    error=error,
                )

    def _not_sent(self, finals: list[_Final], e: ApiError) -> None:
        """The request as a whole failed: back off (retryable) or refuse its finals."""
        if not (isinstance(e, CoordinatorUnreachable) or retryable_status(e.status)):
            for f in finals:
                self._refused(f, e.status, str(e))
            return
        self._failures += 1
        now = self.counts.clock()
        wait = self.counts.delay(self._failures)
        self._paused_until = now + wait
        retried = [f for f in finals if self._retry_at(f, now + wait, str(e))]
        self._log.warning(
            "reports not taken; retrying",
            reports=len(retried),
            first=retried[0].what if retried else None,
            attempt=self._failures,
            retry_in=round(wait, 2),
            error=str(e),
        )


class BatchOrSingle:
    """Sends a batch to ``POST /v1/reports``; to an older coordinator, one report per route.

    The old coordinator's answer to each single report becomes that item's
    result (a connection error or 5xx still fails the whole batch: it is
    retried whole, each final with its id, and the ones applied meanwhile are
    recognised as such).
    """

    def __init__(self, api: AgentClient) -> None:
        self.api = api
        self.single = False  # the coordinator has no /v1/reports (found on first use)

    async def __call__(self, batch: ReportBatch) -> ReportBatchReply | None:
        if not self.single:
            try:
                return await self.api.reports(batch)
            except ApiError as e:
                if e.status != 404 or "no such endpoint" not in e.message:
                    raise
                self.single = True
                log.warning("coordinator has no POST /v1/reports: reports go one by one")
        results = [await self._one(item) for item in batch.items]
        return ReportBatchReply(results=results)

    async def _one(self, item: ProgressItem | DoneItem | FailedItem) -> ReportResult:
        try:
            if isinstance(item, ProgressItem):
                await self.api.transfer_progress(item.transfer_id, item.progress)
            elif isinstance(item, DoneItem):
                await self.api.transfer_done(item.transfer_id, item.done, item.report_id)
            else:
                await self.api.transfer_failed(item.transfer_id, item.failed, item.report_id)
        except CoordinatorUnreachable:
            raise
        except ApiError as e:
            if retryable_status(e.status):
                raise  # the coordinator could not take it: the batch is retried
            return ReportResult(status=e.status, error=e.message)
        return ReportResult(status=200)
