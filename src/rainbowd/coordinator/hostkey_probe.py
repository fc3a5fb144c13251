"""The coordinator's own look at a seeder's SSH host key (evidence for host-key claims).

A demander that saw a wrong host key may be right (someone took the seeder's
address), wrong (a man in the middle on its own path only) or lying. Its word
is not enough to quarantine anyone (coordinator/evidence.py): the coordinator
connects to the seeder's *enrolled* address and port itself, runs the SSH key
exchange (which proves the far end holds the private half of the key it
shows) and compares that key with the one pinned at enrollment. No
authentication is attempted; the agent's server sees a connection that ends
after the handshake.

Checks run as background tasks on the coordinator's event loop, at most one
per node at a time and one per node per :data:`PROBE_INTERVAL` (a burst of
claims about one seeder costs one connection), each bounded by
:data:`PROBE_TIMEOUT`. The probe function is a parameter so unit tests can
play the network.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import structlog

log = structlog.get_logger(__name__)

#: seconds a probe may take (TCP connect plus SSH key exchange)
PROBE_TIMEOUT = 5.0
#: a node's host key is probed at most once per this many seconds (claims in between
#: are recorded but start no new connection)
PROBE_INTERVAL = 10.0
#: probes running at once, all nodes together (a flood of claims cannot fan out)
MAX_CONCURRENT_PROBES = 8

ProbeState = Literal["match", "mismatch", "unreachable"]


@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    state: ProbeState
    detail: str  # what was seen: the presented key's fingerprint, or why none was


Probe = Callable[[str, int, str], Awaitable[ProbeOutcome]]
OnResult = Callable[[str, str, ProbeOutcome], None]


async def probe_host_key(address: str, port: int, pinned: str) -> ProbeOutcome:
    """Connect to ``address:port``, run the key exchange, compare the host key to ``pinned``."""
    # Imported here, not at the top: asyncssh (and the cryptography it loads) took
    # ~0.26 s of the coordinator's 0.70 s start-up, and only this probe needs it.
    import asyncssh

    try:
        want = asyncssh.import_public_key(pinned)
    except (asyncssh.KeyImportError, ValueError) as e:
        return ProbeOutcome("unreachable", f"pinned host key unusable: {e}")
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            seen = await asyncssh.get_server_host_key(
                address, port, config=[], server_host_key_algs=[want.get_algorithm()]
            )
    except (OSError, TimeoutError, asyncssh.Error) as e:
        return ProbeOutcome("unreachable", f"{address}:{port}: {type(e).__name__}: {e}")
    if seen is None:
        return ProbeOutcome("unreachable", f"{address}:{port} presented no host key")
    fp = str(seen.get_fingerprint("sha256"))
    state: ProbeState = "match" if seen.public_data == want.public_data else "mismatch"
    return ProbeOutcome(state, fp)


class HostKeyChecks:
    """Runs probes in the background and hands each outcome to ``on_result``."""

    def __init__(
        self,
        clock: Callable[[], float],
        probe: Probe = probe_host_key,
        interval: float = PROBE_INTERVAL,
    ) -> None:
        self.clock = clock
        self.probe = probe
        self.interval = interval
        self._last: dict[str, float] = {}  # node -> when its last probe started
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_PROBES)

    def request(
        self, node_id: str, address: str, port: int, pinned: str, on_result: OnResult
    ) -> bool:
        """Probe ``node_id`` soon unless one ran lately; True if a probe was started."""
        now = self.clock()
        last = self._last.get(node_id)
        if last is not None and now - last < self.interval:
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # only ever called from the app's handlers; say so if not
            log.error("host key probe needs the coordinator's event loop", node=node_id)
            return False
        self._last[node_id] = now
        task = loop.create_task(self._run(node_id, address, port, pinned, on_result))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _run(
        self, node_id: str, address: str, port: int, pinned: str, on_result: OnResult
    ) -> None:
        async with self._slots:
            outcome = await self.probe(address, port, pinned)
        log.info("host key probed", node=node_id, state=outcome.state, detail=outcome.detail)
        try:
            on_result(node_id, pinned, outcome)
        except Exception:
            log.exception("host key probe result could not be applied", node=node_id)

    async def wait(self) -> None:
        """Until every probe started so far has finished (tests; shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
