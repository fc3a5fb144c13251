"""Store eviction policy: which complete layers to delete when the store is too big.

Pure code (no files, no clock): the agent measures its store, gathers the
pins, and asks :func:`plan` what to evict; unit tests and the simulator call
the same function with made-up numbers.

The rule (issue 7, "disk hygiene"):

* only rbd's own files count (``used`` is what the store directory holds:
  complete layers, partials, manifests, bitmaps, the use index), never the
  rest of the disk, so another program filling the disk does not make rbd
  throw its layers away (that case is the puller's disk-full refusal);
* nothing happens until ``used`` exceeds ``high`` x ``max_bytes``; then the
  least recently used unpinned complete layers go, oldest first, until
  ``used`` is at or below ``low`` x ``max_bytes``. The gap between the two
  watermarks is the hysteresis that keeps a store hovering at the limit from
  evicting a layer on every check;
* a pinned layer (being served or pulled, needed by a pending or running job
  on this node, an origin's layer of an image still in the image table) is
  never chosen, even when that leaves the store above ``low``: over the limit
  is better than breaking a job. Partials are never candidates at all (they
  are work in progress), though their bytes count towards ``used``.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass, field

DEFAULT_HIGH_WATERMARK = 0.9
DEFAULT_LOW_WATERMARK = 0.8


class EvictionError(ValueError):
    """Limits that make no sense (a low watermark above the high one, say)."""


@dataclass(frozen=True)
class StoreLimits:
    """``max_bytes`` of rbd's own files; the watermarks are fractions of it."""

    max_bytes: int
    high: float = DEFAULT_HIGH_WATERMARK
    low: float = DEFAULT_LOW_WATERMARK

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise EvictionError(f"max_bytes {self.max_bytes}: must be > 0")
        if not 0 < self.low < self.high <= 1:
            raise EvictionError(
                f"watermarks low {self.low} / high {self.high}: need 0 < low < high <= 1"
            )

    @property
    def high_bytes(self) -> int:
        return int(self.max_bytes * self.high)

    @property
    def low_bytes(self) -> int:
        return int(self.max_bytes * self.low)


@dataclass(frozen=True)
class StoreEntry:
    """A complete layer: the bytes its files take on disk and when it was last used."""

    digest: str
    size: int
    last_used: float


@dataclass
class EvictionPlan:
    """What to evict (oldest use first) and what the store looks like afterwards."""

    evict: list[str] = field(default_factory=list)
    used_before: int = 0
    used_after: int = 0
    #: bytes still above the low watermark after the plan (pins left nothing else)
    shortfall: int = 0

    @property
    def freed(self) -> int:
        return self.used_before - self.used_after


def plan(
    entries: Iterable[StoreEntry], used: int, limits: StoreLimits, pinned: Set[str] = frozenset()
) -> EvictionPlan:
    """Choose the layers to evict; an empty plan while ``used`` <= the high watermark.

    Ties in ``last_used`` are broken by digest so the result is deterministic.
    """
    out = EvictionPlan(used_before=used, used_after=used)
    if used <= limits.high_bytes:
        return out
    candidates = sorted(
        (e for e in entries if e.digest not in pinned), key=lambda e: (e.last_used, e.digest)
    )
    for e in candidates:
        if out.used_after <= limits.low_bytes:
            break
        out.evict.append(e.digest)
        out.used_after -= e.size
    out.used_after = max(out.used_after, 0)
    out.shortfall = max(0, out.used_after - limits.low_bytes)
    return out
