"""Session hooks of the integration tests: the Debian base image's debootstrap starts early.

tests/support/early_debootstrap.py says why: it runs beside the tests before
test_debian_image.py, which then waits only for what is left of it.
"""

from __future__ import annotations

import pytest

from early_debootstrap import end_early, start_early


def pytest_collection_finish(session: pytest.Session) -> None:
    start_early(session)


def pytest_sessionfinish(session: pytest.Session) -> None:
    end_early(session)
