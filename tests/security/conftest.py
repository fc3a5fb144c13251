"""Fixtures of the security tests: a real coordinator app on loopback with a fake clock.

The helpers of the coordinator tests (tests/support/coordinator_support.py) are
reused, through tests/security/door_support.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from door_support import Door, FakeClock, open_door


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def door(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Door]:
    d = await open_door(tmp_path / "state", clock)
    yield d
    await d.stop()
