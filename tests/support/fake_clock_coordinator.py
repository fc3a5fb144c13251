"""A real Coordinator driven directly, with a fake clock and a played host-key probe.

For the pure tests of tests/security (peer reports, stale trust lists,
holdings): no HTTP, no sleeping; time moves only when a test says so. The
agents are played by calling the coordinator's methods as the HTTP layer would.
(No tests here; pytest collects nothing from this module.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from coordinator_support import fake_image
from rainbowd.coordinator.cluster import Node
from rainbowd.coordinator.core import Coordinator
from rainbowd.coordinator.hostkey_probe import ProbeOutcome, ProbeState
from rainbowd.coordinator.state.sqlite import SqliteStore
from rainbowd.core.chunks import MIN_CHUNK_SIZE, ChunkManifest
from rainbowd.core.messages import (
    ArchiveSource,
    CreateImage,
    CreateJob,
    Heartbeat,
    ImageRecord,
    IngestAssignment,
    IngestDone,
    JobView,
    RegisterRequest,
    TransferAssignment,
    TransferDone,
)

JOIN = "join-secret-for-security-tests"
ADMIN = "admin-secret-for-security-tests"


class Clock:
    """Seconds since the epoch, as far as the coordinator knows; moved by hand."""

    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class PlayedProbe:
    """What the coordinator's own look at a host key shows (hostkey_probe.py)."""

    state: ProbeState = "match"
    calls: list[str] = field(default_factory=list)

    async def __call__(self, address: str, port: int, pinned: str) -> ProbeOutcome:
        self.calls.append(f"{address}:{port}")
        return ProbeOutcome(self.state, "SHA256:what-the-probe-saw")


@dataclass
class Image:
    record: ImageRecord
    manifests: list[ChunkManifest]

    @property
    def layers(self) -> list[str]:
        return [lr.digest for lr in self.record.layers]


class Sim:
    """One coordinator, a fake clock, and helpers to play its agents."""

    def __init__(self, tmp_path: Path, *, heartbeat_interval: float = 1.0) -> None:
        self.clock = Clock()
        self.probe = PlayedProbe()
        self.path = tmp_path / "coordinator.sqlite"
        self.heartbeat_interval = heartbeat_interval
        self.store = SqliteStore(self.path)
        self.c = self._coordinator()
        self.cursors: dict[str, int] = {}
        self.credentials: dict[str, str] = {}

    def _coordinator(self) -> Coordinator:
        return Coordinator(
            self.store,
            join_token=JOIN,
            admin_token=ADMIN,
            heartbeat_interval=self.heartbeat_interval,
            chunk_size=MIN_CHUNK_SIZE,
            policy="paper",
            clock=self.clock,
            host_key_probe=self.probe,
        )

    def restart(self) -> None:
        """A new coordinator on the same state (a restart, or a standby taking over)."""
        self.store.close()
        self.store = SqliteStore(self.path)
        self.c = self._coordinator()
        self.cursors = {}

    def close(self) -> None:
        self.store.close()

    def node(self, node_id: str) -> Node:
        return self.c.cluster.nodes[node_id]

    def enroll(
        self,
        node_id: str,
        *,
        roles: Sequence[str] = (),
        speed: float = 0.0,
        holdings: Sequence[str] = (),
    ) -> Node:
        reply = self.c.register(
            RegisterRequest(
                node_id=node_id,
                join_token=JOIN,
                address=f"10.0.0.{len(self.c.cluster.nodes) + 1}",
                ssh_port=2222,
                host_key=f"ssh-ed25519 HOSTKEY{node_id}",
                client_key=f"ssh-ed25519 CLIENTKEY{node_id}",
                roles=list(roles),
                speed_hint_bps=speed,
                holdings=list(holdings),
            )
        )
        self.credentials[node_id] = reply.credential
        return self.node(node_id)

    def add_image(
        self,
        origin: str,
        ref: str = "app:1",
        sizes: Sequence[int] = (70_000,),
        *,
        standby_origins: Sequence[str] = (),
        ingest: bool = True,
    ) -> Image:
        """Add an image and (``ingest``) play the origin's ingest of it."""
        image = self.read_image(ref, sizes)
        self.c.add_image(
            CreateImage(
                ref=ref,
                source=ArchiveSource(path="/srv/app.tar"),
                origin=origin,
                standby_origins=list(standby_origins),
            )
        )
        if ingest:
            self.ingest(origin, image)
        return image

    @staticmethod
    def read_image(ref: str = "app:1", sizes: Sequence[int] = (70_000,)) -> Image:
        """An image as an origin reads it from its source: random layers of ``sizes``."""
        image = fake_image(ref, sizes)
        return Image(image.record, image.manifests)

    def ingest(self, origin: str, image: Image) -> str:
        """Play ``origin`` taking its ingest assignment and reporting ``image``; the ingest id."""
        [task] = [a for a in self.take(origin) if isinstance(a, IngestAssignment)]
        done = IngestDone(image=image.record, manifests=image.manifests)
        self.c.ingest_done(self.node(origin), task.ingest_id, done)
        return task.ingest_id

    def job(self, image: Image, targets: list[str]) -> JobView:
        return self.c.create_job(CreateJob(image=image.record.ref, targets=targets))

    def take(self, node_id: str) -> list[object]:
        """Everything queued for ``node_id`` since its last take (its poll)."""
        batch = self.c.poll(self.node(node_id), self.cursors.get(node_id, 0), 10**9)
        if batch is None:
            return []
        self.cursors[node_id] = batch.cursor
        return list(batch.assignments)

    def transfer(self, node_id: str) -> TransferAssignment:
        transfers = [a for a in self.take(node_id) if isinstance(a, TransferAssignment)]
        assert len(transfers) == 1, transfers
        return transfers[0]

    def done(self, node_id: str, t: TransferAssignment) -> None:
        self.c.transfer_done(
            self.node(node_id), t.transfer_id, TransferDone(bytes_moved=t.layer.size, seconds=0.1)
        )

    def heartbeat(self, node_id: str, holdings: Sequence[str]) -> None:
        self.c.heartbeat(self.node(node_id), Heartbeat(holdings=list(holdings)))

    def events(self) -> list[tuple[str, str, str]]:
        """(reporter, peer, kind) of every security event recorded, oldest first."""
        return [(r, p, k) for _, r, p, k, _ in self.store.security_events()]
