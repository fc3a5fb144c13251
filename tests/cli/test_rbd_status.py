"""``rbd status`` says which coordinator leads (issue 16 item 5).

The verdict's rules on made-up answers; then real processes: one coordinator
on SQLite (it always leads), and a standby pair on a throwaway PostgreSQL
(rainbowd.devcluster.coordprocs) before and after ``kill -9`` of the leader.
``rbd`` runs as a subprocess with no admin token anywhere: health needs none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rainbowd.cli.status import (
    EXIT_NO_LEADER,
    EXIT_ONE_LEADER,
    EXIT_UNREACHABLE,
    LEADER,
    STANDBY,
    UNREACHABLE,
    CoordinatorStatus,
    status_of,
    verdict,
)
from rainbowd.core.lease import LEASE_S, STANDBY_POLL_S
from rainbowd.devcluster.coordprocs import CoordinatorProcess, start_coordinator
from rainbowd.devcluster.localcluster import LocalCluster, free_port
from rainbowd.devcluster.pgserver import PostgresServer
from waiting import wait_until

A, B, C = "http://10.0.0.1:7700", "http://10.0.0.2:7700", "http://10.0.0.3:7700"
#: a takeover after a kill: lease + poll + restore, with room for a loaded machine
TAKEOVER_TIMEOUT_S = 3 * (LEASE_S + STANDBY_POLL_S) + 10
#: one ``rbd status`` run (Python's start included)
RBD_TIMEOUT_S = 60.0


# -- the verdict ---------------------------------------------------------------------------


def test_one_leader_is_ok_whatever_the_others_say() -> None:
    states = [
        CoordinatorStatus(A, LEADER, A),
        CoordinatorStatus(B, STANDBY, A),
        CoordinatorStatus(C, UNREACHABLE, error="refused"),
    ]
    assert verdict(states) == (EXIT_ONE_LEADER, f"leader: {A}")


def test_no_leader_fails_naming_the_leader_the_standbys_name() -> None:
    code, line = verdict([CoordinatorStatus(A, UNREACHABLE), CoordinatorStatus(B, STANDBY, C)])
    assert code == EXIT_NO_LEADER and "no coordinator leads" in line and C in line


def test_two_leaders_fail_and_nobody_answering_is_unreachable() -> None:
    code, line = verdict([CoordinatorStatus(A, LEADER, A), CoordinatorStatus(B, LEADER, B)])
    assert code == EXIT_NO_LEADER and A in line and B in line
    both_down = [CoordinatorStatus(A, UNREACHABLE), CoordinatorStatus(B, UNREACHABLE)]
    assert verdict(both_down)[0] == EXIT_UNREACHABLE


def test_health_without_a_role_is_a_coordinator_from_before_standbys_and_leads() -> None:
    assert status_of(A, {"v": 1, "status": "ok"}) == CoordinatorStatus(A, LEADER, A)
    standby = status_of(B, {"v": 1, "status": "ok", "role": "standby", "leader": ""})
    assert standby == CoordinatorStatus(B, STANDBY, "")
    leader = status_of(A, {"role": "leader", "leader": A, "nodes": 4, "nodes_up": 3})
    assert (leader.nodes, leader.nodes_up) == (4, 3)


# -- real processes ------------------------------------------------------------------------


def rbd_status(tmp_path: Path, *urls: str, json_out: bool = False) -> tuple[int, str, str]:
    """``rbd --coordinator URLS status [--json]``: exit code, stdout, stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RBD_")}
    env["RBD_ADMIN_TOKEN_FILE"] = str(tmp_path / "no-such-token")  # health needs no token
    argv = [sys.executable, "-m", "rainbowd.cli.main", "--coordinator", ",".join(urls), "status"]
    r = subprocess.run(
        [*argv, *(["--json"] if json_out else [])],
        capture_output=True,
        text=True,
        env=env,
        timeout=RBD_TIMEOUT_S,
        check=False,
    )
    return r.returncode, r.stdout, r.stderr


def rows(stdout: str) -> dict[str, list[str]]:
    """The table's rows by coordinator URL (its first column)."""
    return {line.split()[0]: line.split() for line in stdout.splitlines()[1:] if line.strip()}


@pytest.mark.integration
async def test_a_single_sqlite_coordinator_leads(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "c", [], log_level="warning")
    await cluster.start_coordinator()
    try:
        code, out, err = rbd_status(tmp_path, cluster.url)
        assert code == EXIT_ONE_LEADER, (out, err)
        assert rows(out)[cluster.url][1:4] == [LEADER, cluster.url, "0/0"]
        assert f"leader: {cluster.url}" in out
    finally:
        await cluster.stop()


@pytest.fixture
def pair_db(tmp_path: Path, postgres: PostgresServer) -> Iterator[str]:
    url = postgres.create_database(str(tmp_path))
    try:
        yield url
    finally:
        postgres.drop_database(url)


async def role_is(http: aiohttp.ClientSession, url: str, role: str, leader: str) -> bool:
    try:
        async with http.get(f"{url}/v1/health", headers={"Accept": "application/json"}) as r:
            doc: dict[str, Any] = await r.json()
    except aiohttp.ClientError:
        return False
    return doc.get("role") == role and doc.get("leader") == leader


@pytest.mark.integration
async def test_a_standby_pair_before_and_after_the_leader_is_killed(
    tmp_path: Path, pair_db: str
) -> None:
    tokens = tmp_path / "tokens"
    procs: list[CoordinatorProcess] = []
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    try:
        async with aiohttp.ClientSession() as http:
            a = start_coordinator(tmp_path / "a", state_url=pair_db, tokens=tokens)
            procs.append(a)
            await wait_until(
                lambda: role_is(http, a.url, LEADER, a.url),
                timeout=TAKEOVER_TIMEOUT_S,
                what="the first coordinator to lead",
            )
            b = start_coordinator(tmp_path / "b", state_url=pair_db, tokens=tokens)
            procs.append(b)
            await wait_until(
                lambda: role_is(http, b.url, STANDBY, a.url),
                timeout=TAKEOVER_TIMEOUT_S,
                what="the second to stand by",
            )

            code, out, err = rbd_status(tmp_path, a.url, b.url)
            assert code == EXIT_ONE_LEADER, (out, err)
            table = rows(out)
            assert table[a.url][1:3] == [LEADER, a.url]
            assert table[b.url][1:] == [STANDBY, a.url, "-"]
            assert f"leader: {a.url}" in out

            code, out, _ = rbd_status(tmp_path, a.url, b.url, json_out=True)
            doc = json.loads(out)
            assert code == EXIT_ONE_LEADER and doc["leader"] == a.url and doc["ok"] is True
            assert [(c["url"], c["role"], c["leader"]) for c in doc["coordinators"]] == [
                (a.url, LEADER, a.url),
                (b.url, STANDBY, a.url),
            ]

            # the leader not among the URLs given: a standby and a dead address, nobody leads
            code, out, err = rbd_status(tmp_path, b.url, dead)
            assert code == EXIT_NO_LEADER, (out, err)
            assert rows(out)[dead][1] == UNREACHABLE
            assert f"no coordinator leads (the standbys name {a.url})" in err

            a.kill()
            await wait_until(
                lambda: role_is(http, b.url, LEADER, b.url),
                timeout=TAKEOVER_TIMEOUT_S,
                what="the standby to take over",
            )
            code, out, err = rbd_status(tmp_path, a.url, b.url, json_out=True)
            doc = json.loads(out)
            assert code == EXIT_ONE_LEADER and doc["leader"] == b.url, (out, err)
            by_url = {c["url"]: c for c in doc["coordinators"]}
            assert by_url[a.url]["role"] == UNREACHABLE and by_url[a.url]["error"]
            assert by_url[b.url]["role"] == LEADER and by_url[b.url]["nodes"] == 0

            code, out, _ = rbd_status(tmp_path, dead)
            assert code == EXIT_UNREACHABLE and rows(out)[dead][1] == UNREACHABLE
    finally:
        for p in procs:
            p.stop()
