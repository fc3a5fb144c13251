"""The registry standby: a standby origin takes an image over when its origin dies (issue 16).

The real Coordinator on a fake clock (fake_clock_coordinator.py): agents are
played by the test, a death is missed heartbeats and a liveness pass, and
nothing sleeps. coordinator/origin_standby.py says what must happen.
tests/faults/test_origin_killed_mid_job.py kills a real origin agent mid-job.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fake_clock_coordinator import Image, Sim
from rainbowd.coordinator.cluster import MISSED_HEARTBEATS
from rainbowd.coordinator.errors import BadRequest, Conflict, NotFound
from rainbowd.coordinator.origin_standby import RESTART_GRACE_INTERVALS, TAKEOVER_EVENT
from rainbowd.core.messages import (
    ArchiveSource,
    CreateImage,
    IngestAssignment,
    IngestDone,
    TaskFailed,
    TransferAssignment,
    TransferFailed,
)

HB = 1.0  # the Sim's heartbeat interval

pytestmark = pytest.mark.backends("sqlite")  # the Sim runs its own SQLite store


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    s = Sim(tmp_path, heartbeat_interval=HB)
    s.clock.advance((RESTART_GRACE_INTERVALS + 1) * HB)  # past the start-up grace
    yield s
    s.close()


def dies(sim: Sim, dead: str, alive: list[str]) -> None:
    """``dead`` stops heartbeating; the others go on; a liveness pass marks it down."""
    for _ in range(MISSED_HEARTBEATS + 2):
        sim.clock.advance(HB)
        for nid in alive:
            sim.heartbeat(nid, sorted(sim.node(nid).holdings))
        sim.c.check_liveness()
    assert not sim.node(dead).up


def cluster(sim: Sim) -> Image:
    """Origins o1 (the image's) and o2 (its standby), demanders a and b; the image ingested."""
    sim.enroll("o1", roles=["origin"], speed=1e6)
    sim.enroll("o2", roles=["origin"], speed=1e6)
    sim.enroll("a", speed=1e6)
    sim.enroll("b", speed=1e6)
    return sim.add_image("o1", sizes=(70_000, 60_000), standby_origins=["o2"])


def test_a_standby_origin_takes_over_a_job_whose_origin_died(sim: Sim) -> None:
    img = cluster(sim)
    view = sim.c.image_view("app:1")
    assert (view.origin, view.standby_origins) == ("o1", ["o2"])
    sim.job(img, ["a", "b"])
    first = [(n, t) for n in ("a", "b") for t in sim.take(n) if isinstance(t, TransferAssignment)]
    assert first and {t.seeder.node_id for _, t in first} == {"o1"}
    dies(sim, "o1", ["o2", "a", "b"])  # mid-job: a and b hold nothing yet
    for nid, t in first:  # their pulls from o1 broke off
        lost = TransferFailed(reason="seeder o1 unreachable", kind="unreachable")
        sim.c.transfer_failed(sim.node(nid), t.transfer_id, lost)

    view = sim.c.image_view("app:1")
    assert (view.origin, view.standby_origins, view.state) == ("o2", ["o1"], "ready")
    assert ("coordinator", "o2", TAKEOVER_EVENT) in sim.events()
    sim.ingest("o2", img)  # o2 read the same image from the same source
    assert set(img.layers) <= sim.node("o2").holdings
    # a and b are fed from o2 (or each other) until the job ends
    for _ in range(8):
        for nid in ("a", "b"):
            for t in [a for a in sim.take(nid) if isinstance(a, TransferAssignment)]:
                assert t.seeder.node_id != "o1"
                sim.done(nid, t)
    [job] = sim.c.jobs.values()
    assert job.state == "done"


def test_the_dead_origins_late_report_is_refused(sim: Sim) -> None:
    sim.enroll("o1", roles=["origin"])
    sim.enroll("o2", roles=["origin"])
    sim.enroll("a")
    image = sim.read_image()
    sim.add_image("o1", standby_origins=["o2"], ingest=False)
    [first] = [t for t in sim.take("o1") if isinstance(t, IngestAssignment)]
    dies(sim, "o1", ["o2", "a"])  # before its ingest ended
    assert sim.c.image_view("app:1").origin == "o2"
    with pytest.raises(NotFound):
        done = IngestDone(image=image.record, manifests=image.manifests)
        sim.c.ingest_done(sim.node("o1"), first.ingest_id, done)
    sim.ingest("o2", image)  # the standby's ingest makes the image ready
    view = sim.c.image_view("app:1")
    assert (view.state, view.nodes) == ("ready", ["o2"])


def test_a_standby_that_reads_another_image_holds_nothing_and_says_why(sim: Sim) -> None:
    img = cluster(sim)
    sim.job(img, ["a"])
    dies(sim, "o1", ["o2", "a", "b"])
    with pytest.raises(Conflict, match="source changed"):
        sim.ingest("o2", sim.read_image(sizes=(70_000, 60_000)))  # other bytes: other digests
    assert not set(img.layers) & sim.node("o2").holdings
    assert ("coordinator", "o2", "origin_mismatch") in sim.events()


def test_a_standby_that_cannot_read_the_source_leaves_the_image_ready_and_holds_nothing(
    sim: Sim,
) -> None:
    img = cluster(sim)
    sim.job(img, ["a"])
    dies(sim, "o1", ["o2", "a", "b"])
    [task] = [t for t in sim.take("o2") if isinstance(t, IngestAssignment)]
    sim.c.ingest_failed(sim.node("o2"), task.ingest_id, TaskFailed(reason="no such file"))
    view = sim.c.image_view("app:1")
    assert (view.state, view.origin) == ("ready", "o2")
    assert not set(img.layers) & sim.node("o2").holdings


def test_an_idle_image_is_not_taken_over_until_a_job_uses_it(sim: Sim) -> None:
    img = cluster(sim)
    dies(sim, "o1", ["o2", "a", "b"])
    assert sim.c.image_view("app:1").origin == "o1"  # no job: nobody reads the source again
    sim.job(img, ["a"])
    sim.c.check_liveness()
    assert sim.c.image_view("app:1").origin == "o2"


def test_no_takeover_while_a_restarted_coordinator_waits_for_heartbeats(sim: Sim) -> None:
    img = cluster(sim)
    sim.job(img, ["a"])
    sim.restart()  # every node down until its first heartbeat reaches the new process
    sim.c.check_liveness()
    assert sim.c.image_view("app:1").origin == "o1"
    sim.heartbeat("o1", img.layers)
    sim.clock.advance((RESTART_GRACE_INTERVALS + 1) * HB)
    for nid in ("o1", "o2", "a", "b"):
        sim.heartbeat(nid, sorted(sim.node(nid).holdings))
    sim.c.check_liveness()
    assert sim.c.image_view("app:1").origin == "o1"  # it came back: nothing to take over


def test_no_standby_up_leaves_the_origin_in_place(sim: Sim) -> None:
    img = cluster(sim)
    sim.job(img, ["a"])
    for _ in range(MISSED_HEARTBEATS + 2):
        sim.clock.advance(HB)
        sim.heartbeat("a", [])
        sim.c.check_liveness()
    assert not sim.node("o1").up and not sim.node("o2").up
    assert sim.c.image_view("app:1").origin == "o1"


@pytest.mark.parametrize(
    ("standbys", "why"),
    [
        (["a"], "not a node with the origin role"),
        (["ghost"], "not a node with the origin role"),
        (["o1"], "named twice"),
        (["o2", "o2"], "named twice"),
    ],
)
def test_standby_origins_are_checked_at_the_door(sim: Sim, standbys: list[str], why: str) -> None:
    sim.enroll("o1", roles=["origin"])
    sim.enroll("o2", roles=["origin"])
    sim.enroll("a")
    req = CreateImage(
        ref="app:1", source=ArchiveSource(path="/x.tar"), origin="o1", standby_origins=standbys
    )
    with pytest.raises(BadRequest, match=why):
        sim.c.add_image(req)
