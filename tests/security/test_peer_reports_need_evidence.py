"""Issue 14, item 1: a report about a peer counts only with a transfer behind it.

Pure tests drive the real Coordinator with a fake clock and a played
host-key probe (fake_clock_coordinator.py); the probe itself is tested against
a real asyncssh ChunkServer; the last test is the attack of the issue on real
processes (rbd-coordinator and rbd-agent, a node posting with its own
credential).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fake_clock_coordinator import Sim
from rainbowd.agent.dataplane.keys import fingerprint, load_or_create_key, public_line
from rainbowd.agent.dataplane.ssh_server import ChunkServer
from rainbowd.coordinator.errors import Forbidden
from rainbowd.coordinator.evidence import EVIDENCE_WINDOW
from rainbowd.coordinator.hostkey_probe import PROBE_INTERVAL, probe_host_key
from rainbowd.core import messages as m
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from rainbowd.lib.client import AgentClient, ApiError
from rainbowd.lib.store import LayerStore

VERIFY = m.TransferFailed(reason="chunk 0 digest mismatch", kind="verify", seeder_fault=True)
HOST_KEY = m.TransferFailed(reason="host key mismatch", kind="security", seeder_fault=True)


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    s = Sim(tmp_path)
    yield s
    s.close()


def bad_chunk(peer: str) -> m.SecurityEvent:
    return m.SecurityEvent(kind="bad_chunk", peer=peer, detail="chunk 3 did not verify")


def host_key(peer: str) -> m.SecurityEvent:
    return m.SecurityEvent(kind="host_key_mismatch", peer=peer, detail="saw SHA256:other")


async def test_claims_without_a_transfer_are_refused_and_recorded_against_the_reporter(
    sim: Sim,
) -> None:
    """The issue's attack: one request used to quarantine the origin."""
    sim.enroll("origin", roles=["origin"])
    sim.add_image("origin")
    mallory = sim.enroll("mallory")
    for ev in (host_key("origin"), bad_chunk("origin"), bad_chunk("origin"), bad_chunk("origin")):
        with pytest.raises(Forbidden) as ei:
            sim.c.security_event(mallory, ev)
        assert "no transfer from origin to mallory" in ei.value.message
    assert not sim.node("origin").quarantined
    assert "origin" in [p.node_id for p in sim.c.cluster.trust().peers]
    assert sim.probe.calls == []  # an unbacked claim does not even cost a probe
    assert sim.events() == [("coordinator", "mallory", "unfounded_report")] * 4
    # the origin still ingests: images can be added
    sim.add_image("origin", ref="app:2")
    assert sim.c.image_view("app:2").state == "ready"


async def test_a_transfer_backs_claims_while_running_and_a_window_after(sim: Sim) -> None:
    sim.enroll("origin", roles=["origin"])
    img = sim.add_image("origin")
    mallory = sim.enroll("mallory")
    sim.job(img, ["mallory"])
    t = sim.transfer("mallory")
    assert t.seeder.node_id == "origin"
    sim.c.security_event(mallory, bad_chunk("origin"))  # running: backed
    sim.done("mallory", t)
    sim.clock.advance(EVIDENCE_WINDOW - 1)
    sim.c.security_event(mallory, bad_chunk("origin"))  # ended moments ago: backed
    sim.clock.advance(2)
    with pytest.raises(Forbidden):
        sim.c.security_event(mallory, bad_chunk("origin"))
    # a transfer's own failure report is evidence only within the window too
    assert [k for _, _, k in sim.events()] == ["bad_chunk", "bad_chunk", "unfounded_report"]


async def test_a_stale_failure_report_blames_nobody(sim: Sim) -> None:
    sim.enroll("origin", roles=["origin"], speed=1e6)
    img = sim.add_image("origin")
    sim.enroll("seeder", speed=500e6, holdings=img.layers)
    d = sim.enroll("d")
    sim.job(img, ["d"])
    t = sim.transfer("d")
    assert t.seeder.node_id == "seeder"
    # the coordinator ends the transfer itself (d re-registers: its pulls are gone)
    sim.c._aborted(sim.c.scheduler.node_down("d"), "test: d restarted")
    sim.clock.advance(EVIDENCE_WINDOW + 1)
    with pytest.raises(Forbidden):
        sim.c.transfer_failed(d, t.transfer_id, HOST_KEY)
    assert sim.probe.calls == [] and not sim.node("seeder").quarantined


async def test_one_demander_cannot_get_a_seeder_penalized_or_quarantined(sim: Sim) -> None:
    sim.enroll("origin", roles=["origin"], speed=1e6)
    img = sim.add_image("origin")
    sim.enroll("victim", speed=500e6, holdings=img.layers)
    mallory = sim.enroll("mallory")
    sim.job(img, ["mallory"])
    t = sim.transfer("mallory")
    assert t.seeder.node_id == "victim"
    for _ in range(10):  # as often as it likes, while its transfer runs
        sim.c.security_event(mallory, bad_chunk("victim"))
    sim.c.transfer_failed(mallory, t.transfer_id, VERIFY)
    assert not sim.node("victim").quarantined
    assert sim.c.scheduler.speed("victim") == 500e6  # not even penalized
    # only the pair keeps apart: mallory is re-planned onto the origin
    assert sim.transfer("mallory").seeder.node_id == "origin"


async def test_two_demanders_penalize_three_quarantine(sim: Sim) -> None:
    sim.enroll("origin", roles=["origin"], speed=1e6)
    img = sim.add_image("origin")
    sim.enroll("bad", speed=500e6, holdings=img.layers)
    for i in range(3):
        d = sim.enroll(f"d{i}")
        sim.job(img, [f"d{i}"])
        t = sim.transfer(f"d{i}")
        assert t.seeder.node_id == "bad"
        sim.c.transfer_failed(d, t.transfer_id, VERIFY)
        assert sim.node("bad").quarantined == (i == 2)
        if i < 2:  # one demander: unchanged; two: halved
            assert sim.c.scheduler.speed("bad") == 500e6 / 2**i
        t2 = sim.transfer(f"d{i}")
        assert t2.seeder.node_id != "bad"
        sim.done(f"d{i}", t2)
    assert "3 demanders reported bad chunks" in sim.node("bad").info.quarantine_reason


async def test_the_origin_is_never_quarantined_on_peers_word(sim: Sim) -> None:
    sim.enroll("origin", roles=["origin"], speed=500e6)
    img = sim.add_image("origin")
    for i in range(3):  # slow demanders: each pulls from the (fast, idle) origin in turn
        sim.enroll(f"d{i}", speed=1e3)
        sim.job(img, [f"d{i}"])
        t = sim.transfer(f"d{i}")
        assert t.seeder.node_id == "origin"
        sim.done(f"d{i}", t)
    # three demanders, each with a transfer from the origin, all say it sent bad chunks
    for i in range(3):
        sim.c.security_event(sim.node(f"d{i}"), bad_chunk("origin"))
    assert not sim.node("origin").quarantined
    assert sim.c.cluster.origins() == ["origin"]
    assert sim.c.scheduler.speed("origin") < 500e6  # penalized, so others seed first


@pytest.mark.parametrize(
    ("probe", "quarantined"), [("mismatch", True), ("match", False), ("unreachable", False)]
)
async def test_host_key_claims_are_settled_by_the_coordinators_own_probe(
    sim: Sim, probe: str, quarantined: bool
) -> None:
    sim.enroll("origin", roles=["origin"], speed=1e6)
    img = sim.add_image("origin")
    seeder = sim.enroll("seeder", speed=500e6, holdings=img.layers)
    d = sim.enroll("d")
    sim.job(img, ["d"])
    t = sim.transfer("d")
    assert t.seeder.node_id == "seeder"
    sim.probe.state = probe  # type: ignore[assignment]
    sim.c.security_event(d, host_key("seeder"))
    sim.c.transfer_failed(d, t.transfer_id, HOST_KEY)
    await sim.c.host_key_checks.wait()
    where = f"{seeder.info.address}:{seeder.info.ssh_port}"
    assert sim.probe.calls == [where]  # two claims, one probe
    assert sim.node("seeder").quarantined == quarantined
    # the demander's claim is shown either way; the pair keeps apart; d is re-planned
    assert ("d", "seeder", "host_key_mismatch") in sim.events()
    assert sim.transfer("d").seeder.node_id == "origin"
    if quarantined:
        assert "coordinator's own probe" in sim.node("seeder").info.quarantine_reason
        assert ("coordinator", "seeder", "host_key_mismatch") in sim.events()
    else:  # another backed claim after PROBE_INTERVAL probes again
        sim.clock.advance(PROBE_INTERVAL + 1)
        sim.c.security_event(d, host_key("seeder"))
        await sim.c.host_key_checks.wait()
        assert sim.probe.calls == [where, where]


async def test_the_probe_compares_a_real_servers_host_key(tmp_path: Path) -> None:
    """probe_host_key against a real asyncssh ChunkServer: match, mismatch, unreachable."""
    key = load_or_create_key(tmp_path / "host")
    other = load_or_create_key(tmp_path / "other")
    server = ChunkServer(LayerStore(tmp_path / "store"), key, node_id="seeder")
    port = await server.start("127.0.0.1", 0)
    try:
        ok = await probe_host_key("127.0.0.1", port, public_line(key))
        bad = await probe_host_key("127.0.0.1", port, public_line(other))
    finally:
        await server.close()
    assert (ok.state, ok.detail) == ("match", fingerprint(key))
    assert (bad.state, bad.detail) == ("mismatch", fingerprint(key))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    gone = await probe_host_key("127.0.0.1", closed, public_line(key))
    assert gone.state == "unreachable" and "127.0.0.1" in gone.detail


@pytest.mark.integration
async def test_an_enrolled_node_cannot_quarantine_the_origin(
    tmp_path: Path, demo_image: Path
) -> None:
    """Real processes: a node posts the issue's reports with its own credential."""
    c = LocalCluster(
        tmp_path / "cluster",
        [NodeSpec("origin", roles=["origin"]), NodeSpec("mallory")],
        chunk_size=256 * 1024,
        heartbeat_interval=0.5,
    )
    await c.start()
    try:
        credential = c.agent_dir("mallory").joinpath("credential").read_text().strip()
        async with AgentClient(c.url) as mallory:
            mallory.set_credential("mallory", credential)
            for ev in (host_key("origin"), bad_chunk("origin"), bad_chunk("origin")):
                with pytest.raises(ApiError) as ei:
                    await mallory.security_event(ev)
                assert ei.value.status == 403, ei.value
        async with c.admin() as admin:
            nodes = {n.node_id: n for n in (await admin.nodes()).nodes}
            assert not nodes["origin"].quarantined and nodes["origin"].state == "up"
            view = await admin.ingest(
                m.CreateImage(ref="rbd-demo:latest", source=m.ArchiveSource(path=str(demo_image)))
            )
            assert view.state == "ready", view.error
            events = (await admin.security_events()).events
        assert [(e.reporter, e.peer, e.kind) for e in events] == [
            ("coordinator", "mallory", "unfounded_report")
        ] * 3
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "rbd"),
            "events",
            stdout=asyncio.subprocess.PIPE,
            env={
                **os.environ,
                "RBD_COORDINATOR": c.url,
                "RBD_ADMIN_TOKEN_FILE": str(c.admin_token_file),
            },
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        assert b"unfounded_report" in out and b"mallory" in out, out
    finally:
        await c.stop()
