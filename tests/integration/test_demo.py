"""The quick start's main command, as an operator runs it."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from rainbowd.devcluster.dockerd import PrivateDockerd

pytestmark = pytest.mark.integration


async def test_rbd_demo_distributes_and_runs(dockerd: PrivateDockerd, tmp_path: Path) -> None:
    # the dockerd fixture only proves Docker can run here; the demo starts its own engine
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "rbd"),
        "demo",
        "--nodes",
        "8",
        "--payload-mib",
        "4",
        "--dir",
        str(tmp_path / "demo"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
        env=os.environ.copy(),
    )
    async with asyncio.timeout(240):
        out_b, _ = await proc.communicate()
    out = out_b.decode()
    assert proc.returncode == 0, out
    assert re.search(r"job \S+ done: rbd-demo:latest on 9/9 nodes", out), out
    for i in range(1, 9):
        assert re.search(rf"^\s+node-{i:02d}\s+done\s+\d+\.\d+s\s+from ", out, re.M), out
    assert "hello from rbd" in out
    # rbd distribute preheated every node: each one's mirror serves the image from its store
    pulled = re.findall(
        r"^\s+(\S+)\s+pulled rbd-demo@sha256:[0-9a-f]{12}\.\.\. from its mirror "
        r"127\.0\.0\.1:\d+ .*, 0 B from peers\)$",
        out,
        re.M,
    )
    assert sorted(pulled) == [f"node-{i:02d}" for i in range(1, 9)] + ["origin"], out
    assert "9 pulls served from the nodes' own stores" in out
    assert not (tmp_path / "demo").exists(), "the demo left its work dir behind"
