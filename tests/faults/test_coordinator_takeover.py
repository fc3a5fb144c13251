"""Two coordinator processes on one PostgreSQL: one leads, the other takes over (issue 16).

Real processes (``rbd-coordinator`` on a throwaway PostgreSQL,
rainbowd.devcluster.pgserver), sharing their tokens as a standby pair does:
the first leads; the second, a standby, answers every /v1/ request but health
with 503 and ``RBD-Leader`` naming the first. ``kill -9`` of the leader: the
standby leads once the lease has run out (the test waits on the
``leader_takeover`` event, bounded by ``TAKEOVER_TIMEOUT_S``, and prints how
long it took). The old leader restarted finds the lease held and stands by,
naming the new leader.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rainbowd.core.lease import LEASE_S, STANDBY_POLL_S
from rainbowd.core.report_id import LEADER_HEADER
from rainbowd.devcluster.pgserver import PostgresServer
from waiting import wait_until, wait_until_sync

pytestmark = pytest.mark.integration

CLI = (sys.executable, "-m", "rainbowd.coordinator.cli")
#: a process's start (Python, imports, the schema) on a busy 2-core machine
START_TIMEOUT_S = 30.0
#: the takeover after a kill: lease + poll + restore, with room for a loaded machine
TAKEOVER_TIMEOUT_S = 3 * (LEASE_S + STANDBY_POLL_S) + 10


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    url: str
    log: Path

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_events(self, event: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and doc.get("event") == event:
                out.append(doc)
        return out


@pytest.fixture
def pair_dirs(tmp_path: Path, postgres: PostgresServer) -> Iterator[tuple[str, Path]]:
    """A database of its own and the token directory both coordinators share."""
    url = postgres.create_database(str(tmp_path))
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    try:
        yield url, tokens
    finally:
        postgres.drop_database(url)


def start(tmp_path: Path, name: str, state_url: str, tokens: Path) -> Proc:
    """``rbd-coordinator`` on a port of its own; returns once it listens."""
    state = tmp_path / name
    state.mkdir(exist_ok=True)
    ready = state / "ready"
    ready.unlink(missing_ok=True)
    log = state / f"log-{len(list(state.glob('log-*.jsonl')))}.jsonl"  # one per start
    args = [
        *CLI,
        "--state-dir",
        str(state),
        "--state-url",
        state_url,
        "--listen",
        "127.0.0.1:0",
        "--ready-file",
        str(ready),
        "--log-json",
        "--heartbeat-interval",
        "0.5",
        *(f"--{w}-token-file={tokens / w}" for w in ("join", "admin", "metrics")),
    ]
    with log.open("ab") as out:
        popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    addr = wait_until_sync(
        lambda: ready.is_file() and ready.read_text().strip(),
        timeout=START_TIMEOUT_S,
        what=f"{name} to listen (log: {log})",
    )
    return Proc(name, popen, f"http://{addr}", log)


async def health(http: aiohttp.ClientSession, p: Proc) -> dict[str, Any]:
    async with http.get(f"{p.url}/v1/health", headers={"Accept": "application/json"}) as r:
        assert r.status == 200
        doc: dict[str, Any] = await r.json()
        return doc


async def role_of(http: aiohttp.ClientSession, p: Proc, role: str, leader: str) -> bool:
    """Whether ``p`` says it has ``role`` under ``leader`` (not while it swaps its listener)."""
    try:
        doc = await health(http, p)
    except aiohttp.ClientConnectionError:
        return False
    return doc["role"] == role and doc["leader"] == leader


async def takeover_events(http: aiohttp.ClientSession, p: Proc, admin: str, by: str) -> list[Any]:
    """The ``leader_takeover`` events in ``rbd events`` (asked of ``p``) of the leader ``by``."""
    headers = {"Authorization": f"Bearer {admin}", "Accept": "application/json"}
    try:
        async with http.get(f"{p.url}/v1/security-events", headers=headers) as r:
            if r.status != 200:
                return []  # a standby still
            doc = await r.json()
    except aiohttp.ClientConnectionError:
        return []  # swapping the standby's listener for the leader's
    return [e for e in doc["events"] if e["kind"] == "leader_takeover" and e["peer"] == by]


async def test_the_standby_leads_after_the_leader_is_killed_and_the_old_one_stands_by(
    tmp_path: Path, pair_dirs: tuple[str, Path]
) -> None:
    state_url, tokens = pair_dirs
    a = start(tmp_path, "a", state_url, tokens)
    procs = [a]
    try:
        async with aiohttp.ClientSession() as http:
            await wait_until(
                lambda: role_of(http, a, "leader", a.url),
                timeout=TAKEOVER_TIMEOUT_S,
                what="the first coordinator to lead",
            )
            admin = (tokens / "admin").read_text().strip()
            b = start(tmp_path, "b", state_url, tokens)
            procs.append(b)
            await wait_until(
                lambda: role_of(http, b, "standby", a.url),
                timeout=TAKEOVER_TIMEOUT_S,
                what="the second coordinator to stand by, naming the first",
            )
            auth = {"Authorization": f"Bearer {admin}", "Accept": "application/json"}
            async with http.get(f"{b.url}/v1/nodes", headers=auth) as r:
                assert r.status == 503
                assert r.headers[LEADER_HEADER] == a.url
                assert "not the leader" in (await r.json())["error"]
                assert a.url in (await r.json())["error"]
            async with http.get(f"{a.url}/v1/nodes", headers=auth) as r:
                assert r.status == 200 and LEADER_HEADER not in r.headers

            killed_at = time.monotonic()
            a.kill()
            [event] = await wait_until(
                lambda: takeover_events(http, b, admin, by=b.url),
                timeout=TAKEOVER_TIMEOUT_S,
                what="the standby's leader_takeover event",
            )
            took = time.monotonic() - killed_at
            print(f"takeover after kill -9: {took:.2f} s (lease {LEASE_S} s)")
            assert "token 2" in event["detail"] and a.url in event["detail"]
            assert [e["peer"] for e in await takeover_events(http, b, admin, a.url)] == [a.url]
            assert await role_of(http, b, "leader", b.url)
            async with http.get(f"{b.url}/v1/nodes", headers=auth) as r:
                assert r.status == 200
            [logged] = b.log_events("took over as the leader")
            assert logged["token"] == 2 and logged["previous"] == a.url

            a2 = start(tmp_path, "a", state_url, tokens)  # the old leader restarted
            procs.append(a2)
            await wait_until(
                lambda: role_of(http, a2, "standby", b.url),
                timeout=TAKEOVER_TIMEOUT_S,
                what="the restarted old leader to stand by, naming the new one",
            )
            async with http.get(f"{a2.url}/v1/jobs", headers=auth) as r:
                assert r.status == 503 and r.headers[LEADER_HEADER] == b.url
            assert a2.log_events("took over as the leader") == []
    finally:
        for p in procs:
            p.stop()
