"""Coordinator pieces without HTTP: job bookkeeping, mailboxes, auth helpers, config, CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from coordinator_support import register_request, state_url_args
from rainbowd.coordinator import auth, config
from rainbowd.coordinator.core import MAX_WAIT
from rainbowd.coordinator.jobs import Job
from rainbowd.coordinator.mailbox import Mailbox
from rainbowd.core.messages import ArchiveSource, IngestAssignment, SeederUse, encode
from rainbowd.core.sched.jobdriver import MAX_LAYER_FAILURES
from rainbowd.core.sched.reasons import TransferReason
from rainbowd.lib.client import AdminClient, AgentClient, ApiError
from rainbowd.lib.progress import job_report, summary
from waiting import settle, wait_until, wait_until_sync

L1, L2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64

#: a finished transfer's reason where it does not matter
R = TransferReason.legacy("r")


@pytest.mark.backends("sqlite")  # touches no state store
def test_job_node_lifecycle_and_outcome() -> None:
    job = Job.create("j1", "img", [(L1, 100), (L2, 50), (L1, 100)], ["a", "b"], {"b": {L1}}, 1.0)
    a, b = job.nodes["a"], job.nodes["b"]
    assert a.layers == [L1, L2] and a.missing() == [L1, L2] and b.missing() == [L2]
    a.started_transfer(L1)
    a.progress(L1, 40, 9.0)
    assert a.view().state == "transferring" and a.view().bytes_done == 40
    assert a.hold(L1) and not a.hold(L1)
    assert a.view().bytes_done == 100 and a.view().layers_done == 1
    assert a.hold(L2) and a.all_held()
    a.finish(2.0)
    assert not job.settle(2.0)  # b is still going
    for i in range(MAX_LAYER_FAILURES - 1):
        assert not b.count_failure(L2, f"io {i}", 3.0)
    assert b.count_failure(L2, "io last", 3.0)

    assert b.state == "failed" and "layer 222222222222 failed 5 times (last: io last)" in b.error
    assert job.settle(3.0) and job.state == "failed" and "b:" in job.error
    view = job.view()
    again = Job.from_view(view, [(L1, 100), (L2, 50)], {"a": {L1, L2}, "b": {L1}})
    assert again.view() == view


@pytest.mark.backends("sqlite")  # touches no state store
def test_restored_transferring_node_goes_back_to_pending() -> None:
    job = Job.create("j1", "img", [(L1, 100)], ["a"], {}, 1.0)
    job.nodes["a"].started_transfer(L1)
    again = Job.from_view(job.view(), [(L1, 100)], {})
    assert again.nodes["a"].state == "pending" and again.running


@pytest.mark.backends("sqlite")  # touches no state store
def test_job_byte_accounting_and_summary() -> None:
    mib = 1024 * 1024
    job = Job.create(
        "j1",
        "img",
        [(L1, 40 * mib), (L2, 2 * mib)],
        ["a", "b", "c"],
        {"c": {L1, L2}},
        1.0,
        image_bytes=66 * mib,
    )
    a, b, c = job.nodes["a"], job.nodes["b"], job.nodes["c"]
    assert c.all_held() and c.missing() == []
    for layer, size in ((L1, 40 * mib), (L2, 2 * mib)):
        a.record(SeederUse(layer=layer, seeder="c", reason=R, bytes=size, seconds=1.0))
        a.hold(layer)
    b.record(SeederUse(layer=L1, seeder="a", reason=R, bytes=10 * mib, seconds=1.0))  # resumed
    b.hold(L1)
    b.hold(L2)  # held from another image: no transfer, no wire bytes
    for p in (a, b, c):
        p.finish(2.0)
    assert job.settle(2.5) and job.state == "done"
    view = job.view()
    per_node = {n.node_id: n.wire_bytes for n in view.nodes}
    assert per_node == {"a": 42 * mib, "b": 10 * mib, "c": 0}
    assert view.wire_bytes == 52 * mib and view.image_bytes == 66 * mib
    assert view.copy_bytes == 42 * mib  # the distinct layers as stored: what one copy moves
    # both survive a restart
    held = {n: {L1, L2} for n in ("a", "b", "c")}
    again = Job.from_view(view, [(L1, 40 * mib), (L2, 2 * mib)], held)
    assert again.view() == view
    text = summary(view)
    assert "3/3 nodes" in text
    # wire bytes against one copy on the wire, not against the unpacked image
    assert (
        "a copy is 42.0 MiB on the wire (66.0 MiB unpacked); 52.0 MiB sent = 1.2 copies, to 2 nodes"
        in text
    )
    report = job_report(view)
    assert "42.0 MiB over the wire in 2 transfers" in report
    assert "nothing moved" in report  # c held every layer

    idle = Job.create("j2", "img", [(L1, 10)], ["c"], {"c": {L1}}, 1.0, image_bytes=mib)
    idle.nodes["c"].finish(1.0)
    idle.settle(1.0)
    assert "a copy is 10 B on the wire (1.0 MiB unpacked); nothing sent" in summary(idle.view())


@pytest.mark.backends("sqlite")  # touches no state store
def test_summary_of_a_compressed_image_counts_copies_not_unpacked_bytes() -> None:
    """The issue's case: 190.3 MiB unpacked, gzip layers, a full copy to each of 40 nodes.

    The old line read "image 190.3 MiB, 3.0 GiB over the wire to 40 nodes", less
    than a copy per node; stated on one basis it is 40 copies to 40 nodes.
    """
    mib = 1024 * 1024
    layers = [(L1, 70 * mib), (L2, 8 * mib)]
    nodes = [f"n{i:02d}" for i in range(40)]
    job = Job.create("j1", "img", layers, nodes, {}, 1.0, image_bytes=int(190.3 * mib))
    for nid in nodes:
        for layer, size in layers:
            use = SeederUse(layer=layer, seeder="origin", reason=R, bytes=size, seconds=1.0)
            job.nodes[nid].record(use)
            job.nodes[nid].hold(layer)
        job.nodes[nid].finish(2.0)
    assert job.settle(2.0)
    text = summary(job.view())
    assert "a copy is 78.0 MiB on the wire (190.3 MiB unpacked)" in text, text
    assert "3.0 GiB sent = 40.0 copies, to 40 nodes" in text, text


@pytest.mark.backends("sqlite")  # touches no state store
async def test_mailbox_cursor_and_wakeups() -> None:
    box = Mailbox(seq=10)
    ingest = IngestAssignment(ingest_id="i", ref="r", source=ArchiveSource(path="/x"), chunk_size=1)
    waiter = asyncio.create_task(box.wait(5.0))
    await settle()
    assert not waiter.done()
    assert box.put(ingest) == 11
    await settle()
    assert waiter.done()  # woken by the put, not by its 5 s bound
    assert box.after(10) == (11, [ingest])
    assert box.after(11) == (11, [])  # acknowledged and dropped
    box.put(ingest)
    assert box.after(500) == (12, [ingest])  # an agent ahead of us gets everything
    box.drop(lambda a: True)
    assert box.pending() == []


@pytest.mark.backends("sqlite")  # touches no state store
def test_a_batch_is_cut_at_its_byte_budget_and_the_rest_follows() -> None:
    """A backlog of big assignments (loads carry manifests) never makes one reply too big."""
    box = Mailbox()
    big = [
        IngestAssignment(
            ingest_id=f"i{n}", ref="r" * 200, source=ArchiveSource(path="/x"), chunk_size=1
        )
        for n in range(5)
    ]
    for a in big:
        box.put(a)
    one = len(encode(big[0]))
    cursor, got = box.after(0, max_bytes=2 * one + 1)
    assert (cursor, got) == (2, big[:2])  # the cursor is the last one sent, not the newest
    cursor, got = box.after(cursor, max_bytes=2 * one + 1)
    assert (cursor, got) == (4, big[2:4])
    assert box.after(cursor, max_bytes=1) == (5, big[4:])  # one goes even over the budget
    assert box.after(5) == (5, [])


@pytest.mark.backends("sqlite")  # touches no state store
def test_auth_helpers(tmp_path: Path) -> None:
    assert auth.bearer("Bearer abc") == "abc" and auth.bearer("Basic abc") is None
    assert auth.bearer(None) is None and auth.bearer("Bearer ") is None
    assert auth.split_node_token("n1:secret") == ("n1", "secret")
    assert auth.split_node_token("n1:se:cret") is None  # ":" is not valid in a node id
    assert auth.split_node_token("bad id:x") is None and auth.split_node_token("n1:") is None
    assert auth.credential_matches("s", auth.hash_secret("s"))
    assert not auth.credential_matches("t", auth.hash_secret("s"))
    assert not auth.same_secret("", "")
    path = tmp_path / "sub" / "join-token"
    token, created = auth.read_or_create_token(path)
    assert created and len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.read_or_create_token(path) == (token, False)


@pytest.mark.backends("sqlite")  # touches no state store
def test_config_merges_file_and_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('listen = "0.0.0.0:8000"\nstate_dir = "/var/x"\nheartbeat_interval = 1.5\n')
    cfg = config.build(config.load_file(f), {"listen": "127.0.0.1:9", "state_dir": None})
    assert (cfg.host, cfg.port, cfg.heartbeat_interval) == ("127.0.0.1", 9, 1.5)
    assert cfg.join_token_path == Path("/var/x/join-token")
    assert config.parse_listen("[::1]:7700") == ("::1", 7700)
    for bad in ({"listen": "nope"}, {"bogus": 1}, {}, {"chunk_size": 5}):
        with pytest.raises(config.ConfigError):
            config.build({"state_dir": "/x", **bad} if bad else {}, {})


def test_cli_starts_serves_and_stops_on_sigterm(state_backend: str, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rainbowd.coordinator.cli",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(tmp_path / "state"),
            *state_url_args(tmp_path / "state"),
            "--ready-file",
            str(ready),
            "--log-json",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_sync(
            lambda: ready.exists() or proc.poll() is not None,
            timeout=15,
            what="the coordinator's ready file (or its exit)",
        )
        assert ready.exists(), proc.stderr.read() if proc.stderr else ""
        host, port = ready.read_text().strip().rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        req = urllib.request.Request(
            f"http://{host}:{port}/v1/health", headers={"Accept": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert json.loads(resp.read())["status"] == "ok"

        def role() -> str:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return str(json.loads(resp.read())["role"])

        # on PostgreSQL it listens as a standby first, and leads once it has the lease
        wait_until_sync(lambda: role() == "leader", timeout=15, what="the coordinator to lead")
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "rainbowd.coordinator.cli",
                "show-token",
                "admin",
                "--state-dir",
                str(tmp_path / "state"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == (tmp_path / "state" / "admin-token").read_text().strip()
        # the metrics token was created at start-up too, and opens GET /metrics
        metrics_token = (tmp_path / "state" / "metrics-token").read_text().strip()
        shown = subprocess.run(
            [
                *(sys.executable, "-m", "rainbowd.coordinator.cli", "show-token", "metrics"),
                *("--state-dir", str(tmp_path / "state")),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert shown.stdout.strip() == metrics_token != out.stdout.strip()
        req = urllib.request.Request(
            f"http://{host}:{port}/metrics", headers={"Authorization": f"Bearer {metrics_token}"}
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert b"rbd_coordinator_nodes" in resp.read()
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "coordinator listening" in err and "shutting down" in err
        assert state_backend in err  # the state it opened, named in the listening line
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


async def test_sigterm_does_not_wait_out_a_parked_long_poll(
    state_backend: str, tmp_path: Path
) -> None:
    """An agent's long-poll parked for MAX_WAIT does not hold a stopping coordinator up.

    Requests in flight get a short grace (cli.SHUTDOWN_GRACE_S, as a role switch
    gives them), then they are cancelled and the process exits 0. (With aiohttp's
    own 60 s grace, a SQLite coordinator sat out the poll's whole wait.)
    """
    state = tmp_path / "state"
    ready = tmp_path / "ready"
    argv = ["-m", "rainbowd.coordinator.cli", "--listen", "127.0.0.1:0", "--state-dir", str(state),
            *state_url_args(state), "--ready-file", str(ready)]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None

    async def printed() -> str:
        return (await proc.stderr.read()).decode(errors="replace") if proc.stderr else ""

    try:
        await wait_until(
            lambda: ready.exists() or proc.returncode is not None,
            timeout=15,
            what="the coordinator's ready file (or its exit)",
        )
        assert ready.exists(), await printed()
        url = f"http://{ready.read_text().strip()}"
        async with AdminClient(url, "") as health_only:  # health needs no token

            async def leads() -> bool:  # on PostgreSQL it stands by until it has the lease
                return (await health_only.health()).get("role") == "leader"

            await wait_until(leads, timeout=15, what="the coordinator to lead")
            agent = AgentClient(url)
            await agent.open()
            try:
                token = (state / "join-token").read_text().strip()
                joined = await agent.register(register_request("n1", join=token))
                news = await agent.assignments(0, joined.trust.version, wait=0)
                # nothing new after this cursor: the poll parks for its whole wait
                poll = asyncio.create_task(
                    agent.assignments(news.cursor, joined.trust.version, wait=MAX_WAIT)
                )
                await health_only.health()  # answered after the poll's request, sent first
                assert not poll.done()
                proc.send_signal(signal.SIGTERM)
                # the failure deadline: well under the poll's wait, which the old grace sat out
                stderr = asyncio.ensure_future(printed())  # read on: a full pipe would block it
                try:
                    async with asyncio.timeout(MAX_WAIT / 2):
                        code = await proc.wait()
                except TimeoutError:
                    pytest.fail(f"still running {MAX_WAIT / 2:g} s after SIGTERM: the poll held it")
                assert code == 0, await stderr
                with contextlib.suppress(ApiError):
                    await poll  # an empty batch, or the connection closed under it
            finally:
                await agent.close()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@pytest.mark.backends("sqlite")  # touches no state store
def test_a_full_disk_fails_the_node_at_once() -> None:
    job = Job.create("j2", "img", [(L1, 10), (L2, 20)], ["n1"], {}, 0.0)
    n1 = job.nodes["n1"]
    assert n1.count_failure(L1, "disk full: node n1: layer needs 10 B, 2 B free", 1.0, final=True)
    assert n1.view().state == "failed" and "2 B free" in n1.view().error


@pytest.mark.backends("sqlite")  # touches no state store
def test_every_piece_of_a_layer_counts_on_the_wire() -> None:
    """A split layer arrives in several transfers: all their bytes crossed a link.

    One line per layer and seeder in the report; the pieces' bytes add up.
    """
    mib = 1024 * 1024
    job = Job.create("j1", "img", [(L1, 4 * mib), (L2, 1 * mib)], ["d"], {}, 1.0)
    d = job.nodes["d"]
    for i, seeder in enumerate(["origin", "origin", "n1", "origin"]):
        d.record(
            SeederUse(
                layer=L1,
                seeder=seeder,
                reason=R,
                bytes=mib,
                seconds=0.5,
                started_at=10.0 + i,
                finished_at=10.5 + i,
            )
        )
    d.record(SeederUse(layer=L2, seeder="n1", reason=R, bytes=mib, seconds=1.0))
    view = job.view()
    assert view.wire_bytes == 5 * mib == view.copy_bytes
    lines = {(u.layer, u.seeder): u for u in view.nodes[0].transfers}
    assert set(lines) == {(L1, "origin"), (L1, "n1"), (L2, "n1")}
    from_origin = lines[(L1, "origin")]
    assert from_origin.bytes == 3 * mib and from_origin.started_at == 10.0
    assert from_origin.finished_at == 13.5 and from_origin.seconds == 3.5
    assert "= 1.0 copies, to 1 node" in summary(view)
