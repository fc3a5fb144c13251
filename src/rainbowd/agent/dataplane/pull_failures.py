"""How a pull fails: PullError (and HostKeyMismatch), and a disk failure's reason.

Why a module of its own: a pull ends with a :class:`PullError` of one of a few kinds
(``FailureKind``: ``verify``, ``disk``, ``io`` ...), from which the
coordinator decides whom to blame (a seeder's fault is avoided, a full disk
is the demander's). The fetch loop (chunk_fetch.py) stops on such failures
with a PullError the puller reports as it is; the seeder's connection
(seeder_connections.py) raises PullError, or :class:`HostKeyMismatch` for a
host key other than the pinned one. The disk reason is written alike on
both sides. Here, not in the puller, so that the agent and the connection
module name these without importing the pull's machinery.
"""

from __future__ import annotations

import errno

from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.chunksession import FetchFailure
from rainbowd.core.messages import FailureKind, TransferFailed
from rainbowd.lib.store import LayerStore

#: bytes in a MiB, for the sizes a reason names
_MIB = 1024 * 1024


class PullError(Exception):
    """A pull failed; ``kind`` is a FailureKind, ``reason`` names seeder, address and layer."""

    def __init__(
        self, kind: FailureKind, reason: str, seeder_fault: bool = False, not_held: bool = False
    ) -> None:
        super().__init__(reason)
        self.kind: FailureKind = kind
        self.reason = reason
        self.seeder_fault = seeder_fault
        #: the seeder answered not_held (the coordinator then stops counting it a holder)
        self.not_held = not_held

    @classmethod
    def of(cls, failure: FetchFailure) -> PullError:
        """The error for a failure the chunk session named."""
        return cls(
            failure.kind,
            failure.reason,
            seeder_fault=failure.seeder_fault,
            not_held=failure.not_held,
        )

    def to_failed(self) -> TransferFailed:
        """The control-plane message reporting this failure."""
        return TransferFailed(
            reason=self.reason,
            kind=self.kind,
            seeder_fault=self.seeder_fault,
            not_held=self.not_held,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind!r}, {self.reason!r}, {self.seeder_fault})"


class HostKeyMismatch(PullError):
    """The seeder presented a host key other than the pinned one (spoofing?)."""

    def __init__(self, reason: str, presented: str | None = None) -> None:
        super().__init__("security", reason, seeder_fault=True)
        #: fingerprint of the key the far end presented, if it got that far
        self.presented = presented


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
