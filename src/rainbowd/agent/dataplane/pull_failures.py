"""How the fetch loop says why it stopped, and the reason a pull's disk failure gives.

Why a module of its own: a pull ends with a
:class:`~rainbowd.agent.dataplane.puller.PullError` of one of a few kinds
(``FailureKind``: ``verify``, ``disk``, ``io`` ...), from which the
coordinator decides whom to blame (a seeder's fault is avoided, a full disk
is the demander's). The fetch loop (chunk_fetch.py) stops on such failures
too, but the puller imports it, so it cannot raise the puller's error: it
raises :class:`FetchAborted` with the same fields, which the puller reports
as its PullError unchanged. The disk reason is written alike on both sides.
"""

from __future__ import annotations

import errno

from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.chunksession import FetchFailure
from rainbowd.core.messages import FailureKind
from rainbowd.lib.store import LayerStore

#: bytes in a MiB, for the sizes a reason names
_MIB = 1024 * 1024


class FetchAborted(Exception):
    """The fetch loop stopped on a failure of ``kind``; the fields a PullError carries."""

    def __init__(
        self, kind: FailureKind, reason: str, seeder_fault: bool = False, not_held: bool = False
    ) -> None:
        super().__init__(reason)
        self.kind: FailureKind = kind
        self.reason = reason
        self.seeder_fault = seeder_fault
        self.not_held = not_held

    @classmethod
    def of(cls, failure: FetchFailure) -> FetchAborted:
        """The abort for a failure the chunk session named."""
        return cls(
            failure.kind,
            failure.reason,
            seeder_fault=failure.seeder_fault,
            not_held=failure.not_held,
        )


def disk_reason(
    e: OSError, *, node_id: str, store: LayerStore, manifest: ChunkManifest, what: str
) -> str:
    """The reason of a pull's ``disk`` failure: node, layer, the cause and the free space."""
    try:
        free = mib(store.bytes_free())
    except OSError:
        free = "unknown"
    cause = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "disk error"
    return (
        f"node {node_id}: layer {manifest.digest} ({mib(manifest.size)}): "
        f"{cause} {what}, {free} free on {store.root}: {e}"
    )


def mib(n: int) -> str:
    """``n`` bytes as a reason writes them."""
    return f"{n / _MIB:.1f} MiB"
