"""Prometheus metrics of one agent, and the small HTTP server that exposes them.

What is counted where, and why:

* **Received** (``rbd_agent_bytes_received_total{peer}``), **chunk failures**
  (``rbd_agent_chunk_failures_total{peer,reason}``) and **transfer durations**
  (``rbd_agent_transfer_duration_seconds{outcome}``) are event hooks the
  :class:`~rainbowd.agent.dataplane.puller.LayerPuller` calls as chunks arrive and pulls
  end. ``peer`` is the seeder's node id.
* **Served** (``rbd_agent_bytes_served_total{peer}``, chunks too) is read at
  scrape time from the :class:`~rainbowd.agent.dataplane.ssh_server.ChunkServer`'s own
  per-peer tallies, the ones ``rbd-agent status`` prints, so the two can never
  disagree and the serving hot path gains nothing. ``peer`` is the demander's
  node id, as the trust list names the client key it authenticated with.
* **Chunk channels** (``rbd_agent_chunk_channels_total{how}``): ``opened`` for a
  pull that opened an SSH channel to its seeder, ``reused`` for one that took the
  channel an earlier pull from that seeder left idle
  (:class:`~rainbowd.agent.dataplane.chunk_channels.ChunkChannels` calls it).
* **Registry front door** (``rbd_agent_mirror_requests_total{kind,outcome}``,
  ``rbd_agent_mirror_bytes_served_total``) are hooks the
  :class:`~rainbowd.agent.mirror.server.MirrorServer` calls per request and as
  it sends; a rising ``outcome="miss"`` is pulls this node sent to the upstream.
* **State** (active transfers, store bytes, disk free, layers held, partial
  and corrupt layers, refused client keys) is read at scrape time. The store
  figures walk the store directory, so a scrape refreshes them in a worker
  thread first (:meth:`AgentMetrics.exposition_async`), never on the loop.

Each :class:`AgentMetrics` owns its :class:`~prometheus_client.CollectorRegistry`
(no global default registry: tests run several agents' parts in one process).

Consistency a cluster-wide query can rely on: for seeder S and demander D,
``S.served{peer=D}`` equals ``D.received{peer=S}`` once D's pulls from S have
ended, apart from chunks in flight when a pull broke (served, never received).

The endpoint (``metrics_listen``, off by default) answers ``GET /metrics``;
with ``metrics_token_file`` set it requires ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from rainbowd.lib.httplisten import listen

if TYPE_CHECKING:
    from rainbowd.lib.store import LayerStore

    from .dataplane.ssh_server import ChunkServer

log = structlog.get_logger(__name__)


class _Pulls(Protocol):
    def pulling(self) -> Sized: ...


class Watched(Protocol):
    """What a scrape reads of the agent (agent/agent.py's ``Agent``), and no more.

    A protocol, not the class: the agent imports this module, so this one must
    not import the agent (no import cycle, tests/contracts/test_import_contracts.py).
    """

    @property
    def store(self) -> LayerStore: ...
    @property
    def server(self) -> ChunkServer: ...
    @property
    def view(self) -> _Pulls: ...


TRANSFER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
#: reasons of ``rbd_agent_chunk_failures_total`` (chunksession.FetchFailureLabel names those of a
#: fetch; LayerPuller counts them)
CHUNK_FAILURE_REASONS = (
    "bad_chunk",  # a chunk failed its manifest hash
    "out_of_order",  # the seeder sent another chunk than the one due
    "seeder_corrupt",  # the seeder found its own stored copy corrupt and said so
    "seeder_error",  # the seeder answered an ERROR frame (layer not held, ...)
    "protocol",  # the chunk protocol was violated
    "timeout",  # no chunk within the chunk timeout
    "channel_closed",  # the channel closed with chunks outstanding
    "layer_digest",  # every chunk matched, the whole layer did not
)
#: seconds a scrape may take before the server gives up (store walk included)
SCRAPE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class _StoreStats:
    used: int = 0
    free: int = 0
    layers: int = 0
    partials: int = 0


class AgentMetrics:
    """One agent's metrics: hooks for the puller, a scrape-time view of the rest."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.bytes_received = Counter(
            "rbd_agent_bytes_received_total",
            "Chunk bytes received from each seeder (counted as they arrive, before "
            "verification; rejected ones also count in rbd_agent_chunk_failures_total).",
            ["peer"],
            registry=r,
        )
        self.chunk_failures = Counter(
            "rbd_agent_chunk_failures_total",
            "Pulls broken by a chunk-level failure, by seeder and reason.",
            ["peer", "reason"],
            registry=r,
        )
        self.transfer_seconds = Histogram(
            "rbd_agent_transfer_duration_seconds",
            "Duration of layer pulls, by outcome: done, cancelled, or the failure kind "
            "(io, unreachable, verify, security, disk).",
            ["outcome"],
            buckets=TRANSFER_BUCKETS,
            registry=r,
        )
        self.chunk_channels = Counter(
            "rbd_agent_chunk_channels_total",
            "Chunk channels pulls took, by how: opened (a new SSH channel to the seeder) "
            "or reused (the one an earlier pull from that seeder left idle).",
            ["how"],
            registry=r,
        )
        self.mirror_requests = Counter(
            "rbd_agent_mirror_requests_total",
            "Requests to the registry front door (mirror_listen), by what was asked "
            "(base, manifest, blob, other) and the answer (hit; streamed: a blob sent "
            "in part while its layer was still landing here; miss: a 404 the client "
            "falls back on; invalid: a 4xx for a bad name, digest or range; error: a "
            "layer that failed its check, went or stopped coming while being read).",
            ["kind", "outcome"],
            registry=r,
        )
        self.mirror_bytes_served = Counter(
            "rbd_agent_mirror_bytes_served_total",
            "Manifest and blob bytes the registry front door sent to this host's clients.",
            registry=r,
        )
        self._store = _StoreStats()
        self._agent: Watched | None = None

    def watch(self, agent: Watched) -> None:
        """Read ``agent``'s server tallies and state at every scrape (call once)."""
        self._agent = agent
        self.registry.register(_AgentCollector(self))

    # -- hooks the puller calls -------------------------------------------
    def received(self, peer: str, nbytes: int) -> None:
        self.bytes_received.labels(peer).inc(nbytes)

    def chunk_failure(self, peer: str, reason: str) -> None:
        self.chunk_failures.labels(peer, reason).inc()

    def transfer_ended(self, outcome: str, seconds: float) -> None:
        self.transfer_seconds.labels(outcome).observe(max(0.0, seconds))

    def chunk_channel(self, how: str) -> None:
        self.chunk_channels.labels(how).inc()

    # -- hooks the registry front door calls (agent/mirror/server.py) -----
    def mirror_request(self, kind: str, outcome: str) -> None:
        self.mirror_requests.labels(kind, outcome).inc()

    def mirror_bytes(self, nbytes: int) -> None:
        self.mirror_bytes_served.inc(nbytes)

    # -- exposition --------------------------------------------------------
    def refresh_store(self) -> None:
        """Blocking (walks the store): run in a worker thread."""
        agent = self._agent
        if agent is None:
            return
        store = agent.store
        self._store = _StoreStats(
            used=store.bytes_used(),
            free=store.bytes_free(),
            layers=len(store.holdings()),
            partials=sum(1 for _ in store.partials()),
        )

    def exposition(self) -> bytes:
        """The text exposition (``CONTENT_TYPE_LATEST``), store figures as last refreshed."""
        return generate_latest(self.registry)

    async def exposition_async(self) -> bytes:
        """Refresh the store figures off the loop, then expose everything."""
        await asyncio.to_thread(self.refresh_store)
        return self.exposition()


class _AgentCollector(Collector):
    """Served tallies and state, read when scraped (on the event loop thread)."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        agent = self._m._agent
        if agent is None:
            return
        server = agent.server
        served = CounterMetricFamily(
            "rbd_agent_bytes_served",
            "Chunk bytes this agent's SSH server sent to each demanding peer.",
            labels=["peer"],
        )
        for peer, n in sorted(dict(server.bytes_served).items()):
            served.add_metric([peer], n)
        yield served
        chunks = CounterMetricFamily(
            "rbd_agent_chunks_served",
            "Chunks this agent's SSH server sent to each demanding peer.",
            labels=["peer"],
        )
        for peer, n in sorted(dict(server.chunks_served).items()):
            chunks.add_metric([peer], n)
        yield chunks
        yield CounterMetricFamily(
            "rbd_agent_refused_clients",
            "SSH client keys refused because they are not on the trust list.",
            value=server.refused_count,
        )
        yield GaugeMetricFamily(
            "rbd_agent_corrupt_layers",
            "Stored layers found corrupt while serving them (refused, not sent).",
            value=len(server.corrupt_layers),
        )
        yield GaugeMetricFamily(
            "rbd_agent_active_transfers",
            "Transfers assigned to this agent and not finished (pulling or waiting to).",
            value=len(agent.view.pulling()),
        )
        st = self._m._store
        yield GaugeMetricFamily(
            "rbd_agent_store_bytes",
            "Disk space used by the layer store (complete and partial layers).",
            value=st.used,
        )
        yield GaugeMetricFamily(
            "rbd_agent_disk_free_bytes",
            "Free space on the file system of the layer store.",
            value=st.free,
        )
        yield GaugeMetricFamily(
            "rbd_agent_layers", "Complete, verified layers held.", value=st.layers
        )
        yield GaugeMetricFamily(
            "rbd_agent_partial_layers",
            "Partial layers in the store (resume points).",
            value=st.partials,
        )


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class MetricsServer:
    """``GET /metrics`` on ``host:port`` (aiohttp), optionally behind a bearer token."""

    def __init__(self, metrics: AgentMetrics, host: str, port: int, token: str = "") -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self.token = token
        self._runner: web.AppRunner | None = None
        #: the address actually bound (port 0 asks for an ephemeral one)
        self.bound: tuple[str, int] | None = None

    @property
    def url(self) -> str:
        if self.bound is None:
            return ""
        host, port = self.bound
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    async def start(self) -> tuple[str, int]:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner, self.bound = await listen(app, self.host, self.port, "metrics_listen")
        log.info("metrics_listening", url=self.url, token=bool(self.token))
        return self.bound

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.token:
            given = bearer(request.headers.get("Authorization"))
            if given is None:
                return web.Response(
                    status=401,
                    text="metrics: send 'Authorization: Bearer <token>' "
                    "(the token in this agent's metrics_token_file)\n",
                )
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return web.Response(status=403, text="metrics: the token is wrong\n")
        try:
            body = await asyncio.wait_for(self.metrics.exposition_async(), SCRAPE_TIMEOUT)
        except TimeoutError:
            return web.Response(
                status=503, text=f"metrics: store not readable within {SCRAPE_TIMEOUT:.0f}s\n"
            )
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
