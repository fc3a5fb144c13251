"""Shared fixtures: a private Docker engine and the demo image.

A missing dependency (dockerd, root, busybox-static) skips the tests that need
it on a developer's machine, but fails them in CI (``CI=true``): CI must never
go green by silently skipping the parts it exists to check.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from rainbowd.dockerd import DockerdError, PrivateDockerd
from rainbowd.imagebuild import BUSYBOX, build_demo_image

#: payload of the demo image used by tests (small: tests are about correctness)
DEMO_PAYLOAD_MIB = 2


def missing_dependency(reason: str) -> None:
    """Fail in CI, skip elsewhere: a missing tool must never pass CI silently."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"missing test dependency (CI=true, so this fails): {reason}")
    pytest.skip(reason)


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
