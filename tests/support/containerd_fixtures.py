"""Run a real containerd for tests (Debian's package), with its own root, and drive it with ctr.

:class:`ContainerdProcess` writes a config (its own root, state, sockets and
opt dir; the CRI plugin off, since no kubelet talks to it), starts
``containerd``, waits until ``ctr version`` answers and stops it by PID. A
test pulls through a ``hosts.toml`` directory (containerd's registry host
configuration, the file ``rbd-agent mirror-config containerd`` prints) with
:meth:`ContainerdProcess.ctr`.

The socket lives in a short temporary directory of its own: a unix socket
path is limited to 107 bytes and pytest's tmp paths can be longer.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from waiting import WaitedTooLong, wait_until_sync

CONTAINERD_BIN = "containerd"
CTR_BIN = "ctr"
#: the namespace every test's images go in (kept apart from any other user of containerd)
NAMESPACE = "rbd-test"


class ContainerdError(RuntimeError):
    pass


class ContainerdProcess:
    """One containerd with everything under ``workdir`` (and a short socket dir), stopped by PID."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._sockdir = Path(tempfile.mkdtemp(prefix="rbd-ctrd-"))
        self.address = str(self._sockdir / "c.sock")
        self.log_path = self.workdir / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> str:
        """'' when containerd and ctr exist, else what is missing."""
        missing = [b for b in (CONTAINERD_BIN, CTR_BIN) if shutil.which(b) is None]
        if missing:
            return f"{', '.join(missing)} not installed: apt-get install containerd"
        return ""

    def config_text(self) -> str:
        w = self.workdir
        return (
            "version = 2\n"
            f'root = "{w / "root"}"\n'
            f'state = "{w / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{self.address}"\n'
            "[ttrpc]\n"
            f'  address = "{self.address}.ttrpc"\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{w / "opt"}"\n'
        )

    def start(self, timeout: float = 30.0) -> None:
        config = self.workdir / "config.toml"
        config.write_text(self.config_text())
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [CONTAINERD_BIN, "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise ContainerdError(
                    f"containerd exited with {self.proc.returncode}: {self.log_tail()}"
                )
            return self.ctr("version", check=False).returncode == 0

        try:
            wait_until_sync(up, timeout=timeout, what="containerd to answer")
        except WaitedTooLong as e:
            self.stop()
            raise ContainerdError(f"{e}: {self.log_tail()}") from None

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 120.0, namespace: str = NAMESPACE
    ) -> subprocess.CompletedProcess[str]:
        """``ctr`` against this containerd, in ``namespace`` (by default the tests' own)."""
        argv = [CTR_BIN, "--address", self.address, "--namespace", namespace, *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise ContainerdError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
        return done

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        shutil.rmtree(self._sockdir, ignore_errors=True)


def hosts_dir(root: Path, registry_host: str, server: str, mirror_url: str) -> Path:
    """A containerd ``hosts.toml`` directory: ``registry_host``'s pulls try the mirror first.

    ``server`` is the upstream the client falls back to. The text is what
    ``rbd-agent mirror-config containerd`` prints for the same arguments.
    """
    from rainbowd.agent.mirror.clientconfig import containerd_hosts_toml

    d = root / registry_host
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(containerd_hosts_toml(mirror_url, server=server))
    return root


def start_or_missing(workdir: Path) -> ContainerdProcess:
    """A started containerd under ``workdir``; one missing or broken fails in CI, else skips."""
    from testdeps import missing_dependency

    reason = ContainerdProcess.available()
    if reason:
        missing_dependency(reason)
    proc = ContainerdProcess(workdir)
    try:
        proc.start()
    except ContainerdError as e:
        missing_dependency(f"containerd did not start: {e}")
    return proc


def listed_digests(proc: ContainerdProcess, namespace: str = NAMESPACE) -> dict[str, str]:
    """Image name -> the manifest digest ``ctr images ls`` shows in ``namespace``."""
    out = proc.ctr("images", "ls", namespace=namespace).stdout.splitlines()
    return {cols[0]: cols[2] for cols in (line.split() for line in out[1:]) if len(cols) >= 3}
