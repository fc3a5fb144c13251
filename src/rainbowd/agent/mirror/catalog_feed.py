"""Feeding the registry front door's catalog from the agent's work, never failing that work.

Both an ingest (origin) and a load record the image they handled, so the
front door (mirror/server.py) can serve it; the one rule they share is here.
"""

from __future__ import annotations

import asyncio

from structlog.typing import FilteringBoundLogger

from rainbowd.agent.mirror.catalog import CatalogError, ImageCatalog
from rainbowd.core import messages as m


async def keep_for_front_door(
    catalog: ImageCatalog, image: m.ImageRecord, log: FilteringBoundLogger
) -> None:
    """Keep ``image``'s manifest and config for the registry front door.

    Never fails the work it rides on: an image the catalog refuses (its
    config does not match its digest) or cannot write is only not served
    by the front door, and a client pulling it goes to its upstream.
    """
    try:
        await asyncio.to_thread(catalog.record, image)
    except (CatalogError, OSError) as e:
        log.error("mirror_catalog_failed", image=image.ref, error=str(e))
