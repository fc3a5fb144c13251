"""Pieces for playing agents against a real coordinator (no data plane).

The control-plane benchmarks (assignment_latency.py, coordinator_load.py)
talk to a real ``rbd-coordinator`` over its real HTTP/msgpack API but stand in
for the agents themselves, so that only the coordinator is measured. What
they share lives here, once: the register request a fake agent sends, a fake
image whose chunk manifests are real (the coordinator checks them), and an
:class:`AgentClient` that borrows one shared aiohttp session, so thousands of
simulated agents share one connection pool instead of opening a session each.
"""

from __future__ import annotations

import io
import json
import random

import aiohttp

from rainbowd.core import messages as m
from rainbowd.core.chunks import MIN_CHUNK_SIZE, ChunkManifest, build_manifest
from rainbowd.core.digest import sha256_digest
from rainbowd.lib.client import AgentClient


def register_request(
    node_id: str,
    join: str,
    roles: list[str],
    *,
    holdings: list[str] | None = None,
    disk_free: int = 0,
) -> m.RegisterRequest:
    """An enrollment with the join token; keys are fake (no SSH is ever attempted)."""
    return m.RegisterRequest(
        node_id=node_id,
        join_token=join,
        address="127.0.0.1",
        ssh_port=1,
        host_key=f"ssh-ed25519 HOST{node_id}",
        client_key=f"ssh-ed25519 CLIENT{node_id}",
        roles=roles,
        disk_free=disk_free,
        holdings=list(holdings or []),
    )


def make_image(
    ref: str, *, layers: int = 1, layer_bytes: int = 100_000, seed: int | None = None
) -> tuple[m.ImageRecord, list[ChunkManifest]]:
    """An image record with ``layers`` random layers and their real chunk manifests.

    ``seed`` makes the bytes (hence the digests) reproducible, so a process
    other than the one that will report the ingest can predict the layers.
    """
    rng = random.Random(seed)
    manifests = [
        build_manifest(io.BytesIO(rng.randbytes(layer_bytes)), chunk_size=MIN_CHUNK_SIZE)
        for _ in range(layers)
    ]
    config = json.dumps({"architecture": "amd64", "os": "linux", "ref": ref})
    refs = [
        m.LayerRef(digest=man.digest, size=man.size, media_type="x", diff_id=man.digest)
        for man in manifests
    ]
    rec = m.ImageRecord(
        ref=ref, config_digest=sha256_digest(config.encode()), config=config, layers=refs
    )
    return rec, manifests


class SharedSessionAgent(AgentClient):
    """An AgentClient that sends through a session owned by the caller.

    One session (one connector, one pool of keep-alive connections) for all
    simulated agents of a process is what keeps the load generator cheap;
    each agent keeps only its own credential. ``close`` leaves the shared
    session open: its owner closes it once, after every agent is done.
    """

    def __init__(self, base_url: str, session: aiohttp.ClientSession, timeout: float) -> None:
        super().__init__(base_url, timeout=timeout)
        self._session = session

    async def close(self) -> None:
        """The session is not ours to close."""
