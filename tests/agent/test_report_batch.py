"""TransferReporter (agent/control/report_batch.py): transfer reports, several to a request.

On a fake clock, driving :meth:`TransferReporter.step` by hand: reports that
wait go together with the progress that is due; the same report ids on every
attempt; the shared backoff after a request the coordinator could not take;
per-item results (taken, already applied, refused, not now); lost only after
``give_up_after``; progress riding along with finals; an older coordinator
(no ``POST /v1/reports``) getting each report on its own route.
"""

from __future__ import annotations

import asyncio

import structlog

from rainbowd.agent.control.report_batch import PROGRESS_INTERVAL, BatchOrSingle, TransferReporter
from rainbowd.agent.control.report_sender import BACKOFF_START, ReportSender
from rainbowd.core import messages as m
from rainbowd.lib.client import ApiError, CoordinatorUnreachable
from waiting import FakeClock, settle

DONE = m.TransferDone(bytes_moved=1000, seconds=0.5)


class FakeCoordinator:
    """Answers each request with the next scripted outcome (None: every item applied)."""

    def __init__(self, outcomes: list[ApiError | m.ReportBatchReply | None]) -> None:
        self.outcomes = outcomes
        self.batches: list[m.ReportBatch] = []

    async def __call__(self, batch: m.ReportBatch) -> m.ReportBatchReply | None:
        self.batches.append(batch)
        out = self.outcomes.pop(0) if self.outcomes else None
        if isinstance(out, ApiError):
            raise out
        return out

    def ids(self, n: int) -> list[str]:
        """The report ids of batch ``n``'s final items."""
        return [
            i.report_id for i in self.batches[n].items if isinstance(i, (m.DoneItem, m.FailedItem))
        ]


class Active:
    """The agent's active transfers, as TransferReporter asks for them."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}

    def __call__(self) -> list[m.ProgressItem]:
        return [
            m.ProgressItem(
                transfer_id=tid,
                progress=m.TransferProgress(bytes_done=b, bytes_total=10_000, rate_bps=1e6),
            )
            for tid, b in self.bytes.items()
        ]


def reporter(
    coord: FakeCoordinator, active: Active, clock: FakeClock, give_up_after: float = 3600.0
) -> tuple[TransferReporter, ReportSender]:
    counts = ReportSender("n1", give_up_after=give_up_after, clock=clock, rand=lambda: 1.0)
    return TransferReporter(coord, active, counts), counts


def results(*statuses: int) -> m.ReportBatchReply:
    return m.ReportBatchReply(
        results=[m.ReportResult(status=s, error="" if s < 300 else f"e{s}") for s in statuses]
    )


async def test_reports_waiting_together_leave_in_one_request_with_the_progress_due() -> None:
    clock, active = FakeClock(), Active()
    active.bytes = {"t-a": 100, "t-b": 200}
    coord = FakeCoordinator([])
    r, counts = reporter(coord, active, clock)
    outcomes = [asyncio.create_task(r.done(f"transfer t{i} done", f"t{i}", DONE)) for i in range(3)]
    await settle()
    assert r.pending == 3 and coord.batches == []  # queued; nothing sent before a step
    assert await r.step()
    [batch] = coord.batches
    kinds = [type(i).__name__ for i in batch.items]
    assert kinds == ["DoneItem"] * 3 + ["ProgressItem"] * 2
    assert [await o for o in outcomes] == [True, True, True]
    assert (counts.sent, r.requests, r.pending) == (3, 1, 0)
    assert len(set(coord.ids(0))) == 3  # one id per report
    # progress goes once per interval, and only for transfers whose bytes moved
    assert not await r.step()
    clock.advance(PROGRESS_INTERVAL)
    active.bytes["t-b"] = 300
    assert await r.step()
    assert [(i.transfer_id, i.progress.bytes_done) for i in coord.batches[1].items] == [  # type: ignore[union-attr]
        ("t-b", 300)
    ]
    clock.advance(PROGRESS_INTERVAL)
    assert not await r.step()  # nothing moved: no request at all


async def test_a_final_report_is_not_sent_with_its_own_progress() -> None:
    clock, active = FakeClock(), Active()
    active.bytes = {"t1": 500}  # still listed while its done report is on its way
    coord = FakeCoordinator([])
    r, _ = reporter(coord, active, clock)
    outcome = asyncio.create_task(r.done("transfer t1 done", "t1", DONE))
    await settle()
    assert await r.step()
    assert [type(i).__name__ for i in coord.batches[0].items] == ["DoneItem"]
    assert await outcome


async def test_a_request_not_taken_is_retried_after_a_backoff_with_the_same_ids() -> None:
    clock, active = FakeClock(), Active()
    coord = FakeCoordinator(
        [CoordinatorUnreachable("connection refused"), ApiError(500, "disk full"), None]
    )
    r, counts = reporter(coord, active, clock)
    outcomes = [asyncio.create_task(r.done(f"t{i} done", f"t{i}", DONE)) for i in range(2)]
    await settle()
    assert await r.step()  # refused connection: backs off
    assert not await r.step()  # nothing goes before the backoff
    clock.advance(BACKOFF_START)
    assert await r.step()  # 500: backs off longer
    clock.advance(BACKOFF_START)
    assert not await r.step()
    clock.advance(BACKOFF_START)
    later = asyncio.create_task(r.done("t9 done", "t9", DONE))  # queued meanwhile: goes along
    await settle()
    assert await r.step()
    assert [await o for o in outcomes] == [True, True] and await later
    assert coord.ids(0) == coord.ids(1) == coord.ids(2)[:2]  # the same ids every attempt
    assert (counts.sent, counts.retries, counts.lost) == (3, 4, 0)


async def test_each_item_is_taken_refused_or_retried_on_its_own() -> None:
    clock, active = FakeClock(), Active()
    coord = FakeCoordinator([results(208, 403, 503), None])
    r, counts = reporter(coord, active, clock)
    names = ["again", "not-mine", "busy"]
    outcomes = [asyncio.create_task(r.done(f"{n} done", n, DONE)) for n in names]
    await settle()
    with structlog.testing.capture_logs() as logs:
        assert await r.step()
        await settle()
        assert outcomes[0].done() and outcomes[0].result()  # already applied: taken
        assert outcomes[1].done() and not outcomes[1].result()  # refused: not retried
        assert not outcomes[2].done()
        assert not await r.step()  # its own backoff first
        clock.advance(BACKOFF_START)
        assert await r.step()
    assert await outcomes[2]
    assert coord.ids(1) == [coord.ids(0)[2]]  # alone, with its id
    assert (counts.sent, counts.refused, counts.retries) == (2, 1, 1)
    [refused] = [e for e in logs if e["log_level"] == "error"]
    assert refused["report"] == "not-mine done" and refused["status"] == 403


async def test_a_refused_request_refuses_its_reports() -> None:
    clock, active = FakeClock(), Active()
    coord = FakeCoordinator([ApiError(401, "unknown node")])
    r, counts = reporter(coord, active, clock)
    outcome = asyncio.create_task(
        r.failed("t1 failed", "t1", m.TransferFailed(reason="gone", kind="io"))
    )
    await settle()
    assert await r.step()
    assert not await outcome
    assert (counts.refused, counts.retries, r.pending) == (1, 0, 0)


async def test_a_report_is_lost_only_after_give_up_after() -> None:
    clock, active = FakeClock(), Active()
    coord = FakeCoordinator([ApiError(503, "restarting")] * 100)
    r, counts = reporter(coord, active, clock, give_up_after=20.0)
    outcome = asyncio.create_task(r.done("t1 done", "t1", DONE))
    await settle()
    waited = 0.0
    for _ in range(100):
        if outcome.done():
            break
        if not await r.step():
            step = r._idle_for()
            clock.advance(step)
            waited += step
        await settle()
    assert outcome.done() and not outcome.result()
    assert counts.lost == 1 and waited <= 20.0
    assert len(set(coord.ids(0) + coord.ids(len(coord.batches) - 1))) == 1


async def test_a_reply_with_the_wrong_number_of_results_is_retried() -> None:
    clock, active = FakeClock(), Active()
    coord = FakeCoordinator([results(200, 200), None])
    r, counts = reporter(coord, active, clock)
    outcome = asyncio.create_task(r.done("t1 done", "t1", DONE))
    await settle()
    assert await r.step()
    assert not outcome.done()
    clock.advance(BACKOFF_START)
    assert await r.step()
    assert await outcome
    assert counts.retries == 1


async def test_progress_rides_with_finals_and_goes_alone_only_once_per_interval() -> None:
    clock, active = FakeClock(), Active()
    active.bytes = {"t-long": 100}
    coord = FakeCoordinator([])
    r, _ = reporter(coord, active, clock)
    assert await r.step()  # the first progress, alone
    clock.advance(PROGRESS_INTERVAL / 4)
    active.bytes["t-long"] = 200
    assert not await r.step()  # alone again only after the interval
    outcome = asyncio.create_task(r.done("t1 done", "t1", DONE))
    await settle()
    assert await r.step()  # a final goes at once, and the moved bytes with it
    assert await outcome
    assert [type(i).__name__ for i in coord.batches[1].items] == ["DoneItem", "ProgressItem"]
    clock.advance(PROGRESS_INTERVAL / 2)
    active.bytes["t-long"] = 300
    assert not await r.step()  # the interval counts from the last progress sent
    clock.advance(PROGRESS_INTERVAL / 2)
    assert await r.step()
    assert len(coord.batches) == 3


class OldCoordinator:
    """An AgentClient's report calls against a coordinator without POST /v1/reports."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    async def reports(self, batch: m.ReportBatch) -> m.ReportBatchReply | None:
        self.calls.append(("reports", "", ""))
        raise ApiError(404, "no such endpoint: POST /v1/reports")

    async def transfer_progress(self, tid: str, p: m.TransferProgress) -> None:
        self.calls.append(("progress", tid, ""))

    async def transfer_done(self, tid: str, d: m.TransferDone, report_id: str = "") -> None:
        self.calls.append(("done", tid, report_id))

    async def transfer_failed(self, tid: str, f: m.TransferFailed, report_id: str = "") -> None:
        self.calls.append(("failed", tid, report_id))
        raise ApiError(403, f"transfer {tid} belongs to n2, not n1")


async def test_an_older_coordinator_gets_each_report_on_its_own_route() -> None:
    old = OldCoordinator()
    send = BatchOrSingle(old)  # type: ignore[arg-type]
    items: list[m.ReportItem] = [
        m.DoneItem(transfer_id="t1", report_id="rid-old-00001", done=DONE),
        m.FailedItem(
            transfer_id="t2",
            report_id="rid-old-00002",
            failed=m.TransferFailed(reason="x", kind="io"),
        ),
        m.ProgressItem(
            transfer_id="t3",
            progress=m.TransferProgress(bytes_done=1, bytes_total=2, rate_bps=1.0),
        ),
    ]
    reply = await send(m.ReportBatch(items=items))
    assert reply is not None and [r.status for r in reply.results] == [200, 403, 200]
    assert old.calls == [
        ("reports", "", ""),
        ("done", "t1", "rid-old-00001"),
        ("failed", "t2", "rid-old-00002"),
        ("progress", "t3", ""),
    ]
    await send(m.ReportBatch(items=items[:1]))
    assert old.calls[-1] == ("done", "t1", "rid-old-00001")  # no second try of /v1/reports
    assert sum(c[0] == "reports" for c in old.calls) == 1


async def test_an_unexpected_error_backs_off_and_the_reports_go_later() -> None:
    clock, active = FakeClock(), Active()
    coord = FakeCoordinator([])
    calls = 0

    async def broken_then_fine(batch: m.ReportBatch) -> m.ReportBatchReply | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("Too many open files")  # not an ApiError: a bug or the host
        return await coord(batch)

    counts = ReportSender("n1", clock=clock, rand=lambda: 1.0)
    r = TransferReporter(broken_then_fine, active, counts)
    outcome = asyncio.create_task(r.done("t1 done", "t1", DONE))
    await settle()
    assert not await r.guarded_step()  # no exception out of the loop
    assert not await r.guarded_step()  # and a backoff before the next try
    clock.advance(BACKOFF_START)
    assert await r.guarded_step()
    assert await outcome
