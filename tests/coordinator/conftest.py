"""Fixtures shared by the coordinator unit tests: a real coordinator on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coordinator_support import ADMIN, Running, start
from rainbowd.lib.client import AdminClient


@pytest.fixture
async def coord(tmp_path: Path) -> AsyncIterator[Running]:
    r = await start(tmp_path)
    yield r
    await r.stop()


@pytest.fixture
async def admin(coord: Running) -> AsyncIterator[AdminClient]:
    async with AdminClient(coord.url, ADMIN) as a:
        yield a
