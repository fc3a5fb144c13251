"""Registry clients the tests run as an operator would (skopeo), off the event loop."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

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


async def copy_by_digest(hostport: str, name: str, digest: str, out: Path) -> dict[str, Any]:
    """``skopeo copy`` of ``hostport/name@digest`` into ``dir:out``, checked; the manifest.

    Checked as a runtime would: skopeo succeeded, the manifest kept as served
    hashes to the digest asked for, and the config and every layer hash to the
    digests the manifest names. What the blobs must be is the caller's to check.
    """
    src = f"docker://{hostport}/{name}@{digest}"
    done = await run([skopeo(), "copy", "-q", "--src-tls-verify=false", src, f"dir:{out}"])
    assert done.returncode == 0, done.stderr
    raw = (out / "manifest.json").read_bytes()
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == digest
    manifest: dict[str, Any] = json.loads(raw)
    for desc in [manifest["config"], *manifest["layers"]]:
        blob = (out / desc["digest"].split(":", 1)[1]).read_bytes()
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == desc["digest"], desc
    return manifest
