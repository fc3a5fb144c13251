"""ReportSender: an agent's final reports reach the coordinator once, however long it takes.

A final report (op started/result, ingest and load done/failed, security
events; transfer done/failed go in batches, agent/control/report_batch.py, on the
same schedule and counters) is the only way the coordinator learns how a piece of work
ended; a lost one leaves a job running on or a node counted wrongly. So a
report is retried while the coordinator cannot take it:

* on connection errors and timeouts (coordinator down, restarting, network),
* on 5xx (e.g. its disk full: the write of the report failed) and on 408/429,

with capped exponential backoff and jitter (:data:`BACKOFF_START` doubling
up to :data:`BACKOFF_CAP`, each wait drawn in [½, 1] of it so a hundred
agents that lost the coordinator together do not come back in step), for at
most ``give_up_after`` seconds (config ``report_retry_seconds``); only then is
it logged as lost. A 4xx other than 408/429 means the coordinator read the
report and refused it: retrying cannot change that, so it is logged (naming
the node and what the report was about) and dropped.

Every attempt of one report carries the same report id
(rainbowd/report_id.py), so a retry of a report that *was* applied -- its
answer lost, or the coordinator restarted after writing it -- is recognised
and not applied twice (coordinator/http/report_ids.py).

Clock, sleep and randomness are injectable: unit tests run the whole
schedule on a fake clock without sleeping.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from rainbowd.core.report_id import new_report_id
from rainbowd.lib.client import ApiError, CoordinatorUnreachable

log = structlog.get_logger(__name__)

#: first wait after a failed attempt (seconds)
BACKOFF_START = 0.5
#: longest wait between attempts: a coordinator back after a restart hears
#: from every agent within this, without being hammered before
BACKOFF_CAP = 10.0
#: default of config ``report_retry_seconds``: an hour covers a coordinator
#: restart, a host reboot or an operator freeing its disk
DEFAULT_REPORT_RETRY_SECONDS = 3600.0
#: largest ``report_retry_seconds`` accepted (a week): past that the work is stale
MAX_REPORT_RETRY_SECONDS = 7 * 24 * 3600.0
#: 4xx answers that mean "not now" rather than "no": retried like 5xx
RETRY_STATUSES = frozenset({408, 429})

#: one attempt: sends the report with the report id it is given
Attempt = Callable[[str], Awaitable[Any]]


def retryable_status(status: int) -> bool:
    """Whether a report answered ``status`` may be taken if sent again later."""
    return status >= 500 or status in RETRY_STATUSES


def retryable(e: ApiError) -> bool:
    """Whether trying the same report again later may succeed."""
    return isinstance(e, CoordinatorUnreachable) or retryable_status(e.status)


class ReportSender:
    """Sends final reports with one id each, retrying what the coordinator could not take."""

    def __init__(
        self,
        node_id: str,
        *,
        give_up_after: float = DEFAULT_REPORT_RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.node_id = node_id
        self.give_up_after = give_up_after
        self.clock = clock
        self.sleep = sleep
        self.rand = rand
        self._log = log.bind(node=node_id)
        #: reports sent (applied or answered as already applied), refused (4xx), lost
        self.sent = 0
        self.refused = 0
        self.lost = 0
        #: attempts that failed and were retried
        self.retries = 0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based), jittered."""
        step = min(BACKOFF_CAP, BACKOFF_START * 2.0 ** min(attempt - 1, 32))
        return step * (0.5 + 0.5 * self.rand())

    async def send(self, what: str, attempt: Attempt) -> bool:
        """Deliver one report; True once the coordinator took it, False if refused or lost.

        ``what`` names the report for the logs (e.g. "transfer t-7 done, layer
        sha256:…"); ``attempt`` is called with the report id on every try.
        """
        report_id = new_report_id()
        deadline = self.clock() + self.give_up_after
        tries = 0
        while True:
            tries += 1
            try:
                await attempt(report_id)
            except ApiError as e:
                if not retryable(e):
                    self.refused += 1
                    self._log.error(
                        "report refused by coordinator; not retried",
                        report=what,
                        report_id=report_id,
                        status=e.status,
                        error=str(e),
                    )
                    return False
                wait = self.delay(tries)
                if self.clock() + wait > deadline:
                    self.lost += 1
                    self._log.error(
                        "report lost: coordinator did not take it",
                        report=what,
                        report_id=report_id,
                        attempts=tries,
                        seconds=round(self.give_up_after),
                        error=str(e),
                    )
                    return False
                self.retries += 1
                self._log.warning(
                    "report not taken; retrying",
                    report=what,
                    report_id=report_id,
                    attempt=tries,
                    retry_in=round(wait, 2),
                    error=str(e),
                )
                await self.sleep(wait)
                continue
            self.sent += 1
            if tries > 1:
                self._log.info("report delivered", report=what, attempts=tries)
            return True
