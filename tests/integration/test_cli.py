"""The operator's commands, run as subprocesses against a live local cluster."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rainbowd.core.sched.scheduler import DEFAULT_POLICY
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
REF = "rbd-demo:latest"


async def run(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 120
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    specs = [NodeSpec("origin", roles=["origin"]), NodeSpec("n1"), NodeSpec("n2"), NodeSpec("n3")]
    async with LocalCluster(tmp_path / "c", specs, chunk_size=256 * 1024) as c:
        yield c


def rbd_env(c: LocalCluster) -> dict[str, str]:
    return {"RBD_COORDINATOR": c.url, "RBD_ADMIN_TOKEN_FILE": str(c.admin_token_file)}


async def test_admin_cli_end_to_end(cluster: LocalCluster, demo_image: Path) -> None:
    env = rbd_env(cluster)
    rbd = str(BIN / "rbd")

    source = f"archive:{demo_image}"
    code, out, err = await run(rbd, "images", "add", REF, "--from", source, env=env)
    assert code == 0, err
    assert "ready" in out and "3 layers" in out and "uncompressed" in out and source in out

    code, out, _ = await run(rbd, "images", env=env)
    assert code == 0 and REF in out
    header, row = out.splitlines()[:2]
    assert header.split() == [
        "REF",
        "STATE",
        "SIZE",
        "UNCOMPRESSED",
        "LAYERS",
        "NODES",
        "SOURCE",
        "ORIGIN",
    ]
    assert row.split()[0] == REF and source in row and row.split()[-1] == "origin", out

    code, out, _ = await run(rbd, "nodes", env=env)
    assert code == 0
    for node in ("origin", "n1", "n2", "n3"):
        assert re.search(rf"^{node}\s+up\b", out, re.M), out

    # live progress without a terminal: one line per node state change, then the summary
    code, out, err = await run(rbd, "distribute", REF, "--to", "n1", "n2", env=env)
    assert code == 0, err
    assert re.search(r"^n1\s+done\b", out, re.M) and re.search(r"^n2\s+done\b", out, re.M), out
    job_id = re.search(r"job (j-\S+) done", out)
    assert job_id, out
    # the summary weighs one copy on the wire against what crossed the links
    assert re.search(r"a copy is \d+\.\d \S+ on the wire", out), out
    assert re.search(r"\d+\.\d \S+ sent = 2\.0 copies, to 2 nodes", out), out

    code, out, _ = await run(rbd, "distribute", REF, "--to", "all", "--wait", env=env)
    assert code == 0 and "done" in out and "4/4 nodes" in out
    # n1 and n2 hold every layer already: only n3 receives anything
    assert "sent = 1.0 copies, to 1 node" in out, out

    code, out, _ = await run(rbd, "images", "--wide", env=env)
    assert code == 0 and "4 (n1,n2,n3,origin)" in out, out

    code, out, _ = await run(rbd, "jobs", env=env)
    assert code == 0 and job_id.group(1) in out

    code, out, _ = await run(rbd, "job", job_id.group(1), env=env)
    assert code == 0
    assert "<- origin" in out and f"why: {DEFAULT_POLICY}:" in out, out

    assert "over the wire in" in out, out

    code, out, _ = await run(rbd, "--json", "job", job_id.group(1), env=env)
    assert code == 0 and '"state": "done"' in out and '"wire_bytes"' in out
    code, after, err = await run(rbd, "job", job_id.group(1), "--json", env=env)
    assert code == 0 and json.loads(after) == json.loads(out), err

    # distribute --json: no live view, the final job as JSON (scripts read the state)
    code, out, err = await run(rbd, "distribute", REF, "--to", "n1", "--json", env=env)
    assert code == 0 and json.loads(out)["state"] == "done", (out, err)

    # removing the image keeps its layers on the nodes; adding it again finds them there
    code, out, err = await run(rbd, "images", "rm", REF, env=env)
    assert code == 0 and "removed" in out and "layers stay" in out, err
    code, out, _ = await run(rbd, "images", env=env)
    assert code == 0 and REF not in out
    code, _, err = await run(rbd, "images", "rm", REF, env=env)
    assert code == 1 and REF in err and "no image" in err, err
    code, out, err = await run(rbd, "images", "add", REF, "--from", source, env=env)
    assert code == 0, err
    code, out, _ = await run(rbd, "distribute", REF, "--to", "all", "--wait", env=env)
    assert code == 0 and "nothing sent" in out, out


async def test_admin_cli_errors_are_clear(cluster: LocalCluster, demo_image: Path) -> None:
    env = rbd_env(cluster)
    rbd = str(BIN / "rbd")

    code, _, err = await run(
        rbd, "images", "add", "ghost:1", "--from", "archive:/nonexistent.tar", env=env
    )
    assert code == 1 and "ghost:1" in err and "nonexistent" in err, err
    # the deprecated --archive still works, with a warning
    code, _, err = await run(
        rbd, "images", "add", "ghost:0", "--archive", "/nonexistent.tar", env=env
    )
    assert code == 1 and "deprecated" in err and "--from archive:" in err, err

    # malformed --from: exit 2 with the accepted forms, nothing sent to the coordinator
    code, _, err = await run(rbd, "images", "add", "x:1", "--from", "/srv/x.tar", env=env)
    assert code == 2, err
    for form in ("archive:PATH", "oci:PATH", "registry:HOST/REPO", "docker:IMAGE"):
        assert form in err, err
    code, _, err = await run(
        rbd, "images", "add", "x:1", "--from", "archive:/x.tar", "--insecure", env=env
    )
    assert code == 2 and "registry: sources only" in err, err
    code, _, err = await run(rbd, "images", "add", "x:1", "--from", "registry:app:1", env=env)
    assert code == 2 and "registry host" in err, err
    code, _, err = await run(rbd, "images", "add", "x:1", env=env)
    assert code == 2 and "--from" in err, err
    code, _, err = await run(
        rbd,
        "images",
        "add",
        "x:1",
        "--from",
        "registry:r.local/app:1",
        "--compression",
        "gzip",
        env=env,
    )
    assert code == 1 and "registry" in err and "compression" in err, err
    code, out, _ = await run(rbd, "images", env=env)
    assert "x:1" not in out

    code, _, err = await run(rbd, "distribute", "ghost:2", "--to", "all", env=env)
    assert code == 1 and "ghost:2" in err, err

    code, _, _ = await run(rbd, "images", "add", REF, "--archive", str(demo_image), env=env)
    assert code == 0
    code, _, err = await run(rbd, "distribute", REF, "--to", "n1", "nosuch", env=env)
    assert code == 1 and "nosuch" in err, err

    code, _, err = await run(
        rbd, "nodes", env={**env, "RBD_ADMIN_TOKEN_FILE": "/nonexistent/token"}
    )
    assert code == 2 and "admin token" in err, err

    code, _, err = await run(rbd, "nodes", env={**env, "RBD_ADMIN_TOKEN": "wrong"})
    assert code == 1 and err.strip(), err

    code, _, err = await run(rbd, "nodes", env={**env, "RBD_COORDINATOR": "http://127.0.0.1:9"})
    assert code == 3 and "127.0.0.1:9" in err, err


async def test_agent_status(cluster: LocalCluster, demo_image: Path, tmp_path: Path) -> None:
    agent = str(BIN / "rbd-agent")
    env = rbd_env(cluster)
    await run(str(BIN / "rbd"), "images", "add", REF, "--archive", str(demo_image), env=env)
    code, out, err = await run(agent, "status", "--socket", str(cluster.status_socket("origin")))
    assert code == 0, err
    assert "origin" in out and "connected" in out and "NOT CONNECTED" not in out
    assert "3 held" in out, out

    code, out, _ = await run(agent, "status", "--config", str(cluster.agent_config("n1")), "--json")
    assert code == 0 and '"node_id": "n1"' in out

    code, out, err = await run(agent, "status", "--socket", str(tmp_path / "nope.sock"))
    assert code == 1 and "not running" in err and out == ""
