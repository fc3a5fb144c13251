"""``rbd demo --pull``: after the distribution, every node is pulled from through its mirror.

Issue 17 (item 6, "push and pull meet"): ``rbd distribute`` works as preheat.
Each demo agent runs its registry front door (``mirror_listen`` on loopback);
once the job is done, a real OCI client -- skopeo, as an operator's script or
CI would use -- pulls the image by the digest the node's mirror records, from
every node in turn, and the demo checks what a preheat promises: the pull is
served from the node's own store, with **0 bytes from peers or an upstream**
(the store's size is unchanged and the coordinator handed the node no transfer
during the pulls) and the manifest digest the client computed is the one the
mirror recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from rainbowd.core.units import human_bytes
from rainbowd.devcluster.localcluster import LocalCluster
from rainbowd.devcluster.registryconf import SKOPEO_BIN

#: the agent config key that turns each demo agent's registry front door on (loopback,
#: a free port; the agent's status names the port it got)
MIRROR_CONFIG = {"mirror_listen": "127.0.0.1:0"}
#: seconds one skopeo pull may take before the demo calls it failed (a 64 MiB image
#: pulls in well under a second from loopback)
PULL_TIMEOUT_S = 120.0


class PullError(Exception):
    """A pull through a node's mirror failed, or moved bytes it must not have."""


@dataclass
class NodePull:
    """One node pulled from through its mirror."""

    node_id: str
    mirror: str  # host:port
    digest: str  # the manifest digest the client got (= the mirror's record)
    seconds: float
    blob_bytes: int  # bytes of the blobs the client wrote
    store_growth: int  # bytes the node's store grew by during the pull (must be 0)


def skopeo_available() -> bool:
    return shutil.which(SKOPEO_BIN) is not None


async def pull_everywhere(
    cluster: LocalCluster, ref: str, say: Callable[[str], None]
) -> list[NodePull]:
    """Pull ``ref`` through every agent's mirror (origin included); raise PullError on any miss."""
    repo = ref.rsplit(":", 1)[0]
    out: list[NodePull] = []
    transfers_before = await _transfers_assigned(cluster)
    for node_id in sorted(cluster.nodes):
        status = await cluster.agent_status(node_id)
        mirror = urlsplit(str(status.get("mirror_url") or "")).netloc
        recorded = dict(status.get("mirror_images") or {}).get(ref, "")
        if not mirror or not recorded:
            raise PullError(
                f"node {node_id}: its mirror ({mirror or 'off'}) records no {ref}; "
                "was the job done there?"
            )
        used_before = int(status["disk"]["used"])
        with tempfile.TemporaryDirectory(prefix="rbd-demo-pull-") as tmp:
            started = time.monotonic()
            await _skopeo_copy(f"docker://{mirror}/{repo}@{recorded}", Path(tmp) / "image")
            took = time.monotonic() - started
            digest, blob_bytes = _pulled(Path(tmp) / "image")
        used_after = int((await cluster.agent_status(node_id))["disk"]["used"])
        if digest != recorded:
            raise PullError(
                f"node {node_id}: the client got manifest {digest}, the mirror records {recorded}"
            )
        pull = NodePull(node_id, mirror, digest, took, blob_bytes, used_after - used_before)
        if pull.store_growth:
            raise PullError(
                f"node {node_id}: its store grew by {pull.store_growth} B during the pull: "
                "it fetched what a preheated node must already hold"
            )
        out.append(pull)
        say(
            f"  {node_id:<10} pulled {repo}@{digest[:19]}... from its mirror {mirror} "
            f"in {took:5.2f}s ({human_bytes(blob_bytes)} of blobs, 0 B from peers)"
        )
    if await _transfers_assigned(cluster) != transfers_before:
        raise PullError("the coordinator assigned transfers during the pulls: a pull was a miss")
    return out


async def _skopeo_copy(src: str, dest: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        SKOPEO_BIN,
        "--insecure-policy",
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        src,
        f"dir:{dest}",  # (dir: keeps the manifest as served; oci: would convert it)
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(PULL_TIMEOUT_S):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise PullError(f"skopeo copy {src}: no answer within {PULL_TIMEOUT_S:g}s") from None
    if proc.returncode != 0:
        raise PullError(f"skopeo copy {src} failed: {err.decode(errors='replace').strip()}")


def _pulled(image_dir: Path) -> tuple[str, int]:
    """The digest of the manifest skopeo wrote to ``image_dir`` and the bytes of its blobs.

    skopeo checked the manifest against the digest it asked for; it is hashed
    again here so the demo shows the client's digest rather than trusting it.
    """
    manifest = (image_dir / "manifest.json").read_bytes()
    got = "sha256:" + hashlib.sha256(manifest).hexdigest()
    blobs = [p for p in image_dir.iterdir() if p.name not in ("manifest.json", "version")]
    return got, sum(p.stat().st_size for p in blobs)


async def _transfers_assigned(cluster: LocalCluster) -> int:
    """Transfers the coordinator has handed out so far (its log's ``transfer assigned``)."""
    text = cluster.log_path("coordinator").read_text(errors="replace")
    return text.count('"transfer assigned"')
