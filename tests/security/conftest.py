"""Fixtures of the security tests: a real coordinator app on loopback with a fake clock.

The helpers of the coordinator unit tests (tests/unit/test_coordinator_support.py)
are reused: tests/unit goes on sys.path.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from door_support import Door, FakeClock, open_door


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def door(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Door]:
    d = await open_door(tmp_path / "state", clock)
    yield d
    await d.stop()
