"""AssignmentRunner: what the agent does with each assignment the coordinator sends.

One concern: carry out an assignment and send the report it ends with. A
``TransferAssignment`` is a pull from a peer (the puller), an
``IngestAssignment`` a read of an image from its source (origin role only),
an ``OpAssignment`` a cluster operation (docker/ops.py) and a
``LoadAssignment`` a load into the engines (engine_loads.py). Each runs in
its own task, guarded: nothing it raises may stop the agent, since a failure
is reported to the coordinator instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Coroutine
from typing import Any

from structlog.typing import FilteringBoundLogger

from rainbowd.agent.config import AgentConfig
from rainbowd.agent.control.report_batch import TransferReporter
from rainbowd.agent.control.report_sender import Attempt, ReportSender
from rainbowd.agent.dataplane.pull_failures import HostKeyMismatch, PullError
from rainbowd.agent.dataplane.puller import LayerPuller
from rainbowd.agent.docker.ops import OpRunner
from rainbowd.agent.engine_loads import EngineLoads
from rainbowd.agent.hygiene import StoreHygiene
from rainbowd.agent.mirror.catalog import ImageCatalog
from rainbowd.agent.mirror.catalog_feed import keep_for_front_door
from rainbowd.agent.origin import ingest as origin
from rainbowd.agent.view import ActiveWork, AgentView
from rainbowd.core import messages as m
from rainbowd.core.sources import describe
from rainbowd.lib.client import AgentClient
from rainbowd.lib.image import ImageError
from rainbowd.lib.store import LayerStore, StoreError


class AssignmentRunner:
    """Run each assignment to its end and report how it ended."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        api: AgentClient,
        store: LayerStore,
        view: AgentView,
        puller: LayerPuller,
        hygiene: StoreHygiene,
        catalog: ImageCatalog,
        loads: EngineLoads,
        ops: OpRunner,
        reports: ReportSender,
        transfer_reports: TransferReporter,
        log: FilteringBoundLogger,
    ) -> None:
        self.config = config
        self.api = api
        self.store = store
        self.view = view
        self.puller = puller
        self.hygiene = hygiene
        self.catalog = catalog
        self.loads = loads
        self.ops = ops
        self.reports = reports
        self.transfer_reports = transfer_reports
        self.log = log

    async def guarded(self, work: Awaitable[None]) -> None:
        """Run one piece of work; nothing it raises may stop the agent."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("work failed unexpectedly")

    def accept(self, a: m.Assignment) -> Coroutine[Any, Any, None] | None:
        """The work ``a`` asks for (guarded), or None for a transfer this agent already has.

        Called as the assignment arrives, before the poll cursor moves past it: a
        transfer is in ``view.active`` from here on, so every heartbeat that carries
        that cursor lists it (as pulling, then as reporting until the coordinator
        took its report). The coordinator ends a transfer a heartbeat does not list
        only when the heartbeat's cursor says the agent had it (transfers.py).
        """
        if isinstance(a, m.TransferAssignment):
            if a.transfer_id in self.view.active:
                return None  # re-sent (e.g. after a coordinator restart): already ours
            first, end = a.chunk_range()  # a piece of the layer, or all of it
            size = min(a.layer.size, end * a.layer.chunk_size) - first * a.layer.chunk_size
            w = ActiveWork(a, started=time.time(), bytes_total=size)
            self.view.active[a.transfer_id] = w
            return self.guarded(self._transfer(w))
        if isinstance(a, m.IngestAssignment):
            return self.guarded(self._ingest(a))
        if isinstance(a, m.OpAssignment):
            return self.guarded(self._op(a))
        return self.guarded(self.loads.load(a))

    async def _op(self, a: m.OpAssignment) -> None:
        """A cluster operation (docker/ops.py): report it started, run it, report how it ended."""
        await self._report(f"op {a.op_id} started", lambda rid: self.api.op_started(a.op_id, rid))

        async def report(result: m.OpResult) -> None:
            await self._report(
                f"op {a.op_id} result", lambda rid: self.api.op_result(a.op_id, result, rid)
            )

        await self.ops.run(a, report)

    async def _transfer(self, w: ActiveWork) -> None:
        """Pull ``w`` and report how it ended; it leaves ``view.active`` once reported."""
        try:
            await self._pull_and_report(w)
        finally:
            self.view.active.pop(w.transfer_id, None)

    async def _pull_and_report(self, w: ActiveWork) -> None:
        a = w.assignment
        layer = a.layer.digest
        first, end = a.chunk_range()
        size = w.bytes_total
        tlog = self.log.bind(layer=layer, seeder=a.seeder.node_id, transfer=a.transfer_id)
        if self.puller.overlapping(layer, first, end):
            # e.g. re-sent after a coordinator restart: a pull overlapping a running one
            # waits for it and then moves only what is missing
            tlog.info("layer already being pulled; this transfer waits for it")
        tlog.info("pulling layer", reason=a.reason, size=size, first_chunk=first, end_chunk=end)

        def progress(done: int, total: int, rate: float) -> None:
            w.bytes_done, w.bytes_total, w.rate_bps = done, total, rate

        failure: m.TransferFailed | None = None
        event: m.SecurityEvent | None = None
        try:
            result = await self.puller.pull(a, progress)
        except PullError as e:
            tlog.warning("pull failed", kind=e.kind, error=e.reason)
            failure = e.to_failed()
            if isinstance(e, HostKeyMismatch):
                self.view.security_events.append(e.reason)
                event = m.SecurityEvent(
                    kind="host_key_mismatch", peer=a.seeder.node_id, detail=e.reason
                )
        finally:
            w.reporting = True  # pulled or failed: listed as reporting until reported
        if event is not None:
            sec = event
            await self._report(
                f"security event {sec.kind} about {sec.peer}",
                lambda rid: self.api.security_event(sec, rid),
            )
        what = f"transfer {a.transfer_id} of layer {layer} from {a.seeder.node_id}"
        if failure is not None:
            failed = failure
            await self.transfer_reports.failed(f"{what} failed", a.transfer_id, failed)
            return
        if result.installed:
            tlog.info("layer verified", bytes=result.bytes_moved, seconds=round(result.seconds, 3))
            self.hygiene.used(layer)
            self.hygiene.kick()
        else:  # other pieces of the layer are still to come
            tlog.info("piece verified", bytes=result.bytes_moved, seconds=round(result.seconds, 3))
        done = m.TransferDone(bytes_moved=result.bytes_moved, seconds=result.seconds)
        await self.transfer_reports.done(f"{what} done", a.transfer_id, done)

    async def _ingest(self, a: m.IngestAssignment) -> None:
        # no eviction until the coordinator has the report (and so pins the image's layers)
        self.hygiene.ingesting += 1
        try:
            await self.ingest_and_report(a)
        finally:
            self.hygiene.ingesting -= 1

    async def ingest_and_report(self, a: m.IngestAssignment) -> None:
        """Read the image from its source into the store (origin role) and report the outcome."""
        ilog = self.log.bind(image=a.ref, ingest=a.ingest_id)
        if "origin" not in self.config.roles:
            reason = f"node {self.config.node_id} has no origin role; cannot read {a.ref}"
            await self._report(
                f"ingest {a.ingest_id} of {a.ref} failed",
                lambda rid: self.api.ingest_failed(a.ingest_id, m.TaskFailed(reason=reason), rid),
            )
            return
        source = describe(a.source)
        ilog.info("ingesting image", source=source, compression=a.compression)
        self.view.origin_reads += 1
        try:
            record, manifests = await origin.ingest(
                a, self.store, docker_url=self.config.docker_url
            )
        except (ImageError, StoreError, OSError) as e:
            reason = f"origin {self.config.node_id} could not ingest {a.ref} from {source}: {e}"
            ilog.warning("ingest failed", error=str(e))
            await self._report(
                f"ingest {a.ingest_id} of {a.ref} failed",
                lambda rid: self.api.ingest_failed(a.ingest_id, m.TaskFailed(reason=reason), rid),
            )
            return
        except Exception as e:  # a reader's bug must fail the image, not leave it ingesting
            reason = (
                f"origin {self.config.node_id} could not ingest {a.ref} from {source}: "
                f"unexpected {type(e).__name__}: {e} (see the agent log)"
            )
            ilog.exception("ingest failed unexpectedly")
            await self._report(
                f"ingest {a.ingest_id} of {a.ref} failed",
                lambda rid: self.api.ingest_failed(a.ingest_id, m.TaskFailed(reason=reason), rid),
            )
            return
        for lr in record.layers:
            self.hygiene.used(lr.digest)
        self.hygiene.kick()
        await keep_for_front_door(self.catalog, record, self.log)
        ilog.info("image ingested", layers=len(record.layers), size=record.size)
        await self._report(
            f"ingest {a.ingest_id} of {a.ref} done",
            lambda rid: self.api.ingest_done(
                a.ingest_id, m.IngestDone(image=record, manifests=manifests), rid
            ),
        )

    async def _report(self, what: str, send: Attempt) -> None:
        """Send a final report once; retried on connection errors and 5xx (report_sender.py)."""
        await self.reports.send(what, send)
