"""``rbd job ID`` says why each seeder was chosen; ``rbd --json job ID`` gives the record.

The reason is a record (rainbowd.core.sched.reasons.TransferReason): the table
prints the line it renders, the JSON output the rule and the numbers by name,
so a program reads them without parsing a sentence. The coordinator is a fake
that answers ``job`` with a view sent through the wire codec, as the real
client decodes it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest

from rainbowd.cli import main as rbd_cli
from rainbowd.core import messages as m
from rainbowd.core.messages import JobView, NodeJobState, SeederUse
from rainbowd.core.sched import reasons as rs
from rainbowd.core.sched.reasons import TransferReason
from rainbowd.lib.progress import job_report

LAYER = "sha256:" + "1" * 64
MB = 1e6
BEST_FIT = TransferReason(
    rule=rs.BEST_FIT,
    policy="swarm",
    turn=rs.FASTEST_FIRST,
    numbers={
        rs.SEEDER_BPS: 2.5 * MB,
        rs.FREE_UP_BPS: 2.5 * MB,
        rs.FREE_DOWN_BPS: 8 * MB,
        rs.PLANNED_BPS: 2.5 * MB,
        rs.DEMANDER_BPS: 8 * MB,
    },
)
RELAY = TransferReason(
    rule=rs.RELAY,
    policy="relay",
    turn=rs.URGENT,
    numbers={
        rs.SEEDER_BPS: 8 * MB,
        rs.FREE_UP_BPS: 6 * MB,
        rs.FREE_DOWN_BPS: 4 * MB,
        rs.INBOUND_BPS: 4 * MB,
        rs.LAG_S: 0.42,
        rs.PLANNED_BPS: 4 * MB,
        rs.NEED_S: 20.0,
    },
)
OLD = TransferReason.legacy("paper: fastest idle seeder holding the layer (1.0 MB/s measured)")


def view() -> JobView:
    uses = [
        SeederUse(layer=LAYER, seeder="origin", reason=BEST_FIT, bytes=10**6, seconds=0.4),
        SeederUse(layer=LAYER, seeder="n1", reason=RELAY, bytes=10**6, seconds=0.25),
        SeederUse(layer=LAYER, seeder="n2", reason=OLD, bytes=10**6, seconds=1.0),
    ]
    node = NodeJobState(
        node_id="n3",
        state="done",
        layers_done=1,
        layers_total=1,
        bytes_done=10**6,
        bytes_total=10**6,
        rate_bps=0.0,
        transfers=uses,
        started_at=1.0,
        finished_at=2.0,
        wire_bytes=3 * 10**6,
    )
    job = JobView(
        job_id="j1", image="img", state="done", created_at=1.0, finished_at=2.0, nodes=[node]
    )
    # as the admin client decodes it: the record survives the wire
    return msgspec.msgpack.decode(msgspec.msgpack.encode(job), type=JobView)


class FakeAdmin:
    async def job(self, job_id: str) -> JobView:
        assert job_id == "j1"
        return view()


@pytest.fixture
def fake_coordinator(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    @asynccontextmanager
    async def admin(args: Any, token: str) -> Any:
        yield FakeAdmin()

    monkeypatch.setattr(rbd_cli, "_admin", admin)
    monkeypatch.setenv("RBD_ADMIN_TOKEN", "t")
    yield


def test_the_job_report_renders_each_reason_as_the_scheduler_wrote_it() -> None:
    lines = job_report(view()).splitlines()
    why = [line.split("why: ", 1)[1] for line in lines if "why: " in line]
    assert why == [
        "swarm: best-fit seeder, 2.5 of its 2.5 MB/s upload free for 8.0 MB/s of free "
        "download; planned at 2.5 MB/s; fastest waiting demander first (8.0 MB/s)",
        "relay: cut-through relay -- n1 is still receiving the layer (inbound planned at "
        "4.0 MB/s) and serves its chunks as they land; the best fit among the layer's "
        "holders and relays for 4.0 MB/s of free download; 6.0 of its 8.0 MB/s upload "
        "free; planned at 4.0 MB/s (no faster than its inbound), first chunk 0.4 s behind "
        "a complete copy; urgent: needs 20.0 s of download, little slack",
        "paper: fastest idle seeder holding the layer (1.0 MB/s measured)",  # as stored
    ]


def test_rbd_job_prints_the_rendered_reasons(
    fake_coordinator: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rbd_cli.main(["job", "j1"]) == 0
    out = capsys.readouterr().out
    assert "<- origin" in out and "why: swarm: best-fit seeder, 2.5 of its 2.5 MB/s" in out
    assert "why: paper: fastest idle seeder holding the layer (1.0 MB/s measured)" in out


def test_rbd_json_job_gives_the_rule_and_the_numbers(
    fake_coordinator: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rbd_cli.main(["--json", "job", "j1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    [node] = doc["nodes"]
    reasons = [u["reason"] for u in node["transfers"]]
    assert reasons[0] == {
        "rule": "best-fit",
        "policy": "swarm",
        "turn": "fastest-first",
        "numbers": {
            "seeder_bps": 2.5e6,
            "free_up_bps": 2.5e6,
            "free_down_bps": 8e6,
            "planned_bps": 2.5e6,
            "demander_bps": 8e6,
        },
        "text": "",
    }
    assert (reasons[1]["rule"], reasons[1]["numbers"]["lag_s"]) == ("relay", 0.42)
    assert reasons[2] == {
        "rule": "legacy",
        "policy": "",
        "turn": "",
        "numbers": {},
        "text": OLD.text,
    }
    # the same document the API sends: what a program reads is what the coordinator said
    assert doc == json.loads(json.dumps(m.to_wire(view())))
