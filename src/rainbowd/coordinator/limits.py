"""The coordinator's limits at the door: what one node or one connection may cost it.

Field bounds of every message live with the messages (rainbowd.core.wirebounds);
this module holds the limits that are about volume and time rather than one
value, each with what happens past it (README, "Limits", lists them all):

* **security events per node**: a token bucket of ``EVENT_BURST`` events,
  refilled at ``EVENT_RATE_PER_S``; an event past it is answered 429 and not
  stored (a node that floods events cannot grow the table or the console's
  poll). The table keeps the newest ``state.MAX_STORED_EVENTS``.
* **``GET /v1/security-events``** returns one page: at most ``EVENTS_PAGE_MAX``
  events (``EVENTS_PAGE_DEFAULT`` unless ``limit=`` says otherwise).
* **holdings**: a heartbeat or registration listing more than
  ``wirebounds.MAX_HOLDINGS`` layers is refused (400); digests that are not a
  layer of any image the coordinator knows (no chunk manifest) are ignored,
  never stored, so made-up digests cost nothing.
* **HTTP connections**: one idle longer than ``KEEPALIVE_TIMEOUT`` is closed,
  and so is one whose request line and headers are not complete by then
  (aiohttp starts the same timer when a connection opens); a request body not
  received within ``BODY_READ_TIMEOUT`` is answered 408 and the connection is
  closed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: events one node may post in a burst: a real pull reports one per refused host
#: key or bad chunk, a handful per transfer at most
EVENT_BURST = 20
#: sustained events per second per node after the burst (one every 10 s)
EVENT_RATE_PER_S = 0.1
#: events in one GET /v1/security-events reply by default, and at most
EVENTS_PAGE_DEFAULT = 100
EVENTS_PAGE_MAX = 1_000

#: seconds an idle HTTP connection (or one still sending its headers) stays open;
#: longer than aiohttp clients' 15 s keep-alive, so an agent closes its idle
#: connections first and never reuses one the coordinator is closing
KEEPALIVE_TIMEOUT = 30.0
#: seconds a request body may take to arrive (a 16 MiB ingest report at 4 Mbit/s)
BODY_READ_TIMEOUT = 60.0


def server_options(keepalive_timeout: float = KEEPALIVE_TIMEOUT) -> dict[str, Any]:
    """Keyword arguments for ``web.AppRunner`` (and aiohttp's TestServer)."""
    return {"keepalive_timeout": keepalive_timeout}


def known_layers(digests: Iterable[str], manifests: Mapping[str, object]) -> list[str]:
    """The digests that are layers of an image the coordinator knows; the rest are ignored."""
    return [d for d in digests if d in manifests]


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class EventBudget:
    """A token bucket per node for security events, on the clock it is given.

    ``take(node)`` spends one token and says whether the event may be stored.
    Buckets of nodes that are full again are dropped, so the map stays as
    small as the set of nodes reporting right now.
    """

    clock: Callable[[], float]
    burst: int = EVENT_BURST
    rate_per_s: float = EVENT_RATE_PER_S
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _refused: dict[str, int] = field(default_factory=dict)  # refusals in a row, per node

    def take(self, node_id: str) -> bool:
        now = self.clock()
        b = self._buckets.get(node_id)
        if b is None:
            b = self._buckets[node_id] = _Bucket(float(self.burst), now)
        elapsed = max(0.0, now - b.at)
        b.tokens = min(float(self.burst), b.tokens + elapsed * self.rate_per_s)
        b.at = now
        if b.tokens < 1.0:
            self._refused[node_id] = self._refused.get(node_id, 0) + 1
            return False
        b.tokens -= 1.0
        self._refused.pop(node_id, None)
        self._forget_full(now)
        return True

    def refused_in_a_row(self, node_id: str) -> int:
        """Events of ``node_id`` refused since its last accepted one."""
        return self._refused.get(node_id, 0)

    def retry_after(self, node_id: str) -> float:
        """Seconds until ``node_id`` may post its next event."""
        b = self._buckets.get(node_id)
        if b is None or b.tokens >= 1.0:
            return 0.0
        return (1.0 - b.tokens) / self.rate_per_s

    def _forget_full(self, now: float) -> None:
        if len(self._buckets) < 1024:
            return
        full = [
            nid
            for nid, b in self._buckets.items()
            if b.tokens + (now - b.at) * self.rate_per_s >= self.burst
        ]
        for nid in full:
            del self._buckets[nid]
