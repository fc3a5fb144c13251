"""Fixtures shared by the coordinator unit tests: a real coordinator on loopback.

Every test here runs twice, once on each state backend (issue 16): SQLite in
its temp dir, and a fresh database of its own on the session's throwaway
PostgreSQL server (tests/support/pg_support.py; missing, it skips here and
fails under CI=true). A test that opens no state store of the test's backend
(a flag's parsing, SQLite's own backup file) is marked ``one_backend`` and runs
once, on SQLite; a test that means something else on each backend asks
``state_backend``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from coordinator_support import ADMIN, Backend, Running, start
from pg_support import PostgresServer
from rainbowd.lib.client import AdminClient

#: the state backends every coordinator test runs on
BACKENDS = ["sqlite", "postgresql"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop the PostgreSQL run of the tests marked ``one_backend`` (it would repeat SQLite's)."""
    twice = [
        item
        for item in items
        if item.get_closest_marker("one_backend") is not None
        and getattr(item, "callspec", None) is not None
        and item.callspec.params.get("state_backend") == "postgresql"  # type: ignore[attr-defined]
    ]
    if twice:
        config.hook.pytest_deselected(items=twice)
        items[:] = [item for item in items if item not in twice]


@pytest.fixture(autouse=True, params=BACKENDS)
def state_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The backend this run of the test stores its state in; its databases dropped after."""
    if request.param == "sqlite":
        yield "sqlite"
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    made: dict[str, str] = {}

    def url_for(state_dir: Path) -> str:
        key = str(state_dir.resolve())
        if key not in made:
            made[key] = server.create_database(key)
        return made[key]

    Backend.url_for = url_for
    try:
        yield "postgresql"
    finally:
        Backend.url_for = None
        for url in made.values():
            server.drop_database(url)


@pytest.fixture
async def coord(state_backend: str, tmp_path: Path) -> AsyncIterator[Running]:
    r = await start(tmp_path)
    yield r
    await r.stop()


@pytest.fixture
async def admin(coord: Running) -> AsyncIterator[AdminClient]:
    async with AdminClient(coord.url, ADMIN) as a:
        yield a
