"""The coordinator load benchmark's machinery, at a tiny size, so it cannot silently rot.

Also the job persistence it led to: while a job runs, one node's change is
written as that node's row, and loading applies those rows over the job's.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import coordinator_load
from coordinator_support import open_state
from rainbowd.core.messages import JobView, NodeJobState, NodeJobStateName


@pytest.mark.backends("sqlite")  # touches no state store
@pytest.mark.timeout(60)
async def test_tiny_load_run_measures_every_agent_and_finishes_its_job() -> None:
    opts = coordinator_load.Options(steady=3.0, warmup=0.5, workers=1, job_timeout=30.0)
    step = await coordinator_load.run_step(20, opts)
    assert step.registered == 20
    assert step.errors == 0, (step.hb_errors, step.poll_errors)
    # 20 agents beating once a second for 3 s: about 60 beats, each one timed
    assert step.heartbeats_per_s * opts.steady >= 20 * 2
    assert not math.isnan(step.hb_p99_ms) and step.hb_p99_ms > 0
    assert step.job_state == "done"
    assert step.transfers == step.expected_transfers == 19
    assert not math.isnan(step.assign_p50_ms) and step.assign_p99_ms >= step.assign_p50_ms
    assert step.job_s >= step.ideal_job_s  # ceil(log2 20) rounds of 0.1 s at best
    summary = coordinator_load.summarize([step], opts, 100.0)
    assert summary["steps"][0]["n"] == 20


@pytest.mark.backends("sqlite")  # touches no state store
def test_assignment_latency_counts_from_what_freed_the_pair() -> None:
    t0 = 100.0
    arrivals = [(100.010, "t1", "origin", "a"), (100.230, "t2", "a", "b")]
    dones = [(100.200, "t1", "origin", "a")]
    lat, first = coordinator_load._assignment_latencies(arrivals, dones, t0)
    assert [round(x) for x in lat] == [10, 30]
    assert [round(x) for x in first] == [10]


def _node(node_id: str, state: NodeJobStateName) -> NodeJobState:
    return NodeJobState(
        node_id=node_id,
        state=state,
        layers_done=1 if state == "done" else 0,
        layers_total=1,
        bytes_done=0,
        bytes_total=10,
        rate_bps=0.0,
        transfers=[],
        started_at=1.0,
    )


def test_job_node_rows_apply_over_the_job_until_it_is_saved_whole(tmp_path: Path) -> None:
    store = open_state(tmp_path)
    view = JobView(
        job_id="j-1",
        image="x:1",
        state="running",
        created_at=1.0,
        nodes=[_node("a", "pending"), _node("b", "pending")],
    )
    store.save_job(view)
    store.save_job_node("j-1", _node("b", "done"))
    (loaded,) = store.load_jobs()
    assert [(n.node_id, n.state) for n in loaded.nodes] == [("a", "pending"), ("b", "done")]
    view.nodes = [_node("a", "done"), _node("b", "done")]
    view.state = "done"
    store.save_job(view)  # the whole job supersedes its node rows
    (loaded,) = store.load_jobs()
    assert loaded.state == "done"
    assert [n.state for n in loaded.nodes] == ["done", "done"]
    assert tuple(store.execute("SELECT count(*) FROM job_nodes").fetchone()) == (0,)
    store.close()
