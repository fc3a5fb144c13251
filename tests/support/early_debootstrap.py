"""debootstrap for tests/integration/test_debian_image.py, started when the session starts.

A minbase debootstrap takes ~33 s on CI's 2 vCPUs (half of it downloading from
the machine's apt mirror, half unpacking and configuring), and its only user
runs minutes into the suite. Started in the background as soon as collection
selects a test that needs it (tests/integration/conftest.py), it runs beside
the tests before that one, and the fixture only waits for what is left. It
runs at a lower CPU priority (``nice``) so the tests it runs beside keep the
cores they had; its output goes to a log file (a pipe nobody reads would fill
and stop it).

The tree it makes is the same as a debootstrap run in the fixture: same command,
same mirror, same release; only when it starts differs. (No tests here; pytest
collects nothing from this module.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

#: CPU niceness of the background debootstrap: the tests it runs beside come first
NICENESS = 10
#: seconds a debootstrap may take, downloading included (the fixture's failure deadline)
DEBOOTSTRAP_TIMEOUT_S = 900
#: bytes of its log shown when it failed
LOG_TAIL = 1600


def apt_mirror_and_suite() -> tuple[str, str]:
    """The Debian mirror and release this machine's apt uses (no host is hardcoded)."""
    suite = ""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            suite = line.split("=", 1)[1].strip('"')
    mirror = ""
    for src in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")):
        for line in src.read_text().splitlines():
            if line.startswith("URIs:"):
                uri = line.split(":", 1)[1].split()[0]
                if uri.rstrip("/").endswith("/debian"):
                    mirror = mirror or uri
    legacy = Path("/etc/apt/sources.list")
    if not mirror and legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[1].rstrip("/").endswith("/debian"):
                mirror = mirror or parts[1]
    return mirror, suite


class Debootstrap:
    """One ``debootstrap --variant=minbase`` into a directory of its own, in the background."""

    def __init__(self) -> None:
        self.missing = ""  # why it cannot run here ('' when it can)
        self.workdir = Path(tempfile.mkdtemp(prefix="rbd-debootstrap-"))
        self.root = self.workdir / "root"
        self.log_path = self.workdir / "debootstrap.log"
        self.cmd: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        if shutil.which("debootstrap") is None:
            self.missing = "debootstrap is not installed (apt-get install debootstrap)"
            return
        mirror, suite = apt_mirror_and_suite()
        if not suite:
            self.missing = "cannot tell the Debian release from /etc/os-release"
            return
        self.cmd = ["debootstrap", "--variant=minbase", suite, str(self.root)]
        self.cmd += [mirror] if mirror else []

    def start(self) -> None:
        if self.missing or self.proc is not None:
            return
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["nice", "-n", str(NICENESS), *self.cmd],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own group: stop() ends its wget and dpkg too
            )

    def wait(self) -> str:
        """Wait for it to end (starting it if nobody did); '' on success, else why it failed."""
        if self.missing:
            return self.missing
        self.start()
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=DEBOOTSTRAP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.stop()
            return f"{' '.join(self.cmd)} took over {DEBOOTSTRAP_TIMEOUT_S} s"
        if code != 0:
            tail = self.log_path.read_text(errors="replace")[-LOG_TAIL:]
            return f"{' '.join(self.cmd)} failed ({code}): {tail}"
        return ""

    def stop(self) -> None:
        """End a run still going (an interrupted session); the tree is left where it is."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def remove(self) -> None:
        """Remove the tree of a run that succeeded (debootstrap unmounted what it mounted).

        A run that failed or was stopped may have left /proc mounted in its tree:
        that tree stays, as a failed debootstrap in the fixture left it.
        """
        if self.proc is None or self.proc.poll() == 0:
            shutil.rmtree(self.workdir, ignore_errors=True)


#: the session's early run, when collection selected a test that uses it
EARLY: pytest.StashKey[Debootstrap] = pytest.StashKey()


def start_early(session: pytest.Session) -> None:
    """Start the debootstrap now if a selected test uses ``fixture`` debian_archive."""
    if session.config.option.collectonly:
        return
    if any("debian_archive" in getattr(item, "fixturenames", ()) for item in session.items):
        run = Debootstrap()
        run.start()
        session.config.stash[EARLY] = run


def end_early(session: pytest.Session) -> None:
    """Stop an early run the session did not wait for (interrupted); remove its tree."""
    run = session.config.stash.get(EARLY, None)
    if run is not None:
        run.stop()
        run.remove()
