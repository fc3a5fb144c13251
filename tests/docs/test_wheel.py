"""deploy/INSTALL.md § 1 and "Upgrading": `make wheel` builds the wheel every host installs.

The wheel is built for real (`make wheel`: its own build venv, pip fetching the
build backend from the package index) and installed into a fresh venv with the
commands INSTALL.md shows, `/opt/rbd` moved under the test's temporary
directory. The install runs offline: the fresh venv sees this checkout's
dependencies (not its editable rainbowd) through a .pth file, so pip finds
every requirement satisfied and installs the wheel alone. Then the installed
programs run, from the wheel's files: the help, and a coordinator answering
/v1/health.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import pytest

from rainbowd.core.sched.scheduler import DEFAULT_POLICY
from testdeps import missing_dependency
from waiting import wait_until_sync

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
#: what INSTALL.md calls /opt/rbd becomes this, under the test's tmp_path
OPT = "opt-rbd"
#: site-packages entries of this checkout's venv that are not rbd's dependencies
NOT_DEPENDENCIES = ("rainbowd", "__editable__", "pip", "setuptools", "_distutils_hack")
#: seconds a coordinator from the wheel may take to listen
START_TIMEOUT = 30.0


def _sh(command: str, *, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _start_wheel() -> subprocess.Popen[str]:
    """``make wheel``, started: it runs while the test makes the venv to install it into."""
    return subprocess.Popen(
        ["make", "wheel"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _built_wheel(make: subprocess.Popen[str]) -> Path:
    try:
        out, err = make.communicate(timeout=600)
    finally:
        if make.poll() is None:
            make.kill()
            make.wait()
    if make.returncode != 0 and "No matching distribution found for setuptools" in err:
        missing_dependency("make wheel: the package index is unreachable\n" + err)
    assert make.returncode == 0, out + err
    (wheel,) = (REPO / "dist").glob("rainbowd-*.whl")
    return wheel


def _fresh_venv(tmp_path: Path) -> Path:
    """INSTALL.md's ``python3 -m venv /opt/rbd/venv``, seeded with the dependencies."""
    venv = tmp_path / OPT / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True, timeout=120)  # type: ignore[attr-defined]
    deps = tmp_path / "deps"
    deps.mkdir()
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        if not entry.name.startswith(NOT_DEPENDENCIES) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    (site,) = venv.glob("lib/python3*/site-packages")
    (site / "rbd-test-dependencies.pth").write_text(f"{deps}\n")
    return venv


def _install_md(section: str) -> list[str]:
    """The fenced commands of one INSTALL.md section that call the venv's pip."""
    text = (REPO / "deploy" / "INSTALL.md").read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return [
        line.split("  #", 1)[0].strip()
        for line in body.splitlines()
        if line.startswith("/opt/rbd/venv/bin/pip ")
    ]


def test_make_wheel_installs_as_install_md_says_and_runs(tmp_path: Path) -> None:
    make = _start_wheel()  # the two venvs (make's build venv, INSTALL.md's) are made at once
    try:
        venv = _fresh_venv(tmp_path)
    except BaseException:
        make.kill()
        make.wait()
        raise
    wheel = _built_wheel(make)
    offline = {"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}

    install = _install_md("1. Software")
    upgrade = _install_md("Upgrading")
    assert install == ["/opt/rbd/venv/bin/pip install dist/rainbowd-*.whl"], install
    assert len(upgrade) == 2, upgrade
    for command in install + upgrade:
        _sh(command.replace("/opt/rbd", str(tmp_path / OPT)), env=offline)

    py = venv / "bin" / "python"
    where = _sh(
        f"{py} -c 'import rainbowd, importlib.resources as r; print(rainbowd.__file__); "
        'ui = r.files("rainbowd.coordinator.http") / "console-ui"; '
        'print(len((ui / "index.html").read_text()))\''
    ).split()
    assert Path(where[0]).is_relative_to(venv), f"{where[0]} is not the wheel's copy"
    assert int(where[1]) > 0  # the web console ships in the wheel
    assert wheel.name.startswith("rainbowd-") and wheel.name.endswith("-py3-none-any.whl")

    bin_ = venv / "bin"
    help_text = " ".join(_sh(f"{bin_}/rbd-coordinator run --help").split())
    assert f"(default {DEFAULT_POLICY};" in help_text
    _sh(f"{bin_}/rbd --help")
    _sh(f"{bin_}/rbd-agent status --help")

    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [
            str(bin_ / "rbd-coordinator"),
            "run",
            "--state-dir",
            str(tmp_path / "state"),
            "--listen",
            "127.0.0.1:0",
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def listening() -> bool:  # the ready file is the event: written once listening
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            return ready.exists()

        wait_until_sync(
            listening, timeout=START_TIMEOUT, what="the coordinator from the wheel to listen"
        )
        with urllib.request.urlopen(f"http://{ready.read_text().strip()}/v1/health") as r:
            assert r.headers["Content-Type"].startswith("application/json")
            assert json.load(r)["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
