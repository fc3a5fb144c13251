"""Fixtures shared by the coordinator unit tests: a real coordinator on loopback.

Every test here runs twice, once on each state backend (issue 16): SQLite in
its temp dir, and a fresh database of its own on the session's throwaway
PostgreSQL server (rainbowd.devcluster.pgserver; missing, it skips here and
fails under CI=true). ``@pytest.mark.backends("sqlite")`` runs a test on the
backends named only: one that opens no state store of its run's backend (a
flag's parsing, SQLite's own backup file) runs once, and one about a single
backend's behaviour (a schema only SQLite had, a PostgreSQL connection lost)
runs on it alone. A test that means something else on each asks ``state_backend``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from coordinator_support import ADMIN, Backend, Running, start
from rainbowd.devcluster.pgserver import PostgresServer
from rainbowd.lib.client import AdminClient

#: the state backends every coordinator test runs on
BACKENDS = ["sqlite", "postgresql"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop the runs on a backend a test's ``backends`` marker does not name."""
    off = [item for item in items if not _runs_here(item)]
    if off:
        config.hook.pytest_deselected(items=off)
        items[:] = [item for item in items if _runs_here(item)]


def _runs_here(item: pytest.Item) -> bool:
    marker = item.get_closest_marker("backends")
    callspec = getattr(item, "callspec", None)
    if marker is None or callspec is None:
        return True
    return callspec.params.get("state_backend") in marker.args


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
