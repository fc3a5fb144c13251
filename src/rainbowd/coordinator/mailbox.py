"""Per-node assignment queues with wake-ups for the long-poll.

Every assignment gets a per-node sequence number. An agent polls with the
highest number it has seen (its cursor); everything above is returned, and
everything at or below is acknowledged and dropped. A waiting poll sleeps on
an :class:`asyncio.Event` that :meth:`Mailbox.wake` sets, so an assignment
reaches its agent in milliseconds without any polling loop.

Sequence numbers are persisted with the node, so they keep rising across a
coordinator restart; an agent whose cursor is ahead of the coordinator anyway
(a lost database, say) is handed everything queued and the current cursor.

A batch holds at most :data:`BATCH_BYTES` of encoded assignments (always at
least one): loads carry image records with their manifests, and a backlog of
them must not make a reply larger than a client takes (``MAX_BODY``). The
cursor of a cut batch is its last assignment's number, so the rest comes with
the next poll, at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from rainbowd.core.messages import MAX_BODY, Assignment, encode

#: most bytes of encoded assignments one batch carries (half a body: room for the batch's
#: trust list and framing); a single bigger one still goes, alone
BATCH_BYTES = MAX_BODY // 2


class Mailbox:
    def __init__(self, seq: int = 0) -> None:
        self.seq = seq
        self._items: list[tuple[int, Assignment]] = []
        self._event = asyncio.Event()

    def put(self, assignment: Assignment) -> int:
        self.seq += 1
        self._items.append((self.seq, assignment))
        self.wake()
        return self.seq

    def wake(self) -> None:
        """Release every poll waiting on this node (new work or a new trust list)."""
        self._event.set()
        self._event = asyncio.Event()

    def after(self, cursor: int, max_bytes: int = BATCH_BYTES) -> tuple[int, list[Assignment]]:
        """Acknowledge up to ``cursor``; return (new cursor, assignments after it).

        At most ``max_bytes`` of them encoded (at least one); the new cursor is
        then the last one returned, so the rest follow with the next poll.
        """
        if cursor > self.seq:  # the agent is ahead of us: we lost state; resend all
            items = self._items
        else:
            self._items = [(s, a) for s, a in self._items if s > cursor]
            items = self._items
        out: list[Assignment] = []
        size, last = 0, cursor
        for seq, a in items:
            size += len(encode(a))
            if out and size > max_bytes:
                return last, out
            out.append(a)
            last = seq
        return self.seq, out

    def drop(self, pred: Callable[[Assignment], bool]) -> None:
        """Withdraw queued (maybe not yet delivered) assignments, e.g. aborted transfers."""
        self._items = [(s, a) for s, a in self._items if not pred(a)]

    def pending(self) -> list[Assignment]:
        return [a for _, a in self._items]

    async def wait(self, timeout: float) -> None:
        """Sleep until :meth:`wake` or ``timeout`` seconds, whichever comes first."""
        event = self._event
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
