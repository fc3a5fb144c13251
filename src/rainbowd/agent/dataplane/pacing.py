"""RatePacer: hold a byte stream to a configured rate (the agent's bandwidth caps).

Each call to :meth:`RatePacer.pace` books ``nbytes`` of the link and returns
when that booking ends, so however many tasks share one pacer (all pulls of
an agent share its download pacer), the bytes they pass through it never run
ahead of ``bps``: after ``n`` bytes, at least ``n / bps`` seconds have gone
by since the pacer was last idle. Idle time is not saved up as credit, so a
burst after a pause is paced like any other traffic.

Pacing the receiver works through flow control: a pull waits here before it
asks for more chunks, so what is in flight stays bounded by its request
window, and the seeder -- whatever its speed -- sends no faster than this.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class RatePacer:
    def __init__(
        self,
        bps: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """``clock`` and ``sleep`` are the time the pacer books against (tests pass fake ones)."""
        if bps < 0:
            raise ValueError(f"rate {bps} bytes/s: must be >= 0 (0 = no cap)")
        self.bps = bps
        self.clock = clock
        self.sleep = sleep
        self._booked_until = 0.0

    async def pace(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more fit under the rate (returns at once without a cap)."""
        if self.bps <= 0 or nbytes <= 0:
            return
        now = self.clock()
        self._booked_until = max(now, self._booked_until) + nbytes / self.bps
        delay = self._booked_until - now
        if delay > 0:
            await self.sleep(delay)
