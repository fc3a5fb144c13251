"""Per-node bandwidth caps: the pacer, the scheduler's clamps, the coordinator passing them on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from coordinator_support import enroll, register_request, start
from rainbowd.agent.dataplane.pacing import RatePacer
from rainbowd.core.sched.reasons import DOWNLOAD_CAP_BPS
from rainbowd.core.sched.scheduler import DEFAULT_SPEED_BPS, Scheduler
from rainbowd.lib.client import AgentClient, ApiError
from waiting import FakeClock

MB = 1e6


class PlayedTime:
    """The pacer's clock and sleep: a sleep is noted and ends at once; the clock moves by hand."""

    def __init__(self) -> None:
        self.clock = FakeClock(0.0)
        self.asked: list[float] = []  # every delay the pacer slept, in order

    async def sleep(self, seconds: float) -> None:
        self.asked.append(seconds)

    def pacer(self, bps: float) -> RatePacer:
        return RatePacer(bps, clock=self.clock, sleep=self.sleep)


async def test_pacer_holds_shared_traffic_to_the_rate() -> None:
    played = PlayedTime()
    pacer = played.pacer(4 * MB)

    async def stream(n: int) -> None:
        for _ in range(n):
            await pacer.pace(100_000)

    await asyncio.gather(stream(6), stream(6))  # 1.2 MB over one 4 MB/s cap, no time passing
    # each booking ends 100 kB / 4 MB/s after the one before, whichever stream made it:
    # the last ends exactly 1.2 MB / 4 MB/s from the start (it paces, it does not stall)
    assert sorted(played.asked) == pytest.approx([0.025 * k for k in range(1, 13)])
    # idle time is not saved up as credit: after a long pause a burst is paced again
    played.clock.advance(60.0)
    played.asked.clear()
    await pacer.pace(100_000)
    await pacer.pace(100_000)
    assert played.asked == pytest.approx([0.025, 0.05])


async def test_pacer_without_cap_does_not_wait() -> None:
    played = PlayedTime()
    for _ in range(1000):
        await played.pacer(0).pace(10**9)
    assert played.asked == []
    with pytest.raises(ValueError, match="rate"):
        RatePacer(-1)


def test_speed_estimate_never_exceeds_the_upload_cap() -> None:
    s = Scheduler()
    s.add_node("hinted", 100 * MB, max_upload_bps=10 * MB)
    assert s.speed("hinted") == 10 * MB
    s.add_node("unknown", max_upload_bps=1 * MB)
    assert s.speed("unknown") == 1 * MB  # below the default guess
    s.add_node("free")
    assert s.speed("free") == DEFAULT_SPEED_BPS
    s.observe_speed("hinted", 50 * MB)  # a burst measured above the cap
    assert s.speed("hinted") == 10 * MB
    s.observe_speed("hinted", 4 * MB)
    assert s.speed("hinted") == 4 * MB
    # a cap set later (re-registration) clamps at once; None leaves it alone
    s.add_node("free", max_upload_bps=2 * MB)
    assert s.speed("free") == 2 * MB
    s.add_node("free")
    s.observe_speed("free", 9 * MB)
    assert s.speed("free") == 2 * MB
    s.add_node("free", max_upload_bps=0)  # cap lifted
    s.observe_speed("free", 9 * MB)
    assert s.speed("free") == 9 * MB


def test_a_capped_demander_caps_the_expected_rate_and_does_not_slow_the_seeder() -> None:
    s = Scheduler()
    s.add_node("seed", 50 * MB, ["L"])
    s.add_node("slow", max_download_bps=2 * MB)
    s.demand("slow", "L", "j", now=0.0)
    (t,) = s.schedule(now=0.0)
    assert t.seeder_speed_bps == 50 * MB and t.expected_bps == 2 * MB
    assert t.reason.numbers[DOWNLOAD_CAP_BPS] == 2 * MB and "download cap" in t.reason.render()
    # 10 MB in 5 s: the demander's cap was the bottleneck, not the seeder
    s.complete(t.transfer_id, now=5.0, bytes_moved=int(10 * MB))
    assert s.speed("seed") == 50 * MB
    # an uncapped demander at the same rate does say the seeder is slow
    s.add_node("fast")
    s.demand("fast", "L", "j", now=5.0)
    (t2,) = s.schedule(now=5.0)
    assert t2.expected_bps == 50 * MB and DOWNLOAD_CAP_BPS not in t2.reason.numbers
    assert "download cap" not in t2.reason.render()
    s.complete(t2.transfer_id, now=10.0, bytes_moved=int(10 * MB))
    assert s.speed("seed") == 2 * MB


async def test_coordinator_takes_the_caps_from_registration(tmp_path: Path) -> None:
    coord = await start(tmp_path)
    try:
        c = AgentClient(coord.url)
        await c.open()
        req = register_request("capped", speed=100 * MB)
        req.max_upload_bps, req.max_download_bps = 5 * MB, 3 * MB
        await c.register(req)
        sched = coord.coordinator.scheduler
        assert sched.speed("capped") == 5 * MB
        assert coord.coordinator.cluster.nodes["capped"].info.max_download_bps == 3 * MB
        await c.close()
        # old agents (no caps in their registration) still register
        old = await enroll(coord.url, "old", speed=20 * MB)
        assert sched.speed("old") == 20 * MB
        await old.close()
        bad = AgentClient(coord.url)
        await bad.open()
        req = register_request("bad")
        req.max_download_bps = -1
        with pytest.raises(ApiError, match="max_download_bps"):
            await bad.register(req)
        await bad.close()
    finally:
        await coord.stop()
