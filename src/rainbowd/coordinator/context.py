"""What every coordinator service shares: the narrow context it is built with.

The coordinator is a set of services (enrollment, liveness, dispatch, transfer
reports, quarantine, jobs, images, holdings; core.py wires them). None of them
is handed the whole coordinator: each gets this context -- the state store, the
scheduler (and the job driver over it), the cluster registry, the clock, an id
source, the metrics hooks and the settings -- plus the few other services it
calls, named in its constructor. So a service's dependencies are what its
constructor says, and a test can build one with fakes.

Mutable on purpose: :class:`Settings` is shared by reference, so a setting
changed on the coordinator (tests shorten ``node_down_timeout``) is seen by
every service at once, as it was when they were one class.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from rainbowd.core.sched.jobdriver import JobDriver
from rainbowd.core.sched.pieces import PieceScheduler

from .cluster import Cluster, Node
from .metrics import CoordinatorMetrics
from .state import StateStore

#: random hex characters of a generated job, load or ingest id (after its "j-"/"l-"/"i-")
ID_HEX_BYTES = 6

#: starts scheduling at ``now``: how a service asks for transfers without owning dispatch
Schedule = Callable[[float], None]


def random_id(prefix: str) -> str:
    """A fresh id such as ``j-1a2b3c4d5e6f`` (the id source of a real coordinator)."""
    return f"{prefix}-{secrets.token_hex(ID_HEX_BYTES)}"


@dataclass
class Settings:
    """The coordinator's tunables, shared by every service (see core.py for the defaults)."""

    heartbeat_interval: float
    chunk_size: int
    node_down_timeout: float
    seeder_fault_limit: int


@dataclass(frozen=True)
class ServiceContext:
    """State store, scheduler, cluster registry, clock, id source, metrics and settings."""

    store: StateStore
    scheduler: PieceScheduler
    cluster: Cluster
    clock: Callable[[], float]
    metrics: CoordinatorMetrics
    settings: Settings
    #: ``new_id("j")`` -> a fresh job id; "l" loads, "i" ingests
    new_id: Callable[[str], str] = random_id
    #: the rules that turn jobs, reports and faults into scheduler calls
    #: (rainbowd.core.sched.jobdriver): the services decide nothing about the scheduler themselves
    driver: JobDriver = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "driver", JobDriver(self.scheduler, self.settings))

    def save_node(self, node: Node) -> None:
        """Persist ``node`` (its record and its mailbox sequence)."""
        self.store.save_node(node.stored(), node.mailbox.seq)

    def save_trust_version(self) -> None:
        """Persist the trust list's version (agents compare it to fetch a newer list)."""
        self.store.set_meta("trust_version", str(self.cluster.trust_version))
