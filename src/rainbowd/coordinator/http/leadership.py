"""A coordinator on PostgreSQL: stand by, take over, step down (issue 16).

Any number of coordinators share one PostgreSQL; the one holding the lease
row leads (docs/standby-coordinator.md, "Leader election"). :class:`Leadership` runs the
lease for one process -- the decisions are rainbowd.core.lease's
:class:`~rainbowd.core.lease.LeaseKeeper`, the statements
coordinator/state/lease.py -- and serves the app of its role on its one
address:

* **standby**: coordinator/http/standby.py (health, metrics, 503 +
  ``RBD-Leader`` naming the leader it read from the lease row). No scheduler,
  no view of the cluster: it would be stale by the time it led.
* **takeover** (an acquire won): the store is fenced with the new token, a
  :class:`~rainbowd.coordinator.core.Coordinator` is built -- which is the
  restart path, coordinator/restore.py: nodes, images, jobs and transfers in
  flight reloaded, every node down until its next heartbeat re-adopts it --
  and its app replaces the standby's. The takeover is a ``leader_takeover``
  event in ``rbd events`` and a warning in the log;
  ``rbd_coordinator_is_leader`` goes to 1.
* **step down** (the keeper's own deadline passed, a renew updated no row, or
  the fence refused a write): the leader's app answers 503 at once (its role
  flips), every later write of this process is refused (its fence token is
  one no row has), and the standby's app replaces it. The process lives on as
  a standby and may lead again later with a new token.

The process binds its listening socket once, for its whole life, and each
role's app is served on a duplicate of it: the new app starts accepting before
the old one stops, so a role switch never refuses a connection (a CI run once
reset a health request that met a takeover in the gap of a stop-and-rebind).
The old app stops accepting at once and is torn down ``ROLE_SWITCH_GRACE_S``
later, so connections it had already accepted still get their answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from rainbowd.core.lease import Action, LeaseKeeper

from ..core import Coordinator
from ..enrollment import Tokens
from ..limits import server_options
from ..metrics import CoordinatorMetrics
from ..state import StateError
from ..state.lease import LeaderRow, acquire, read_leader, release, renew
from .app import create_app
from .role import Role
from .standby import create_standby_app

if TYPE_CHECKING:  # (the driver is loaded only by a coordinator on PostgreSQL)
    from ..state.postgres import PostgresStore

log = structlog.get_logger(__name__)

#: seconds the app of a role that was replaced keeps answering the connections it had
#: accepted (a request on its way in when the new app started), and then the time requests
#: in flight get to finish before they are cancelled (a parked long-poll would otherwise
#: hold the old app for its whole wait)
ROLE_SWITCH_GRACE_S = 1.0
#: the fence token of a coordinator that stepped down: no lease row has it, so every
#: write it still tries is refused (tokens start at 1)
STOPPED_TOKEN = -1
#: connections the kernel queues while no app has accepted them yet (aiohttp's default)
LISTEN_BACKLOG = 128
#: the security-event kind of a takeover (``rbd events``)
TAKEOVER_EVENT = "leader_takeover"


def bind_listener(host: str, port: int) -> socket.socket:
    """The coordinator's listening socket on ``host:port`` (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def stop_accepting(fd: int) -> None:
    """Stop a server accepting on ``fd`` and let the connections it just accepted settle.

    Closing an asyncio server right after its socket was readable drops a
    connection it accepted but had not yet given a transport (CPython 3.11:
    ``Server._attach`` asserts the server is open; the accepted socket leaks and
    the client sees a hang, then a reset). So the accepting stops first, and one
    turn of the loop lets those connections get their transports before the
    server is closed.
    """
    asyncio.get_running_loop().remove_reader(fd)
    await asyncio.sleep(0)


def holder_id() -> str:
    """A name for this process in the lease row: host, pid, and a random part (restarts)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Leadership:
    """One coordinator process on PostgreSQL: runs its lease and serves its role's app."""

    def __init__(
        self,
        store: PostgresStore,
        make_coordinator: Callable[[], Coordinator],
        tokens: Tokens,
        *,
        host: str,
        port: int,
        url: str = "",
        keeper: LeaseKeeper | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_listening: Callable[[str, int], None] | None = None,
    ) -> None:
        self.store = store
        self.make_coordinator = make_coordinator
        self.tokens = tokens
        self.host, self.port = host, port
        #: this process's URL (the lease row's ``url``); "" = http://HOST:PORT once bound
        self.url = url
        self.holder = holder_id()
        self.keeper = keeper if keeper is not None else LeaseKeeper()
        self.clock = clock
        self.on_listening = on_listening
        #: the coordinator while leading, else None
        self.coordinator: Coordinator | None = None
        self.role = Role(leading=False)
        self.standby_metrics = CoordinatorMetrics()
        self.standby_metrics.is_leader.set(0)
        self._runner: web.AppRunner | None = None
        #: the listening socket, bound once; each role's app accepts on a duplicate of it
        self._listener: socket.socket | None = None
        #: the file descriptor the current app accepts on (its duplicate of the listener)
        self._accepting_fd = -1
        #: apps of earlier roles being torn down (owned here: awaited on shut-down)
        self._retiring: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._fenced = False
        self._stopping = False
        #: the URL of the last other coordinator seen holding the lease, live or lapsed: the
        #: takeover names it. (``role.leader_url`` is "" once the lease lapses, and a standby
        #: whose acquire lost the race with the lapse reads the row after it: named there,
        #: the killed leader would be forgotten by the time this process takes over.)
        self._last_leader_seen = ""
        store.on_fenced = self._on_fenced

    # -- the loop ---------------------------------------------------------
    async def run(self) -> None:
        """Serve as a standby, then lead or stand by as the lease says, until :meth:`stop`."""
        await self._serve(create_standby_app(self.role, self.tokens, self.standby_metrics))
        try:
            while not self._stopping:
                now = self.clock()
                if self._fenced:
                    self._fenced = False
                    if self.keeper.leading:
                        self.keeper.deposed(now)
                        await self._step_down("a write was refused: another coordinator leads")
                    continue
                step = self.keeper.step(now)
                if step.action is Action.ACQUIRE:
                    await self._try_acquire(now)
                elif step.action is Action.RENEW:
                    await self._renew(now)
                elif step.action is Action.STEP_DOWN:
                    await self._step_down("no renew answered within the lease (own clock)")
                else:
                    await self._sleep(step.wake_at - now)
        finally:
            await self._shut_down()

    def stop(self) -> None:
        """End :meth:`run` (SIGTERM): a leader releases its lease so a standby leads at once."""
        self._stopping = True
        self._wake.set()

    def _on_fenced(self) -> None:
        """The store refused a write (called inside a request): step down at the next turn."""
        self._fenced = True
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, seconds))
        self._wake.clear()

    # -- acquire, renew ---------------------------------------------------
    async def _try_acquire(self, sent_at: float) -> None:
        try:
            token = acquire(self.store, self.holder, self.url, self.keeper.lease_s)
            row = None if token is not None else read_leader(self.store)
        except StateError as e:
            log.warning("lease: cannot reach the state database", error=str(e))
            self.keeper.acquire_failed(sent_at)
            return
        if token is None:
            assert row is not None
            self.keeper.acquire_failed(sent_at)
            self.role.leader_url = row.url if row.live else ""
            if row.url and row.url != self.url:
                self._last_leader_seen = row.url
            return
        self.keeper.acquired(sent_at, token)
        await self._take_over(token)

    async def _renew(self, sent_at: float) -> None:
        token = self.keeper.token
        assert token is not None
        try:
            ours = renew(self.store, token, self.keeper.lease_s)
        except StateError as e:
            log.warning("lease: renew failed; still leading until the lease ends", error=str(e))
            self.keeper.renew_failed(sent_at)
            return
        if ours:
            self.keeper.renewed(sent_at)
            return
        self.keeper.deposed(self.clock())
        await self._step_down("the renew updated no row: another coordinator took the lease")

    # -- the roles ----------------------------------------------------------
    async def _take_over(self, token: int) -> None:
        """Lead with ``token``: fence the store, rebuild the state (restore.py), swap apps."""
        previous = self._last_leader_seen
        self.store.fence_token = token
        started = self.clock()
        try:
            coordinator = self.make_coordinator()
        except StateError as e:
            log.error("takeover failed: the state did not load; standing by", error=str(e))
            self.store.fence_token = STOPPED_TOKEN
            self.keeper.deposed(self.clock())
            return
        leader_role = Role(leading=True, leader_url=self.url)
        app = create_app(coordinator, role=leader_role)
        await self._serve(app)
        self.role = leader_role
        self.coordinator = coordinator
        detail = (
            f"{self.holder} at {self.url} leads with lease token {token}"
            f" (the last leader seen: {previous or 'none'})"
        )
        with contextlib.suppress(StateError):  # (fenced already: the step-down follows)
            self.store.add_security_event("coordinator", self.url, TAKEOVER_EVENT, detail)
        log.warning(
            "took over as the leader",
            url=self.url,
            holder=self.holder,
            token=token,
            previous=previous,
            restore_seconds=round(self.clock() - started, 3),
        )

    async def _step_down(self, why: str) -> None:
        """Stop leading now: 503 at once, every later write refused, the standby's app served."""
        self.role.leading = False
        self.role.leader_url = ""
        self.store.fence_token = STOPPED_TOKEN
        if self.coordinator is not None:
            self.coordinator.metrics.is_leader.set(0)
        self.coordinator = None
        log.warning("stepped down: no longer the leader", why=why, url=self.url)
        self.role = Role(leading=False)
        await self._serve(create_standby_app(self.role, self.tokens, self.standby_metrics))

    async def _serve(self, app: web.Application) -> None:
        """Serve ``app`` on this process's address in place of the app served until now.

        The new app accepts (on a duplicate of the one listening socket) before the old
        one stops: there is no moment in which a connection is refused.
        """
        if self._listener is None:
            self._listener = bind_listener(self.host, self.port)
            self.port = int(self._listener.getsockname()[1])  # port 0 asked: keep the one bound
            if not self.url:
                self.url = f"http://{self.host}:{self.port}"
        runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=ROLE_SWITCH_GRACE_S,
            **server_options(),
        )
        await runner.setup()
        sock = self._listener.dup()
        await web.SockSite(runner, sock).start()
        old, self._runner = self._runner, runner
        old_fd, self._accepting_fd = self._accepting_fd, sock.fileno()
        if old is not None:
            await stop_accepting(old_fd)
            for site in list(old.sites):
                await site.stop()  # closes its listening duplicate; its connections live on
            task = asyncio.create_task(self._retire(old), name="retire-role-app")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        if self.on_listening is not None:  # the first time only
            self.on_listening(self.host, self.port)
            self.on_listening = None

    @staticmethod
    async def _retire(runner: web.AppRunner) -> None:
        """Tear down the app of a replaced role once its accepted connections had their grace."""
        await asyncio.sleep(ROLE_SWITCH_GRACE_S)
        await runner.cleanup()

    async def _shut_down(self) -> None:
        token = self.keeper.token
        if token is not None:
            with contextlib.suppress(StateError):
                release(self.store, token)
            log.info("lease released", token=token)
        self.role.leading = False
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for task in list(self._retiring):
            task.cancel()
        for task in list(self._retiring):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def leader_row(self) -> LeaderRow:
        """The lease row as the database has it now (for tests and ``rbd status``)."""
        return read_leader(self.store)
