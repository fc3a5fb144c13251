"""How many agents can one coordinator hold? Heartbeat and assignment latency under load.

A real ``rbd-coordinator`` process on loopback (its own process, so its CPU
is its own) and a load generator that plays N agents over the real
HTTP/msgpack agent API, as agent/agent.py does: each enrolls with the join
token, heartbeats every ``heartbeat_interval`` (the one the register reply
carries) with holdings, partial layers, active transfers, load and disk, and
always keeps one ``GET /v1/assignments`` long-poll parked. The generator runs
in one or more processes (``--workers``), each with a single aiohttp
connector, and measures its own CPU and event-loop lag so a reader can tell
whether the numbers are the coordinator's or the generator's.

Per cluster size N (a fresh coordinator each time):

1. registration: all N agents enroll (bounded concurrency); each starts
   heartbeating and polling as soon as its reply is in, like a real agent;
2. steady state: after a warm-up, ``--steady`` seconds of heartbeats are timed
   (round trip p50/p99/max, errors and timeouts), with the coordinator's and
   the generator's CPU over the same window;
3. a job: an image is added (a fake origin agent reports the ingest: real
   chunk manifests, no data plane) and distributed to all agents. Each fake
   demander reports its transfer done ``--done-delay`` seconds after its
   long-poll delivered it, so the ``paper`` scheduler proceeds (every
   finished node becomes a seeder). Assignment latency of one transfer is the
   time from the event that made it possible -- job creation, or the latest
   done report that freed its seeder or its demander -- to the demander's
   parked long-poll returning it. The step also reports the time until every
   assignment was handed out, the job's completion time against the ideal
   (ceil(log2 N) rounds of ``--done-delay`` for a one-layer image), the
   scheduling throughput (assignments/s) and heartbeat latency during the job.

The cost of piece reports (issue 13): with ``--policy swarm`` and layers of
a few MiB (``--layer-bytes``) every layer moves as ~16 piece transfers, each
ending in a done report (a node holds a layer once every chunk of it
arrived); ``--progress-interval`` makes the agents report progress too. The
agents send these as agents do (``--reports batch``: agent/control/report_batch.py's
TransferReporter, several to a ``POST /v1/reports``) or one request per
report as they did before (``--reports single``), each final with its report
id. The job line then says how many reports went in how many requests, the
coordinator's CPU per done report (all of the job's work, heartbeats and
scheduling included, divided by the done reports) and heartbeat latency
during the job::

    PYTHONPATH=.:bench .venv/bin/python bench/coordinator_load.py --sizes 100 --steady 5 \
        --warmup 2 --policy swarm --layer-bytes 8388608 --done-delay 1.0 \
        --progress-interval 0.5 --log-level info [--reports single]

Sizes are stepped up until heartbeat p99 passes ``--p99-limit-ms`` (100) or
errors appear. Every loop is bounded in count and time; all traffic goes to
127.0.0.1.

    .venv/bin/python bench/coordinator_load.py [--sizes 250,500,1000,2000,4000,8000]
        [--steady 20] [--workers 0 (auto)] [--profile DIR] [--out bench/out/coordinator_load.json]

``--profile DIR`` samples the coordinator with py-spy (if installed) during the
steady window and the job, and prints its hottest functions.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import gc
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from agentsim import SharedSessionAgent, make_image, register_request
from rainbowd.agent.control.report_batch import TransferReporter
from rainbowd.agent.control.report_sender import ReportSender
from rainbowd.core import messages as m
from rainbowd.core.digest import sha256_digest
from rainbowd.core.report_id import new_report_id
from rainbowd.devcluster.localcluster import LocalCluster
from rainbowd.devcluster.pgserver import PostgresServer
from rainbowd.lib.client import ApiError, CoordinatorUnreachable

#: heartbeat p99 (ms) a cluster size must stay under to count as "held"
P99_LIMIT_MS = 100.0
#: layers every simulated node already holds (earlier images), listed in each heartbeat
BASE_LAYERS = 24
#: concurrent enrollments per generator process
REGISTER_CONCURRENCY = 32
#: an agent process waits this long for a long-poll before asking again (agent default)
POLL_WAIT = 25.0
#: per-request timeout of the simulated agents (agent default request_timeout)
REQUEST_TIMEOUT = 10.0
#: agents per generator process when --workers is 0 (auto)
AGENTS_PER_WORKER = 2000
IMAGE_REF = "bench/load:1"
IMAGE_SEED = 20240611


def pct(samples: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of ``samples`` by nearest rank; NaN when empty."""
    if not samples:
        return math.nan
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


# --------------------------------------------------------------------------
# parent <-> worker channel
# --------------------------------------------------------------------------
class Channel:
    """One end of a multiprocessing pipe, read from an event loop without blocking it.

    Messages are ``(kind, payload)`` tuples. :meth:`expect` waits for one
    kind and keeps others for later, so a worker can push news (its job part
    is done) while the parent is waiting for something else.
    """

    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        self.conn = conn
        self._kept: list[tuple[str, Any]] = []

    def send(self, kind: str, payload: Any = None) -> None:
        self.conn.send((kind, payload))

    async def recv(self, timeout: float) -> tuple[str, Any]:
        """The next message; TimeoutError after ``timeout`` seconds, EOFError if the peer died."""
        if self._kept:
            return self._kept.pop(0)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while not self.conn.poll():
                ready: asyncio.Future[None] = loop.create_future()
                fd = self.conn.fileno()
                loop.add_reader(fd, _set_once, ready)
                try:
                    await ready
                finally:
                    loop.remove_reader(fd)
        kind, payload = self.conn.recv()
        return str(kind), payload

    async def expect(self, kind: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        for i, (k, payload) in enumerate(self._kept):
            if k == kind:
                del self._kept[i]
                return payload
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {kind!r} message from the worker in {timeout:.0f}s")
            k, payload = await self.recv(left)
            if k == "error":
                raise RuntimeError(f"load worker failed: {payload}")
            if k == kind:
                return payload
            self._kept.append((k, payload))


def _set_once(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# --------------------------------------------------------------------------
# the load generator (one per worker process)
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerSpec:
    """What one generator process plays; picklable for the spawn start method."""

    index: int
    url: str
    join_token: str
    node_ids: tuple[str, ...]
    origin: str  # the node id with the origin role ("" if not in this worker)
    layers: int
    layer_bytes: int
    done_delay: float
    lifetime: float  # the worker stops by itself after this many seconds, whatever happens
    progress_interval: float = 0.0  # each agent reports its active transfers this often (0: never)
    reports: str = (
        "batch"  # "batch": as agents do (agent/control/report_batch.py); "single": one per POST
    )
    cold_start: bool = False  # park each agent's long-poll as soon as it is enrolled
    poll_wait: float = POLL_WAIT
    request_timeout: float = REQUEST_TIMEOUT
    register_concurrency: int = REGISTER_CONCURRENCY


@dataclass
class SimAgent:
    """One simulated agent: credential, cursor, holdings, the transfers it 'pulls'."""

    node_id: str
    client: SharedSessionAgent
    roles: list[str]
    holdings: list[str]
    interval: float = 1.0
    cursor: int = 0
    trust_version: int = 0
    disk_free: int = 0
    active: dict[str, tuple[m.TransferAssignment, float]] = field(default_factory=dict)
    #: layer -> chunks received so far (a piece transfer brings some of them)
    chunks: dict[str, set[int]] = field(default_factory=dict)
    reporter: TransferReporter | None = None  # --reports batch: the agent's own batching


@dataclass
class Window:
    """What the generator saw between a ``measure`` and an ``end`` command."""

    name: str
    started: float
    cpu0: float
    hb_ms: list[float] = field(default_factory=list)
    hb_errors: Counter[str] = field(default_factory=Counter)
    poll_errors: Counter[str] = field(default_factory=Counter)
    lag_ms: list[float] = field(default_factory=list)
    trust_pushes: int = 0
    gc_ms: list[float] = field(default_factory=list)  # the generator's own GC pauses

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "wall_s": time.monotonic() - self.started,
            "cpu_s": _cpu() - self.cpu0,
            "hb_ms": self.hb_ms,
            "hb_errors": dict(self.hb_errors),
            "poll_errors": dict(self.poll_errors),
            "lag_ms": self.lag_ms,
            "trust_pushes": self.trust_pushes,
            "gc_ms": self.gc_ms,
        }


def _cpu() -> float:
    """CPU seconds (user + system) of this process."""
    t = os.times()
    return t.user + t.system


class LoadWorker:
    """Plays ``spec.node_ids`` against the coordinator until told to stop (or its lifetime ends)."""

    def __init__(self, spec: WorkerSpec, channel: Channel) -> None:
        self.spec = spec
        self.channel = channel
        self.stop = asyncio.Event()
        self.window: Window | None = None
        self.reg_ms: list[float] = []
        self.reg_errors: Counter[str] = Counter()
        self.arrivals: list[tuple[float, str, str, str]] = []  # (t, transfer, seeder, demander)
        self.dones: list[tuple[float, str, str, str]] = []  # (t sent, transfer, seeder, demander)
        self.job_errors: Counter[str] = Counter()
        self.job_started = False
        self.job_done_sent = False
        self.polled_sent = False
        self.trust_target: int | None = None  # the trust version after the last enrollment
        self.behind = 0  # enrolled agents whose trust list is older than trust_target
        self.reporting = 0  # done reports on the wire: the job is not over before they land
        self.progress_sent = 0  # progress reports answered during the job
        self.report_requests = 0  # requests that carried reports during the job
        self.dones_sent = 0  # done reports answered (retries not counted)
        self.record, self.manifests = make_image(
            IMAGE_REF, layers=spec.layers, layer_bytes=spec.layer_bytes, seed=IMAGE_SEED
        )
        self.job_layers = {mf.digest for mf in self.manifests}
        self.base = [str(sha256_digest(f"base-layer-{i}".encode())) for i in range(BASE_LAYERS)]
        self.agents: list[SimAgent] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.rng = random.Random(spec.index)

    # -- lifecycle -------------------------------------------------------
    def _gc_timer(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        elif self.window is not None:
            self.window.gc_ms.append((time.perf_counter() - self._gc_t0) * 1000)

    async def run(self) -> None:
        self._gc_t0 = 0.0
        gc.callbacks.append(self._gc_timer)
        connector = aiohttp.TCPConnector(limit=2 * len(self.spec.node_ids) + 64, limit_per_host=0)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.spec.request_timeout)
        ) as session:
            for nid in self.spec.node_ids:
                roles = ["origin"] if nid == self.spec.origin else []
                client = SharedSessionAgent(self.spec.url, session, self.spec.request_timeout)
                # the origin holds no old layers: it only ever seeds what it ingests
                holdings = [] if roles else list(self.base)
                self.agents.append(SimAgent(nid, client, roles, holdings))
            self._spawn(self._lag_monitor())
            try:
                async with asyncio.timeout(self.spec.lifetime):
                    await self._register_all()
                    await self._commands()
            except TimeoutError:
                pass  # lifetime over: stop by ourselves
            finally:
                self.stop.set()
                for t in list(self.tasks):
                    t.cancel()
                await asyncio.gather(*self.tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped first; True if we should go on."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), max(0.0, seconds))
        return not self.stop.is_set()

    async def _commands(self) -> None:
        while not self.stop.is_set():
            kind, payload = await self.channel.recv(self.spec.lifetime)
            if kind == "measure":
                # the agents' state is long-lived: keep the GC from rescanning it (its
                # full collections would otherwise show up as heartbeat latency)
                gc.collect()
                gc.freeze()
                self.window = Window(str(payload), time.monotonic(), _cpu())
            elif kind == "end":
                w, self.window = self.window, None
                self.channel.send("stats", w.summary() if w else None)
            elif kind == "poll":
                self.trust_target = int(payload)
                enrolled = [a for a in self.agents if a.client.credential]
                self.behind = sum(1 for a in enrolled if a.trust_version < self.trust_target)
                if not self.spec.cold_start:
                    for a in enrolled:
                        self._spawn(self._polls(a))
                self._note_trust_settled()
            elif kind == "job":
                self.job_started = True
            elif kind == "job_report":
                self.channel.send(
                    "job",
                    {
                        "arrivals": self.arrivals,
                        "dones": self.dones,
                        "progress_sent": self.progress_sent,
                        "report_requests": self.report_requests,
                        "dones_sent": self.dones_sent,
                        "errors": dict(self.job_errors),
                    },
                )
            elif kind == "stop":
                self.stop.set()

    # -- registration ----------------------------------------------------
    async def _register_all(self) -> None:
        sem = asyncio.Semaphore(self.spec.register_concurrency)
        t0 = time.monotonic()

        async def one(a: SimAgent) -> None:
            async with sem:
                await self._register(a)

        await asyncio.gather(*(one(a) for a in self.agents))
        self.channel.send(
            "registered",
            {
                "t0": t0,
                "t1": time.monotonic(),
                "reg_ms": self.reg_ms,
                "errors": dict(self.reg_errors),
                "ok": sum(1 for a in self.agents if a.client.credential),
            },
        )

    async def _register(self, a: SimAgent) -> None:
        a.disk_free = 40_000_000_000 + self.rng.randrange(20_000_000_000)
        req = register_request(
            a.node_id, self.spec.join_token, a.roles, holdings=a.holdings, disk_free=a.disk_free
        )
        for attempt in range(3):
            t0 = time.perf_counter()
            try:
                reply = await a.client.register(req)
            except (ApiError, CoordinatorUnreachable) as e:
                self.reg_errors[_error_kind(e)] += 1
                if not await self._sleep(0.5 * (attempt + 1)):
                    return
                continue
            self.reg_ms.append((time.perf_counter() - t0) * 1000)
            a.interval = reply.heartbeat_interval
            a.trust_version = reply.trust.version
            self._spawn(self._heartbeats(a))
            if self.spec.reports == "batch":
                a.reporter = self._reporter(a)
                self._spawn(a.reporter.run())
            elif self.spec.progress_interval > 0:
                self._spawn(self._progress(a))
            if self.spec.cold_start:
                self._spawn(self._polls(a))
            return

    # -- heartbeats ------------------------------------------------------
    def _heartbeat(self, a: SimAgent) -> m.Heartbeat:
        """What agent/agent.py sends: holdings, partials, active transfers, load, disk."""
        active = [
            m.ActiveTransfer(
                transfer_id=ta.transfer_id,
                layer=ta.layer.digest,
                seeder=ta.seeder.node_id,
                bytes_done=ta.layer.size // 2,
                bytes_total=ta.layer.size,
                rate_bps=50e6,
            )
            for ta, _ in a.active.values()
        ]
        partials = [
            m.LayerProgress(
                digest=ta.layer.digest, have=len(ta.layer.chunks) // 2, count=len(ta.layer.chunks)
            )
            for ta, _ in a.active.values()
        ]
        used = 2_000_000_000 + 1_000_000 * len(a.holdings)
        return m.Heartbeat(
            holdings=list(a.holdings),
            partials=partials,
            active=active,
            load=0.3 + 0.2 * self.rng.random(),
            disk_free=a.disk_free,
            disk_used=used,
        )

    async def _heartbeats(self, a: SimAgent) -> None:
        # agents start at random moments: spread the beats over the interval
        if not await self._sleep(self.rng.random() * a.interval):
            return
        for _ in range(int(self.spec.lifetime / a.interval) + 2):
            hb = self._heartbeat(a)
            t0 = time.perf_counter()
            error = ""
            try:
                await a.client.heartbeat(hb)
            except (ApiError, CoordinatorUnreachable) as e:
                error = _error_kind(e)
            ms = (time.perf_counter() - t0) * 1000
            w = self.window
            if w is not None:
                if error:
                    w.hb_errors[error] += 1
                else:
                    w.hb_ms.append(ms)
            if not await self._sleep(a.interval):
                return

    async def _lag_monitor(self) -> None:
        """Event-loop lag of this generator: how late a 50 ms sleep wakes up."""
        tick = 0.05
        for _ in range(int(self.spec.lifetime / tick) + 2):
            t0 = time.perf_counter()
            if not await self._sleep(tick):
                return
            if self.window is not None:
                self.window.lag_ms.append(max(0.0, (time.perf_counter() - t0 - tick) * 1000))

    # -- assignments -----------------------------------------------------
    async def _polls(self, a: SimAgent) -> None:
        # a parked poll ends after poll_wait or with news; the loop cannot outlive us
        max_polls = int(self.spec.lifetime / 0.005) + 10
        for _ in range(max_polls):
            if self.stop.is_set():
                return
            try:
                batch = await a.client.assignments(a.cursor, a.trust_version, self.spec.poll_wait)
            except (ApiError, CoordinatorUnreachable) as e:
                if self.window is not None:
                    self.window.poll_errors[_error_kind(e)] += 1
                if self.job_started:
                    self.job_errors["poll " + _error_kind(e)] += 1
                if not await self._sleep(0.5):
                    return
                continue
            self._handle(a, batch, time.monotonic())
            # drop the batch before parking again: N agents each keeping a trust list
            # of N peers is N^2 live objects, and the generator's GC pauses grow with it
            del batch

    def _handle(self, a: SimAgent, batch: m.AssignmentBatch, now: float) -> None:
        if batch.trust is not None:
            self._trust_arrived(a, batch.trust.version)
            if self.window is not None:
                self.window.trust_pushes += 1
        for x in batch.assignments:
            if isinstance(x, m.TransferAssignment):
                if x.transfer_id not in a.active:
                    self.arrivals.append((now, x.transfer_id, x.seeder.node_id, a.node_id))
                    a.active[x.transfer_id] = (x, now)
                    self._spawn(self._finish(a, x))
            elif isinstance(x, m.IngestAssignment):
                self._spawn(self._ingest(a, x))
        a.cursor = batch.cursor

    def _progress_now(self, a: SimAgent) -> list[m.ProgressItem]:
        """Each active transfer's bytes so far (a share of it by the time it has run)."""
        now = time.monotonic()
        out = []
        for x, t0 in list(a.active.values()):
            first, end = x.chunk_range()
            total = min(x.layer.size, end * x.layer.chunk_size) - first * x.layer.chunk_size
            share = min(1.0, (now - t0) / max(1e-9, self.spec.done_delay))
            msg = m.TransferProgress(bytes_done=int(total * share), bytes_total=total, rate_bps=5e6)
            out.append(m.ProgressItem(transfer_id=x.transfer_id, progress=msg))
        return out

    async def _progress(self, a: SimAgent) -> None:
        """--reports single: what agents did before batches, one POST per active transfer."""
        for _ in range(int(self.spec.lifetime / self.spec.progress_interval) + 2):
            if not await self._sleep(self.spec.progress_interval):
                return
            for item in self._progress_now(a):
                try:
                    await a.client.transfer_progress(item.transfer_id, item.progress)
                except (ApiError, CoordinatorUnreachable) as e:
                    self.job_errors["progress " + _error_kind(e)] += 1
                    continue
                if self.job_started:
                    self.progress_sent += 1
                    self.report_requests += 1

    def _reporter(self, a: SimAgent) -> TransferReporter:
        """--reports batch: the agent's own TransferReporter, sending through the shared session."""

        async def send(batch: m.ReportBatch) -> m.ReportBatchReply | None:
            reply = await a.client.reports(batch)
            if self.job_started:
                self.report_requests += 1
                self.progress_sent += sum(isinstance(i, m.ProgressItem) for i in batch.items)
            return reply

        def progress() -> list[m.ProgressItem]:
            # on or off; when on, as often as the agent's own rule sends it
            return self._progress_now(a) if self.spec.progress_interval > 0 else []

        counts = ReportSender(a.node_id, give_up_after=self.spec.request_timeout * 6)
        return TransferReporter(send, progress, counts)

    async def _finish(self, a: SimAgent, x: m.TransferAssignment) -> None:
        """The 'pull' takes done_delay; the piece (or layer) is then reported done.

        A layer is held once every chunk of it arrived (a piece transfer brings some).
        """
        if not await self._sleep(self.spec.done_delay):
            return
        first, end = x.chunk_range()
        have = a.chunks.setdefault(x.layer.digest, set())
        have.update(range(first, end))
        if len(have) >= x.layer.count and x.layer.digest not in a.holdings:
            a.holdings.append(x.layer.digest)
        a.active.pop(x.transfer_id, None)
        moved = min(x.layer.size, end * x.layer.chunk_size) - first * x.layer.chunk_size
        done = m.TransferDone(bytes_moved=moved, seconds=self.spec.done_delay)
        rid = new_report_id()  # as agent/control/report_sender.py: one id for every attempt
        self.reporting += 1
        try:
            if a.reporter is not None:
                t0 = time.monotonic()
                if await a.reporter.done(f"transfer {x.transfer_id} done", x.transfer_id, done):
                    self.dones.append((t0, x.transfer_id, x.seeder.node_id, a.node_id))
                    self.dones_sent += 1
                else:
                    self.job_errors["done not taken"] += 1
            for attempt in range(0 if a.reporter is not None else 3):
                t0 = time.monotonic()
                try:
                    await a.client.transfer_done(x.transfer_id, done, report_id=rid)
                except (ApiError, CoordinatorUnreachable) as e:
                    self.job_errors["done " + _error_kind(e)] += 1
                    if not await self._sleep(0.5 * (attempt + 1)):
                        return
                    continue
                self.dones.append((t0, x.transfer_id, x.seeder.node_id, a.node_id))
                self.dones_sent += 1
                self.report_requests += 1
                break
        finally:
            self.reporting -= 1
        self._check_job_done()

    def _trust_arrived(self, a: SimAgent, version: int) -> None:
        """Tell the parent once every enrolled agent holds the trust list it was told of."""
        target = self.trust_target
        if target is not None and a.trust_version < target <= version:
            self.behind -= 1
        a.trust_version = version
        self._note_trust_settled()

    def _note_trust_settled(self) -> None:
        if not self.polled_sent and self.trust_target is not None and self.behind <= 0:
            self.polled_sent = True
            self.channel.send("polled", time.monotonic())

    def _check_job_done(self) -> None:
        if self.job_done_sent or not self.job_started or self.reporting:
            return
        if all(self.job_layers <= set(a.holdings) for a in self.agents):
            self.job_done_sent = True
            self.channel.send("job_done", time.monotonic())

    async def _ingest(self, a: SimAgent, x: m.IngestAssignment) -> None:
        """The fake origin 'reads' the image: it now holds every layer and says so."""
        for mf in self.manifests:
            if mf.digest not in a.holdings:
                a.holdings.append(mf.digest)
        try:
            await a.client.ingest_done(
                x.ingest_id, m.IngestDone(image=self.record, manifests=self.manifests)
            )
        except (ApiError, CoordinatorUnreachable) as e:
            self.job_errors["ingest " + _error_kind(e)] += 1


def _error_kind(e: ApiError) -> str:
    if isinstance(e, CoordinatorUnreachable):
        return "timeout" if "did not answer" in e.message else "unreachable"
    return f"http {e.status}"


def worker_entry(spec: WorkerSpec, conn: multiprocessing.connection.Connection) -> None:
    """Process entry point of one generator process."""
    channel = Channel(conn)
    try:
        asyncio.run(LoadWorker(spec, channel).run())
        channel.send("bye", _cpu())
    except BaseException as e:  # tell the parent instead of vanishing
        with contextlib.suppress(OSError):
            channel.send("error", f"{type(e).__name__}: {e}")
        raise


# --------------------------------------------------------------------------
# one cluster size
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    steady: float = 20.0
    warmup: float = 3.0
    heartbeat_interval: float = 1.0
    workers: int = 0  # 0: one per AGENTS_PER_WORKER agents
    layers: int = 1
    layer_bytes: int = 100_000
    done_delay: float = 0.1
    progress_interval: float = 0.0
    job_timeout: float = 120.0
    log_level: str = "warning"  # the coordinator's (the lab runs it at info: a line per transfer)
    reports: str = "batch"  # how the agents send transfer reports (WorkerSpec.reports)
    cold_start: bool = False
    profile_dir: Path | None = None
    #: store-and-forward: the simulated agents finish a transfer done_delay after its
    #: assignment and serve nothing while receiving, so cut-through (``relay``) would
    #: hand out relays they cannot be; ideal_job_s counts doubling rounds
    policy: str = "slots"
    #: the coordinator's state backend: "sqlite" (in its state dir) or "postgresql" (a
    #: throwaway durable server of each step's own, rainbowd.devcluster.pgserver)
    state: str = "sqlite"


@dataclass
class StepResult:
    n: int
    workers: int
    registered: int
    register_s: float
    first_poll_s: float  # last enrollment -> every agent's first poll answered (trust lists)
    register_p50_ms: float
    register_p99_ms: float
    heartbeats_per_s: float
    hb_p50_ms: float
    hb_p99_ms: float
    hb_max_ms: float
    hb_errors: dict[str, int]
    poll_errors: dict[str, int]
    trust_pushes: int
    coordinator_cpu_pct: float
    machine_busy_pct: float  # every process on the machine (% of one CPU): others' load shows
    generator_cpu_pct: float
    generator_lag_p99_ms: float
    generator_gc_max_ms: float  # longest GC pause of a generator process in the window
    job_state: str
    transfers: int
    expected_transfers: int
    assign_p50_ms: float
    assign_p99_ms: float
    assign_max_ms: float
    first_wave_p50_ms: float
    handout_s: float
    job_s: float
    ideal_job_s: float
    assignments_per_s: float
    job_hb_p50_ms: float
    job_hb_p99_ms: float
    job_hb_errors: dict[str, int]
    job_errors: dict[str, int]
    job_coordinator_cpu_pct: float
    done_reports: int = 0  # done reports the coordinator answered during the job
    progress_reports: int = 0  # progress reports it answered during the job
    report_requests: int = 0  # requests that carried them
    job_coordinator_cpu_s: float = 0.0
    profile: dict[str, list[tuple[str, float]]] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return sum(self.hb_errors.values()) + sum(self.poll_errors.values())

    def held(self, limit_ms: float) -> bool:
        return (
            self.registered == self.n
            and self.errors == 0
            and self.hb_p99_ms < limit_ms
            and self.job_state == "done"
        )


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid``, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def _state_url(state: str) -> Iterator[str]:
    """The coordinator's --state-url for one step ("" for SQLite), its server stopped after."""
    if state == "sqlite":
        yield ""
        return
    server = PostgresServer(durable=True)  # fsync on, as a real server: commits are measured
    try:
        server.start()
        yield server.create_database("coordinator-load")
    finally:
        server.stop()


async def run_step(n: int, opts: Options) -> StepResult:
    """A fresh coordinator and ``n`` simulated agents (one of them the origin)."""
    with tempfile.TemporaryDirectory(prefix="rbd-load-") as tmp, _state_url(opts.state) as url:
        cluster = LocalCluster(
            Path(tmp),
            [],
            heartbeat_interval=opts.heartbeat_interval,
            log_level=opts.log_level,
            policy=opts.policy,
            state_url=url,
        )
        await cluster.start_coordinator()
        try:
            return await _drive(cluster, n, opts)
        finally:
            await cluster.stop()


async def _drive(cluster: LocalCluster, n: int, opts: Options) -> StepResult:
    ids = ["origin"] + [f"n{i:05d}" for i in range(1, n)]
    workers = opts.workers or max(1, math.ceil(n / AGENTS_PER_WORKER))
    register_timeout = 30.0 + n / 20
    lifetime = register_timeout + opts.warmup + opts.steady + opts.job_timeout + 60.0
    ctx = multiprocessing.get_context("spawn")
    channels: list[Channel] = []
    procs: list[multiprocessing.process.BaseProcess] = []
    coord_pid = cluster.pid("coordinator")
    profiler = _start_profile(opts.profile_dir, coord_pid, f"register-{n}", 0)
    profile: dict[str, list[tuple[str, float]]] = {}
    try:
        for w in range(workers):
            spec = WorkerSpec(
                index=w,
                url=cluster.url,
                join_token=cluster.join_token,
                node_ids=tuple(ids[w::workers]),
                origin="origin" if w == 0 else "",
                layers=opts.layers,
                layer_bytes=opts.layer_bytes,
                done_delay=opts.done_delay,
                lifetime=lifetime,
                progress_interval=opts.progress_interval,
                reports=opts.reports,
                cold_start=opts.cold_start,
            )
            parent_end, child_end = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=worker_entry, args=(spec, child_end), daemon=True)
            proc.start()
            child_end.close()
            procs.append(proc)
            channels.append(Channel(parent_end))

        # 1. registration
        regs = [await ch.expect("registered", register_timeout) for ch in channels]
        reg_ms = [x for r in regs for x in r["reg_ms"]]
        register_s = max(r["t1"] for r in regs) - min(r["t0"] for r in regs)
        registered = sum(r["ok"] for r in regs)
        async with cluster.admin() as admin:
            trust_version = int((await admin.health())["trust_version"])
        for ch in channels:
            ch.send("poll", trust_version)
        polled = [await ch.expect("polled", register_timeout) for ch in channels]
        first_poll_s = max(polled) - max(r["t1"] for r in regs)
        profile["register"] = _finish_profile(profiler)

        # 2. steady state
        await asyncio.sleep(opts.warmup)
        profiler = _start_profile(opts.profile_dir, coord_pid, f"steady-{n}", opts.steady)
        cpu0, t0, machine0 = _proc_cpu(coord_pid), time.monotonic(), _machine_cpu()
        for ch in channels:
            ch.send("measure", "steady")
        await asyncio.sleep(opts.steady)
        for ch in channels:
            ch.send("end")
        steady = [await ch.expect("stats", 30.0) for ch in channels]
        coord_cpu = (_proc_cpu(coord_pid) - cpu0) / (time.monotonic() - t0)
        machine1 = _machine_cpu()
        machine_busy = (machine1[0] - machine0[0]) / max(1e-9, machine1[1] - machine0[1])
        profile["steady"] = _finish_profile(profiler)

        # 3. the job
        async with cluster.admin() as admin:
            await admin.add_image(m.CreateImage(ref=IMAGE_REF, source=m.ArchiveSource(path="/x")))
            image = await admin.wait_image(IMAGE_REF, timeout=30.0)
            if image.state != "ready":
                raise RuntimeError(f"image did not become ready: {image.error}")
            for ch in channels:
                ch.send("job")
                ch.send("measure", "job")
            await asyncio.sleep(0.3)  # every long-poll is parked again
            profiler = _start_profile(opts.profile_dir, coord_pid, f"job-{n}", 0)
            cpu0 = _proc_cpu(coord_pid)
            t_create = time.monotonic()
            job = await admin.create_job(m.CreateJob(image=IMAGE_REF, targets=["all"]))
            finished: list[float] = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(opts.job_timeout):
                    for ch in channels:
                        finished.append(await ch.expect("job_done", opts.job_timeout))
            t_end = time.monotonic()
            job_cpu_s = _proc_cpu(coord_pid) - cpu0
            job_cpu = job_cpu_s / max(1e-9, t_end - t_create)
            profile["job"] = _finish_profile(profiler)
            view = await admin.job(job.job_id)
            for ch in channels:
                ch.send("end")
                ch.send("job_report")
            during = [await ch.expect("stats", 30.0) for ch in channels]
            reports = [await ch.expect("job", 60.0) for ch in channels]
        for ch in channels:
            ch.send("stop")
        for ch in channels:
            with contextlib.suppress(TimeoutError, EOFError, RuntimeError):
                await ch.expect("bye", 15.0)
    finally:
        _finish_profile(profiler)
        for child in procs:
            child.join(timeout=10)
            if child.is_alive():
                child.terminate()  # our own child, by its handle
                child.join(timeout=5)

    job_s = (max(finished) - t_create) if len(finished) == len(channels) else math.nan
    arrivals = [a for r in reports for a in r["arrivals"]]
    dones = [d for r in reports for d in r["dones"]]
    lat, first_wave = _assignment_latencies(arrivals, dones, t_create)
    handout_s = max((a[0] for a in arrivals), default=t_create) - t_create
    hb = [x for s in steady for x in s["hb_ms"]]
    job_hb = [x for s in during for x in s["hb_ms"]]
    rounds = math.ceil(math.log2(n)) if n > 1 else 0
    return StepResult(
        n=n,
        workers=workers,
        registered=registered,
        register_s=register_s,
        first_poll_s=first_poll_s,
        register_p50_ms=pct(reg_ms, 0.5),
        register_p99_ms=pct(reg_ms, 0.99),
        heartbeats_per_s=len(hb) / opts.steady,
        hb_p50_ms=pct(hb, 0.5),
        hb_p99_ms=pct(hb, 0.99),
        hb_max_ms=max(hb, default=math.nan),
        hb_errors=_sum_counts(s["hb_errors"] for s in steady),
        poll_errors=_sum_counts(s["poll_errors"] for s in steady),
        trust_pushes=sum(s["trust_pushes"] for s in steady),
        coordinator_cpu_pct=100 * coord_cpu,
        machine_busy_pct=100 * machine_busy * (os.cpu_count() or 1),
        generator_cpu_pct=100 * sum(s["cpu_s"] for s in steady) / opts.steady,
        generator_lag_p99_ms=max(pct(s["lag_ms"], 0.99) for s in steady),
        generator_gc_max_ms=max((x for s in steady for x in s["gc_ms"]), default=0.0),
        job_state=view.state,
        transfers=len({a[1] for a in arrivals}),
        expected_transfers=(n - 1) * opts.layers,
        assign_p50_ms=pct(lat, 0.5),
        assign_p99_ms=pct(lat, 0.99),
        assign_max_ms=max(lat, default=math.nan),
        first_wave_p50_ms=pct(first_wave, 0.5),
        handout_s=handout_s,
        job_s=job_s,
        ideal_job_s=rounds * opts.done_delay if opts.layers == 1 else math.nan,
        assignments_per_s=len(lat) / handout_s if handout_s > 0 else math.nan,
        job_hb_p50_ms=pct(job_hb, 0.5),
        job_hb_p99_ms=pct(job_hb, 0.99),
        job_hb_errors=_sum_counts(s["hb_errors"] for s in during),
        job_errors=_sum_counts(r["errors"] for r in reports),
        job_coordinator_cpu_pct=100 * job_cpu,
        done_reports=sum(r["dones_sent"] for r in reports),
        progress_reports=sum(r["progress_sent"] for r in reports),
        report_requests=sum(r["report_requests"] for r in reports),
        job_coordinator_cpu_s=job_cpu_s,
        profile=profile,
    )


def _sum_counts(counts: Any) -> dict[str, int]:
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    return dict(total)


def _assignment_latencies(
    arrivals: list[tuple[float, str, str, str]],
    dones: list[tuple[float, str, str, str]],
    t_create: float,
) -> tuple[list[float], list[float]]:
    """Per transfer: ms from what made it possible to its long-poll delivering it.

    A transfer becomes possible when both its seeder and its demander are
    free: at job creation, or when the latest done report involving either
    (as seeder or demander) was sent. Also returns the first wave alone (the
    transfers job creation itself made possible).
    """
    freed: dict[str, list[float]] = {}
    for t, _, seeder, demander in dones:
        freed.setdefault(seeder, []).append(t)
        freed.setdefault(demander, []).append(t)
    for times in freed.values():
        times.sort()
    out: list[float] = []
    first: list[float] = []
    seen: set[str] = set()
    for t, tid, seeder, demander in sorted(arrivals):
        if tid in seen:
            continue
        seen.add(tid)
        trigger = t_create
        for node in (seeder, demander):
            times = freed.get(node, [])
            i = bisect.bisect_left(times, t)
            if i:
                trigger = max(trigger, times[i - 1])
        out.append((t - trigger) * 1000)
        if trigger == t_create:
            first.append((t - trigger) * 1000)
    return out, first


# --------------------------------------------------------------------------
# py-spy (optional)
# --------------------------------------------------------------------------
def _start_profile(
    out_dir: Path | None, pid: int, name: str, seconds: float
) -> tuple[subprocess.Popen[bytes], Path] | None:
    """Sample ``pid`` with py-spy into ``out_dir/name.txt`` (collapsed stacks)."""
    if out_dir is None:
        return None
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy not found; no profile", file=sys.stderr)
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.txt"
    argv = [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200"]
    argv += ["--output", str(path), "--nonblocking"]
    if seconds:
        argv += ["--duration", str(int(seconds))]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, path


def _finish_profile(
    prof: tuple[subprocess.Popen[bytes], Path] | None, top: int = 12
) -> list[tuple[str, float]]:
    """Stop py-spy (by its own handle) and return the hottest frames: (frame, % of samples)."""
    if prof is None:
        return []
    proc, path = prof
    if proc.poll() is None:
        proc.send_signal(2)  # SIGINT: py-spy writes what it has and exits
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return hot_frames(path, top)


def hot_frames(path: Path, top: int = 12) -> list[tuple[str, float]]:
    """Inclusive share of samples per frame in a py-spy raw (collapsed) profile."""
    if not path.exists():
        return []
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        for frame in set(stack.split(";")):
            incl[frame] += int(count)
    if not total:
        return []
    skip = ("<module>", "run_forever", "_run_once", "_run (", "run (", "main (", "run_app")
    rows = [(f, 100 * c / total) for f, c in incl.most_common() if not f.startswith(skip)]
    return rows[:top]


# --------------------------------------------------------------------------
# the whole run
# --------------------------------------------------------------------------
def _raise_fd_limit(n: int) -> None:
    """Each agent holds a parked poll (one socket each side): lift the soft limit for both."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 3 * n + 1024))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def run(
    sizes: Sequence[int],
    opts: Options,
    *,
    repeat: int = 1,
    limit_ms: float = P99_LIMIT_MS,
    keep_going: bool = False,
) -> dict[str, Any]:
    _raise_fd_limit(max(sizes))
    steps: list[StepResult] = []
    for n in sizes:
        held = True
        for r in range(repeat):
            step = await run_step(n, opts)
            steps.append(step)
            print(_row(step, r), flush=True)
            held = held and step.held(limit_ms)
        if not held and not keep_going:
            break
    return summarize(steps, opts, limit_ms)


def summarize(steps: list[StepResult], opts: Options, limit_ms: float) -> dict[str, Any]:
    by_n: dict[int, list[StepResult]] = {}
    for s in steps:
        by_n.setdefault(s.n, []).append(s)
    medians = {
        n: {
            k: statistics.median(getattr(s, k) for s in ss)
            for k in ("hb_p50_ms", "hb_p99_ms", "hb_max_ms", "assign_p50_ms", "assign_p99_ms")
        }
        for n, ss in by_n.items()
    }
    held = [n for n, ss in by_n.items() if all(s.held(limit_ms) for s in ss)]
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "note": "coordinator and load generator share these CPUs",
        },
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "p99_limit_ms": limit_ms,
        "largest_held": max(held, default=0),
        "medians": medians,
        "steps": [asdict(s) for s in steps],
    }


HEADER = (
    f"{'N':>6} {'wk':>2} {'reg s':>6} {'hb/s':>6} {'hb p50':>7} {'hb p99':>7} {'hb max':>7} "
    f"{'err':>4} {'coord%':>6} {'gen%':>5} {'all%':>5} {'lag99':>6} | {'asg p50':>7} "
    f"{'asg p99':>7} {'handout':>7} {'job s':>6} {'ideal':>5} {'asg/s':>6} {'job hb99':>8} "
    f"{'coord%':>6}"
)


def _row(s: StepResult, rep: int = 0) -> str:
    tag = "" if rep == 0 else f" (repeat {rep})"
    errs = s.errors + sum(s.job_errors.values())
    return (
        f"{s.n:>6} {s.workers:>2} {s.register_s:>6.1f} {s.heartbeats_per_s:>6.0f} "
        f"{s.hb_p50_ms:>7.1f} {s.hb_p99_ms:>7.1f} {s.hb_max_ms:>7.1f} {errs:>4} "
        f"{s.coordinator_cpu_pct:>6.0f} {s.generator_cpu_pct:>5.0f} {s.machine_busy_pct:>5.0f} "
        f"{s.generator_lag_p99_ms:>6.1f} | {s.assign_p50_ms:>7.1f} {s.assign_p99_ms:>7.1f} "
        f"{s.handout_s:>7.2f} {s.job_s:>6.2f} {s.ideal_job_s:>5.1f} {s.assignments_per_s:>6.0f} "
        f"{s.job_hb_p99_ms:>8.1f} {s.job_coordinator_cpu_pct:>6.0f} {s.job_state}{tag}"
    )


def _report_cost(step: dict[str, Any]) -> str:
    """The coordinator's cost of the job's reports: CPU per done report, heartbeats meanwhile."""
    done, progress, cpu = (
        step["done_reports"],
        step["progress_reports"],
        step["job_coordinator_cpu_s"],
    )
    per_done = 1000 * cpu / done if done else math.nan
    return (
        f"{done} done + {progress} progress reports in {step['report_requests']} requests, "
        f"{step['job_s']:.1f} s; coordinator "
        f"{cpu:.2f} CPU s ({step['job_coordinator_cpu_pct']:.0f}% of a core), "
        f"{per_done:.2f} CPU ms per done report (all the job's work included); heartbeat "
        f"p50 {step['job_hb_p50_ms']:.1f} ms, p99 {step['job_hb_p99_ms']:.1f} ms"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--sizes", default="250,500,1000,2000,4000,8000", help="comma-separated N")
    p.add_argument("--steady", type=float, default=20.0, help="seconds of timed heartbeats")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds after registration")
    p.add_argument("--repeat", type=int, default=1, help="runs per size (medians reported)")
    p.add_argument("--workers", type=int, default=0, help="generator processes (0: auto)")
    p.add_argument("--heartbeat-interval", type=float, default=1.0)
    p.add_argument("--layers", type=int, default=1, help="layers of the distributed image")
    p.add_argument("--done-delay", type=float, default=0.1, help="fake transfer time (s)")
    p.add_argument(
        "--layer-bytes", type=int, default=Options.layer_bytes, help="size of each image layer"
    )
    p.add_argument(
        "--policy",
        default=Options.policy,
        help="the coordinator's policy; swarm splits each layer into pieces (a done report each)",
    )
    p.add_argument(
        "--progress-interval",
        type=float,
        default=0.0,
        help="agents report progress of their active transfers (0: not at all); with "
        "--reports single one POST per transfer this often (agents did: 0.5 s), with batch "
        "as agent/control/report_batch.py does",
    )
    p.add_argument("--p99-limit-ms", type=float, default=P99_LIMIT_MS)
    p.add_argument(
        "--cold-start",
        action="store_true",
        help="park each poll right after its agent enrolls (every enrollment then pushes the "
        "trust list to every parked poll), as agents starting together do",
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="run every size even after one failed (e.g. on a machine others are loading)",
    )
    p.add_argument(
        "--reports",
        choices=("batch", "single"),
        default=Options.reports,
        help="batch: agents send reports as agent/control/report_batch.py does (several per POST "
        "/v1/reports); single: one POST per report, as agents did before",
    )
    p.add_argument("--log-level", default=Options.log_level, help="the coordinator's log level")
    p.add_argument("--profile", type=Path, default=None, help="py-spy output directory")
    p.add_argument(
        "--state",
        choices=("sqlite", "postgresql"),
        default=Options.state,
        help="the coordinator's state backend; postgresql: a throwaway server (Debian's "
        "postgresql package) with a fresh database for each size",
    )
    p.add_argument("--out", type=Path, default=Path("bench/out/coordinator_load.json"))
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    opts = Options(
        steady=args.steady,
        warmup=args.warmup,
        heartbeat_interval=args.heartbeat_interval,
        workers=args.workers,
        layers=args.layers,
        done_delay=args.done_delay,
        layer_bytes=args.layer_bytes,
        policy=args.policy,
        progress_interval=args.progress_interval,
        log_level=args.log_level,
        reports=args.reports,
        profile_dir=args.profile,
        cold_start=args.cold_start,
        state=args.state,
    )
    print(
        f"coordinator load ({opts.state} state): {os.cpu_count()} CPUs shared by the "
        "coordinator process and the "
        f"load generator; heartbeat every {opts.heartbeat_interval:g}s, {opts.steady:g}s steady "
        f"window, one job of a {opts.layers}-layer image to all nodes "
        f"(fake transfers of {opts.done_delay:g}s). Latencies in ms; coord%/gen%/all% "
        "(the coordinator, the generator, every process on "
        "the machine, other users' included) are % of one CPU; lag99 is the generator's "
        "event-loop lag."
    )
    print(HEADER, flush=True)
    result = asyncio.run(
        run(
            sizes,
            opts,
            repeat=args.repeat,
            limit_ms=args.p99_limit_ms,
            keep_going=args.keep_going,
        )
    )
    for step in result["steps"]:
        print(f"\nN={step['n']} job: {_report_cost(step)}")
    for step in result["steps"]:
        for phase, rows in step["profile"].items():
            if rows:
                print(f"\ncoordinator hot frames, N={step['n']} {phase} (inclusive % of samples):")
                for frame, share in rows:
                    print(f"  {share:5.1f}%  {frame}")
    print(
        f"\nlargest cluster with heartbeat p99 < {args.p99_limit_ms:g} ms "
        f"(no errors, job done): {result['largest_held'] or 'none'}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
