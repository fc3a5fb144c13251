"""Which coordinator to ask next: the list of URLs a client follows the leader through.

A cluster may run several coordinators on one database, one leading and the
others standing by (docs/standby-coordinator.md). Agents and ``rbd``
are configured with all their URLs; :class:`CoordinatorList` remembers which
one answered last (the leader, so later calls go there first), and a
:class:`Walk` decides, for one call, which URL to try after an attempt failed
and how long to pause first:

* a standby's 503 naming a leader that is *in the list*: that URL, at once;
* a leader not in the list is never followed: the list is the trust boundary
  (credentials and the admin token go only to configured coordinators);
* otherwise (a refused connection, a standby that knows no leader): the next
  URL, round robin; each time as many attempts as there are URLs have failed in a
  row, a pause first, doubling from :data:`BACKOFF_START` up to
  :data:`BACKOFF_CAP` with jitter, until the call's deadline.

One URL is today's single coordinator and behaves as before: one attempt, its
error raised as it is (the agent's loops and its report sender retry on their
own schedule). Sans-IO: the caller passes the clock reading and does the
sleeping and the HTTP (lib/client.py), so tests run every schedule without
waiting.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

#: most coordinator URLs a client takes: each costs an attempt per round when none
#: leads, and a real cluster runs two or three; more is a misconfiguration
MAX_COORDINATORS = 16
#: pause after the first round in which every URL failed (seconds): a takeover
#: (lease + poll + restore) takes a few seconds, so the first retries come fast
BACKOFF_START = 0.1
#: longest pause between rounds: a client hears of a new leader within about this,
#: and a hundred agents waiting out a takeover send a request per URL per this, at most
BACKOFF_CAP = 2.0


class CoordinatorListError(ValueError):
    """The configured coordinator URLs are unusable; the message says which and why."""


def normalize(url: str) -> str:
    """A base URL as compared and used: no surrounding blanks, no trailing slash."""
    return url.strip().rstrip("/")


def parse_urls(value: str | Sequence[str], what: str = "coordinator URL") -> tuple[str, ...]:
    """Coordinator base URLs from a comma-separated string or a list, checked.

    Each must be ``http(s)://HOST[:PORT][/PATH]``; none twice; at least one, at
    most :data:`MAX_COORDINATORS`. The error names ``what`` and the bad entry.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    if not items or items == [""]:
        raise CoordinatorListError(f"{what}: give at least one http(s):// URL")
    if len(items) > MAX_COORDINATORS:
        raise CoordinatorListError(
            f"{what}: {len(items)} URLs, at most {MAX_COORDINATORS} (one per coordinator)"
        )
    out: list[str] = []
    seen: set[str] = set()
    for raw in items:
        if not isinstance(raw, str):
            raise CoordinatorListError(f"{what}: {raw!r} is not a URL string")
        url = normalize(raw)
        if not url:
            raise CoordinatorListError(f"{what} {value!r}: an empty entry (a stray comma?)")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise CoordinatorListError(
                f"{what} {raw.strip()!r}: must start with http(s)://, e.g. http://coord-1:7700"
            )
        key = _key(url)
        if key in seen:
            raise CoordinatorListError(f"{what} {raw.strip()!r}: listed twice")
        seen.add(key)
        out.append(url)
    return tuple(out)


def _key(url: str) -> str:
    """What makes two URLs the same coordinator: scheme and host compare case-blind."""
    parts = urlsplit(normalize(url))
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path}"


class CoordinatorList:
    """The configured coordinator URLs and the one to ask first (the last that answered)."""

    def __init__(
        self, urls: str | Sequence[str], *, rng: Callable[[], float] = random.random
    ) -> None:
        self.urls = parse_urls(urls)
        self._keys = {_key(u): u for u in self.urls}
        self._current = self.urls[0]
        self._rng = rng

    @property
    def current(self) -> str:
        """The URL a call tries first: the last that answered, or the next after a failure."""
        return self._current

    def known(self, url: str) -> str | None:
        """``url`` as configured if it is in the list (the only URLs followed), else None."""
        if not url:
            return None
        return self._keys.get(_key(url))

    def answered(self, url: str) -> None:
        """``url`` took a request (it leads, or there is one coordinator): ask it first."""
        self._current = url

    def walk(self) -> Walk:
        """The plan of one call: start at :attr:`current`."""
        return Walk(self)

    def failed_over(self, failed: str, to: str) -> None:
        """``failed`` gave no answer: ask ``to`` first from now on.

        Only if no other call found a better one meanwhile (calls run concurrently).
        """
        if self._current == failed:
            self._current = to

    def jitter(self) -> float:
        """A factor in [0.5, 1] for a pause, so clients that lost the leader together spread."""
        return 0.5 + 0.5 * self._rng()


class Walk:
    """One call's way through the list: which URL after a failure, and the pause before it."""

    def __init__(self, coordinators: CoordinatorList) -> None:
        self.coordinators = coordinators
        self.first = coordinators.current
        #: attempts of this call that failed in a row
        self.failures = 0
        self._rounds = 0

    def next(
        self, failed: str, *, now: float, deadline: float, leader: str | None = None
    ) -> tuple[str, float] | None:
        """After ``failed`` gave no answer: the URL to try next and the seconds to pause first.

        ``leader`` is a URL of the list a standby named (see
        :meth:`CoordinatorList.known`). None when the call should give up: one URL
        (today's behaviour), or the pause would end past ``deadline``.
        """
        urls = self.coordinators.urls
        if len(urls) == 1:
            return None
        self.failures += 1
        if leader is not None:
            target = leader
        else:
            i = urls.index(failed) if failed in urls else -1
            target = urls[(i + 1) % len(urls)]
        pause = 0.0
        if self.failures % len(urls) == 0:
            # a whole list's worth failed (or standbys sent us in a circle): back off
            self._rounds += 1
            cap = min(BACKOFF_CAP, BACKOFF_START * 2 ** (self._rounds - 1))
            pause = cap * self.coordinators.jitter()
        if now + pause >= deadline:
            return None
        self.coordinators.failed_over(failed, target)
        return target, pause


__all__ = [
    "BACKOFF_CAP",
    "BACKOFF_START",
    "MAX_COORDINATORS",
    "CoordinatorList",
    "CoordinatorListError",
    "Walk",
    "normalize",
    "parse_urls",
]
