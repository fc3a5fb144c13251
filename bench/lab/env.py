"""LabEnv: a profile's cluster as network namespaces, and the owner of every process in it.

One :class:`LabEnv` is built per run; the systems under test (rbd, the
registry-only pull, the BitTorrent swarm) run in it one after the other, so
they all see the same shaped links. The origin node and every demander of the
profile get a namespace (rainbowd.devcluster.netlab) shaped with its up/down rates; the
hub namespace is unshaped and holds what is not a node (the rbd coordinator).

Every process a system starts goes through :meth:`LabEnv.spawn`: it runs
inside its node's namespace, logs to ``<workdir>/logs/<name>.log``, dies with
the lab runner (``PR_SET_PDEATHSIG``, kept across ``ip netns exec``'s exec)
and is stopped by PID in :meth:`LabEnv.stop_processes` -- which every system
calls when it is done, and :meth:`LabEnv.down` calls again, so nothing outlives
a crash or a Ctrl-C. ``python -m bench.lab clean`` removes what a killed
runner (``kill -9``) could not.

CPU: every node of the lab shares this machine's few cores, where a real
cluster gives each host its own. A system's *central* process (rbd's
coordinator, the BitTorrent tracker, the registry server) would have its own
host too; here it is started with ``nice`` ``CENTRAL_NICE`` (``spawn(...,
central=True)``), so 100 busy nodes cannot starve it. Every system gets the
same treatment, so the comparison stays fair. (It did not, on its own, stop
the missed heartbeats seen in paper-profile runs: those came from tbf's FIFO,
see rainbowd.devcluster.netlab "Control traffic", and from the agent's busy thread pool.)

A node's CPU need grows with the bytes it moves, so with one CPU share per
process a 32 Mbit/s node got no more CPU than a 4 Mbit/s one once the cores
were full: in paper-profile runs transfers into fast nodes reached a quarter
of their planned rate, those into slow nodes 0.6-0.9 of it. Each node's
processes therefore run at a niceness that gives them a CPU weight in
proportion to the node's link rate (:func:`node_nice`; CFS weights grow
~1.25 x per step), as if each node had its own host sized to its link.
Every system's node processes get the same.

The origin's egress (bench/lab/egress.py): each system calls
:meth:`LabEnv.timed_start` just before its timed phase and
:meth:`LabEnv.timed_end` just after it, and the lab runner reports
``origin_sent`` -- the same kernel counter for every system. The same two
calls read the host's CPU times (bench/lab/hostcpu.py): ``host_cpu_busy`` says
whether the phase measured the network or the host's CPUs.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

from rainbowd.devcluster.localcluster import die_with_parent
from rainbowd.devcluster.netlab import HUB, NetLab, Shape, clean_stale
from rainbowd.devcluster.profile import ORIGIN, ClusterProfile

from .egress import tx_bytes
from .hostcpu import CpuTimes, busy_fraction, read_cpu_times

#: the niceness of each system's central process (see the module docstring)
CENTRAL_NICE = -10
#: CFS's weight ratio between two adjacent nice levels (sched/core.c's prio table)
NICE_STEP = 1.25


def node_nice(rate_mbit: float, slowest_mbit: float) -> int:
    """The niceness that gives a node's processes CPU weight in proportion to its link rate.

    0 for the slowest node; one step lower per factor ``NICE_STEP`` beyond it,
    never as high a priority as the central processes (``CENTRAL_NICE``).
    """
    if rate_mbit <= slowest_mbit or slowest_mbit <= 0:
        return 0
    steps = round(math.log(rate_mbit / slowest_mbit) / math.log(NICE_STEP))
    return max(CENTRAL_NICE + 1, -steps)


#: the central processes' ports, whose traffic every shaped link serves first
#: (rainbowd.devcluster.netlab, "Control traffic"): rbd's coordinator and the BitTorrent tracker
COORDINATOR_PORT = 7700
TRACKER_PORT = 6969


@dataclass
class _Running:
    name: str
    node: str
    popen: subprocess.Popen[bytes]
    log: IO[bytes]


@dataclass
class LabEnv:
    """A shaped NetLab for ``profile`` plus process ownership; use as a context manager."""

    profile: ClusterProfile
    workdir: Path
    #: the docker-archive every system distributes (already built)
    image: Path
    lab: NetLab = field(init=False)
    _procs: list[_Running] = field(default_factory=list, init=False)
    _tx_at_start: int | None = field(default=None, init=False)
    #: bytes the origin sent in the last timed phase (None until one ended)
    origin_sent: int | None = field(default=None, init=False)
    _cpu_at_start: CpuTimes | None = field(default=None, init=False)
    #: share of the host's CPU time that was busy in the last timed phase (0..1)
    host_cpu_busy: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        shapes = {
            n.name: Shape(up_mbit=n.up_mbit, down_mbit=n.down_mbit) for n in self.profile.all_nodes
        }
        self.lab = NetLab(
            [n.name for n in self.profile.all_nodes],
            shapes=shapes,
            control_ports=(COORDINATOR_PORT, TRACKER_PORT),
        )

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> LabEnv:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def up(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.lab.up()

    def down(self) -> None:
        """Stop every process (by PID), then delete every namespace; idempotent."""
        try:
            self.stop_processes()
        finally:
            self.lab.down()

    # -- the timed phase -------------------------------------------------------
    def timed_start(self) -> None:
        """A system's timed phase starts now: note the origin's sent-bytes counter."""
        self.origin_sent = self.host_cpu_busy = None
        self._tx_at_start = tx_bytes(self.lab, ORIGIN)
        self._cpu_at_start = read_cpu_times()

    def timed_end(self) -> None:
        """The timed phase ended: ``origin_sent`` = what the origin sent since timed_start."""
        if self._tx_at_start is None:
            raise RuntimeError("timed_end without timed_start")
        self.origin_sent = tx_bytes(self.lab, ORIGIN) - self._tx_at_start
        if self._cpu_at_start is not None:
            self.host_cpu_busy = busy_fraction(self._cpu_at_start, read_cpu_times())
        self._tx_at_start = self._cpu_at_start = None

    def reset_timed(self) -> None:
        """Forget the last system's count (the runner calls it before each system)."""
        self._tx_at_start = self.origin_sent = self._cpu_at_start = self.host_cpu_busy = None

    # -- nodes -------------------------------------------------------------
    @property
    def origin(self) -> str:
        return ORIGIN

    @property
    def demanders(self) -> list[str]:
        """Every node but the origin, in profile order."""
        return [n.name for n in self.profile.nodes]

    def address(self, node: str) -> str:
        """``node``'s address on the lab bridge (``"hub"`` for the hub)."""
        return self.lab.address(node)

    @property
    def hub(self) -> str:
        return HUB

    def node_dir(self, system: str, node: str) -> Path:
        """A fresh per-system, per-node directory (on the shared file system)."""
        d = self.workdir / system / node
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- processes ---------------------------------------------------------
    def spawn(
        self,
        node: str,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        central: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``node``'s namespace; its output goes to logs/<name>.log.

        ``central``: the system's central process, run at ``CENTRAL_NICE``.
        """
        log_path = self.log_path(name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")
        try:
            p = subprocess.Popen(
                [*self.prefix(node, central=central), *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        except BaseException:
            log.close()
            raise
        self._procs.append(_Running(name, node, p, log))
        return p

    def prefix(self, node: str, *, central: bool = False) -> list[str]:
        """The command prefix that runs a program in ``node``'s namespace (and niceness)."""
        level = CENTRAL_NICE if central else self.nice(node)
        nice = ["nice", "-n", str(level)] if level else []
        return [*self.lab.exec_prefix(node), *nice]

    def nice(self, node: str) -> int:
        """``node``'s niceness: CPU weight in proportion to its link rate (module docstring)."""
        rates = {n.name: n.up_mbit + n.down_mbit for n in self.profile.all_nodes}
        if node not in rates:
            return 0  # the hub: what runs there is central or plumbing
        return node_nice(rates[node], min(rates.values()))

    def log_path(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop_processes(self, grace: float = 5.0) -> None:
        """SIGTERM every process started here, SIGKILL what lingers after ``grace``; reap all."""
        procs, self._procs = self._procs, []
        for r in procs:
            if r.popen.poll() is None:
                r.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for r in procs:
            try:
                r.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                r.popen.kill()
                r.popen.wait()
            r.log.close()


def clean() -> list[str]:
    """Remove the labs of runs that are gone (their processes killed by PID); names removed.

    A runner killed with SIGKILL cannot tear down; its children die with it
    (``PR_SET_PDEATHSIG``) but its namespaces stay. Only labs whose creating
    process no longer exists are touched, so a run in progress is left alone.
    """
    return clean_stale()
