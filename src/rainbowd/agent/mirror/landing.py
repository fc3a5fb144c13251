"""LayerLanding: the front door waits for the next chunk of a blob whose layer is still landing.

Why: a client asking for a layer this node is receiving (a pull-on-miss
bringing it, or the agent's puller holding a partial of it) should get its
first bytes as soon as the first chunk is verified here, not once the whole
layer is installed. The bytes are read by the one reader the ChunkServer's
cut-through relay uses (agent/dataplane/chunk_source.py): this class only
says *when* chunk ``i`` may be read, by waiting on the agent's
:class:`~rainbowd.agent.dataplane.relay.RelayBoard` (woken by the puller as
each chunk lands, never by polling), and when to give up.

When to give up -- the front door's stall rule (rainbowd.core.stall): no new
chunk for ``stall_s``, counted by ``progress`` (for a pull-on-miss, the
chunks of the *image's* layers this node holds, so a blob whose layer waits
behind the image's other layers is not cut while they move; otherwise the
layer's own landed chunks), or at once when the pull bringing it (``ended``)
ended without it. A wait that outlasts a piece's failure is no reason to stop:
the coordinator may assign the chunk again (``fail_over=False``). The caller
turns :class:`NotLanding` into a 404 before its headers are out, and into a
cut connection after (the client's digest check refuses the short blob).

Time is the board's clock (a fake one in unit tests).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

from rainbowd.agent.dataplane.chunk_source import Where, partial_chunk
from rainbowd.agent.dataplane.relay import RelayBoard, RelayUnavailable
from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.digest import Digest
from rainbowd.core.stall import StallWatch
from rainbowd.lib.store import LayerStore


class NotLanding(Exception):
    """The layer stopped coming here: no progress for the stall time, or its pull ended."""


class LayerLanding:
    """Waits for chunks of one layer for one blob response (one per response)."""

    def __init__(
        self,
        board: RelayBoard,
        store: LayerStore,
        layer: Digest,
        *,
        stall_s: float,
        progress: Callable[[], int],
        ended: asyncio.Future[None] | None = None,
    ) -> None:
        self.board = board
        self.store = store
        self.layer = layer
        self.stall_s = stall_s
        #: a count that grows while the layer (or its image) keeps landing
        self.progress = progress
        #: done once the pull bringing the layer ended (held, stalled or refused); None: none
        self.ended = ended
        self.watch = StallWatch(stall_s, board.clock())
        self.watch.seen(progress(), board.clock())

    async def manifest(self) -> ChunkManifest | None:
        """The layer's chunk manifest once known here (a pull of it opened its partial, or its
        first chunk landed); None: the layer is complete now (read the store's).

        The front door needs it for the blob's length and chunk boundaries
        before any header goes out. Raises NotLanding as :meth:`wait` does.
        """
        p = self.store.shared_partial(self.layer)
        if p is not None:
            return p.manifest
        where = await partial_chunk(self.store, self.layer, 0)
        if where is None:
            where = await self.wait(self.layer, 0)
        return None if where is None else where[0]

    async def wait(self, layer: Digest, index: int) -> Where | None:
        """Where chunk ``index`` is once verified in the partial; None: the layer is installed.

        The ``wait`` of :func:`~rainbowd.agent.dataplane.chunk_source.read_chunk`.
        """
        clock = self.board.clock
        while True:
            if self.ended is not None and self.ended.done():
                return self._after_end()
            now = clock()
            if self.watch.seen(self.progress(), now):
                raise NotLanding(
                    f"layer {layer}: chunk {index} not here and nothing new landed "
                    f"for {self.stall_s:g}s"
                )
            left = self.watch.left(now)
            try:
                return await self._unless_ended(
                    self.board.wait_chunk(
                        layer, index, left, lambda: self.store.has(layer), left, fail_over=False
                    )
                )
            except RelayUnavailable:
                continue  # the bound passed: look at the progress again

    async def _unless_ended(self, wait: Coroutine[Any, Any, Where | None]) -> Where | None:
        """``wait``'s answer, unless the pull bringing the layer ends first."""
        waiter = asyncio.ensure_future(wait)
        if self.ended is None:
            return await waiter
        try:
            both: set[asyncio.Future[Any]] = {waiter, self.ended}
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
            if waiter.done():
                return waiter.result()
        finally:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError, RelayUnavailable):
                    await waiter
        return self._after_end()

    def _after_end(self) -> Where | None:
        """The pull bringing the layer ended: read the blob if it is installed, else give up."""
        if self.store.has(self.layer):
            return None
        raise NotLanding(f"layer {self.layer}: the pull bringing it here ended without it")
