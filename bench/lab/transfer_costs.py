"""What each transfer cost rbd in the lab beyond its bytes, read from the run's logs.

The simulator charges every transfer fixed costs (bench/sim/overheads.py): the
assignment reaching the demander, a new SSH connection to a seeder, the done
report reaching the coordinator. Its defaults come from micro-benchmarks on an
idle host (an asyncssh handshake is ~3.4 ms of CPU on this machine). The lab is
not idle and scales rates down but not packets: at a quarter or an eighth of
the paper profile's rates a 16 KiB segment holds a slow link for a quarter of a
second, so every round trip of a handshake can wait behind one, and 100 agents
share two cores. Measured in a paper run at an eighth of its rates (session 16):
a new connection took a median 1.0 s (40 % of the pulls opened one), an
assignment 0.1 s to reach its agent, a done report 0.45 s to be applied -- 10 to
500 times the simulator's defaults, and with ~97 one-chunk pieces a node they
were most of the gap between the lab (225.6 s) and the simulator (177.8 s,
-21 %). Charged what the lab measured, the simulator gave 207.2 s (-8.1 %, per
node median |error| 3.9 %).

So the lab measures these costs itself when its processes log every transfer
(``--log-level info``), and records them in the report (``transfer_costs`` in
the system's notes); ``python -m bench.sim --compare`` charges them unless told
otherwise. Medians, so a few stalled transfers do not set the cost of all.

Log events read (JSON lines, ``timestamp`` in ISO 8601): the coordinator's
``transfer assigned`` and ``transfer done`` (field ``transfer``), each agent's
``pulling layer``, ``pull_started`` and ``pull_done`` (field ``transfer``)
and ``seeder_connected`` (field ``seeder``: the connection a pull waiting for
that seeder opened).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

#: fewer pulls than this in the logs measure nothing worth charging (logs below info level
#: have none; a run that moved next to nothing has too few)
MIN_PULLS = 20
#: the coordinator's log file in a LocalCluster's logs directory; every other is an agent's
COORDINATOR_LOG = "coordinator.log"


@dataclass(frozen=True)
class TransferCosts:
    """Median fixed costs per transfer of one lab run (module docstring)."""

    pulls: int
    #: pulls that had to open an SSH connection to their seeder
    new_connections: int
    #: the coordinator assigned it -> the demander's agent started on it
    assign_s: float
    #: a pull that opened a connection: started -> connected (0.0 if none did)
    connect_s: float
    #: the demander's agent finished the pull -> the coordinator applied its done report
    finish_s: float

    def as_notes(self) -> dict[str, float | int]:
        return {
            "pulls": self.pulls,
            "new_connections": self.new_connections,
            "assign_s": round(self.assign_s, 4),
            "connect_s": round(self.connect_s, 4),
            "finish_s": round(self.finish_s, 4),
        }


def measure(logs: Path) -> TransferCosts | None:
    """The run's transfer costs from ``logs`` (a LocalCluster's logs directory), None if too few."""
    coordinator = logs / COORDINATOR_LOG
    if not coordinator.is_file():
        return None
    assigned: dict[str, float] = {}
    applied: dict[str, float] = {}
    for e in _events(coordinator):
        tid = e.get("transfer")
        if not isinstance(tid, str):
            continue
        if e["event"] == "transfer assigned":
            assigned.setdefault(tid, e["t"])
        elif e["event"] == "transfer done":
            applied.setdefault(tid, e["t"])
    received: dict[str, float] = {}
    pulled: dict[str, float] = {}
    connects: list[float] = []
    for path in sorted(logs.glob("*.log")):
        if path.name != COORDINATOR_LOG:
            connects += _agent_log(path, received, pulled)
    if len(pulled) < MIN_PULLS:
        return None
    assign = [received[t] - assigned[t] for t in received if t in assigned]
    finish = [applied[t] - pulled[t] for t in pulled if t in applied]
    if not assign or not finish:
        return None
    return TransferCosts(
        pulls=len(pulled),
        new_connections=len(connects),
        assign_s=max(0.0, statistics.median(assign)),
        connect_s=max(0.0, statistics.median(connects)) if connects else 0.0,
        finish_s=max(0.0, statistics.median(finish)),
    )


def _agent_log(path: Path, received: dict[str, float], pulled: dict[str, float]) -> list[float]:
    """One agent's pulls into ``received``/``pulled``; the seconds each new connection took."""
    waiting: dict[str, list[float]] = {}  # seeder -> start times of pulls not yet connected
    connects: list[float] = []
    for e in _events(path):
        event, tid = e["event"], e.get("transfer")
        if event == "pulling layer" and isinstance(tid, str):
            received.setdefault(tid, e["t"])
        elif event == "pull_started" and isinstance(e.get("seeder"), str):
            waiting.setdefault(e["seeder"], []).append(e["t"])
        elif event == "seeder_connected" and isinstance(e.get("seeder"), str):
            started = waiting.pop(e["seeder"], [])
            if started:
                connects.append(e["t"] - min(started))  # the pull that opened it
        elif event == "pull_done" and isinstance(tid, str):
            pulled.setdefault(tid, e["t"])
            seeder = e.get("seeder")
            if isinstance(seeder, str):
                waiting.pop(seeder, None)  # it had its connection: later pulls reuse it
    return connects


def _events(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines of ``path`` that carry an event and a time (``t``: epoch seconds)."""
    out = []
    with path.open(errors="replace") as f:
        for line in f:
            if not line.startswith("{"):
                continue
            try:
                e = json.loads(line)
                if not isinstance(e, dict) or not isinstance(e.get("event"), str):
                    continue
                when = datetime.fromisoformat(str(e["timestamp"]).replace("Z", "+00:00"))
            except (ValueError, KeyError):
                continue
            e["t"] = when.timestamp()
            out.append(e)
    return out
