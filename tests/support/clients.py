"""Registry clients the tests run as an operator would (skopeo), off the event loop."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

from testdeps import missing_dependency


def skopeo() -> str:
    """The skopeo binary; a missing one fails under CI=true (testdeps), never skips."""
    path = shutil.which("skopeo")
    if path is None:
        missing_dependency("skopeo missing: apt-get install skopeo")
    assert path is not None
    return path


async def run(argv: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """A client to its end, off the event loop; its output captured, never raising on exit."""
    return await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=timeout, check=False
    )
