"""``rbd status``: which coordinator leads (issue 16 item 5, the paper's alert).

Asks every configured coordinator (``--coordinator`` / ``$RBD_COORDINATOR``,
comma-separated) for ``GET /v1/health`` -- unauthenticated, so no admin token
is read -- each on its own and at the same time, never following a
redirection to a leader: the point is what each one says. Prints one row per
URL: its role (``leader``, ``standby`` or ``unreachable``), the leader it
names and, for a leader, its nodes up. A coordinator from before standbys
(no ``role`` in its health) always led, and is shown so.

The exit code is for a monitoring check: 0 when exactly one coordinator
says it leads; 1 when none does (a takeover under way, or every one a
standby that lost the database) or more than one does (never expected: the
lease fences them, coordinator/http/leadership.py); 3 when none answered at
all, as every ``rbd`` command exits when it cannot reach a coordinator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

from rainbowd.lib.client import AdminClient, ApiError, CoordinatorUnreachable

#: seconds one coordinator may take to answer its health check (one attempt, no walk)
HEALTH_TIMEOUT_S = 5.0
LEADER = "leader"
STANDBY = "standby"
UNREACHABLE = "unreachable"
#: exit codes: one leader; none (or several); no coordinator answered (rbd's "unreachable")
EXIT_ONE_LEADER = 0
EXIT_NO_LEADER = 1
EXIT_UNREACHABLE = 3


@dataclass(frozen=True)
class CoordinatorStatus:
    """What one configured coordinator says of itself."""

    url: str
    role: str  # LEADER, STANDBY or UNREACHABLE
    leader: str = ""  # the leader it names ("" if it knows none)
    nodes: int | None = None  # a leader's nodes, and how many are up
    nodes_up: int | None = None
    error: str = ""  # why it is UNREACHABLE


def status_of(url: str, doc: dict[str, Any]) -> CoordinatorStatus:
    """A health document read as a status (no ``role``: a coordinator from before standbys)."""
    role = str(doc.get("role") or LEADER)
    leader = str(doc.get("leader") or (url if "role" not in doc else ""))
    nodes, up = doc.get("nodes"), doc.get("nodes_up")
    return CoordinatorStatus(
        url,
        role if role in (LEADER, STANDBY) else f"{role}?",
        leader,
        nodes if isinstance(nodes, int) else None,
        up if isinstance(up, int) else None,
    )


async def probe(url: str) -> CoordinatorStatus:
    """``GET /v1/health`` of ``url`` alone (a one-URL client makes one attempt)."""
    try:
        async with AdminClient(url, "", timeout=HEALTH_TIMEOUT_S) as c:
            doc = await c.health()
    except (CoordinatorUnreachable, ApiError, aiohttp.ClientError, TimeoutError) as e:
        return CoordinatorStatus(url, UNREACHABLE, error=str(e) or type(e).__name__)
    return status_of(url, doc)


def verdict(states: list[CoordinatorStatus]) -> tuple[int, str]:
    """The exit code and the line that says it."""
    leaders = [s.url for s in states if s.role == LEADER]
    if len(leaders) == 1:
        return EXIT_ONE_LEADER, f"leader: {leaders[0]}"
    if len(leaders) > 1:
        return EXIT_NO_LEADER, f"more than one coordinator says it leads: {', '.join(leaders)}"
    if all(s.role == UNREACHABLE for s in states):
        return EXIT_UNREACHABLE, "no coordinator answered"
    named = sorted({s.leader for s in states if s.leader})
    hint = f" (the standbys name {', '.join(named)})" if named else ""
    return EXIT_NO_LEADER, f"no coordinator leads{hint}"


def render(states: list[CoordinatorStatus]) -> str:
    rows = [["COORDINATOR", "ROLE", "LEADER", "NODES UP", "ERROR"]]
    for s in states:
        up = f"{s.nodes_up}/{s.nodes}" if s.nodes is not None else "-"
        rows.append([s.url, s.role, s.leader or "-", up, s.error])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


async def status_cmd(args: argparse.Namespace) -> int:
    """``rbd status [--json]``; ``args.coordinator`` is the parsed URL list."""
    urls: tuple[str, ...] = tuple(args.coordinator)
    states = list(await asyncio.gather(*(probe(u) for u in urls)))
    code, line = verdict(states)
    if args.json:
        leaders = [s.url for s in states if s.role == LEADER]
        doc = {
            "leader": leaders[0] if len(leaders) == 1 else "",
            "ok": code == EXIT_ONE_LEADER,
            "coordinators": [asdict(s) for s in states],
        }
        print(json.dumps(doc, indent=2))
    else:
        print(render(states))
        print(line, file=sys.stdout if code == EXIT_ONE_LEADER else sys.stderr)
    return code
