"""Session hooks of the bench tests: the simulator gate's runs start early.

tests/support/early_sim_gate.py says why: they compute beside the tests
before the gate, which then checks what they computed.
"""

from __future__ import annotations

import pytest

from early_sim_gate import end_early, start_early


def pytest_collection_finish(session: pytest.Session) -> None:
    start_early(session)


def pytest_sessionfinish(session: pytest.Session) -> None:
    end_early(session)
