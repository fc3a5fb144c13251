"""Replace a file atomically: a reader sees the old bytes or the new ones, never half.

Temp file in the same directory (so the rename cannot cross a filesystem),
fsync before the rename (so a crash cannot leave the new name on empty blocks),
and the temp file removed if anything fails on the way.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` at ``path`` in one step; ``mode`` sets its permissions (else 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
