"""Evidence for reports about peers: what one node's word about another is worth.

A node is believed about itself. About a *peer* it is believed only as far as
it can show, and never so far that one enrolled node alone can take another
out of the cluster. The rules (coordinator/quarantine.py and transfers.py call
these; quarantine itself is decided in quarantine.py):

* **A transfer backs the report.** A report naming a peer -- a
  ``host_key_mismatch`` or ``bad_chunk`` event, or a failed transfer blaming
  its seeder (kind ``security``, ``verify``/``seeder_fault``, ``io``,
  ``unreachable``) -- counts only if the coordinator assigned the reporter a
  transfer *from that peer* that is running or ended at most
  :data:`EVIDENCE_WINDOW` seconds ago. Anything else is refused with 403 and
  recorded as an ``unfounded_report`` security event against the reporter.
  The coordinator makes every assignment itself and keeps the record, so a
  node cannot invent one; it can only report on peers it was really sent to.
* **Bad chunks need two demanders.** Each bad-chunk claim makes that
  demander and that seeder avoid each other for a while. The seeder is
  penalized (speed halved) only once at least :data:`MIN_INDEPENDENT_DEMANDERS`
  *different* demanders, each with its own transfer from it, have reported
  bad chunks, and quarantined once ``seeder_fault_limit`` different demanders
  have. A demander counts once however often it reports, so one node -- even
  one assigned a hundred transfers from its victim -- cannot get it penalized
  or quarantined; it takes two enrolled nodes acting together.
* **Host keys are checked by the coordinator itself.** A host-key claim with
  a transfer behind it makes the coordinator connect to the seeder's enrolled
  address and compare the host key it is shown with the one pinned at
  enrollment (coordinator/hostkey_probe.py). Only the coordinator's own
  probe seeing another key quarantines the seeder; a probe that sees the
  pinned key clears it (the claim is recorded, the pair avoids each other),
  and one that cannot connect changes nothing. A reporter cannot forge what
  the coordinator sees on its own connection.
* **An origin is never quarantined on peers' word.** It is the cluster's
  source: bad-chunk reports from any number of demanders penalize it but do
  not take it out (it checks its own copy before serving and stops
  advertising a corrupt one, see coordinator/holdings.py); only the
  coordinator's own host-key probe can quarantine it.

Memory is bounded: ended pairs are forgotten after the window, and at most
one reporter set per seeder is kept (its size is bounded by the number of
enrolled nodes). The bad-chunk reporters live in memory only: after a
coordinator restart corroboration starts over, which only ever makes a
quarantine harder to reach.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Literal

from rainbowd.core.sched.records import Transfer

#: a report about a peer counts while a transfer from it to the reporter runs and this
#: long after it ended (seconds). As long as an agent keeps retrying a final report
#: (agent.REPORT_RETRY_SECONDS), so an honest report delayed by a short outage still
#: counts; after that a node cannot bring up an old transfer to accuse its seeder.
EVIDENCE_WINDOW = 120.0
#: different demanders that must report bad chunks from a seeder before it is penalized
#: (and the floor of the quarantine limit): no single node can act on a peer alone
MIN_INDEPENDENT_DEMANDERS = 2
#: ended (demander, seeder) pairs remembered at most; past this the oldest are dropped
#: early (a very busy cluster then has a shorter window, never unbounded memory)
MAX_ENDED_PAIRS = 100_000

#: the reporter recorded for events the coordinator raises itself
COORDINATOR = "coordinator"

#: what a backed bad-chunk claim does: keep the pair apart only, also halve the seeder's
#: speed, or quarantine it
Verdict = Literal["pair", "penalize", "quarantine"]


class PeerEvidence:
    """Which reports about peers are backed by a transfer; who reported bad chunks."""

    def __init__(self, window: float = EVIDENCE_WINDOW) -> None:
        self.window = window
        # (demander, seeder) -> when their last transfer ended, oldest first
        self._ended: OrderedDict[tuple[str, str], float] = OrderedDict()
        # seeder -> demanders that reported bad chunks from it (with a transfer behind it)
        self._bad_chunks: dict[str, set[str]] = {}

    def transfer_ended(self, t: Transfer, now: float) -> None:
        """``t`` stopped (done, failed or aborted): reports about it count a while longer."""
        key = (t.demander, t.seeder)
        self._ended.pop(key, None)
        self._ended[key] = now
        self._prune(now)

    def backed(self, reporter: str, peer: str, active: Iterable[Transfer], now: float) -> bool:
        """Was ``reporter`` sent to ``peer`` by us: a transfer running now or ended lately?"""
        if any(t.demander == reporter and t.seeder == peer for t in active):
            return True
        self._prune(now)
        ended = self._ended.get((reporter, peer))
        return ended is not None and now - ended <= self.window

    def bad_chunks(self, seeder: str, demander: str) -> int:
        """Count ``demander``'s (backed) bad-chunk report; how many different demanders did."""
        reporters = self._bad_chunks.setdefault(seeder, set())
        reporters.add(demander)
        return len(reporters)

    def bad_chunk_verdict(
        self, seeder: str, demander: str, *, origin: bool, limit: int
    ) -> tuple[Verdict, int]:
        """Count a backed bad-chunk claim; what follows, and how many demanders reported."""
        n = self.bad_chunks(seeder, demander)
        if n >= max(limit, MIN_INDEPENDENT_DEMANDERS) and not origin:
            return "quarantine", n
        return ("penalize" if n >= MIN_INDEPENDENT_DEMANDERS else "pair"), n

    def forget(self, node_id: str) -> None:
        """An admin cleared ``node_id``'s quarantine: its bad-chunk record starts afresh."""
        self._bad_chunks.pop(node_id, None)

    def _prune(self, now: float) -> None:
        ended = self._ended
        while ended:
            key, at = next(iter(ended.items()))
            if now - at <= self.window and len(ended) <= MAX_ENDED_PAIRS:
                break
            del ended[key]


def unfounded(reporter: str, peer: str, what: str, window: float) -> str:
    """The 403 message (and security event detail) for a report without a transfer behind it."""
    return (
        f"node {reporter} reported {what} about {peer}, but no transfer from {peer} to "
        f"{reporter} is running or ended in the last {window:.0f}s: a report about a peer "
        "counts only for a transfer the coordinator assigned; recorded against the reporter"
    )
