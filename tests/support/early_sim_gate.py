"""The simulator's long runs of tests/bench/test_sim_gate.py, started when the session starts.

The gate simulates every shape of the suite at the record's sizes (~77 CPU
seconds, ~40 s on CI's two cores), and the determinism test runs a small suite
once per PYTHONHASHSEED (~10 CPU seconds each): all of it computing. Most of
the suite's tests wait (on processes, sockets, timers) and leave cores idle,
so these runs are started in processes of their own as soon as collection
selects their tests (tests/bench/conftest.py), at a lower CPU priority
(``nice``) so the tests beside them keep the cores they had, and their tests
are moved to the end of the session, where they check what the runs computed.
They are the same runs: the gate's is the same ``run_suite`` call on the same
record, in worker processes either way (the simulations are deterministic:
test_runs_in_worker_processes_are_the_runs_one_after_the_other), and the
hash-seed runs the same commands.

Run as a script (``python early_sim_gate.py OUT``) it is the gate's process: it
writes the runs, pickled, to OUT. (No tests here; pytest collects nothing
from this module.)
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from background_run import BackgroundRun

ROOT = Path(__file__).resolve().parents[2]
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


#: ``python -m bench.sim`` arguments of the determinism test's two runs (each adds ``--out``)
SAME_SEED_ARGS = [
    "suite", "--nodes", "60", "--only", "bimodal,random-asymmetric,drawn-2", "--random", "2",
]  # fmt: skip
#: the PYTHONHASHSEED of each of those runs
HASH_SEEDS = ("1", "2")


def start_hash_seed_runs(workdir: Path) -> list[tuple[BackgroundRun, Path]]:
    """The determinism test's runs, one per hash seed, at once; each with its JSON's path."""
    runs = []
    for seed in HASH_SEEDS:
        out = workdir / f"s{seed}.json"
        argv = [sys.executable, "-m", "bench.sim", *SAME_SEED_ARGS, "--out", str(out)]
        log = workdir / f"s{seed}.log"
        run = BackgroundRun(argv, log, cwd=ROOT, env={"PYTHONHASHSEED": seed})
        run.start()
        runs.append((run, out))
    return runs


class Early:
    """What the session started: the gate's runs and the hash-seed runs, as selected."""

    def __init__(self, gate: bool, hash_seeds: bool) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="rbd-simgate-"))
        self.gate_out = self.workdir / "runs.pickle"
        self.gate: BackgroundRun | None = None
        if gate:
            argv = [sys.executable, __file__, str(self.gate_out)]
            self.gate = BackgroundRun(argv, self.workdir / "runs.log", cwd=ROOT)
            self.gate.start()
        self.hash_seeds = start_hash_seed_runs(self.workdir) if hash_seeds else None

    def stop(self) -> None:
        for run in [self.gate, *(r for r, _ in self.hash_seeds or [])]:
            if run is not None:
                run.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


#: the session's early runs, when collection selected a test that uses them
EARLY: pytest.StashKey[Early] = pytest.StashKey()
#: the fixtures whose runs start early: tests that use them run last (see early_last)
FIXTURES = ("gate_runs", "hash_seed_outputs")


def _uses(item: pytest.Item, fixture: str) -> bool:
    return fixture in getattr(item, "fixturenames", ())


def early_last(items: list[pytest.Item]) -> None:
    """Move the tests whose runs start early to the end of the session, so those runs have
    every test before them to compute beside (tests/bench runs second otherwise)."""
    late = [i for i in items if any(_uses(i, f) for f in FIXTURES)]
    if late:
        items[:] = [i for i in items if i not in late] + late


def start_early(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    gate = any(_uses(i, "gate_runs") for i in session.items)
    seeds = any(_uses(i, "hash_seed_outputs") for i in session.items)
    if gate or seeds:
        session.config.stash[EARLY] = Early(gate, seeds)


def end_early(session: pytest.Session) -> None:
    early = session.config.stash.get(EARLY, None)
    if early is not None:
        early.stop()


def _wait(run: BackgroundRun) -> None:
    """Wait for ``run``; fail with what it printed unless it exited 0."""
    failed = run.wait(WAIT_S, log_tail=3000)
    assert not failed, failed


def runs_for(config: pytest.Config) -> list[Any]:
    """The early process's gate runs if the session started one, else computed now."""
    early = config.stash.get(EARLY, None)
    if early is None or early.gate is None:
        return gate_runs(os.cpu_count() or 1)
    _wait(early.gate)
    with open(early.gate_out, "rb") as f:
        runs: list[Any] = pickle.load(f)  # written by this module's own process
    return runs


def hash_seed_outputs(config: pytest.Config, tmp_path: Path) -> list[Path]:
    """The JSON of each hash seed's run: the early ones if started, else run now in tmp_path."""
    early = config.stash.get(EARLY, None)
    runs = early.hash_seeds if early is not None else None
    if runs is None:
        runs = start_hash_seed_runs(tmp_path)
    try:
        for run, _ in runs:
            _wait(run)
    finally:
        for run, _ in runs:
            run.stop()
    return [out for _, out in runs]


if __name__ == "__main__":
    result = gate_runs(os.cpu_count() or 1)
    Path(sys.argv[1]).write_bytes(pickle.dumps(result))
