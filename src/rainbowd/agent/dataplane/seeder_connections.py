"""SeederConnections: the SSH connection to each seeder, pinned, authenticated and cached.

Trust: the seeder's host key is pinned from the assignment (which the
coordinator filled from its trust list); nothing is read from ``~/.ssh``
(no config, no known_hosts, no agent, no default identities), so a spoofed
address or DNS name fails the handshake with :class:`HostKeyMismatch`. A
seeder refusing our client key is asked again a few times, since its trust
list may be behind (see :meth:`SeederConnections._dial`).

Why a module of its own: who we connect to and how we prove who they are is
one concern, apart from what a pull moves over the connection (puller.py).
One connection per seeder (node, pinned key, address, port) is shared by
every pull from it.

Kept open: the :data:`MAX_CACHED_CONNECTIONS` most recently used. Over its life
an agent pulls from many seeders (with pieces, ~10-40 per node per image on the
suite's shapes); each connection kept holds a descriptor here and one of the
seeder's ``max_connections`` slots (ssh_limits.py). Beyond the bound the least
recently used connection with no pull running is closed (:meth:`SeederConnections.use`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncssh
from structlog.typing import FilteringBoundLogger

from rainbowd.core.messages import PeerInfo

from .keys import KeyFormatError, fingerprint, key_blob, parse_public_line
from .pull_failures import HostKeyMismatch, PullError
from .ssh_server import COMPRESSION_ALGS

#: SSH user name; the server ignores it (the key is the identity)
SSH_USER = "rbd"
#: connection attempts repeated after a seeder refused our client key (see SeederConnections._dial)
TRUST_RETRIES = 2
#: seconds between them: longer than ssh_trust.TRUST_REFRESH_INTERVAL, so the seeder may
#: fetch its trust list again before the next attempt
TRUST_RETRY_DELAY = 1.5
#: connections to seeders kept open (the most recently used; module docstring). The
#: coordinator remembers as many seeders per demander and prefers them
#: (core/sched/policies/peers.py, PEERS_KEPT): the seeders it picks for their open
#: connection are the ones kept open here.
MAX_CACHED_CONNECTIONS = 64


class _Client(asyncssh.SSHClient):
    """Records the host key a seeder presented when it is not the pinned one."""

    def __init__(self) -> None:
        self.presented: str | None = None
        self.closed = False

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.presented = fingerprint(key)
        return False  # only the pinned key (known_hosts) is ever accepted

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True


_ConnKey = tuple[str, bytes, str, int]


class SeederConnections:
    """Open, pin, authenticate and cache the SSH connections to seeders."""

    def __init__(
        self,
        client_key: asyncssh.SSHKey,
        *,
        connect_timeout: float,
        encryption_algs: list[str],
        log: FilteringBoundLogger,
        max_cached: int = MAX_CACHED_CONNECTIONS,
    ) -> None:
        if max_cached < 1:
            raise ValueError(f"max_cached {max_cached}: must be at least 1")
        self.max_cached = max_cached
        self.client_key = client_key
        self.connect_timeout = connect_timeout
        self.encryption_algs = encryption_algs
        self.log = log
        self._conns: dict[_ConnKey, asyncssh.SSHClientConnection] = {}
        self._clients: dict[_ConnKey, _Client] = {}
        self._locks: dict[_ConnKey, asyncio.Lock] = {}
        self._in_use: dict[_ConnKey, int] = {}  # pulls running on each connection
        #: see _dial (an attribute so tests of a refused key need not wait)
        self.trust_retry_delay = TRUST_RETRY_DELAY

    @asynccontextmanager
    async def use(self, seeder: PeerInfo) -> AsyncIterator[asyncssh.SSHClientConnection]:
        """The connection to ``seeder`` for one pull: not closed for the bound while it runs.

        When it ends, connections beyond ``max_cached`` are closed, least recently
        used first, none with a pull running.
        """
        key, conn = await self._open(seeder)
        self._in_use[key] = self._in_use.get(key, 0) + 1
        self._trim()  # a new connection may have passed the bound
        try:
            yield conn
        finally:
            left = self._in_use.get(key, 1) - 1
            if left > 0:
                self._in_use[key] = left
            else:
                self._in_use.pop(key, None)
            self._trim()

    def open_count(self) -> int:
        """Connections kept open now (the tests read it)."""
        return sum(1 for k in self._conns if not self._clients[k].closed)

    def _trim(self) -> None:
        """Close the least recently used idle connections beyond ``max_cached``."""
        for key in [k for k in self._conns if self._clients[k].closed]:
            del self._conns[key], self._clients[key]  # closed by the seeder meanwhile
        excess = len(self._conns) - self.max_cached
        for key in list(self._conns):  # oldest use first
            if excess <= 0:
                return
            if self._in_use.get(key):
                continue
            conn = self._conns.pop(key)
            self._clients.pop(key, None)
            conn.close()
            excess -= 1
            self.log.info("seeder_connection_closed", seeder=key[0], why="least recently used")

    async def connection(self, seeder: PeerInfo) -> asyncssh.SSHClientConnection:
        """The cached SSH connection to ``seeder`` (opened and authenticated if needed).

        A pull takes it through :meth:`use`, which keeps it open while the pull runs.
        """
        return (await self._open(seeder))[1]

    async def _open(self, seeder: PeerInfo) -> tuple[_ConnKey, asyncssh.SSHClientConnection]:
        """:meth:`connection`, with its cache key; it becomes the most recently used."""
        where = f"seeder {seeder.node_id} at {seeder.address}:{seeder.ssh_port}"
        try:
            pinned = parse_public_line(seeder.host_key)
        except KeyFormatError as e:
            raise PullError("security", f"{where}: trust list host key unusable: {e}") from None
        key: _ConnKey = (seeder.node_id, key_blob(pinned), seeder.address, seeder.ssh_port)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            conn = self._conns.get(key)
            if conn is not None and not self._clients[key].closed:
                self._conns[key] = self._conns.pop(key)  # the most recently used now
                return key, conn
            self._conns.pop(key, None)
            client = _Client()
            try:
                conn = await self._dial(seeder, pinned, client)
            except asyncssh.HostKeyNotVerifiable as e:
                presented = client.presented
                reason = (
                    f"{where} presented host key {presented or '(unknown)'}, but the trust list "
                    f"pins {fingerprint(pinned)}: possible spoofing, not pulling ({e.reason})"
                )
                self.log.error(
                    "host_key_mismatch",
                    seeder=seeder.node_id,
                    address=seeder.address,
                    presented=presented,
                    pinned=fingerprint(pinned),
                )
                raise HostKeyMismatch(reason, presented) from None
            except asyncssh.PermissionDenied as e:
                raise PullError(
                    "security",
                    f"{where} refused our client key {fingerprint(self.client_key)} "
                    f"(not on its trust list yet?): {e.reason}",
                ) from None
            except TimeoutError as e:
                raise PullError("unreachable", f"{where}: connect timed out ({e})") from None
            except asyncssh.DisconnectError as e:
                raise PullError(
                    "unreachable", f"{where}: SSH handshake failed: {e.reason}"
                ) from None
            except OSError as e:
                raise PullError("unreachable", f"{where}: cannot connect: {e}") from None
            self._conns[key] = conn
            self._clients[key] = client
            self.log.info(
                "seeder_connected",
                seeder=seeder.node_id,
                address=f"{seeder.address}:{seeder.ssh_port}",
                cipher=conn.get_extra_info("send_cipher"),
            )
            return key, conn

    async def _dial(
        self, seeder: PeerInfo, pinned: asyncssh.SSHKey, client: _Client
    ) -> asyncssh.SSHClientConnection:
        """Connect and authenticate; a refused client key is tried again a few times.

        A seeder refusing our key most likely has not heard of this node yet
        (its trust list is behind; it fetches the list when it meets an
        unknown key, at most once per ssh_trust.TRUST_REFRESH_INTERVAL), so
        the connection is retried TRUST_RETRIES times, TRUST_RETRY_DELAY apart,
        before the pull fails (kind ``security``, not the seeder's fault).
        """
        for attempt in range(TRUST_RETRIES + 1):
            try:
                return await asyncssh.connect(
                    seeder.address,
                    seeder.ssh_port,
                    client_factory=lambda: client,
                    username=SSH_USER,
                    config=[],
                    known_hosts=([pinned], [], []),
                    client_keys=[self.client_key],
                    agent_path=None,
                    agent_forwarding=False,
                    x509_trusted_certs=None,
                    x509_trusted_cert_paths=[],
                    pkcs11_provider=None,
                    password=None,
                    public_key_auth=True,
                    password_auth=False,
                    kbdint_auth=False,
                    host_based_auth=False,
                    gss_auth=False,
                    gss_kex=False,
                    preferred_auth=["publickey"],
                    encryption_algs=self.encryption_algs,
                    compression_algs=COMPRESSION_ALGS,
                    connect_timeout=self.connect_timeout,
                    login_timeout=self.connect_timeout,
                    keepalive_interval=30,
                    tcp_keepalive=True,
                    client_version="rbd",
                )
            except asyncssh.PermissionDenied:
                if attempt == TRUST_RETRIES:
                    raise
                self.log.info("client_key_refused_retry", seeder=seeder.node_id, attempt=attempt)
                await asyncio.sleep(self.trust_retry_delay)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Close every cached connection."""
        conns = list(self._conns.values())
        self._conns.clear()
        self._clients.clear()
        for conn in conns:
            conn.close()
        for conn in conns:
            await conn.wait_closed()
