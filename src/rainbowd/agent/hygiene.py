"""StoreHygiene: keep rbd's store under ``store_max_bytes`` (the I/O around rainbowd.core.eviction).

One check (:meth:`StoreHygiene.check`) measures the store -- rbd's own files
only: complete layers and their manifests, partials and their bitmaps, ingest
scratch, the use record -- asks :func:`rainbowd.core.eviction.plan` which least
recently used layers to drop, and then, in this order:

1. marks them *evicting* (heartbeats stop listing them),
2. asks the coordinator (``POST /v1/evictions``), which refuses any layer a
   pending or running job on this node still needs, that this node is seeding
   right now, or that this origin holds for an image in the table, and drops
   the accepted ones from the node's holdings and from the scheduler,
3. deletes only the accepted layers that are not, by now, locally busy.

So the coordinator never offers this node as the seeder of a layer it deleted
(it forgot the holding first), and a layer the cluster still needs is never
deleted (the coordinator is the one that knows what jobs need, and is asked
at the moment of deletion, not at the last heartbeat). While the coordinator
is unreachable nothing is evicted: over the limit is better than deleting a
layer a job is about to need. Locally busy layers -- being served to a peer,
pulled (complete, report pending), loaded into Docker -- are pinned without
asking, and no eviction runs while an ingest is writing into the store.

Holdings lock: building and sending a heartbeat (or a registration) and the
ask-then-delete step run under one asyncio.Lock, so a heartbeat built before
a deletion cannot arrive after it and make the coordinator believe in a layer
that is gone.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from rainbowd.core import messages as m
from rainbowd.core.digest import Digest, short
from rainbowd.core.eviction import EvictionPlan, StoreEntry, StoreLimits, plan
from rainbowd.lib.client import AgentClient, ApiError, CoordinatorUnreachable
from rainbowd.lib.store import LayerStore

from .layer_uses import LayerUses

log = structlog.get_logger(__name__)

#: coordinator pins touch a layer's use time at most this often (seconds)
PIN_TOUCH_RESOLUTION = 30.0


def _disk_bytes(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def store_footprint(store: LayerStore, extra: Set[Path] = frozenset()) -> int:
    """Bytes on disk of rbd's own files in ``store``.

    Allocated blocks, not file lengths: a preallocated partial is sparse and
    counts for what has been written into it.
    """
    total = sum(_disk_bytes(p) for p in extra)
    for d in (store.blob_dir, store.partial_dir, store.tmp_dir):
        for dirpath, _dirs, files in os.walk(d):
            total += sum(_disk_bytes(Path(dirpath) / f) for f in files)
    return total


@dataclass
class CheckResult:
    """What one check did (for logs and tests)."""

    plan: EvictionPlan
    evicted: list[str]
    refused: dict[str, str]
    skipped: str = ""  # why nothing was attempted, if so


class StoreHygiene:
    def __init__(
        self,
        store: LayerStore,
        limits: StoreLimits | None,
        *,
        node_id: str,
        local_pins: Callable[[], Set[str]] = frozenset,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.limits = limits
        self.uses = LayerUses(store.root)
        self.local_pins = local_pins
        self.clock = clock
        #: serializes heartbeats/registration with ask-then-delete (module docstring)
        self.holdings_lock = asyncio.Lock()
        #: layers asked about or being deleted: not listed in heartbeats
        self.evicting: set[str] = set()
        #: ingests writing into the store right now: no eviction meanwhile
        self.ingesting = 0
        self._remote_pins: set[str] = set()
        self._refused: set[str] = set()
        self._log = log.bind(node=node_id)
        self._wake = asyncio.Event()
        self._stuck = False  # over the limit with only pinned layers left (warned)

    # -- inputs from the agent ------------------------------------------
    def used(self, digest: str) -> None:
        """The layer was added, served or loaded just now."""
        self.uses.touch(digest, self.clock())

    def coordinator_pins(self, pins: list[str]) -> None:
        """The pins of the last heartbeat reply: they replace the previous ones."""
        now = self.clock()
        self._remote_pins = set(pins)
        self._refused.clear()  # the fresh pins include whatever still holds them
        for d in pins:
            self.uses.touch(d, now, PIN_TOUCH_RESOLUTION)

    def holdings(self) -> list[str]:
        """What a heartbeat may list: held layers, minus those being evicted."""
        return [d for d in self.store.holdings() if d not in self.evicting]

    def kick(self) -> None:
        """The store grew (a layer landed): check soon rather than at the next tick."""
        self._wake.set()

    # -- the loop ----------------------------------------------------------
    async def run(self, api: AgentClient, interval: Callable[[], float]) -> None:
        """Check every ``interval()`` seconds or when kicked, until cancelled."""
        try:
            while True:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=interval())
                except TimeoutError:
                    pass
                self._wake.clear()
                await self.check(api)
        finally:
            data = self.uses.snapshot()
            if data is not None:
                self.uses.write(data)

    async def check(self, api: AgentClient) -> CheckResult:
        """One measure-plan-ask-delete round (see the module docstring)."""
        try:
            return await self._check(api)
        finally:
            data = self.uses.snapshot()
            if data is not None:
                await asyncio.to_thread(self.uses.write, data)

    async def _check(self, api: AgentClient) -> CheckResult:
        empty = CheckResult(EvictionPlan(), [], {})
        if self.limits is None:
            return empty
        used, entries = await asyncio.to_thread(self._measure)
        self.uses.retain({e.digest for e in entries} | self.evicting)
        pins = self._remote_pins | self._refused | set(self.local_pins())
        p = plan(entries, used, self.limits, pins)
        result = CheckResult(p, [], {})
        if not p.evict:
            if p.shortfall and not self._stuck:
                self._log.warning(
                    "store over its limit but every layer left is pinned",
                    used=used,
                    max_bytes=self.limits.max_bytes,
                    pinned=len(pins),
                )
            self._stuck = bool(p.shortfall)  # warn once per episode, not every check
            return result
        self._stuck = False
        if self.ingesting:
            result.skipped = "an ingest is writing into the store"
            self._log.info("eviction postponed: an ingest is running", used=used)
            return result
        sizes = {e.digest: e.size for e in entries}
        async with self.holdings_lock:
            self.evicting |= set(p.evict)
            try:
                try:
                    reply = await api.evict(m.EvictRequest(layers=p.evict))
                except (ApiError, CoordinatorUnreachable) as e:
                    result.skipped = f"coordinator did not accept the eviction: {e}"
                    self._log.warning("eviction not possible now", error=str(e))
                    return result
                busy = set(self.local_pins())
                now = self.clock()
                doomed = [d for d in reply.accepted if d in sizes and d not in busy]
                for d in doomed:
                    self.uses.evicted_now(d, sizes[d], now)  # recorded before it is gone
                await asyncio.to_thread(self._delete, doomed)
            finally:
                self.evicting.clear()
        self._refused |= set(reply.refused)
        result.evicted, result.refused = doomed, dict(reply.refused)
        freed = sum(sizes[d] for d in doomed)
        self._log.info(
            "layers evicted",
            layers=[short(d) for d in doomed],
            freed=freed,
            used_before=used,
            used_after=used - freed,
            high=self.limits.high_bytes,
            low=self.limits.low_bytes,
            refused={short(d): why for d, why in reply.refused.items()},
        )
        return result

    def _measure(self) -> tuple[int, list[StoreEntry]]:
        entries = []
        for d in self.store.holdings():
            blob = self.store.path(d)
            size = _disk_bytes(blob) + _disk_bytes(blob.with_name(blob.name + ".chunks"))
            entries.append(StoreEntry(d, size, self.uses.last_used(d, blob)))
        return store_footprint(self.store, {self.uses.path}), entries

    def _delete(self, digests: list[str]) -> None:
        for d in digests:
            self.store.remove(Digest(d))

    def status(self) -> dict[str, Any]:
        """The ``store`` part of ``rbd-agent status``."""
        lim = self.limits
        return {
            "max_bytes": lim.max_bytes if lim else 0,
            "high_bytes": lim.high_bytes if lim else 0,
            "low_bytes": lim.low_bytes if lim else 0,
            "evicted": [
                {"digest": e.digest, "size": e.size, "at": e.at} for e in self.uses.evicted
            ],
        }
