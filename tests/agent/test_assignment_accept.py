"""AssignmentRunner (agent/assignments.py): a transfer is the agent's from arrival to report.

The coordinator ends a transfer that a heartbeat leaves out, so a heartbeat
must list every transfer the agent has: from the moment the assignment
arrives (``accept`` registers it before the poll cursor moves past it, not
when its task first runs) until the coordinator took its done or failed
report (listed as ``reporting`` once the pull ended). Real AssignmentRunner,
AgentView and TransferReporter; the puller is faked (a scripted pull: what it
does to bytes is not the subject) and so is the coordinator's report endpoint
(it holds each batch until the test lets it answer).
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import structlog

from rainbowd.agent.assignments import AssignmentRunner
from rainbowd.agent.control.coordinator_link import CoordinatorLink
from rainbowd.agent.control.report_batch import TransferReporter
from rainbowd.agent.control.report_sender import ReportSender
from rainbowd.agent.dataplane.puller import PullResult
from rainbowd.agent.view import ActiveWork, AgentView
from rainbowd.core import messages as m
from rainbowd.core.chunks import MIN_CHUNK_SIZE, ChunkManifest
from rainbowd.core.wirebounds import MAX_ACTIVE
from waiting import FakeClock, settle

LAYER = ChunkManifest(
    digest="sha256:" + "a" * 64,
    size=3 * MIN_CHUNK_SIZE,
    chunk_size=MIN_CHUNK_SIZE,
    chunks=["sha256:" + c * 64 for c in "bcd"],
)
SEEDER = m.PeerInfo(
    node_id="s1",
    address="10.0.0.2",
    ssh_port=2222,
    host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHOSTKEY",
    client_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICLIENTKEY",
)


def assignment(tid: str = "t-1") -> m.TransferAssignment:
    return m.TransferAssignment(
        transfer_id=tid, job_id="j-1", layer=LAYER, seeder=SEEDER, reason="test", end_chunk=1
    )


class ScriptedPuller:
    """The puller's interface; each pull waits until the test ends it."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.pulls: list[str] = []

    def overlapping(self, layer: str, first: int, end: int) -> bool:
        return False

    async def pull(self, a: m.TransferAssignment, on_progress: Any) -> PullResult:
        self.pulls.append(a.transfer_id)
        await self.release.wait()
        return PullResult(MIN_CHUNK_SIZE, 0.5, 1, installed=False)


class HeldCoordinator:
    """The report endpoint: takes a batch with a done/failed report only when the test lets it."""

    def __init__(self) -> None:
        self.answer = asyncio.Event()
        self.finals: list[m.ReportBatch] = []

    async def __call__(self, batch: m.ReportBatch) -> m.ReportBatchReply | None:
        if any(isinstance(i, (m.DoneItem, m.FailedItem)) for i in batch.items):
            self.finals.append(batch)
            await self.answer.wait()
        return None


def runner(view: AgentView, puller: ScriptedPuller, reports: TransferReporter) -> AssignmentRunner:
    none = cast(Any, None)  # parts a transfer that is not installed never touches
    return AssignmentRunner(
        none,
        api=none,
        store=none,
        view=view,
        puller=cast(Any, puller),
        hygiene=none,
        catalog=none,
        loads=none,
        ops=none,
        reports=none,
        transfer_reports=reports,
        log=structlog.get_logger("test"),
    )


async def test_a_transfer_is_listed_from_arrival_until_its_report_is_taken() -> None:
    view, puller, coord = AgentView(), ScriptedPuller(), HeldCoordinator()
    counts = ReportSender("n1", give_up_after=3600.0, clock=FakeClock(), rand=lambda: 1.0)
    reports = TransferReporter(coord, view.progress, counts)
    run = runner(view, puller, reports)
    a = assignment()

    work = run.accept(a)
    assert work is not None
    # listed before its task has run at all (a heartbeat built now carries the cursor past it)
    assert [t.transfer_id for t in view.active_transfers()] == ["t-1"]
    assert run.accept(a) is None  # the same assignment re-sent: already the agent's
    async with asyncio.TaskGroup() as tg:
        tg.create_task(work)
        sender = tg.create_task(reports.run())
        await settle()
        assert puller.pulls == ["t-1"]

        puller.release.set()  # the pull ends; its done report goes out and is held
        await settle()
        (held,) = coord.finals
        assert [i.transfer_id for i in held.items if isinstance(i, m.DoneItem)] == ["t-1"]
        assert view.active_transfers() == [] and view.progress() == []
        assert view.reporting_transfers() == ["t-1"]
        assert view.pulling() == []

        coord.answer.set()  # the coordinator takes it: the transfer is no longer listed
        await settle()
        assert view.reporting_transfers() == [] and "t-1" not in view.active
        sender.cancel()


def test_a_heartbeat_vouches_for_its_cursor_only_when_it_lists_everything() -> None:
    """Cut to what a heartbeat may carry, it claims no cursor: what was cut is not over."""
    view = AgentView()
    link = object.__new__(CoordinatorLink)  # _heartbeat reads only the view and the cursor
    link.view, link._cursor = view, 7
    for i in range(MAX_ACTIVE):
        a = assignment(f"t-{i}")
        view.active[a.transfer_id] = ActiveWork(a, started=0.0, bytes_total=1)
    view.active["t-0"].reporting = True
    hb = link._heartbeat()
    assert (len(hb.active), hb.reporting, hb.cursor) == (MAX_ACTIVE - 1, ["t-0"], 7)
    for tid in ("t-more", "t-most"):  # MAX_ACTIVE + 1 pulling now
        a = assignment(tid)
        view.active[a.transfer_id] = ActiveWork(a, started=0.0, bytes_total=1)
    hb = link._heartbeat()
    assert (len(hb.active), hb.cursor) == (MAX_ACTIVE, 0)
