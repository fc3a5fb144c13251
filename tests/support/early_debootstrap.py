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

import shutil
import tempfile
from pathlib import Path

import pytest

from background_run import BackgroundRun

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
        self.run: BackgroundRun | None = None
        if shutil.which("debootstrap") is None:
            self.missing = "debootstrap is not installed (apt-get install debootstrap)"
            return
        mirror, suite = apt_mirror_and_suite()
        if not suite:
            self.missing = "cannot tell the Debian release from /etc/os-release"
            return
        cmd = ["debootstrap", "--variant=minbase", suite, str(self.root)]
        self.run = BackgroundRun(cmd + ([mirror] if mirror else []), self.log_path)

    def start(self) -> None:
        if self.run is not None:
            self.run.start()

    def wait(self) -> str:
        """Wait for it to end (starting it if nobody did); '' on success, else why it failed."""
        if self.run is None:
            return self.missing
        return self.run.wait(DEBOOTSTRAP_TIMEOUT_S, log_tail=LOG_TAIL)

    def stop(self) -> None:
        """End a run still going (an interrupted session); the tree is left where it is."""
        if self.run is not None:
            self.run.stop()

    def remove(self) -> None:
        """Remove the tree of a run that succeeded (debootstrap unmounted what it mounted).

        A run that failed or was stopped may have left /proc mounted in its tree:
        that tree stays, as a failed debootstrap in the fixture left it.
        """
        if self.run is None or self.run.proc is None or self.run.succeeded():
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
