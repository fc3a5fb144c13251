"""A command a test session runs beside its tests: at a lower CPU priority, in its own group.

Used for the long runs started at collection (early_sim_gate.py, early_debootstrap.py):
they compute while other tests wait on processes and sockets, and the tests beside them
keep the cores they had (``nice``). Its own process group, so :meth:`BackgroundRun.stop`
ends whatever it started too (the simulator's workers, debootstrap's wget and dpkg).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

#: CPU niceness of the background runs: the tests they run beside come first
NICENESS = 10


class BackgroundRun:
    """``argv`` at nice NICENESS, its output in ``log_path``; started by :meth:`start`."""

    def __init__(
        self,
        argv: list[str],
        log_path: Path,
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = argv
        self.log_path = log_path
        self.cwd = cwd
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.proc is not None:
            return
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["nice", "-n", str(NICENESS), *self.argv],
                cwd=self.cwd,
                env={**os.environ, **(self.env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait(self, timeout_s: float, log_tail: int) -> str:
        """Wait for it to end (starting it if nobody did): '' if it exited 0, else why not,
        with the last ``log_tail`` characters of what it printed."""
        self.start()
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            return f"{' '.join(self.argv)} took over {timeout_s} s"
        if code != 0:
            tail = self.log_path.read_text(errors="replace")[-log_tail:]
            return f"{' '.join(self.argv)} failed ({code}):\n{tail}"
        return ""

    def succeeded(self) -> bool:
        return self.proc is not None and self.proc.poll() == 0

    def stop(self) -> None:
        """End it if still running, its whole process group."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
