"""Agent: the long-running process on one host.

It enrolls with the coordinator, reports what it holds, long-polls for
assignments and carries them out: pull a layer from a peer (``transfer``),
read an image from its source (``ingest``, origin role only), or load a
complete image into Docker and/or containerd (``load``). It also serves its own layers to
trusted peers over SSH and answers ``rbd-agent status`` on a unix socket.

Concurrency: :meth:`Agent.run` owns one TaskGroup. Every task in it is a loop
(heartbeats, assignments, transfer reports) or one piece of work; work tasks
never let an exception escape (they report the failure to the coordinator), so
one bad layer cannot take the agent down. SIGTERM sets the stop event; the
group is cancelled and every resource is closed in reverse order.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from rainbowd.agent.config import AgentConfig
from rainbowd.agent.containerd.loader import ContainerdLoader
from rainbowd.agent.control.report_batch import BatchOrSingle, TransferReporter
from rainbowd.agent.control.report_sender import Attempt, ReportSender
from rainbowd.agent.dataplane.keys import load_or_create_key, public_line
from rainbowd.agent.dataplane.puller import HostKeyMismatch, LayerPuller, PullError
from rainbowd.agent.dataplane.relay import RelayBoard
from rainbowd.agent.dataplane.ssh_server import ChunkServer
from rainbowd.agent.docker.loader import DockerLoader
from rainbowd.agent.docker.ops import OpRunner
from rainbowd.agent.hygiene import StoreHygiene
from rainbowd.agent.loadstream import Loader
from rainbowd.agent.metrics import AgentMetrics, MetricsServer
from rainbowd.agent.mirror.catalog import CatalogError, ImageCatalog
from rainbowd.agent.mirror.server import MirrorServer
from rainbowd.agent.origin import ingest as origin
from rainbowd.agent.status import StatusServer
from rainbowd.core import messages as m
from rainbowd.core.digest import Digest
from rainbowd.core.eviction import StoreLimits
from rainbowd.core.sources import describe
from rainbowd.lib.client import AgentClient, ApiError, CoordinatorUnreachable
from rainbowd.lib.image import ImageError
from rainbowd.lib.store import LayerStore, StoreError

log = structlog.get_logger(__name__)


class _Shutdown(Exception):
    """Raised inside the task group to cancel it on stop."""


class EnrollmentRefused(RuntimeError):
    """The coordinator refused this node; retrying will not help."""


@dataclass
class ActiveWork:
    """A pull this agent runs: its assignment, kept by reference, and its progress so far.

    The transfer's identity and plan are the coordinator's ``TransferAssignment``
    (not copied: the properties read it); the agent adds only when the pull
    started and what the puller last said of it, for heartbeats, progress
    reports and ``rbd-agent status``.
    """

    assignment: m.TransferAssignment
    started: float  # wall clock (status shows seconds since)
    bytes_total: int  # of its chunk range
    bytes_done: int = 0
    rate_bps: float = 0.0

    @property
    def transfer_id(self) -> str:
        return self.assignment.transfer_id

    @property
    def layer(self) -> str:
        return self.assignment.layer.digest

    @property
    def seeder(self) -> str:
        return self.assignment.seeder.node_id


@dataclass
class AgentView:
    """What ``rbd-agent status`` shows; updated by the agent as it works."""

    registered: bool = False
    last_contact: float = 0.0
    heartbeat_interval: float = 2.0
    trust_version: int = 0
    active: dict[str, ActiveWork] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)  # ref -> loaded at (iso)
    origin_reads: int = 0
    security_events: list[str] = field(default_factory=list)
    last_error: str = ""


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.log = log.bind(node=config.node_id)
        self.store = LayerStore(config.store_dir)
        self.host_key = load_or_create_key(config.keys_dir / "host_ed25519")
        self.client_key = load_or_create_key(config.keys_dir / "client_ed25519")
        # shared by the puller and the server: chunks of a layer being pulled are
        # served as they land (cut-through relay, agent/dataplane/relay.py)
        self.relay = RelayBoard()
        self.server = ChunkServer(
            self.store,
            self.host_key,
            node_id=config.node_id,
            verify_reads=config.verify_served,
            max_upload_bps=config.max_upload_mbps * 1e6 / 8,
            on_served=lambda layer: self.hygiene.used(layer),
            relay=self.relay,
            limits=config.ssh_limits(),
            refresh_trust=self._fetch_trust,
            on_corrupt=self._own_copy_corrupt,
        )
        self.server_port = config.ssh_port
        self.metrics = AgentMetrics()
        self.puller = LayerPuller(
            self.store,
            self.client_key,
            node_id=config.node_id,
            metrics=self.metrics,
            max_download_bps=config.max_download_mbps * 1e6 / 8,
            relay=self.relay,
        )
        self.loader = DockerLoader(config.docker_url) if config.docker_url else None
        # containerd is a load target too (agent/containerd/): a node without Docker runs
        # what rbd distributes, and a node with both gets every image into both
        self.containerd = (
            ContainerdLoader(
                config.containerd_address,
                config.containerd_namespace,
                snapshotter=config.containerd_snapshotter,
            )
            if config.containerd_address
            else None
        )
        self.view = AgentView()
        self.metrics.watch(self)
        self.metrics_server: MetricsServer | None = None
        # the registry front door (agent/mirror/): off unless mirror_listen is set
        self.catalog = ImageCatalog(config.mirror_dir)
        mirror_at = config.mirror_address()
        self.mirror: MirrorServer | None = None
        if mirror_at is not None:
            self.mirror = MirrorServer(
                self.store,
                self.catalog,
                *mirror_at,
                node_id=config.node_id,
                verify_reads=config.verify_served,
                hooks=self.metrics,
                on_served=lambda layer: self.hygiene.used(layer),
                on_corrupt=self._own_copy_corrupt,
            )
        limits = (
            StoreLimits(
                config.store_max_bytes, config.store_high_watermark, config.store_low_watermark
            )
            if config.store_max_bytes
            else None
        )
        self.hygiene = StoreHygiene(
            self.store, limits, node_id=config.node_id, local_pins=self._busy_layers
        )
        self._loading: dict[str, int] = {}  # layer -> image loads reading it now
        self.api = AgentClient(config.coordinator_urls, timeout=config.request_timeout)
        self.reports = ReportSender(config.node_id, give_up_after=config.report_retry_seconds)
        # transfer progress/done/failed: several to a request (agent/control/report_batch.py)
        self.transfer_reports = TransferReporter(
            BatchOrSingle(self.api), self._progress, self.reports
        )
        self._stop = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._cursor = 0
        # held while a heartbeat is built and sent, and while an eviction or an image
        # removal runs and is reported: a heartbeat never re-announces a layer just
        # deleted. One lock for both ways a layer leaves the store.
        self.holdings_lock = self.hygiene.holdings_lock
        # the heartbeat's own thread: the default executor carries the data plane (chunk
        # writes with their fdatasync, serve-side reads and checks, commits), and behind a
        # queue of those a heartbeat was late by seconds on a busy host and the
        # coordinator marked a working node down
        self._control_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rbd-heartbeat")
        self.ops = OpRunner(
            config.node_id,
            self.loader,
            self.store,
            self.api,
            self.holdings_lock,
            docker_url=config.docker_url,
            image_removed=self._image_removed,
        )

    async def _fetch_trust(self) -> m.TrustList:
        """The coordinator's current trust list (our server met a client key it did not know)."""
        trust = await self.api.trust()
        self.view.trust_version = max(self.view.trust_version, trust.version)
        return trust

    def _own_copy_corrupt(self, layer: str, why: str) -> None:
        """Our server found our copy of ``layer`` corrupt: delete it, so no heartbeat lists it.

        The coordinator then stops sending demanders here for it (and, if we
        were its only holder, fails the jobs waiting for it, naming it); a
        later pull fetches a good copy.
        """
        if self._tg is not None:
            self._tg.create_task(self._guarded(self._drop_corrupt(layer, why)))

    async def _drop_corrupt(self, layer: str, why: str) -> None:
        async with self.holdings_lock:
            if not await asyncio.to_thread(self.store.has, Digest(layer)):
                return
            await asyncio.to_thread(self.store.remove, Digest(layer))
        note = f"own copy of layer {layer} is corrupt; deleted, no longer advertised: {why}"
        self.view.security_events.append(note)
        self.log.error("own_copy_corrupt_removed", layer=layer, why=why)

    def _image_removed(self, ref: str) -> None:
        self.view.images.pop(ref, None)

    def stop(self) -> None:
        self._stop.set()

    def _busy_layers(self) -> set[str]:
        """Layers in use on this host right now: pulled, served, loaded (never evicted)."""
        busy = {w.layer for w in self.view.active.values()}
        mirrored = set(self.mirror.serving) if self.mirror is not None else set()
        return busy | set(self.server.serving) | set(self._loading) | mirrored

    # -- lifecycle -------------------------------------------------------
    async def run(self) -> None:
        """Serve until :meth:`stop`; raise EnrollmentRefused if the coordinator says no."""
        self.server_port = await self.server.start(self.config.listen_address, self.config.ssh_port)
        status = StatusServer(self.config.status_path, self.status_snapshot)
        await status.start()
        metrics_at = self.config.metrics_address()
        if metrics_at is not None:
            self.metrics_server = MetricsServer(
                self.metrics, *metrics_at, self.config.metrics_token()
            )
            await self.metrics_server.start()
        if self.mirror is not None:
            await self.mirror.start()
        self.log.info(
            "agent started", ssh_port=self.server_port, status_socket=str(self.config.status_path)
        )
        self._log_resumable()
        try:
            async with self.api:
                try:
                    async with asyncio.TaskGroup() as tg:
                        self._tg = tg
                        tg.create_task(self._main(tg))
                        tg.create_task(self._wait_stop())
                except* _Shutdown:
                    pass
        finally:
            self._tg = None
            await self.puller.close()
            await self.server.close()
            if self.loader is not None:
                await self.loader.close()
            await status.close()
            if self.metrics_server is not None:
                await self.metrics_server.close()
            if self.mirror is not None:
                await self.mirror.close()
            self._control_pool.shutdown(wait=True)
            self.log.info("agent stopped")

    def _log_resumable(self) -> None:
        """Name the partial layers found at start: the next pull of each resumes there.

        Nothing is pulled on our own initiative (the coordinator decides who
        sends what); heartbeats report these partials so it can see them.
        """
        for digest, have, count in self.store.partials():
            self.log.info("partial_layer_found", layer=digest, chunks_have=have, chunks=count)

    async def _wait_stop(self) -> None:
        await self._stop.wait()
        raise _Shutdown

    async def _main(self, tg: asyncio.TaskGroup) -> None:
        await self._register()
        tg.create_task(self._heartbeats())
        tg.create_task(self.transfer_reports.run())
        tg.create_task(self.hygiene.run(self.api, lambda: self.view.heartbeat_interval))
        await self._assignments(tg)

    # -- enrollment and heartbeats ----------------------------------------
    async def _register(self) -> None:
        async with self.holdings_lock:
            await self._register_locked()

    async def _register_locked(self) -> None:
        cfg = self.config
        credential = ""
        if cfg.credential_file.exists():
            credential = cfg.credential_file.read_text().strip()
        req = m.RegisterRequest(
            node_id=cfg.node_id,
            join_token="" if credential else cfg.join_token(),
            credential=credential,
            address=cfg.advertised(),
            ssh_port=self.server_port,
            host_key=public_line(self.host_key),
            client_key=public_line(self.client_key),
            labels=dict(cfg.labels),
            roles=list(cfg.roles),
            docker=self.loader is not None and await self.loader.available(),
            containerd=self.containerd is not None and await self.containerd.available(),
            disk_free=self.store.bytes_free(),
            speed_hint_bps=cfg.speed_hint_mbps * 1e6 / 8,
            download_hint_bps=cfg.download_hint_mbps * 1e6 / 8,
            max_upload_bps=cfg.max_upload_mbps * 1e6 / 8,
            max_download_bps=cfg.max_download_mbps * 1e6 / 8,
            holdings=self.hygiene.holdings(),
        )
        delay = 0.5
        while True:
            try:
                reply = await self.api.register(req)
                break
            except CoordinatorUnreachable as e:
                self.view.last_error = str(e)
                self.log.warning("coordinator unreachable; retrying", error=str(e), retry_in=delay)
            except ApiError as e:
                if 400 <= e.status < 500:
                    raise EnrollmentRefused(
                        f"coordinator refused node {cfg.node_id}: {e}"
                    ) from None
                self.log.warning("register failed; retrying", error=str(e), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        if reply.credential and reply.credential != credential:
            _write_secret(cfg.credential_file, reply.credential)
        self.api.set_credential(cfg.node_id, reply.credential or credential)
        self.server.update_trust(reply.trust)
        self.view.trust_version = reply.trust.version
        self.view.heartbeat_interval = reply.heartbeat_interval
        self.view.registered = True
        self.view.last_contact = time.time()
        self._cursor = 0  # the coordinator's queue for us starts again after (re)registration
        self.log.info("registered", coordinator=self.api.base_url, trust=reply.trust.version)

    def _heartbeat(self) -> m.Heartbeat:
        return m.Heartbeat(
            holdings=self.hygiene.holdings(),
            partials=[
                m.LayerProgress(digest=d, have=have, count=n)
                for d, have, n in self.store.partials()
            ],
            active=[
                m.ActiveTransfer(
                    transfer_id=w.transfer_id,
                    layer=w.layer,
                    seeder=w.seeder,
                    bytes_done=w.bytes_done,
                    bytes_total=w.bytes_total,
                    rate_bps=w.rate_bps,
                )
                for w in self.view.active.values()
            ],
            load=os.getloadavg()[0],
            disk_free=self.store.bytes_free(),
            disk_used=self.store.bytes_used(),
        )

    async def _heartbeats(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.view.heartbeat_interval)
            started = time.monotonic()
            try:
                async with self.holdings_lock:
                    locked = time.monotonic()
                    hb = await loop.run_in_executor(self._control_pool, self._heartbeat)
                    built = time.monotonic()
                    reply = await self.api.heartbeat(hb)
                took = time.monotonic() - started
                if took > self.view.heartbeat_interval:
                    # the coordinator marks a node down after a few missed intervals:
                    # say where the time went before that happens
                    self.log.warning(
                        "heartbeat slow",
                        seconds=round(took, 3),
                        lock_wait=round(locked - started, 3),
                        build=round(built - locked, 3),
                        send=round(time.monotonic() - built, 3),
                    )
                self.view.last_contact = time.time()
                self.hygiene.coordinator_pins(reply.pinned)
                self.hygiene.kick()
            except CoordinatorUnreachable as e:
                self.view.last_error = str(e)
                self.log.warning("heartbeat: coordinator unreachable", error=str(e))
            except ApiError as e:
                self.view.last_error = str(e)
                if e.status == 401:
                    self.log.warning("heartbeat refused; registering again", error=str(e))
                    await self._register()
                else:
                    self.log.warning("heartbeat failed", error=str(e))
            except OSError as e:
                # e.g. EMFILE while descriptors are short: this heartbeat is skipped, the
                # agent lives on (agent/dataplane/ssh_limits.py bounds what inbound SSH may take)
                self.view.last_error = f"node {self.config.node_id}: heartbeat: {e}"
                self.log.error("heartbeat failed on this host; retrying", error=str(e))

    def _progress(self) -> list[m.ProgressItem]:
        """Progress of every active transfer (sent with the next batch of reports)."""
        return [
            m.ProgressItem(
                transfer_id=w.transfer_id,
                progress=m.TransferProgress(
                    bytes_done=w.bytes_done, bytes_total=w.bytes_total, rate_bps=w.rate_bps
                ),
            )
            for w in self.view.active.values()
        ]

    # -- assignments -----------------------------------------------------
    async def _assignments(self, tg: asyncio.TaskGroup) -> None:
        delay = 0.5
        while True:
            try:
                batch = await self.api.assignments(
                    self._cursor, self.view.trust_version, self.config.poll_wait
                )
            except CoordinatorUnreachable as e:
                self.view.last_error = str(e)
                self.log.warning("assignments: coordinator unreachable", retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            except ApiError as e:
                self.view.last_error = str(e)
                if e.status == 401:
                    await self._register()
                else:
                    self.log.warning("assignments failed", error=str(e), retry_in=delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
                continue
            delay = 0.5
            self.view.last_contact = time.time()
            if batch.trust is not None:
                self.server.update_trust(batch.trust)
                self.view.trust_version = batch.trust.version
            for a in batch.assignments:
                tg.create_task(self._guarded(self._dispatch(a)))
            self._cursor = batch.cursor

    async def _guarded(self, work: Awaitable[None]) -> None:
        """Run one piece of work; nothing it raises may stop the agent."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("work failed unexpectedly")

    async def _dispatch(self, a: m.Assignment) -> None:
        if isinstance(a, m.TransferAssignment):
            if a.transfer_id not in self.view.active:
                await self._transfer(a)
        elif isinstance(a, m.IngestAssignment):
            await self._ingest(a)
        elif isinstance(a, m.OpAssignment):
            await self._op(a)
        else:
            await self._load(a)

    async def _op(self, a: m.OpAssignment) -> None:
        """A cluster operation (docker/ops.py): report it started, run it, report how it ended."""
        await self._report(f"op {a.op_id} started", lambda rid: self.api.op_started(a.op_id, rid))

        async def report(result: m.OpResult) -> None:
            await self._report(
                f"op {a.op_id} result", lambda rid: self.api.op_result(a.op_id, result, rid)
            )

        await self.ops.run(a, report)

    async def _transfer(self, a: m.TransferAssignment) -> None:
        layer = a.layer.digest
        first, end = a.chunk_range()  # a piece of the layer, or all of it
        size = min(a.layer.size, end * a.layer.chunk_size) - first * a.layer.chunk_size
        w = ActiveWork(a, started=time.time(), bytes_total=size)
        self.view.active[a.transfer_id] = w
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
            self.view.active.pop(a.transfer_id, None)
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
            await self._ingest_and_report(a)
        finally:
            self.hygiene.ingesting -= 1

    async def _ingest_and_report(self, a: m.IngestAssignment) -> None:
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
        await self._catalog_image(record)
        ilog.info("image ingested", layers=len(record.layers), size=record.size)
        await self._report(
            f"ingest {a.ingest_id} of {a.ref} done",
            lambda rid: self.api.ingest_done(
                a.ingest_id, m.IngestDone(image=record, manifests=manifests), rid
            ),
        )

    def _engines(self) -> list[tuple[str, Loader]]:
        """The engines a load goes into, by name: Docker, then containerd, as configured."""
        engines: list[tuple[str, Loader]] = []
        if self.loader is not None:
            engines.append(("Docker", self.loader))
        if self.containerd is not None:
            engines.append(("containerd", self.containerd))
        return engines

    async def _load(self, a: m.LoadAssignment) -> None:
        """Load ``a.image`` into every engine this node has; one failure fails the load.

        Every engine, not one: the agent cannot know which runtime will run
        the image (a Kubernetes node's containerd, a Docker beside it for
        builds), and an engine left out would pull it from the registry
        anyway. A load is done only when each engine holds the image, so the
        job never reports "done" for a node where one of them lacks it.
        """
        llog = self.log.bind(image=a.image.ref, load=a.load_id)
        engines = self._engines()
        if not engines:
            reason = (
                f"node {self.config.node_id} has no Docker engine (docker_url) nor containerd "
                "(containerd_address) configured"
            )
            await self._report(
                f"load {a.load_id} of {a.image.ref} failed",
                lambda rid: self.api.load_failed(a.load_id, m.TaskFailed(reason=reason), rid),
            )
            return
        # every layer is held (that is when a load is sent): the front door may serve it
        await self._catalog_image(a.image)
        layers = [lr.digest for lr in a.image.layers]
        for d in layers:
            self._loading[d] = self._loading.get(d, 0) + 1
        seconds, layers_sent, failed = 0.0, 0, ""
        try:
            for engine, loader in engines:
                try:
                    result = await loader.load(a.image, self.store)
                except Exception as e:  # engine errors come in many types; all are reported
                    failed = (
                        f"node {self.config.node_id} could not load {a.image.ref} "
                        f"into {engine}: {e}"
                    )
                    llog.warning("image load failed", engine=engine, error=str(e))
                    break
                seconds += result.seconds
                layers_sent += result.layers_sent
                llog.info("image loaded", engine=engine, layers_sent=result.layers_sent)
        finally:
            for d in layers:
                left = self._loading.pop(d, 1) - 1
                if left > 0:
                    self._loading[d] = left
                self.hygiene.used(d)
        if failed:
            await self._report(
                f"load {a.load_id} of {a.image.ref} failed",
                lambda rid: self.api.load_failed(a.load_id, m.TaskFailed(reason=failed), rid),
            )
            return
        self.view.images[a.image.ref] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        await self._report(
            f"load {a.load_id} of {a.image.ref} done",
            lambda rid: self.api.load_done(
                a.load_id, m.LoadDone(seconds=seconds, layers_sent=layers_sent), rid
            ),
        )

    async def _catalog_image(self, image: m.ImageRecord) -> None:
        """Keep ``image``'s manifest and config for the registry front door.

        Never fails the work it rides on: an image the catalog refuses (its
        config does not match its digest) or cannot write is only not served
        by the front door, and a client pulling it goes to its upstream.
        """
        try:
            await asyncio.to_thread(self.catalog.record, image)
        except (CatalogError, OSError) as e:
            self.log.error("mirror_catalog_failed", image=image.ref, error=str(e))

    async def _report(self, what: str, send: Attempt) -> None:
        """Send a final report once; retried on connection errors and 5xx (report_sender.py)."""
        await self.reports.send(what, send)

    # -- status ----------------------------------------------------------
    def status_snapshot(self) -> dict[str, Any]:
        """Everything ``rbd-agent status`` prints, as plain data."""
        cfg = self.config
        holdings = []
        for d in self.store.holdings():
            try:
                holdings.append({"digest": d, "size": self.store.size(d)})
            except StoreError:
                continue
        now = time.time()
        return {
            "node_id": cfg.node_id,
            "pid": os.getpid(),
            "coordinator": {
                # the one asked first: the leader once one answered
                "url": self.api.base_url,
                "urls": list(cfg.coordinator_urls),
                "registered": self.view.registered,
                "last_contact_age": (now - self.view.last_contact)
                if self.view.last_contact
                else None,
                # the contact's own time: a watcher tells one contact from the next exactly
                "last_contact_at": self.view.last_contact or None,
                "connected": bool(self.view.last_contact)
                and now - self.view.last_contact < max(30.0, 3 * self.view.heartbeat_interval),
                "last_error": self.view.last_error,
                "trust_version": self.view.trust_version,
            },
            "ssh": {
                "address": cfg.advertised(),
                "port": self.server_port,
                "host_key": public_line(self.host_key),
            },
            "roles": cfg.roles,
            "docker_url": cfg.docker_url,
            "containerd": {"address": cfg.containerd_address, "namespace": cfg.containerd_namespace}
            if cfg.containerd_address
            else None,
            "holdings": holdings,
            "partials": [
                {"digest": d, "have": have, "count": n} for d, have, n in self.store.partials()
            ],
            "images": [{"ref": r, "loaded_at": t} for r, t in sorted(self.view.images.items())],
            "active": [
                {
                    "transfer_id": w.transfer_id,
                    "layer": w.layer,
                    "seeder": w.seeder,
                    "bytes_done": w.bytes_done,
                    "bytes_total": w.bytes_total,
                    "rate_bps": w.rate_bps,
                    "seconds": now - w.started,
                }
                for w in self.view.active.values()
            ],
            "disk": {"used": self.store.bytes_used(), "free": self.store.bytes_free()},
            "metrics_url": self.metrics_server.url if self.metrics_server is not None else "",
            "mirror_url": self.mirror.url if self.mirror is not None else "",
            # ref -> manifest digest the front door serves (pull REPO@DIGEST from it)
            "mirror_images": dict(sorted(self.catalog.recorded.items())),
            "store": self.hygiene.status(),
            "served_bytes": dict(self.server.bytes_served),
            "relayed_chunks": self.relay.relayed_chunks,
            "corrupt_layers": dict(self.server.corrupt_layers),
            "refused_clients": len(self.server.refused_clients),
            "ssh_refused": dict(self.server.gate.refused),
            # peers with an authenticated SSH connection open now, and how many each
            "ssh_peers": dict(self.server.gate.per_peer),
            "reports": {
                "sent": self.reports.sent,
                "retries": self.reports.retries,
                "refused": self.reports.refused,
                "lost": self.reports.lost,
            },
            "origin_reads": self.view.origin_reads,
            "security_events": list(self.view.security_events),
        }


def _write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    os.replace(tmp, path)
