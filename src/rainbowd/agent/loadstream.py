"""What every image loader shares: its interface and result, and a blocking stream made async.

The Docker loader (``agent/docker/loader.py``) and the containerd loader
(``agent/containerd/loader.py``) both feed an engine an archive that
``rainbowd.lib`` yields piecewise from the layer store, in a worker thread,
so a multi-GiB image is never whole in memory or on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Protocol

from rainbowd.core.messages import ImageRecord
from rainbowd.lib.store import LayerStore


@dataclass
class LoadResult:
    layers_sent: int  # layers streamed to the engine (the rest it already had)
    seconds: float
    image_id: str  # Docker: the image ID (config digest); containerd: the manifest digest
    bytes_sent: int = 0


class Loader(Protocol):
    """An engine a complete image can be loaded into (the agent's ``_load`` walks them)."""

    async def load(self, image: ImageRecord, store: LayerStore) -> LoadResult: ...


class Pieces:
    """An async view of a blocking piece iterator, pulled one piece at a time in a thread.

    aiohttp wraps an exception raised by a request body in its own connection
    error, and a subprocess only sees its input end; keeping the exception
    here lets the loader report the real cause (a corrupt blob).
    """

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self.pieces = pieces
        self.bytes = 0
        self.error: BaseException | None = None

    async def stream(self) -> AsyncIterator[bytes]:
        sentinel = b""
        while True:
            try:
                piece = await asyncio.to_thread(next, self.pieces, sentinel)
            except Exception as e:
                self.error = e
                raise
            if piece is sentinel:
                return
            self.bytes += len(piece)
            yield piece


def close_quietly(pieces: Iterator[bytes]) -> None:
    """Close the archive generator (its open blob), unless a thread is still inside it."""
    close = getattr(pieces, "close", None)
    if close is not None:
        with contextlib.suppress(ValueError):  # "generator already executing"
            close()
