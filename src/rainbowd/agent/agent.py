"""Agent: the long-running process on one host.

It enrolls with the coordinator, reports what it holds, long-polls for
assignments and carries them out: pull a layer from a peer (``transfer``),
read an image from its source (``ingest``, origin role only), or load a
complete image into Docker and/or containerd (``load``). It also serves its own layers to
trusted peers over SSH and answers ``rbd-agent status`` on a unix socket.

The parts, one concern each: ``CoordinatorLink`` (control/coordinator_link.py)
registers, heartbeats and long-polls; ``AssignmentRunner`` (assignments.py)
carries out each assignment, ``EngineLoads`` (engine_loads.py) the loads;
``AgentStatus`` (status_snapshot.py) gathers the status JSON; ``AgentView``
(view.py) is what they all know of the work. The Agent builds and wires them.

Concurrency: :meth:`Agent.run` owns one TaskGroup. Every task in it is a loop
(heartbeats, assignments, transfer reports) or one piece of work; work tasks
never let an exception escape (they report the failure to the coordinator), so
one bad layer cannot take the agent down. SIGTERM sets the stop event; the
group is cancelled and every resource is closed in reverse order.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from rainbowd.agent.assignments import AssignmentRunner
from rainbowd.agent.config import AgentConfig
from rainbowd.agent.containerd.loader import ContainerdLoader
from rainbowd.agent.control.coordinator_link import CoordinatorLink
from rainbowd.agent.control.report_batch import BatchOrSingle, TransferReporter
from rainbowd.agent.control.report_sender import ReportSender
from rainbowd.agent.dataplane.keys import load_or_create_key
from rainbowd.agent.dataplane.puller import LayerPuller
from rainbowd.agent.dataplane.relay import RelayBoard
from rainbowd.agent.dataplane.ssh_server import ChunkServer
from rainbowd.agent.docker.loader import DockerLoader
from rainbowd.agent.docker.ops import OpRunner
from rainbowd.agent.engine_loads import EngineLoads
from rainbowd.agent.hygiene import StoreHygiene
from rainbowd.agent.metrics import AgentMetrics, MetricsServer
from rainbowd.agent.mirror.catalog import ImageCatalog
from rainbowd.agent.mirror.pull_on_miss import PullOnMiss
from rainbowd.agent.mirror.resolver import CoordinatorResolver
from rainbowd.agent.mirror.server import MirrorServer
from rainbowd.agent.status import StatusServer
from rainbowd.agent.status_snapshot import AgentStatus
from rainbowd.agent.view import AgentView
from rainbowd.core import messages as m
from rainbowd.core.digest import Digest
from rainbowd.core.eviction import StoreLimits
from rainbowd.lib.client import AgentClient
from rainbowd.lib.store import LayerStore

log = structlog.get_logger(__name__)


class _Shutdown(Exception):
    """Raised inside the task group to cancel it on stop."""


class Agent:
    """The owner: builds the agent's parts, wires them, and runs them in one TaskGroup."""

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
        self.view = AgentView()
        self.metrics.watch(self)
        self.metrics_server: MetricsServer | None = None
        self.api = AgentClient(config.coordinator_urls, timeout=config.request_timeout)
        # the registry front door (agent/mirror/): off unless mirror_listen is set
        self.catalog = ImageCatalog(config.mirror_dir)
        mirror_at = config.mirror_address()
        self.mirror: MirrorServer | None = None
        #: a front door's miss of an image the coordinator knows, got by P2P (None: off)
        self.pull_on_miss: PullOnMiss | None = None
        if mirror_at is not None:
            resolver = CoordinatorResolver(
                self.api, node_id=config.node_id, timeout=config.mirror_resolve_timeout
            )
            if config.mirror_pull_stall_seconds > 0:
                self.pull_on_miss = PullOnMiss(
                    self.api,
                    self.store,
                    self.catalog,
                    node_id=config.node_id,
                    stall_s=config.mirror_pull_stall_seconds,
                    ref_of=resolver.ref_of,
                    ingesting_ref=resolver.ingesting_ref,
                )
            self.mirror = MirrorServer(
                self.store,
                self.catalog,
                *mirror_at,
                node_id=config.node_id,
                verify_reads=config.verify_served,
                hooks=self.metrics,
                on_served=lambda layer: self.hygiene.used(layer),
                on_corrupt=self._own_copy_corrupt,
                resolve=resolver,
                default_registry=config.mirror_registry,
                resolve_timeout=config.mirror_resolve_timeout,
                pulls=self.pull_on_miss,
                # blobs of layers landing here stream as their chunks are verified
                relay=self.relay,
                stall_s=config.mirror_pull_stall_seconds,
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
        self.reports = ReportSender(config.node_id, give_up_after=config.report_retry_seconds)
        # transfer progress/done/failed: several to a request (agent/control/report_batch.py)
        self.transfer_reports = TransferReporter(
            BatchOrSingle(self.api), self.view.progress, self.reports
        )
        self._stop = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        # held while a heartbeat is built and sent, and while an eviction or an image
        # removal runs and is reported: a heartbeat never re-announces a layer just
        # deleted. One lock for both ways a layer leaves the store.
        self.holdings_lock = self.hygiene.holdings_lock
        self.loads = EngineLoads(
            node_id=config.node_id,
            docker=DockerLoader(config.docker_url) if config.docker_url else None,
            containerd=ContainerdLoader(
                config.containerd_address,
                config.containerd_namespace,
                snapshotter=config.containerd_snapshotter,
            )
            if config.containerd_address
            else None,
            store=self.store,
            catalog=self.catalog,
            hygiene=self.hygiene,
            api=self.api,
            reports=self.reports,
            view=self.view,
            log=self.log,
        )
        self.ops = OpRunner(
            config.node_id,
            self.loads.docker,
            self.store,
            self.api,
            self.holdings_lock,
            docker_url=config.docker_url,
            image_removed=self._image_removed,
        )
        self.link = CoordinatorLink(
            config,
            api=self.api,
            store=self.store,
            server=self.server,
            ssh_port=lambda: self.server_port,
            host_key=self.host_key,
            client_key=self.client_key,
            loads=self.loads,
            hygiene=self.hygiene,
            view=self.view,
            log=self.log,
        )
        self.assignments = AssignmentRunner(
            config,
            api=self.api,
            store=self.store,
            view=self.view,
            puller=self.puller,
            hygiene=self.hygiene,
            catalog=self.catalog,
            loads=self.loads,
            ops=self.ops,
            reports=self.reports,
            transfer_reports=self.transfer_reports,
            log=self.log,
        )
        self.status = AgentStatus(
            config,
            api=self.api,
            store=self.store,
            view=self.view,
            host_key=self.host_key,
            server=self.server,
            relay=self.relay,
            hygiene=self.hygiene,
            reports=self.reports,
            catalog=self.catalog,
            mirror=self.mirror,
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
            self._tg.create_task(self.assignments.guarded(self._drop_corrupt(layer, why)))

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
        return busy | set(self.server.serving) | set(self.loads.loading) | mirrored

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
            if self.loads.docker is not None:
                await self.loads.docker.close()
            await status.close()
            if self.metrics_server is not None:
                await self.metrics_server.close()
            if self.mirror is not None:
                await self.mirror.close()
            if self.pull_on_miss is not None:
                await self.pull_on_miss.close()
            self.link.close()
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
        await self.link.register()
        tg.create_task(self.link.heartbeats())
        tg.create_task(self.transfer_reports.run())
        tg.create_task(self.hygiene.run(self.api, lambda: self.view.heartbeat_interval))

        def start(a: m.Assignment) -> None:
            work = self.assignments.accept(a)
            if work is not None:
                tg.create_task(work)

        await self.link.assignments(start)

    def status_snapshot(self) -> dict[str, Any]:
        """Everything ``rbd-agent status`` prints, as plain data (status_snapshot.py)."""
        metrics_url = self.metrics_server.url if self.metrics_server is not None else ""
        return self.status.snapshot(ssh_port=self.server_port, metrics_url=metrics_url)
