"""How a coordinator that does not lead tells a client where the leader is.

Several coordinators may share one database
(docs/standby-coordinator.md); one leads, the others stand by. A standby answers every request
under ``/v1/`` except ``GET /v1/health`` with HTTP 503, an ``ErrorReply`` whose
error contains :data:`NOT_LEADER` (see :func:`not_leader_error`), and, when
it knows the leader, the leader's base URL in :data:`LEADER_HEADER`. A client
(rainbowd/lib/client.py) follows that header only to a URL it was configured
with, so credentials never go to an address a standby names. Shared by both
sides so they agree on the header and on the words.
"""

from __future__ import annotations

#: response header naming the leader's base URL (absent when no leader is known)
LEADER_HEADER = "RBD-Leader"
#: the words in a standby's 503 error: they tell it from the leader's own 503s
#: (a report being applied right now, coordinator/http/report_ids.py)
NOT_LEADER = "not the leader"
#: the status a standby answers with: the request was not applied, safe to send elsewhere
NOT_LEADER_STATUS = 503


def not_leader_error(leader_url: str = "") -> str:
    """The error text of a standby's 503: says it does not lead, and names the leader if known."""
    if leader_url:
        return f"{NOT_LEADER}: the leader is {leader_url}"
    return f"{NOT_LEADER}: no leader is known yet"


def is_not_leader(status: int, error: str, leader_header: str = "") -> bool:
    """Whether a reply is a standby's refusal (so another coordinator may take the request)."""
    if status != NOT_LEADER_STATUS:
        return False
    return bool(leader_header) or NOT_LEADER in error.lower()
