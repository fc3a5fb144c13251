"""CoordinatorLink: this agent's standing with the coordinator.

One concern: enroll (register, keep the credential it hands out), send a
heartbeat per interval (holdings, partials, active transfers, load, disk) and
long-poll for assignments, registering again whenever the coordinator says it
no longer knows us (401). What to do with an assignment is not its business:
it hands each one to the ``start`` callback it is given.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncssh
from structlog.typing import FilteringBoundLogger

from rainbowd.agent.config import AgentConfig
from rainbowd.agent.dataplane.keys import public_line
from rainbowd.agent.dataplane.ssh_server import ChunkServer
from rainbowd.agent.engine_loads import EngineLoads
from rainbowd.agent.hygiene import StoreHygiene
from rainbowd.agent.view import AgentView
from rainbowd.core import messages as m
from rainbowd.core.wirebounds import MAX_ACTIVE
from rainbowd.lib.client import AgentClient, ApiError, CoordinatorUnreachable
from rainbowd.lib.store import LayerStore

#: first wait after a failed register or assignments poll, seconds; doubled per failure
RETRY_FIRST = 0.5
#: longest wait between those retries, seconds
RETRY_MAX = 10.0
#: heartbeat intervals one heartbeat may spend finding the leader before it is given up
#: (the next is built afresh). A heartbeat is a snapshot of the holdings: carried across a
#: takeover for longer, it could reach the new leader after the done report of a pull that
#: ended meanwhile and undo it. The coordinator keeps a restored holding for two intervals
#: after it leads (coordinator/holdings.py HOLDING_GRACE_INTERVALS), and a takeover takes at
#: least a lease: two intervals here cannot outlive that grace.
HEARTBEAT_TIMEOUT_INTERVALS = 2.0


class EnrollmentRefused(RuntimeError):
    """The coordinator refused this node; retrying will not help."""


class CoordinatorLink:
    """Register, heartbeat and long-poll assignments for one agent."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        api: AgentClient,
        store: LayerStore,
        server: ChunkServer,
        ssh_port: Callable[[], int],
        host_key: asyncssh.SSHKey,
        client_key: asyncssh.SSHKey,
        loads: EngineLoads,
        hygiene: StoreHygiene,
        view: AgentView,
        log: FilteringBoundLogger,
    ) -> None:
        self.config = config
        self.api = api
        self.store = store
        self.server = server
        #: the port our ChunkServer listens on (known once it has started)
        self.ssh_port = ssh_port
        self.host_key = host_key
        self.client_key = client_key
        self.loads = loads
        self.hygiene = hygiene
        self.view = view
        self.log = log
        self._cursor = 0
        # held while a heartbeat is built and sent, and while an eviction or an image
        # removal runs and is reported: a heartbeat never re-announces a layer just
        # deleted. One lock for both ways a layer leaves the store.
        self.holdings_lock = hygiene.holdings_lock
        # the heartbeat's own thread: the default executor carries the data plane (chunk
        # writes with their fdatasync, serve-side reads and checks, commits), and behind a
        # queue of those a heartbeat was late by seconds on a busy host and the
        # coordinator marked a working node down
        self._control_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rbd-heartbeat")

    def close(self) -> None:
        """Let the heartbeat's thread go (after the loops are cancelled)."""
        self._control_pool.shutdown(wait=True)

    # -- enrollment ------------------------------------------------------
    async def register(self) -> None:
        async with self.holdings_lock:
            await self._register_locked()

    async def _register_locked(self) -> None:
        cfg = self.config
        docker, containerd = self.loads.docker, self.loads.containerd
        credential = ""
        if cfg.credential_file.exists():
            credential = cfg.credential_file.read_text().strip()
        req = m.RegisterRequest(
            node_id=cfg.node_id,
            join_token="" if credential else cfg.join_token(),
            credential=credential,
            address=cfg.advertised(),
            ssh_port=self.ssh_port(),
            host_key=public_line(self.host_key),
            client_key=public_line(self.client_key),
            labels=dict(cfg.labels),
            roles=list(cfg.roles),
            docker=docker is not None and await docker.available(),
            containerd=containerd is not None and await containerd.available(),
            mirror=cfg.mirror_address() is not None,
            disk_free=self.store.bytes_free(),
            speed_hint_bps=cfg.speed_hint_mbps * 1e6 / 8,
            download_hint_bps=cfg.download_hint_mbps * 1e6 / 8,
            max_upload_bps=cfg.max_upload_mbps * 1e6 / 8,
            max_download_bps=cfg.max_download_mbps * 1e6 / 8,
            holdings=self.hygiene.holdings(),
        )
        delay = RETRY_FIRST
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
            delay = min(delay * 2, RETRY_MAX)
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

    # -- heartbeats ------------------------------------------------------
    def _heartbeat(self) -> m.Heartbeat:
        """What this node runs now, and the assignment cursor that answers for it.

        Built on the event loop, where assignments arrive: every transfer up to the
        cursor is registered (``AssignmentRunner.accept``) before the cursor moves
        past it, so ``active`` plus ``reporting`` lists all of them that are not
        over. The coordinator ends a transfer this heartbeat leaves out only if its
        assignment is at or below the cursor (coordinator/transfers.py). A list
        longer than a heartbeat may carry (``MAX_ACTIVE``) is cut, and then the
        heartbeat vouches for no cursor (0), so what was cut is not taken as over.
        """
        active, reporting = self.view.active_transfers(), self.view.reporting_transfers()
        whole = len(active) <= MAX_ACTIVE and len(reporting) <= MAX_ACTIVE
        return m.Heartbeat(
            active=active[:MAX_ACTIVE],
            reporting=reporting[:MAX_ACTIVE],
            cursor=self._cursor if whole else 0,
        )

    def _store_state(self, hb: m.Heartbeat) -> m.Heartbeat:
        """The heartbeat with what the store holds: disk reads, in the control thread."""
        hb.holdings = self.hygiene.holdings()
        hb.partials = [
            m.LayerProgress(digest=d, have=have, count=n) for d, have, n in self.store.partials()
        ]
        hb.load = os.getloadavg()[0]
        hb.disk_free = self.store.bytes_free()
        hb.disk_used = self.store.bytes_used()
        return hb

    async def heartbeats(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.view.heartbeat_interval)
            started = time.monotonic()
            try:
                async with self.holdings_lock:
                    locked = time.monotonic()
                    hb = await loop.run_in_executor(
                        self._control_pool, self._store_state, self._heartbeat()
                    )
                    built = time.monotonic()
                    reply = await self.api.heartbeat(
                        hb, timeout=HEARTBEAT_TIMEOUT_INTERVALS * self.view.heartbeat_interval
                    )
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
                    await self.register()
                else:
                    self.log.warning("heartbeat failed", error=str(e))
            except OSError as e:
                # e.g. EMFILE while descriptors are short: this heartbeat is skipped, the
                # agent lives on (agent/dataplane/ssh_limits.py bounds what inbound SSH may take)
                self.view.last_error = f"node {self.config.node_id}: heartbeat: {e}"
                self.log.error("heartbeat failed on this host; retrying", error=str(e))

    # -- assignments -----------------------------------------------------
    async def assignments(self, start: Callable[[m.Assignment], object]) -> None:
        """Long-poll for assignments forever, handing each to ``start`` (which must not block)."""
        delay = RETRY_FIRST
        while True:
            try:
                batch = await self.api.assignments(
                    self._cursor, self.view.trust_version, self.config.poll_wait
                )
            except CoordinatorUnreachable as e:
                self.view.last_error = str(e)
                self.log.warning("assignments: coordinator unreachable", retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            except ApiError as e:
                self.view.last_error = str(e)
                if e.status == 401:
                    await self.register()
                else:
                    self.log.warning("assignments failed", error=str(e), retry_in=delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_FIRST
            self.view.last_contact = time.time()
            if batch.trust is not None:
                self.server.update_trust(batch.trust)
                self.view.trust_version = batch.trust.version
            for a in batch.assignments:
                start(a)
            self._cursor = batch.cursor


def _write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    os.replace(tmp, path)
