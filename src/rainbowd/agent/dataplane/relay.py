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

Pieces: a layer may be pulled as several runs of chunks at once (one pull
per piece, each from its own seeder, into one shared partial). Each pull is
announced with its range (:meth:`begin` returns a token for :meth:`end`); a
chunk is waited for only while some running pull covers it. A chunk no pull
here covers is waited for up to the start bound (the pull that will bring it
may be on its way), and a chunk whose covering pull ended without it is
answered "unavailable" at once. Chunks already in a partial with no pull
running are served by the ChunkServer straight from the store
(:meth:`~rainbowd.lib.store.LayerStore.stored_partial_chunk`), not from here.

Integrity stays as it was: only chunks whose bits are set (verified before
being marked) are handed out, the server verifies what it reads against the
manifest again before sending, and the demander checks every chunk and the
whole digest. A partial is never reported as held.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rainbowd.core.chunks import ChunkManifest

#: failed pulls remembered (so late demanders fail over at once, not after the bound)
MAX_ENDED = 64


class RelayUnavailable(Exception):
    """The chunk is not here and will not be within the bound (the reason says why)."""


class RelayNotPulling(RelayUnavailable):
    """No pull of the layer started here within the start bound: it is simply not held."""


@dataclass
class _Entry:
    """One layer: its running pulls (by token) and the chunks present in its partial."""

    manifest: ChunkManifest | None = None
    path: Path | None = None  # the partial's data file
    present: set[int] = field(default_factory=set)
    pulls: dict[int, tuple[int, int]] = field(default_factory=dict)  # token -> [first, end)
    complete: bool = False  # the layer was installed (read the blob now)
    #: pulls that ended without the layer: ([first, end), why), newest last
    ended: list[tuple[int, int, str]] = field(default_factory=list)
    waiters: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def active(self) -> bool:
        return bool(self.pulls)

    def covers(self, index: int) -> bool:
        """A running pull will bring chunk ``index``."""
        return any(first <= index < end for first, end in self.pulls.values())

    def ended_why(self, index: int) -> str:
        """Why the last pull covering ``index`` ended without it ("" if none did)."""
        for first, end, why in reversed(self.ended):
            if first <= index < end:
                return why
        return ""

    def wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class RelayBoard:
    """In-process notifier between this agent's LayerPuller and its ChunkServer."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        #: measures the bounds of :meth:`wait_chunk` (tests pass a fake one)
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        self._tokens = itertools.count(1)
        #: chunks served from a partial (a layer still being received), for status/tests
        self.relayed_chunks = 0

    # -- puller side -----------------------------------------------------
    def begin(
        self,
        manifest: ChunkManifest,
        path: Path,
        present: list[int],
        first: int = 0,
        end: int = 0,
    ) -> int:
        """A pull of chunks [first, end) (0, 0: all) starts; ``present`` are the verified chunks.

        Returns the token :meth:`end` takes to end this pull (others of the layer go on).
        """
        e = self._entries.setdefault(manifest.digest, _Entry())
        end = end or manifest.count
        token = next(self._tokens)
        e.manifest, e.path, e.complete = manifest, path, False
        e.pulls[token] = (first, end)
        e.present.update(present)
        # a pull covering them again supersedes the failures remembered for those chunks
        e.ended = [x for x in e.ended if x[1] <= first or x[0] >= end]
        e.wake()
        return token

    def landed(self, digest: str, index: int) -> None:
        """Chunk ``index`` was verified and written to the partial (its bitmap bit is set)."""
        e = self._entries.get(digest)
        if e is not None and e.manifest is not None:
            e.present.add(index)
            e.wake()

    def end(self, digest: str, *, installed: bool, why: str = "", token: int | None = None) -> None:
        """Pull ``token`` (None: all of the layer's) ended: ``installed``, or not with ``why``."""
        e = self._entries.get(digest)
        if e is None:
            return
        ended = list(e.pulls.values()) if token is None else [e.pulls.get(token, (0, 0))]
        if token is None:
            e.pulls.clear()
        else:
            e.pulls.pop(token, None)
        if installed:
            e.complete = True
            e.ended.clear()
        else:
            for first, last in ended:
                if last > first:
                    e.ended.append((first, last, why or "the relay's own pull ended"))
            del e.ended[:-MAX_ENDED]
        e.wake()
        if e.complete and not e.active and e.waiters == 0:
            del self._entries[digest]
        # a failed pull's entry stays (until the next pull or MAX_ENDED newer ones), so a
        # demander that comes late hears "unavailable: the relay's pull ended" at once
        idle = [d for d, x in self._entries.items() if not x.active and not x.waiters]
        for d in idle[: max(0, len(idle) - MAX_ENDED)]:
            del self._entries[d]

    def receiving(self, digest: str) -> bool:
        """Whether a pull of ``digest`` is running here."""
        e = self._entries.get(digest)
        return e is not None and e.active

    def landed_count(self, digest: str) -> int:
        """Chunks of ``digest`` known verified in its partial here (0: none, or not pulled here)."""
        e = self._entries.get(digest)
        return 0 if e is None else len(e.present)

    def waiting(self, digest: str) -> int:
        """How many servers wait here on a chunk of ``digest`` (for status and tests)."""
        e = self._entries.get(digest)
        return 0 if e is None else e.waiters

    # -- server side -----------------------------------------------------
    async def wait_chunk(
        self,
        digest: str,
        index: int,
        timeout: float,
        held: Callable[[], bool],
        start_timeout: float,
        *,
        fail_over: bool = True,
    ) -> tuple[ChunkManifest, Path] | None:
        """Wait until chunk ``index`` of ``digest`` can be read here.

        Returns (manifest, partial data file) for a chunk present in a partial,
        or None once the layer is complete (the caller reads the blob). A
        chunk no running pull covers (its pull's assignment may be on the way)
        is waited for up to ``start_timeout``; one a running pull covers, up
        to ``timeout``. Raises RelayUnavailable when the bound passes, or at
        once when the pull covering the chunk ended without it.
        ``held`` says whether the store holds the layer complete; it is asked
        (synchronously) before waiting on a layer with no pull announced, which
        closes the race with a pull that installed it just before we came.
        A layer nothing of which is here and no pull of which was announced
        within ``start_timeout`` raises :class:`RelayNotPulling` (the server
        answers "not held", as without relay).

        ``fail_over=False`` (the registry front door, whose client cannot go to
        another seeder mid-blob): a pull that ended without the chunk, or none
        covering it yet, is no reason to give up early -- the coordinator may
        assign it again -- so only ``timeout`` bounds the wait
        (``start_timeout`` is not used) and RelayUnavailable says it passed.
        """
        e = self._entries.get(digest)
        if e is None:
            if held():
                return None
            e = self._entries[digest] = _Entry()
        e.waiters += 1
        t0 = self.clock()
        deadline = t0 + timeout
        try:
            while True:
                if e.complete:
                    return None
                if e.manifest is not None and not 0 <= index < e.manifest.count:
                    raise IndexError(
                        f"layer {digest} has chunks 0..{e.manifest.count - 1}, not {index}"
                    )
                if index in e.present and e.manifest is not None and e.path is not None:
                    return e.manifest, e.path
                covered = e.covers(index) or not fail_over
                why = "" if covered else e.ended_why(index)
                if why:
                    raise RelayUnavailable(
                        f"chunk {index} is not here and the relay's pull ended: {why}"
                    )
                now = self.clock()
                left = deadline - now
                if not covered:
                    # no pull of this chunk announced yet (its assignment may be on the way)
                    if now - t0 >= start_timeout:
                        if held():
                            return None
                        if e.manifest is None:
                            raise RelayNotPulling(
                                f"layer not held and no pull of it started within "
                                f"{start_timeout:g}s"
                            )
                        raise RelayUnavailable(
                            f"chunk {index} is not here and no pull of it started within "
                            f"{start_timeout:g}s ({len(e.present)} chunks of the layer here)"
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
            if e.waiters == 0 and not e.active and not e.ended:
                if self._entries.get(digest) is e:
                    del self._entries[digest]
