"""Session hooks of the bench tests: the simulator's long runs start early, and their tests last.

tests/support/early_sim_gate.py says why: the runs compute beside the rest of
the suite, and the tests that check them (the gate, the hash-seed determinism)
run at the end, when the runs are done.
"""

from __future__ import annotations

import pytest

from early_sim_gate import early_last, end_early, start_early


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    early_last(items)


def pytest_collection_finish(session: pytest.Session) -> None:
    start_early(session)


def pytest_sessionfinish(session: pytest.Session) -> None:
    end_early(session)
