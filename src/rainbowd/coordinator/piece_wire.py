"""A transfer on the wire: the one conversion of ``Transfer`` into ``TransferAssignment``.

A transfer has one record, ``rainbowd.core.sched.scheduler.Transfer``, from the
scheduler to the state file. The demander gets a different shape,
``rainbowd.core.messages.TransferAssignment``, for reasons of its own: it is a
bounded wire schema older agents decode, it carries what the demander needs and
the scheduler does not keep (the layer's ``ChunkManifest``, the seeder's
``PeerInfo`` with its pinned host key), and it leaves out what is the
coordinator's business (the seeder's measured speed, the expected rate, the
demander, the start time). :func:`assignment_for` is the only place that builds
one from the other.

The scheduler may split a layer into *pieces* (runs of consecutive chunks,
rainbowd.core.sched.pieces); a transfer then carries ``first_chunk``/``end_chunk``
(``end_chunk`` 0: the whole layer), checked here against the manifest so a
range outside the layer is never handed out. Whether a finished piece leaves
its demander holding the whole layer is the job driver's question
(``JobDriver.holds_layer``, rainbowd.core.sched.jobdriver).
"""

from __future__ import annotations

import structlog

from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.digest import short
from rainbowd.core.messages import PeerInfo, TransferAssignment
from rainbowd.core.sched.records import Transfer

log = structlog.get_logger(__name__)


def assignment_for(
    t: Transfer, manifest: ChunkManifest, seeder: PeerInfo
) -> TransferAssignment | None:
    """The demander's assignment for ``t``; None (logged) if its range does not fit the layer."""
    try:
        return TransferAssignment(
            transfer_id=t.transfer_id,
            job_id=t.job_id,
            layer=manifest,
            seeder=seeder,
            reason=t.reason.render(t.seeder),
            first_chunk=t.first_chunk,
            end_chunk=t.end_chunk,
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
