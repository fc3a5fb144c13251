"""Pieces on the wire: a scheduler transfer's chunk range, to the agent and to the state file.

The scheduler may split a layer into *pieces* (runs of consecutive chunks,
rainbowd.core.sched.pieces) and move each from its own seeder; a transfer then carries
``first_chunk``/``end_chunk`` (``end_chunk`` 0: the whole layer). This module
is the coordinator's side of that contract, kept out of its services:

* :func:`assignment_for` builds the demander's :class:`TransferAssignment`
  with the range (checked against the manifest: a range outside it is never
  handed out);
* whether a finished piece leaves its demander holding the whole layer is
  the job driver's question (``JobDriver.holds_layer``, rainbowd.core.sched.jobdriver).
"""

from __future__ import annotations

import structlog

from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.digest import short
from rainbowd.core.messages import PeerInfo, TransferAssignment
from rainbowd.core.sched.scheduler import Transfer

log = structlog.get_logger(__name__)


def chunk_range(t: Transfer) -> tuple[int, int]:
    """``(first_chunk, end_chunk)`` of ``t``; (0, 0) is the whole layer."""
    return int(getattr(t, "first_chunk", 0)), int(getattr(t, "end_chunk", 0))


def assignment_for(
    t: Transfer, manifest: ChunkManifest, seeder: PeerInfo
) -> TransferAssignment | None:
    """The demander's assignment for ``t``; None (logged) if its range does not fit the layer."""
    first, end = chunk_range(t)
    try:
        return TransferAssignment(
            transfer_id=t.transfer_id,
            job_id=t.job_id,
            layer=manifest,
            seeder=seeder,
            reason=t.reason,
            first_chunk=first,
            end_chunk=end,
        )
    except ValueError as e:
        log.error(
            "transfer range does not fit its layer; not handed out",
            transfer=t.transfer_id,
            layer=short(t.layer),
            demander=t.demander,
            error=str(e),
        )
        return None
