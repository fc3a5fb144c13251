"""When waiting for a pull has become pointless: no progress for a configured time.

A registry front door that lacks an image asks for it and holds the client's
request while the layers arrive (agent/mirror/pull_on_miss.py). It must not
hold it forever: containerd and Docker fall back to the upstream only once the
mirror answers, so a pull that stopped moving must end soon. But a big image
on a slow link may take minutes while moving steadily, so a fixed total
timeout would cut good pulls short. The rule: **give up when no progress was
seen for ``stall_s``** -- progress being any growth of a monotone count (the
chunks of the image's layers the node holds) -- and never before.

Pure: time is passed in; the agent samples its store and asks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StallWatch:
    """Tracks a count that should keep growing; stalled once it has not for ``stall_s``."""

    stall_s: float
    started_at: float
    best: int = -1  # the highest count seen (-1: none yet)
    moved_at: float = 0.0  # when it last grew (or the start)

    def __post_init__(self) -> None:
        if not self.stall_s > 0:
            raise ValueError(f"stall_s must be > 0 (got {self.stall_s})")
        self.moved_at = self.started_at

    def seen(self, count: int, now: float) -> bool:
        """Record ``count`` at ``now``; True when stalled (no growth for ``stall_s``)."""
        if count > self.best:
            if self.best >= 0:
                self.moved_at = now
            self.best = count
        return now - self.moved_at >= self.stall_s

    def left(self, now: float) -> float:
        """Seconds until it stalls unless the count grows."""
        return max(0.0, self.moved_at + self.stall_s - now)
