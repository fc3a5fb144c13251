"""A private Docker engine: its own data, exec root, socket and pid file.

Tests and ``rbd demo`` need a real dockerd that starts empty, cannot disturb
the host's engine (or another test's), and is reliably gone afterwards. This
starts one with every path under a directory we own, no iptables or bridge
changes (``--iptables=false --bridge=none``; containers run with network
"none"), and stops it by the PID we started, never by name.

Unix socket paths are limited to 108 bytes and dockerd puts containerd's
sockets several levels below ``--exec-root``, so when the given directory is
long the socket and exec root go to a short ``/tmp/rbd-dk-XXXX`` instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

log = structlog.get_logger(__name__)

#: longest base directory we put the socket and exec root under
_SHORT_BASE = 40
STORAGE_DRIVERS = ("overlay2", "vfs")


class DockerdError(RuntimeError):
    """The private dockerd cannot be started or did not come up; says why."""


def ping(socket_path: str | Path, timeout: float = 2.0) -> bool:
    """True if a Docker engine answers ``GET /_ping`` with OK on the unix socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(socket_path))
            s.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
            reply = b""
            while len(reply) < 4096:
                data = s.recv(4096)
                if not data:
                    break
                reply += data
    except OSError:
        return False
    return reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n", 1)[0]


class PrivateDockerd:
    """A dockerd started by us, for us; use as ``with PrivateDockerd(dir) as d: d.url``."""

    def __init__(
        self,
        base_dir: Path,
        *,
        storage_drivers: tuple[str, ...] = STORAGE_DRIVERS,
        start_timeout: float = 60.0,
        dockerd: str = "dockerd",
        daemon_config: dict[str, Any] | None = None,
    ) -> None:
        self.base_dir = Path(base_dir)
        #: the engine's daemon.json (e.g. registry-mirrors); {} keeps the host's out
        self.daemon_config = dict(daemon_config or {})
        self.storage_drivers = storage_drivers
        self.start_timeout = start_timeout
        self.dockerd = dockerd
        self.data_root = self.base_dir / "data"
        self._short_dir: Path | None = None
        self.run_dir = self.base_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.storage_driver = ""
        self.log_path = self.base_dir / "dockerd.log"

    # -- paths -----------------------------------------------------------
    @property
    def socket_path(self) -> Path:
        return self.run_dir / "docker.sock"

    @property
    def exec_root(self) -> Path:
        return self.run_dir / "exec"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "docker.pid"

    @property
    def url(self) -> str:
        """The engine's address, e.g. ``unix:///tmp/rbd-dk-ab12/docker.sock``."""
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # -- lifecycle -------------------------------------------------------
    @staticmethod
    def check_prerequisites(dockerd: str = "dockerd") -> None:
        """Raise DockerdError saying what is missing (dockerd binary, root)."""
        if shutil.which(dockerd) is None:
            raise DockerdError(f"{dockerd} not found: apt-get install docker.io")
        if os.geteuid() != 0:
            raise DockerdError("a private dockerd needs root (run as root or use the host engine)")

    def start(self) -> PrivateDockerd:
        """Start dockerd (overlay2, falling back to vfs) and wait until it answers."""
        self.check_prerequisites(self.dockerd)
        if self.proc is not None:
            return self
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if len(str(self.base_dir)) > _SHORT_BASE:
            self._short_dir = Path(tempfile.mkdtemp(prefix="rbd-dk-", dir="/tmp"))
            self.run_dir = self._short_dir
        self.data_root.mkdir(parents=True, exist_ok=True)
        config_file = self.base_dir / "daemon.json"
        # always our own file: isolates the engine from the host's /etc/docker/daemon.json
        config_file.write_text(json.dumps(self.daemon_config) + "\n")
        errors: list[str] = []
        for driver in self.storage_drivers:
            try:
                self._start_with(driver, config_file)
                return self
            except DockerdError as e:
                errors.append(f"{driver}: {e}")
                log.warning("dockerd failed to start", driver=driver, error=str(e))
        self._cleanup_dirs()
        raise DockerdError("private dockerd did not start; " + "; ".join(errors))

    def _start_with(self, driver: str, config_file: Path) -> None:
        self.socket_path.unlink(missing_ok=True)
        cmd = [
            self.dockerd,
            "--config-file",
            str(config_file),
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "--host",
            self.url,
            "--pidfile",
            str(self.pid_file),
            "--iptables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--bridge=none",
            "--userland-proxy=false",
            f"--storage-driver={driver}",
        ]
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n--- starting: {' '.join(cmd)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # our Ctrl-C is not its Ctrl-C; we stop it ourselves
            )
        self.proc = proc
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.proc = None
                raise DockerdError(
                    f"exited with status {proc.returncode}: {self._log_tail()} "
                    f"(full log: {self.log_path})"
                )
            if ping(self.socket_path, timeout=1.0):
                self.storage_driver = driver
                log.info(
                    "private dockerd up",
                    pid=proc.pid,
                    url=self.url,
                    driver=driver,
                    data_root=str(self.data_root),
                )
                return
            time.sleep(0.1)
        self.stop()
        raise DockerdError(
            f"did not answer on {self.socket_path} within {self.start_timeout:.0f}s: "
            f"{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM our dockerd (by PID), wait, SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("dockerd ignored SIGTERM; killing", pid=proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(10)
            log.info("private dockerd stopped", pid=proc.pid, status=proc.returncode)
        self._cleanup_dirs()

    def _cleanup_dirs(self) -> None:
        if self._short_dir is not None:
            shutil.rmtree(self._short_dir, ignore_errors=True)
            self._short_dir = None
            self.run_dir = self.base_dir

    def __enter__(self) -> PrivateDockerd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
