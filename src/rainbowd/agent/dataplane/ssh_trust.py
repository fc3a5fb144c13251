"""Which client keys the chunk server lets in: the trust list, its refresh, the refusals.

Why a class of its own: the :class:`~rainbowd.agent.dataplane.ssh_server.ChunkServer`
answers chunk requests and keeps its connections within limits; *who* may
connect is a separate question with rules of its own. Only keys that are
some peer's ``client_key`` in the coordinator's current trust list are let
in. A key it does not know may belong to a node enrolled after our last
trust list (a stale list is not an attack): before refusing, the current list
is fetched once through ``refresh_trust`` (one fetch at a time, at most one
per :data:`TRUST_REFRESH_INTERVAL`, each bounded by
:data:`TRUST_REFRESH_TIMEOUT`, so a stranger's keys cost the coordinator at
most one request a second). A refused key is logged with its fingerprint and
the remote address, kept in :attr:`ClientTrust.refused_clients` and passed to
``on_refused`` so the agent can raise a ``client_key_refused`` security event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rainbowd.core.messages import TrustList

from .keys import KeyFormatError, key_blob

#: refused-client records kept (the counter keeps counting past this)
MAX_REFUSED_RECORDS = 256
#: an unknown client key fetches the trust list at most once per this many seconds
TRUST_REFRESH_INTERVAL = 1.0
#: longest wait for that fetch (the client's login waits meanwhile)
TRUST_REFRESH_TIMEOUT = 5.0

OnRefused = Callable[[str, str], None]
RefreshTrust = Callable[[], Awaitable[TrustList]]


@dataclass(frozen=True, slots=True)
class RefusedClient:
    """A client key that tried to authenticate and is not on the trust list."""

    fingerprint: str
    address: str
    at: float


class ClientTrust:
    """The client keys on the current trust list, by key blob, and the keys refused."""

    def __init__(
        self,
        *,
        log: Any,
        refresh_trust: RefreshTrust | None = None,
        on_refused: OnRefused | None = None,
        on_update: Callable[[Mapping[bytes, str]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: fetches the coordinator's current trust list (an unknown client key; see above)
        self.refresh_trust = refresh_trust
        self.on_refused = on_refused
        self.trust_refreshes = 0  # fetches made for unknown keys
        self.trust_version = -1
        #: recent refused client keys (newest last), see also :attr:`refused_count`
        self.refused_clients: list[RefusedClient] = []
        self.refused_count = 0
        self._clock = clock
        self._last_refresh: float | None = None
        self._refreshing: asyncio.Future[None] | None = None
        self._trusted: dict[bytes, str] = {}  # client key blob -> node id
        #: the trust list's client keys as parsed last time: key line -> blob (see update)
        self._key_blobs: dict[str, bytes] = {}
        #: the server's logger, so these lines carry its node as before
        self._log = log
        #: told the new keys after each update (the server drops peers no longer trusted)
        self._on_update = on_update

    def update(self, trust: TrustList) -> None:
        """Replace the set of client keys allowed in.

        Keys seen in the last list are not parsed again: at a cold start every
        enrollment sends every agent the whole list, so N agents parsed N keys
        N times (77 us each; in the lab, 101 agents kept 2 vCPUs busy until the
        job began). Only keys still listed are remembered.
        """
        trusted: dict[bytes, str] = {}
        blobs: dict[str, bytes] = {}
        for peer in trust.peers:
            if not peer.client_key:
                continue
            blob = self._key_blobs.get(peer.client_key)
            if blob is None:
                try:
                    blob = key_blob(peer.client_key)
                except KeyFormatError as e:
                    self._log.warning("trust_bad_client_key", peer=peer.node_id, error=str(e))
                    continue
            blobs[peer.client_key] = blob
            trusted[blob] = peer.node_id
        self._key_blobs = blobs
        self._trusted = trusted
        self.trust_version = trust.version
        self._log.info("trust_updated", version=trust.version, clients=len(trusted))
        if self._on_update is not None:
            self._on_update(trusted)

    def peer_of(self, blob: bytes) -> str | None:
        """The node whose client key ``blob`` is, or None if it is not on the list."""
        return self._trusted.get(blob)

    async def refresh_for_unknown_key(self) -> None:
        """A client key not on our list: fetch the current list (shared, rate-limited)."""
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)
            return
        now = self._clock()
        if self.refresh_trust is None or (
            self._last_refresh is not None and now - self._last_refresh < TRUST_REFRESH_INTERVAL
        ):
            return
        self._last_refresh = now
        self._refreshing = asyncio.ensure_future(self._refresh(self.refresh_trust))
        try:
            await asyncio.shield(self._refreshing)
        finally:
            self._refreshing = None

    async def _refresh(self, fetch: RefreshTrust) -> None:
        self.trust_refreshes += 1
        try:
            async with asyncio.timeout(TRUST_REFRESH_TIMEOUT):
                trust = await fetch()
        except Exception as e:  # the coordinator away, or refusing: keep the list we have
            self._log.warning("trust_refresh_failed", error=f"{type(e).__name__}: {e}")
            return
        if trust.version > self.trust_version:
            self.update(trust)

    def record_refusal(self, fp: str, address: str) -> None:
        """Log and keep a refused client key, and tell ``on_refused``."""
        self.refused_count += 1
        self.refused_clients.append(RefusedClient(fp, address, time.time()))
        del self.refused_clients[:-MAX_REFUSED_RECORDS]
        self._log.warning("client_key_refused", fingerprint=fp, address=address)
        if self.on_refused is not None:
            try:
                self.on_refused(fp, address)
            except Exception:
                self._log.exception("on_refused_callback_failed")
