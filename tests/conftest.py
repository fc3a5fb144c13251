"""Shared fixtures: a private Docker engine, a containerd, a registry and the demo image.

A missing dependency (dockerd, root, busybox-static) skips the tests that need
it on a developer's machine, but fails them in CI (``CI=true``): CI must never
go green by silently skipping the parts it exists to check.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from containerd_fixtures import ContainerdProcess, start_or_missing
from rainbowd.devcluster.dockerd import DockerdError, PrivateDockerd
from rainbowd.devcluster.imagebuild import BUSYBOX, build_demo_image
from rainbowd.devcluster.pgserver import PostgresServer, PostgresUnavailable
from registry_fixtures import RegistryError as RegistryProcessError
from registry_fixtures import RegistryProcess, skopeo_push
from testdeps import missing_dependency

#: payload of the demo image used by tests (small: tests are about correctness)
DEMO_PAYLOAD_MIB = 2


@pytest.fixture(autouse=True)
def _logging_as_found() -> Iterator[None]:
    """Each test leaves structlog and the root logger as it found them.

    A test that runs a process's entry point in-process (the simulator's suite
    calls ``rainbowd.lib.log.configure("warning")``) would otherwise leave a
    warning-level, cache-on-first-use config behind, and every later test whose
    loggers are first used under it loses their info events: a test capturing
    them (``structlog.testing.capture_logs``) then fails for the order it ran in.
    """
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    if structlog.get_config() != config:
        structlog.configure(**config)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateDockerd]:
    """A private dockerd for the whole session (its own data root and socket); use ``.url``."""
    try:
        PrivateDockerd.check_prerequisites()
    except DockerdError as e:
        missing_dependency(str(e))
    engine = PrivateDockerd(tmp_path_factory.mktemp("dockerd"))
    try:
        engine.start()
    except DockerdError as e:
        missing_dependency(f"private dockerd did not start: {e}")
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def demo_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runnable 3-layer docker-archive (busybox, 2 MiB payload, files): rbd-demo:latest."""
    if not BUSYBOX.is_file():
        missing_dependency(f"{BUSYBOX} missing: apt-get install busybox-static")
    out = tmp_path_factory.mktemp("demo") / "rbd-demo.tar"
    return build_demo_image(out, payload_mib=DEMO_PAYLOAD_MIB)


# --------------------------------------------------------------------------
# registry (tests/support/registry_fixtures.py): a real docker-registry and skopeo
# --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """A plain-HTTP ``docker-registry`` on 127.0.0.1 for the session; ``.host`` is host:port."""
    reason = RegistryProcess.available()
    if reason:
        missing_dependency(reason)
    reg = RegistryProcess(tmp_path_factory.mktemp("registry"))
    try:
        reg.start()
    except RegistryProcessError as e:
        missing_dependency(f"docker-registry did not start: {e}")
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def push_image() -> Callable[..., str]:
    """``push_image(archive, "host/repo:tag", oci=False)`` copies a docker-archive with skopeo.

    Returns the reference pushed. ``oci=True`` stores an OCI manifest instead
    of Docker schema 2.
    """
    reason = RegistryProcess.available()
    if reason:
        missing_dependency(reason)

    def push(archive: Path, dest: str, *, oci: bool = False) -> str:
        skopeo_push(archive, dest, oci=oci)
        return dest

    return push


# --------------------------------------------------------------------------
# containerd (tests/support/containerd_fixtures.py): Debian's package, its own root
# --------------------------------------------------------------------------
@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[ContainerdProcess]:
    """A containerd of this test's own, stopped by PID at the end (a load target, a client)."""
    proc = start_or_missing(tmp_path / "containerd")
    try:
        yield proc
    finally:
        proc.stop()


# --------------------------------------------------------------------------
# PostgreSQL (rainbowd.devcluster.pgserver): the coordinator's second state backend
# --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server for the session (started on first use)."""
    try:
        server = PostgresServer()
    except PostgresUnavailable as e:
        missing_dependency(str(e))
    try:
        server.start()
    except PostgresUnavailable as e:
        server.stop()
        missing_dependency(str(e))
    try:
        yield server
    finally:
        server.stop()
