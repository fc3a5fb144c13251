"""Shared helpers for the coordinator tests: a real app on a loopback port, fake images.

(No tests here; pytest collects nothing from this module.)
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from aiohttp.test_utils import TestServer

from rainbowd.coordinator.core import Coordinator
from rainbowd.coordinator.hostkey_probe import ProbeOutcome, ProbeState
from rainbowd.coordinator.http.app import create_app
from rainbowd.coordinator.state.backends import open_store
from rainbowd.coordinator.state.sql import SqlStore
from rainbowd.coordinator.upstreams import parse_upstreams
from rainbowd.core.chunks import MIN_CHUNK_SIZE, ChunkManifest, build_manifest
from rainbowd.core.digest import sha256_digest
from rainbowd.core.messages import (
    ArchiveSource,
    Assignment,
    CreateImage,
    Heartbeat,
    ImageRecord,
    IngestAssignment,
    IngestDone,
    LayerRef,
    RegisterRequest,
)
from rainbowd.lib.client import AdminClient, AgentClient

JOIN = "join-secret-for-tests"
ADMIN = "admin-secret-for-tests"


class Backend:
    """The state backend of the test running now (tests/coordinator/conftest.py sets it).

    ``url_for``: None for SQLite in the state directory (the default, as the
    other suites use), else a function from a state directory to the URL of a
    PostgreSQL database of its own (the same one each time it is asked, so a
    test that restarts its coordinator on one directory finds its state).
    """

    url_for: Callable[[Path], str] | None = None


def open_state(state_dir: Path) -> SqlStore:
    """A test's state store in ``state_dir``, on the backend of the test running now.

    Typed as the backends' common class: a test may run a statement of its own
    (``execute``) to look at or damage the tables.
    """
    url = Backend.url_for(state_dir) if Backend.url_for is not None else None
    return cast(SqlStore, open_store(url, state_dir))


#: every table of the state schema (coordinator/state/sql.py)
TABLES = (
    "meta",
    "nodes",
    "images",
    "jobs",
    "job_nodes",
    "transfers",
    "security_events",
    "ops",
    "applied_reports",
    "set_aside",
    "leader",
    "image_manifests",
)


def stored_text(store: SqlStore) -> str:
    """Every row of every table, as text: to check a secret is not in the database."""
    return "\n".join(
        repr(row) for table in TABLES for row in store.execute(f"SELECT * FROM {table}").fetchall()
    )


def state_url_args(state_dir: Path) -> list[str]:
    """``rbd-coordinator`` flags that put ``state_dir``'s state on this test's backend."""
    return ["--state-url", Backend.url_for(state_dir)] if Backend.url_for is not None else []


@dataclass
class Running:
    server: TestServer
    coordinator: Coordinator
    store: SqlStore
    url: str

    async def stop(self) -> None:
        await self.server.close()
        self.store.close()

    def probe_says(self, state: ProbeState, detail: str = "SHA256:seen-by-probe") -> list[str]:
        """Play the network for the coordinator's host-key probe (coordinator/hostkey_probe.py).

        The fake agents here enroll with made-up keys and run no SSH server;
        returns the list of ``address:port`` probed, filled as probes run.
        """
        probed: list[str] = []

        async def probe(address: str, port: int, pinned: str) -> ProbeOutcome:
            probed.append(f"{address}:{port}")
            return ProbeOutcome(state, detail)

        self.coordinator.host_key_checks.probe = probe
        return probed


async def start(
    state_dir: Path,
    heartbeat_interval: float = 5.0,
    policy: str = "paper",
    clock: Callable[[], float] = time.time,
    upstreams: dict[str, Any] | None = None,
) -> Running:
    """A coordinator on loopback; ``paper`` by default, as most flow tests check Algorithm 1.

    A test of liveness passes a fake ``clock`` and calls ``check_liveness`` itself
    after moving it (the app's own liveness loop then sees no time pass).
    """
    store = open_state(state_dir)
    c = Coordinator(
        store,
        join_token=JOIN,
        admin_token=ADMIN,
        heartbeat_interval=heartbeat_interval,
        chunk_size=MIN_CHUNK_SIZE,
        policy=policy,
        clock=clock,
        upstreams=parse_upstreams(upstreams),
    )
    server = TestServer(create_app(c), host="127.0.0.1", port=0)
    await server.start_server()
    return Running(server, c, store, str(server.make_url("")).rstrip("/"))


def register_request(
    node_id: str,
    *,
    roles: Sequence[str] = (),
    docker: bool = False,
    containerd: bool = False,
    mirror: bool = False,
    speed: float = 0.0,
    holdings: Sequence[str] = (),
    join: str = JOIN,
    credential: str = "",
    address: str = "",
) -> RegisterRequest:
    return RegisterRequest(
        node_id=node_id,
        join_token=join,
        credential=credential,
        address=address or f"10.0.0.{abs(hash(node_id)) % 250 + 1}",
        ssh_port=2222,
        host_key=f"ssh-ed25519 HOSTKEY{node_id}",
        client_key=f"ssh-ed25519 CLIENTKEY{node_id}",
        roles=list(roles),
        docker=docker,
        containerd=containerd,
        mirror=mirror,
        speed_hint_bps=speed,
        holdings=list(holdings),
    )


async def enroll(url: str, node_id: str, **kw: object) -> AgentClient:
    """An open AgentClient for a freshly enrolled node (close it with ``await c.close()``)."""
    c = AgentClient(url)
    await c.open()
    await c.register(register_request(node_id, **kw))  # type: ignore[arg-type]
    return c


@dataclass
class FakeImage:
    record: ImageRecord
    manifests: list[ChunkManifest]

    @property
    def digests(self) -> list[str]:
        return [layer.digest for layer in self.record.layers]


def fake_image(ref: str = "example/app:1", sizes: Sequence[int] = (150_000, 70_000)) -> FakeImage:
    manifests = [
        build_manifest(io.BytesIO(os.urandom(n)), chunk_size=MIN_CHUNK_SIZE) for n in sizes
    ]
    config = '{"architecture":"amd64","os":"linux"}'
    record = ImageRecord(
        ref=ref,
        config_digest=sha256_digest(config.encode()),
        config=config,
        layers=[
            LayerRef(
                digest=m.digest,
                size=m.size,
                media_type="application/vnd.docker.image.rootfs.diff.tar.gzip",
                diff_id=m.digest,
            )
            for m in manifests
        ],
    )
    return FakeImage(record, manifests)


async def poll(agent: AgentClient, cursor: int = 0, wait: float = 0.0) -> list[Assignment]:
    return (await agent.assignments(cursor, 0, wait)).assignments


async def ingest(admin: AdminClient, origin: AgentClient, image: FakeImage) -> None:
    """Add ``image`` through the API and play the origin's part of the ingest."""
    view = await admin.add_image(
        CreateImage(ref=image.record.ref, source=ArchiveSource(path="/srv/app.tar"))
    )
    assert view.state == "ingesting"
    batch = await origin.assignments(0, 0, 0)
    ingests = [a for a in batch.assignments if isinstance(a, IngestAssignment)]
    assert len(ingests) == 1 and ingests[0].ref == image.record.ref
    await origin.ingest_done(
        ingests[0].ingest_id, IngestDone(image=image.record, manifests=image.manifests)
    )
    await origin.heartbeat(Heartbeat())
