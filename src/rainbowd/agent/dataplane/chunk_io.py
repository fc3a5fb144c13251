"""Where an agent runs a chunk's blocking work: on the event loop when small, in a thread when not.

A chunk's disk work is a SHA-256 of it plus one ``pread``/``pwrite`` into the
page cache. Sent to the default thread pool it costs a hop besides: a queue
put that wakes a worker, the worker taking the GIL, a write to the loop's
self-pipe and the loop waking up again. Measured here that hop is ~110 µs of
CPU on an idle machine, as much as hashing 128 KiB, and on a crowded host
each of its wake-ups is a context switch (in the 101-agent lab it was the
largest single item in the agents' GIL-held profile). For a chunk of up to
``INLINE_MAX_BYTES`` the work itself blocks the loop for less than the hop
costs (~0.25 ms at 256 KiB), so it runs inline; bigger chunks (the 4 MiB
default) still go to a thread, where hashing runs beside the loop.

What may wait on the disk for long (``fsync``, ``fdatasync``, renames, opening
a layer's manifest the first time) never runs inline, whatever its size.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

#: largest chunk whose hash-and-copy runs on the event loop
INLINE_MAX_BYTES = 256 * 1024


def runs_inline(nbytes: int, inline_max: int) -> bool:
    """True when a chunk of ``nbytes`` is cheaper to handle inline than to hand to a thread."""
    return nbytes <= inline_max


async def chunk_work(
    nbytes: int, inline_max: int, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """Run ``func`` for a chunk of ``nbytes``: inline if small enough, else in a worker thread."""
    if runs_inline(nbytes, inline_max):
        return func(*args, **kwargs)
    return await asyncio.to_thread(func, *args, **kwargs)
