"""The one way a test waits for a condition it cannot await: poll briefly, fail by name.

A test that can await what it waits for (a task, a future, an event the code
under test offers) awaits it. A test of real processes, or of a server whose
state it can only look at, waits here: :func:`wait_until` (in a coroutine) or
:func:`wait_until_sync` (in plain code) checks a predicate, sleeps a little,
and checks again, until it holds or ``timeout`` passes; then it fails with
``what`` it waited for and how long, never with a bare ``TimeoutError``.

The timeout is a failure deadline, not a measurement: a predicate that holds
at once returns at once, so a fast machine runs the test as fast as the code
goes. ``tests/contracts/test_test_rules.py`` keeps every other sleep out of
the in-process tests and tests/security. (No tests here; pytest collects nothing from
this module.)
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

#: first pause between two checks (seconds): most in-process conditions hold within one
FIRST_PAUSE = 0.002
#: longest pause between two checks (seconds): a real process is seen within this of getting there
MAX_PAUSE = 0.05


#: loop turns :func:`settle` gives: enough for a woken task to pass an Event, a wait_for
#: and a lock (each costs a turn or two) and act on what woke it
SETTLE_TURNS = 10


class FakeClock:
    """A ``clock`` to pass to the code under test: time moves only when the test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def settle() -> None:
    """Let every task that is ready run until it waits again; lets no time pass.

    For asserting that something did *not* happen after a wake-up (a task still
    waits, say): give it its turns, then look.
    """
    for _ in range(SETTLE_TURNS):
        await asyncio.sleep(0)


#: futures of :func:`hang` in progress: referenced, so a hung task is cancelled, never collected
_HUNG: set[asyncio.Future[None]] = set()


async def hang() -> None:
    """Never return (until cancelled): a played peer that stalls, not a wait of the test."""
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    _HUNG.add(never)
    try:
        await never
    finally:
        _HUNG.discard(never)


class WaitedTooLong(AssertionError):
    """The condition a test waited for did not come within its timeout."""


def _next_pause(pause: float) -> float:
    return min(pause * 2, MAX_PAUSE)


async def wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    *,
    timeout: float,
    what: str,
) -> T:
    """Return ``predicate()``'s first truthy value; fail naming ``what`` after ``timeout`` s.

    ``predicate`` may be a plain function or a coroutine function (an HTTP
    look at a server, say).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pause = FIRST_PAUSE
    while True:
        got = predicate()
        value: T = await got if inspect.isawaitable(got) else got
        if value:
            return value
        if loop.time() >= deadline:
            raise WaitedTooLong(f"waited {timeout:g}s for {what}; last seen: {value!r}")
        await asyncio.sleep(pause)
        pause = _next_pause(pause)


def wait_until_sync(predicate: Callable[[], T], *, timeout: float, what: str) -> T:
    """:func:`wait_until` for code outside an event loop (subprocesses, files)."""
    deadline = time.monotonic() + timeout
    pause = FIRST_PAUSE
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitedTooLong(f"waited {timeout:g}s for {what}; last seen: {value!r}")
        time.sleep(pause)
        pause = _next_pause(pause)
