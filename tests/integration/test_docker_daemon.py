"""PrivateDockerd: short socket paths for long dirs, stop by PID, nothing left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rainbowd.devcluster.dockerd import DockerdError, PrivateDockerd, ping

pytestmark = [pytest.mark.docker]


def test_long_dir_gets_short_socket_and_stops_clean(
    dockerd: PrivateDockerd, tmp_path: Path
) -> None:
    # `dockerd` (the session engine) proves the prerequisites are here
    long_dir = tmp_path / ("d" * 60) / "engine"
    engine = PrivateDockerd(long_dir)
    with engine:
        assert len(str(engine.socket_path)) < 60
        assert str(engine.socket_path).startswith("/tmp/rbd-dk-")
        assert engine.data_root.is_relative_to(long_dir)
        assert ping(engine.socket_path)
        pid = engine.pid
        assert pid is not None
        run_dir = engine.run_dir
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not run_dir.exists()
    assert engine.pid is None
    engine.stop()  # idempotent


def test_missing_binary_says_what_to_install(tmp_path: Path) -> None:
    engine = PrivateDockerd(tmp_path / "x", dockerd="dockerd-not-installed-here")
    with pytest.raises(DockerdError, match=r"apt-get install docker\.io"):
        engine.start()


def test_ping_on_nothing(tmp_path: Path) -> None:
    assert not ping(tmp_path / "absent.sock", timeout=0.2)
