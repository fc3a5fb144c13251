"""How busy the host's CPUs were during a system's timed phase: is the run the network's?

The lab emulates a cluster whose every node has its own CPU, but all of its
nodes share the CPUs of one host. A run is a measure of the emulated network
only while those CPUs keep up; once they are saturated, every system's
processes queue for them and the run times the host instead (session 9: rbd's
101 agents on 2 vCPUs kept both 100 % busy through the paper profile's job at
its own rates and at half of them, and transfers reached a median 0.46 of
their planned rate). So each timed phase is bracketed by two readings of
/proc/stat and the report carries the busy fraction; at
:data:`CPU_BOUND_BUSY` or more the runner says so and the table marks the
row, and ``--rate-scale`` runs the same cluster at lower rates.

Busy is everything but idle and iowait, over all CPUs; steal (time the VM's
host took) counts as busy, because the guest could not use it either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: a timed phase whose CPUs were at least this busy measured the host, not the
#: network (one that is not CPU-bound leaves slack: the paper profile at a quarter
#: of its rates on a quiet host kept them 83-84 % busy, at its own rates 100 %;
#: bench/RESULTS.md, session 9)
CPU_BOUND_BUSY = 0.9

PROC_STAT = Path("/proc/stat")


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative CPU time of all CPUs since boot, in clock ticks."""

    busy: int
    total: int


def parse_proc_stat(text: str) -> CpuTimes:
    """The aggregate ``cpu`` line of /proc/stat as busy and total ticks.

    Fields: user nice system idle iowait irq softirq steal [guest guest_nice];
    guest time is already counted in user and nice, so it is left out.
    """
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [int(x) for x in fields[1:9]]
            if len(ticks) < 5:
                raise ValueError(f"/proc/stat cpu line too short: {line!r}")
            total = sum(ticks)
            idle = ticks[3] + ticks[4]
            return CpuTimes(busy=total - idle, total=total)
    raise ValueError("/proc/stat has no aggregate 'cpu' line")


def read_cpu_times(path: Path = PROC_STAT) -> CpuTimes:
    return parse_proc_stat(path.read_text())


def busy_fraction(start: CpuTimes, end: CpuTimes) -> float | None:
    """The share of CPU time that was busy between two readings (None if no tick passed)."""
    total = end.total - start.total
    if total <= 0:
        return None
    return min(1.0, max(0.0, (end.busy - start.busy) / total))


def cpu_bound(busy: float | None) -> bool:
    """Whether a phase this busy measured the host's CPUs rather than the network."""
    return busy is not None and busy >= CPU_BOUND_BUSY
