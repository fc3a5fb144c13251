"""The rule for test dependencies: fail in CI, skip elsewhere.

A plain module (not conftest) so any test file can import it: the name
``conftest`` is ambiguous once tests/coordinator/conftest.py is loaded too.
"""

from __future__ import annotations

import os

import pytest


def missing_dependency(reason: str) -> None:
    """Fail in CI, skip elsewhere: a missing tool must never pass CI silently."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"missing test dependency (CI=true, so this fails): {reason}")
    pytest.skip(reason)
