"""A rollout through rbd's front doors: every node pulls a new image from its own mirror at once.

Issue 17, item 8. The same upstream as the registry-only baseline (a
docker-registry in the origin's namespace holding the archive:
registry_system.start_registry), but each node's client asks **its own
agent's registry front door** (``mirror_listen`` on the node's address) for
the tag, as containerd or Docker would with the agent as their mirror. The
image is new to rbd: no ``rbd images add``, no ``rbd distribute``. The first
front door's resolve makes the coordinator add the image on demand
(``[upstreams]`` maps ``docker.io``, the registry a client that names none is
taken to pull from, to the lab's registry); the origin agent reads it once;
every front door joins the one pull job and answers its client once the
layers have come by P2P (coordinator/pulls.py, agent/mirror/pull_on_miss.py).

Untimed: the registry started and the archive pushed; rbd started (coordinator
in the hub, one agent per node, front doors on). Timed: from the moment every
client is started (skopeo copy ``docker://<node>:<mirror_port>/<ref>`` into a
directory, digests checked by skopeo) until each exits 0. What the registry
sent is read from its log (``http.response.written`` of each blob response):
the upstream's egress, the number the issue asks for beside the time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rainbowd.devcluster.registryconf import SKOPEO_BIN

from .baseline import archive_ref, run_baseline
from .env import LabEnv
from .rbd_system import RbdSystem
from .registry_system import RegistrySystem, start_registry
from .result import SystemResult

#: a blob response in the registry's log and the bytes it wrote
_BLOB_RESPONSE = re.compile(
    r'http\.request\.method=GET[^\n]*http\.request\.uri="/v2/[^"]*/blobs/[^"]*"'
    r"[^\n]*http\.response\.written=(\d+)"
)
#: the same, with the blob's digest
_BLOB_GET = re.compile(
    r'http\.request\.method=GET[^\n]*http\.request\.uri="/v2/[^"]*/blobs/(sha256:[0-9a-f]+)"'
    r"[^\n]*http\.response\.written=(\d+)"
)


@dataclass
class RolloutSystem:
    """Concurrent skopeo pulls of a new tag, each from the node's own rbd front door."""

    name: str = "rbd-pull"
    port: int = 5000  # the upstream registry, on the origin's address
    mirror_port: int = 5001  # each agent's front door, on its node's address
    #: a front door gives up a pull after this long without a new chunk: the lab's slow
    #: nodes may wait minutes for their first (fast nodes are fed first), so the whole run
    mirror_stall_s: float = 600.0
    setup_timeout: float = 60.0
    start_timeout: float = 300.0

    async def run(self, env: LabEnv, *, timeout: float) -> SystemResult:
        return await run_baseline(self.name, env, timeout, self._run)

    async def _run(self, env: LabEnv, timeout: float, result: SystemResult) -> None:
        upstream = f"{env.address(env.origin)}:{self.port}"
        ref = archive_ref(env.image)
        registry_log = f"{self.name}-{env.origin}-registry"
        # gzipped, as a real registry holds them (the origin reads what the registry says)
        await start_registry(env, self.name, upstream, compress=True, timeout=self.setup_timeout)
        rbd = RbdSystem(start_timeout=self.start_timeout)
        cluster = rbd.cluster(
            env,
            agent_config={"mirror_pull_stall_seconds": self.mirror_stall_s},
            coordinator_config={
                "upstreams": {"docker.io": {"upstream": upstream, "insecure": True}}
            },
        )
        for node_id, spec in cluster.nodes.items():
            spec.config["mirror_listen"] = f"{env.address(node_id)}:{self.mirror_port}"
        egress_before = _blob_bytes(env.log_path(registry_log))
        try:
            await cluster.start(timeout=self.start_timeout)
            # -- timed: every node's client asks its own front door at once ------
            pulls = RegistrySystem(name=self.name, compress=True)
            seconds, failed = await pulls.pull_all(
                env, lambda node: f"{env.address(node)}:{self.mirror_port}", ref, timeout
            )
            async with cluster.admin() as admin:
                jobs = [j for j in (await admin.jobs()).jobs if j.pull]
                images = (await admin.images()).images
        finally:
            await cluster.stop()
        result.node_seconds.update(seconds)
        result.failed.update(failed)
        sent = _blob_bytes(env.log_path(registry_log)) - egress_before
        image_bytes = _pushed_bytes(env.log_path(registry_log))
        result.notes.update(
            {
                "client": f"{SKOPEO_BIN} copy docker://<node>:{self.mirror_port}/{ref} "
                "dir:<node_dir>/image, every node at once, each from its own front door",
                "upstream": f"docker-registry at http://{upstream} in the origin's namespace",
                "upstream_blob_bytes": sent,
                # copies of the image as the registry holds it (gzipped layers)
                "upstream_copies": round(sent / image_bytes, 3) if image_bytes else None,
                "images_added": [i.ref for i in images],
                "pull_jobs": [
                    {"job": j.job_id, "nodes": len(j.nodes), "state": j.state} for j in jobs
                ],
                "wire_bytes": sum(j.wire_bytes for j in jobs),
            }
        )


def _blob_bytes(log: Path) -> int:
    """Bytes the registry's blob responses wrote so far (0 before it logged any)."""
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return 0
    return sum(int(m.group(1)) for m in _BLOB_RESPONSE.finditer(text))


def _pushed_bytes(log: Path) -> int:
    """Bytes of the image as pushed (one copy as the registry holds it), from its log.

    distribution logs no size for an upload, so this is the first full read of
    every blob instead: the origin's ingest reads each once.
    """
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return 0
    first: dict[str, int] = {}
    for m in _BLOB_GET.finditer(text):
        first.setdefault(m.group(1), int(m.group(2)))
    return sum(first.values())
