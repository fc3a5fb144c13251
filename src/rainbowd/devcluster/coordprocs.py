"""Coordinator processes started one at a time: a standby pair on one database (issue 16).

:class:`~rainbowd.devcluster.localcluster.LocalCluster` runs one coordinator;
a standby pair needs two (or more) sharing one PostgreSQL and one set of
tokens, each killed and restarted on its own. :func:`start_coordinator` starts
``rbd-coordinator`` as systemd would (its console entry point, its own state
directory), on a fixed or ephemeral loopback port, and returns once it
listens (``--ready-file``); a standby listens too, so "started" is not
"leads": ask ``GET /v1/health`` (``role``, ``leader``) or wait for
:meth:`CoordinatorProcess.log_events`. The benchmark bench/takeover.py and
tests/integration/test_rbd_status.py use it; each process dies with its
starter (``PR_SET_PDEATHSIG``) and is stopped by PID.

Agents for such a pair come from a LocalCluster whose coordinator is never
started: pass its ``coordinator_dir`` as ``tokens`` (the coordinators create
the token files there, where the agents' configs look for the join token) and
give every node ``config={"coordinator_url": [url_a, url_b]}``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .localcluster import ClusterError, die_with_parent

#: how a coordinator is started: its console entry point's module
CLI = (sys.executable, "-m", "rainbowd.coordinator.cli")
#: a process's start (Python, imports, the schema) on a busy 2-core machine
START_TIMEOUT_S = 30.0
#: how long SIGTERM may take (a leader releases its lease) before SIGKILL
STOP_TIMEOUT_S = 15.0
#: how often the start polls the ready file
POLL_S = 0.05


@dataclass
class CoordinatorProcess:
    """One running ``rbd-coordinator``: its URL, its process and this start's JSON log."""

    name: str
    popen: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """``kill -9`` (by PID) and reap: the crash a standby must survive."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        """SIGTERM (a leader releases its lease), SIGKILL if it lingers."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """The JSON log records of this start named ``event``, oldest first."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and doc.get("event") == event:
                out.append(doc)
        return out


def start_coordinator(
    state_dir: Path,
    *,
    state_url: str,
    tokens: Path,
    listen: str = "127.0.0.1:0",
    heartbeat_interval: float = 0.5,
    log_level: str = "info",
    extra: tuple[str, ...] = (),
) -> CoordinatorProcess:
    """``rbd-coordinator`` with its state in ``state_url``; returns once it listens.

    ``tokens`` is the directory of the join, admin and metrics token files every
    coordinator of the pair shares (the first to start creates them). Each start
    logs to a new ``log-N.jsonl`` in ``state_dir``.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    tokens.mkdir(parents=True, exist_ok=True)
    ready = state_dir / "ready"
    ready.unlink(missing_ok=True)
    log = state_dir / f"log-{len(list(state_dir.glob('log-*.jsonl')))}.jsonl"
    args = [
        *CLI,
        "--state-dir",
        str(state_dir),
        "--state-url",
        state_url,
        "--listen",
        listen,
        "--ready-file",
        str(ready),
        "--log-json",
        "--log-level",
        log_level,
        "--heartbeat-interval",
        str(heartbeat_interval),
        *(f"--{w}-token-file={tokens / f'{w}-token'}" for w in ("join", "admin", "metrics")),
        *extra,
    ]
    with log.open("ab") as out:
        popen = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=die_with_parent,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (ready.is_file() and ready.read_text().strip()):
        if popen.poll() is not None or time.monotonic() > deadline:
            if popen.poll() is None:
                popen.kill()
                popen.wait()
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise ClusterError(f"rbd-coordinator {state_dir.name} did not start:\n{tail}")
        time.sleep(POLL_S)
    return CoordinatorProcess(state_dir.name, popen, f"http://{ready.read_text().strip()}", log)
