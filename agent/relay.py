"""RelayBoard: lets the ChunkServer serve chunks of a layer this agent is still pulling.

Why: with whole-layer store-and-forward every level of the distribution tree
costs a full layer time, and the slowest nodes start late (bench/RESULTS.md,
"Policies (issue 6)"). With *cut-through relay* the coordinator may name a
node that is still receiving layer L as the seeder of L (policy ``relay``);
its ChunkServer then answers chunks as they land.

How: the puller and the server live in one agent process, so they share this
board (owned by the :class:`~agent.agent.Agent`, passed to both; no global
state). The puller announces a pull (:meth:`begin`), each chunk once it was
verified against the manifest and written (:meth:`landed`; the bit it sets is
the partial's bitmap bit), and the end of the pull (:meth:`end`). The server
asks :meth:`wait_chunk` for a chunk of a layer it does not hold complete: it
returns where to read that chunk (the partial's file, or ``None`` = the layer
is complete now, read the blob) as soon as it is there, or raises
:class:`RelayUnavailable` after ``timeout`` seconds or at once when the pull
ended without the chunk, so the demander fails over instead of hanging.

Integrity stays as it was: only chunks whose bits are set (verified before
being marked) are handed out, the server verifies what it reads against the
manifest again before sending, and the demander checks every chunk and the
whole digest. A partial is never reported as held.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rainbowd.chunks import ChunkManifest

#: failed pulls remembered (so late demanders fail over at once, not after the bound)
MAX_ENDED = 64


class RelayUnavailable(Exception):
    """The chunk is not here and will not be within the bound (the reason says why)."""


class RelayNotPulling(RelayUnavailable):
    """No pull of the layer started here within the start bound: it is simply not held."""


@dataclass
class _Entry:
    """One layer: its pull (if any) and the chunks present in its partial."""

    manifest: ChunkManifest | None = None
    path: Path | None = None  # the partial's data file
    present: set[int] = field(default_factory=set)
    active: bool = False  # a pull is running
    complete: bool = False  # the layer was installed (read the blob now)
    ended_why: str = ""  # why the last pull ended without the layer
    waiters: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class RelayBoard:
    """In-process notifier between this agent's LayerPuller and its ChunkServer."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        #: chunks served from a partial (a layer still being received), for status/tests
        self.relayed_chunks = 0

    # -- puller side -----------------------------------------------------
    def begin(self, manifest: ChunkManifest, path: Path, present: list[int]) -> None:
        """A pull of ``manifest``'s layer starts; ``present`` are its verified chunks."""
        e = self._entries.setdefault(manifest.digest, _Entry())
        e.manifest, e.path, e.active, e.complete, e.ended_why = manifest, path, True, False, ""
        e.present = set(present)
        e.wake()

    def landed(self, digest: str, index: int) -> None:
        """Chunk ``index`` was verified and written to the partial (its bitmap bit is set)."""
        e = self._entries.get(digest)
        if e is not None and e.active:
            e.present.add(index)
            e.wake()

    def end(self, digest: str, *, installed: bool, why: str = "") -> None:
        """The pull ended: ``installed`` (the blob is in place) or failed with ``why``."""
        e = self._entries.get(digest)
        if e is None:
            return
        e.active = False
        e.complete = installed
        e.ended_why = "" if installed else (why or "the relay's own pull ended")
        e.wake()
        if installed and e.waiters == 0:
            del self._entries[digest]
        # a failed pull's entry stays (until the next pull or MAX_ENDED newer ones), so a
        # demander that comes late hears "unavailable: the relay's pull ended" at once
        ended = [d for d, x in self._entries.items() if not x.active and not x.waiters]
        for d in ended[: max(0, len(ended) - MAX_ENDED)]:
            del self._entries[d]

    def receiving(self, digest: str) -> bool:
        """Whether a pull of ``digest`` is running here."""
        e = self._entries.get(digest)
        return e is not None and e.active

    # -- server side -----------------------------------------------------
    async def wait_chunk(
        self,
        digest: str,
        index: int,
        timeout: float,
        held: Callable[[], bool],
        start_timeout: float,
    ) -> tuple[ChunkManifest, Path] | None:
        """Wait until chunk ``index`` of ``digest`` can be read here.

        Returns (manifest, partial data file) for a chunk present in a partial,
        or None once the layer is complete (the caller reads the blob). A
        layer whose pull has not started yet (the assignment is on its way)
        is waited for too. Raises RelayUnavailable after ``timeout`` seconds,
        or at once when the pull ended without the layer and without the chunk.
        ``held`` says whether the store holds the layer complete; it is asked
        (synchronously) before waiting on a layer with no pull announced, which
        closes the race with a pull that installed it just before we came.
        A layer no pull of which was announced within ``start_timeout`` raises
        :class:`RelayNotPulling` (the server answers "not held", as without relay).
        """
        e = self._entries.get(digest)
        if e is None:
            if held():
                return None
            e = self._entries[digest] = _Entry()
        e.waiters += 1
        t0 = time.monotonic()
        deadline = t0 + timeout
        try:
            while True:
                if e.complete:
                    return None
                if index in e.present and e.manifest is not None and e.path is not None:
                    return e.manifest, e.path
                if e.ended_why and not e.active:
                    raise RelayUnavailable(
                        f"chunk {index} is not here and the relay's pull ended: {e.ended_why}"
                    )
                now = time.monotonic()
                left = deadline - now
                if e.manifest is None:
                    # no pull announced yet (its assignment may be on the way)
                    if now - t0 >= start_timeout:
                        if held():
                            return None
                        raise RelayNotPulling(
                            f"layer not held and no pull of it started within {start_timeout:g}s"
                        )
                    left = min(left, t0 + start_timeout - now)
                if left <= 0 and not e.active and held():
                    return None
                if left <= 0:
                    state = (
                        f"pull running, {len(e.present)} chunks in"
                        if e.active
                        else "no pull of it running"
                    )
                    raise RelayUnavailable(
                        f"chunk {index} did not arrive within {timeout:g}s ({state})"
                    )
                try:
                    await asyncio.wait_for(e.changed.wait(), left)
                except TimeoutError:
                    pass
        finally:
            e.waiters -= 1
            if e.waiters == 0 and not e.active and not e.ended_why:
                if self._entries.get(digest) is e:
                    del self._entries[digest]
