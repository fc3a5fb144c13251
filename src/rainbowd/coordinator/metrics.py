"""Prometheus metrics of the coordinator, served at ``GET /metrics``.

Two kinds, both in one :class:`~prometheus_client.CollectorRegistry` owned by
one :class:`CoordinatorMetrics` (never the library's global default registry:
tests run several coordinators in one process, and a global registry would
mix their numbers or refuse the second one's metric names):

* **Events** the core reports through small hooks as they happen: scheduler
  decisions, heartbeats, finished jobs, transfer outcomes, seeder faults,
  quarantines. Counters and histograms, updated on the event loop thread.
* **State** read at scrape time (nodes by state, pending demands, active
  transfers, parked long-polls, jobs by state), by a custom collector, from a
  :class:`MetricsSnapshot` the coordinator builds when asked
  (coordinator/views.py). Nothing has to keep a gauge in step with the state:
  a scrape shows exactly what ``rbd nodes`` / ``rbd jobs`` would. The
  collector sees only the snapshot, never the coordinator, so this module
  imports nothing of the coordinator.

Names follow the Prometheus conventions: ``rbd_`` prefix, base units in the
name (``_seconds``, ``_bytes``), ``_total`` for counters. Label values are
small fixed sets (states, outcomes, failure kinds) except ``seeder``, which is
a node id: bounded by the cluster size.

Who may read it: ``Authorization: Bearer <metrics token>`` (a token of its
own, so Prometheus never holds the admin token) or the admin token; see
:meth:`rainbowd.coordinator.core.Coordinator.check_metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

#: node states of ``rbd_coordinator_nodes`` (each node is in exactly one)
NODE_STATES = ("up", "suspect", "down", "quarantined")
#: job states of ``rbd_coordinator_jobs``
JOB_STATES = ("running", "done", "failed")

# A schedule() call walks the pending demands; microseconds on a small
# cluster, milliseconds on a large one. Buckets span both.
DECISION_BUCKETS = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 1)
HEARTBEAT_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
TRANSFER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
JOB_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)

__all__ = ["CONTENT_TYPE_LATEST", "CoordinatorMetrics", "MetricsSnapshot"]


@dataclass(frozen=True)
class MetricsSnapshot:
    """The coordinator's state as the scrape-time gauges show it (counts only)."""

    #: (state, count) for every state of NODE_STATES, in that order
    nodes: tuple[tuple[str, int], ...]
    #: (state, count) for every state of JOB_STATES (and any other a job is in)
    jobs: tuple[tuple[str, int], ...]
    pending_demands: int
    active_transfers: int
    polls_parked: int


class CoordinatorMetrics:
    """The coordinator's metrics: event hooks for the core, plus a scrape-time state view."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.decision_seconds = Histogram(
            "rbd_scheduler_decision_seconds",
            "Wall time of each scheduler decision (one schedule() call).",
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.transfers_started = Counter(
            "rbd_scheduler_transfers_started_total",
            "Transfers the scheduler started (queued to a demander).",
            registry=r,
        )
        self.heartbeat_seconds = Histogram(
            "rbd_heartbeat_duration_seconds",
            "Time the coordinator took to handle one agent heartbeat (including the "
            "scheduling it triggered).",
            buckets=HEARTBEAT_BUCKETS,
            registry=r,
        )
        self.transfers = Counter(
            "rbd_transfers_total",
            "Layer transfers that ended, by outcome: done (reported verified), failed "
            "(reported failed), aborted (dropped by the coordinator: node down, quarantine).",
            ["outcome"],
            registry=r,
        )
        self.transfer_failures = Counter(
            "rbd_transfer_failures_total",
            "Failed transfers by the failure kind the demander reported.",
            ["kind"],
            registry=r,
        )
        self.transfer_seconds = Histogram(
            "rbd_transfer_duration_seconds",
            "Duration of transfers that ended with a report: done (as the demander "
            "measured it) or failed (from assignment to the report).",
            ["outcome"],
            buckets=TRANSFER_BUCKETS,
            registry=r,
        )
        self.transfer_bytes = Counter(
            "rbd_transfer_bytes_total",
            "Chunk bytes moved by transfers reported done.",
            registry=r,
        )
        self.seeder_faults = Counter(
            "rbd_seeder_faults_total",
            "Transfers spoiled by bad chunks, or bad_chunk events, counted against a seeder.",
            ["seeder"],
            registry=r,
        )
        self.quarantines = Counter(
            "rbd_quarantines_total",
            "Nodes quarantined (host key mismatch, or too many seeder faults).",
            registry=r,
        )
        self.is_leader = Gauge(
            "rbd_coordinator_is_leader",
            "1 while this coordinator leads (schedules and assigns), 0 while it is a "
            "standby; a coordinator on SQLite always leads.",
            registry=r,
        )
        self.job_seconds = Histogram(
            "rbd_job_duration_seconds",
            "Duration of distribution jobs, from creation to their final state.",
            ["state"],
            buckets=JOB_BUCKETS,
            registry=r,
        )

    def watch(self, snapshot: Callable[[], MetricsSnapshot]) -> None:
        """Call ``snapshot`` at every scrape for the state gauges (call once)."""
        self.registry.register(_StateCollector(snapshot))

    def exposition(self) -> bytes:
        """The text exposition format (``CONTENT_TYPE_LATEST``) of every metric."""
        return generate_latest(self.registry)

    # -- hooks the core calls --------------------------------------------
    def decision(self, seconds: float, started: int) -> None:
        self.decision_seconds.observe(seconds)
        if started:
            self.transfers_started.inc(started)

    def heartbeat(self, seconds: float) -> None:
        self.heartbeat_seconds.observe(seconds)

    def transfer_done(self, seconds: float, nbytes: int) -> None:
        self.transfers.labels("done").inc()
        self.transfer_seconds.labels("done").observe(max(0.0, seconds))
        self.transfer_bytes.inc(max(0, nbytes))

    def transfer_failed(self, kind: str, seconds: float) -> None:
        self.transfers.labels("failed").inc()
        self.transfer_failures.labels(kind).inc()
        self.transfer_seconds.labels("failed").observe(max(0.0, seconds))

    def transfers_aborted(self, count: int) -> None:
        if count:
            self.transfers.labels("aborted").inc(count)

    def seeder_fault(self, seeder: str) -> None:
        self.seeder_faults.labels(seeder).inc()

    def quarantined(self) -> None:
        self.quarantines.inc()

    def job_finished(self, state: str, seconds: float) -> None:
        self.job_seconds.labels(state).observe(max(0.0, seconds))


class _StateCollector(Collector):
    """Gauges computed at scrape time (on the event loop thread) from a fresh snapshot."""

    def __init__(self, snapshot: Callable[[], MetricsSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        g = GaugeMetricFamily("rbd_coordinator_nodes", "Enrolled nodes by state.", labels=["state"])
        for state, count in s.nodes:
            g.add_metric([state], count)
        yield g
        g = GaugeMetricFamily("rbd_coordinator_jobs", "Known jobs by state.", labels=["state"])
        for state, count in s.jobs:
            g.add_metric([state], count)
        yield g
        yield GaugeMetricFamily(
            "rbd_scheduler_pending_demands",
            "Demands (node needs layer) waiting for a seeder: the scheduler's queue depth.",
            value=s.pending_demands,
        )
        yield GaugeMetricFamily(
            "rbd_scheduler_active_transfers",
            "Transfers in flight (seeder and demander locked).",
            value=s.active_transfers,
        )
        yield GaugeMetricFamily(
            "rbd_assignment_polls_parked",
            "Agent long-polls for assignments waiting at the coordinator right now.",
            value=s.polls_parked,
        )
