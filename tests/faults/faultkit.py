"""Small helpers the fault tests share: add an image and wait for it, read a process's log."""

from __future__ import annotations

import json
from pathlib import Path

from rainbowd.core import messages as m
from rainbowd.devcluster.localcluster import LocalCluster


async def add_image(cluster: LocalCluster, archive: Path, ref: str) -> m.ImageView:
    """Ingest ``archive`` as ``ref`` at the origin; it must end "ready"."""
    async with cluster.admin() as admin:
        view = await admin.ingest(m.CreateImage(ref=ref, source=m.ArchiveSource(path=str(archive))))
    assert view.state == "ready", view.error
    return view


def log_events(cluster: LocalCluster, name: str, event: str) -> list[dict[str, object]]:
    """The JSON log records of process ``name`` (a node id or "coordinator") named ``event``."""
    out = []
    for line in cluster.log_path(name).read_text().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("event") == event:
            out.append(doc)
    return out


#: the policy of the fault tests staged on whole-layer transfers: the previous default,
#: not swarm (pieces); tests/faults/test_pieces_cluster.py runs the faults of pieces
WHOLE_LAYERS = "relay"
