"""The simulator gate's runs (tests/bench/test_sim_gate.py), started when the session starts.

The gate simulates every shape of the suite at the record's sizes: ~77 CPU
seconds, ~40 s on CI's two cores, all of it computing. Most of the suite's
tests wait (on processes, sockets, timers) and leave cores idle, so the runs
are started in a process of their own as soon as collection selects the gate
(tests/bench/conftest.py), at a lower CPU priority (``nice``) so the tests
beside them keep the cores they had; the gate test then checks the runs that
process computed. They are the same runs: the same ``run_suite`` call on the
same record, in worker processes either way (the simulations are
deterministic: test_runs_in_worker_processes_are_the_runs_one_after_the_other).

Run as a script (``python early_sim_gate.py OUT``) it is that process: it
writes the runs, pickled, to OUT. (No tests here; pytest collects nothing
from this module.)
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: CPU niceness of the background runs: the tests they run beside come first
NICENESS = 10
#: seconds the gate may wait for the runs (pytest-timeout stops the test before, at 300)
WAIT_S = 280


def gate_runs(workers: int) -> list[Any]:
    """The gate's runs, computed here: every suite shape at the record's sizes."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.sim.gate import GATE, read_record
    from bench.sim.suite import run_suite, suite_profiles
    from rainbowd.core.sched.scheduler import DEFAULT_POLICY

    record = read_record(GATE)
    profiles = suite_profiles(record["random"], record["seeds_from"])
    return run_suite(profiles, record["nodes"], DEFAULT_POLICY, workers=workers)


class EarlyGate:
    """One background process computing :func:`gate_runs`, its result in a pickle file."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="rbd-simgate-"))
        self.out = self.workdir / "runs.pickle"
        self.log_path = self.workdir / "runs.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["nice", "-n", str(NICENESS), sys.executable, __file__, str(self.out)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own group: stop() ends its workers too
            )

    def runs(self) -> list[Any]:
        """Wait for the process; its runs, or fail with what it printed."""
        try:
            code = self.proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"the simulator gate's runs took over {WAIT_S} s")
        log = self.log_path.read_text(errors="replace")
        assert code == 0, f"the simulator gate's runs failed ({code}):\n{log[-3000:]}"
        with open(self.out, "rb") as f:
            runs: list[Any] = pickle.load(f)  # written by this module's own process
        return runs

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def remove(self) -> None:
        self.stop()
        for p in (self.out, self.log_path):
            p.unlink(missing_ok=True)
        self.workdir.rmdir()


#: the session's early run, when collection selected a test that uses ``gate_runs``
EARLY: pytest.StashKey[EarlyGate] = pytest.StashKey()


def start_early(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if any("gate_runs" in getattr(item, "fixturenames", ()) for item in session.items):
        session.config.stash[EARLY] = EarlyGate()


def end_early(session: pytest.Session) -> None:
    run = session.config.stash.get(EARLY, None)
    if run is not None:
        run.remove()


def runs_for(config: pytest.Config) -> list[Any]:
    """The early process's runs if the session started one, else computed now (as before)."""
    run = config.stash.get(EARLY, None)
    if run is None:
        return gate_runs(os.cpu_count() or 1)
    return run.runs()


if __name__ == "__main__":
    result = gate_runs(os.cpu_count() or 1)
    Path(sys.argv[1]).write_bytes(pickle.dumps(result))
