"""Faults in the simulator: reports take the coordinator's path through the job driver.

Each test runs a small simulated job (simulated time only: no clock, no
sleep), picks its fault's target from a traced fault-free run of the same
job (so a change of the scheduler's choices moves the target, not the
test's meaning), injects the fault and checks the driver's rules showed --
suspect, avoid, relay failures without blame, adoption, failure budgets --
and that every live node still got the image.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path

import pytest

# the repo root (bench/ is a package there, not installed)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.sim import Simulation
from bench.sim.__main__ import main
from bench.sim.engine import SimResult, Traced
from bench.sim.faults import Fault, parse_fault
from rainbowd.coordinator.core import SEEDER_FAULT_LIMIT
from rainbowd.core.chunks import MIN_LAYER_CHUNKS
from rainbowd.core.sched.jobdriver import MAX_LAYER_FAILURES, VERIFY_AVOID_SECONDS
from rainbowd.devcluster.profile import ClusterProfile, load_profile

PROFILES = Path(__file__).resolve().parents[2] / "bench" / "profiles"
#: the paper profile's image (bench/profiles/paper.toml's demo image, sizes in bytes)
LAYERS = [(f"sha256:{i:064x}", size) for i, size in enumerate((1996800, 8396800, 10240), 1)]
#: when the faults of the tests strike (simulated seconds; the job takes about 20)
AT = 1.0


def paper(nodes: int = 10) -> ClusterProfile:
    """bench/profiles/paper.toml scaled to ``nodes`` demanders (its relay chains, its heartbeat)."""
    return load_profile(PROFILES / "paper.toml").scaled(nodes)


def run(
    policy: str,
    *faults: str,
    profile: ClusterProfile | None = None,
    layers: list[tuple[str, int]] = LAYERS,
) -> SimResult:
    p = profile or paper()
    return Simulation(
        p, layers, policy=policy, faults=[parse_fault(f) for f in faults], trace=True
    ).run()


def spanning(r: SimResult, at: float) -> list[Traced]:
    """Transfers from a peer (not the origin) whose flow ran at ``at``."""
    return [
        e
        for e in r.trace
        if e.seeder != "origin" and 0 <= e.started <= at < e.ended and e.outcome == "done"
    ]


def every_live_node_done(p: ClusterProfile, r: SimResult) -> None:
    assert r.failed == {}
    live = {n.name for n in p.nodes} - set(r.dead) - set(r.quarantined)
    assert set(r.node_seconds) == live


# -- specs -----------------------------------------------------------------------
def test_fault_specs() -> None:
    assert parse_fault("dies:fast-001@12.5") == Fault("dies", "fast-001", 12.5)
    assert parse_fault("seeder-dies:n7@3") == Fault("dies", "n7", 3.0)
    assert parse_fault("corrupt:a->b@0") == Fault("corrupt", "a", 0.0, "b")
    assert parse_fault("corrupt:a->*@2").spec() == "corrupt:a->*@2"
    for bad in ("dies:x", "explodes:x@1", "corrupt:a@1", "blip:a->b@1", "dies:@1"):
        with pytest.raises(ValueError, match="fault"):
            parse_fault(bad)
    with pytest.raises(ValueError, match="no node 'ghost'"):
        Simulation(paper(), LAYERS, faults=[parse_fault("dies:ghost@1")])


def test_a_trace_says_what_each_transfer_moved() -> None:
    """Fault-free, every node's done transfers move each of its layers' bytes once (pieces
    of one layer add up to it), and the origin's ones add up to what it sent."""
    r = run("swarm")
    sizes = dict(LAYERS)
    got: dict[tuple[str, str], int] = {}
    for e in r.trace:
        assert e.outcome == "done" and 0 < e.size <= sizes[e.layer]
        got[(e.demander, e.layer)] = got.get((e.demander, e.layer), 0) + e.size
    assert got == {(n, layer): sizes[layer] for n in r.node_seconds for layer in sizes}
    assert sum(e.size for e in r.trace if e.seeder == "origin") == r.sent_bytes["origin"]


def test_a_fault_after_the_job_changes_nothing() -> None:
    clean = run("relay")
    late = run("relay", "blip:fast-001@1000")
    assert late.node_seconds == clean.node_seconds
    assert late.failures == {} and late.adopted == 0


# -- a seeder dies -----------------------------------------------------------------
# (``relay`` only: ``swarm``'s pieces are one chunk, and a relay forwards whole chunks)
@pytest.mark.parametrize("policy", ["relay"])
def test_a_dead_seeder_is_suspected_and_its_relays_are_not_blamed(policy: str) -> None:
    clean = run(policy)
    by_id = {e.transfer_id: e for e in clean.trace}
    # a peer seeding at AT to a demander that relays it on (a transfer fed by it runs too)
    fed = {e.upstream for e in clean.trace if e.upstream and e.started <= AT < e.ended}
    victims = [e for e in spanning(clean, AT) if e.transfer_id in fed]
    assert victims, "the job has no relay chain at AT"
    victim = victims[0].seeder
    r = run(policy, f"dies:{victim}@{AT}")
    assert r.dead == {victim: AT}
    assert r.failures.get("io", 0) >= 1  # its demanders saw the connection close
    assert r.failures.get("relay", 0) >= 1  # and their own relays could not serve
    # only the io reports made a seeder suspect: a relay whose upstream broke is not blamed
    assert r.suspected == r.failures["io"]
    every_live_node_done(paper(), r)
    assert by_id  # (the clean run was traced)


# -- a node nobody can reach -------------------------------------------------------
def test_an_unreachable_seeder_is_suspected_and_avoided_and_still_gets_the_image() -> None:
    clean = run("swarm")
    seeders = sorted({e.seeder for e in clean.trace if e.seeder != "origin"})
    victim = seeders[0]
    r = run("swarm", f"unreachable:{victim}@0")
    assert r.failures.get("unreachable", 0) >= 1
    assert r.suspected >= r.failures["unreachable"]
    # its suspicion ends with each heartbeat, so it was tried again -- by demanders
    # not avoiding it: no pair failed twice within its avoid time
    fails = sorted((e.ended, e.demander) for e in r.trace if e.outcome == "unreachable")
    assert len(fails) == len(set(fails))
    every_live_node_done(paper(), r)  # it pulls (outbound) as ever: it is done too
    assert victim in r.node_seconds


# -- bad chunks ------------------------------------------------------------------
def test_bad_chunks_part_the_pair_without_suspecting_the_seeder() -> None:
    clean = run("relay")
    pair = next(e for e in clean.trace if e.seeder != "origin" and e.started > 0)
    r = run("relay", f"corrupt:{pair.seeder}->{pair.demander}@0")
    bad = [e for e in r.trace if e.outcome == "verify"]
    assert bad and all((e.seeder, e.demander) == (pair.seeder, pair.demander) for e in bad)
    assert r.suspected == 0  # it answers; it is not dead
    # the pair avoid each other for VERIFY_AVOID_SECONDS (longer than this job): never again
    first = min(e.ended for e in bad)
    assert r.total < first + VERIFY_AVOID_SECONDS
    assert not [
        e
        for e in r.trace
        if (e.seeder, e.demander) == (pair.seeder, pair.demander) and e.started > first
    ]
    every_live_node_done(paper(), r)


def test_bad_chunks_to_everyone_quarantine_the_seeder_on_several_demanders_word() -> None:
    clean = run("swarm")
    victim = next(e.seeder for e in clean.trace if e.seeder != "origin")
    r = run("swarm", f"corrupt:{victim}->*@0")
    reporters = {e.demander for e in r.trace if e.outcome == "verify"}
    assert len(reporters) >= SEEDER_FAULT_LIMIT  # never on one node's word
    assert list(r.quarantined) == [victim]
    # out of the job from then on: nothing more from it, nor to it
    out = r.quarantined[victim]
    assert not [e for e in r.trace if victim in (e.seeder, e.demander) and e.started > out]
    every_live_node_done(paper(), r)


def test_the_origin_is_never_quarantined_on_peers_word() -> None:
    r = run("relay", "corrupt:origin->*@0", profile=paper(nodes=4))
    assert r.quarantined == {}
    assert r.failures.get("verify", 0) >= SEEDER_FAULT_LIMIT


def test_a_node_fails_when_a_layer_fails_its_whole_budget() -> None:
    # one demander, the origin its only seeder, every chunk from it bad: each retry waits
    # out the pair's avoid time, and the fifth failure of a layer fails the node
    p = paper(nodes=1)
    (node,) = [n.name for n in p.nodes]
    r = run("relay", f"corrupt:origin->{node}@0", profile=p)
    assert r.failures == {"verify": MAX_LAYER_FAILURES}
    assert list(r.failed) == [node]
    assert f"failed {MAX_LAYER_FAILURES} times" in r.failed[node]
    ends = sorted(e.ended for e in r.trace if e.outcome == "verify")
    assert all(b - a >= VERIFY_AVOID_SECONDS for a, b in itertools.pairwise(ends))


# -- the coordinator drops a node that is still pulling ---------------------------
@pytest.mark.parametrize("policy", ["relay", "swarm"])
def test_a_dropped_node_s_pulls_are_adopted_back_at_its_heartbeat(policy: str) -> None:
    # swarm's pieces are one chunk: 4 MiB chunks (the agents' default) on a layer big enough
    # to be cut so (MIN_LAYER_CHUNKS of them), so a pull outlasts a heartbeat (4 MiB take 1 s
    # at 32 Mbit/s)
    p = paper() if policy == "relay" else dataclasses.replace(paper(), chunk_size=4 << 20)
    layers = LAYERS if policy == "relay" else [(LAYERS[0][0], MIN_LAYER_CHUNKS * (4 << 20))]
    clean = run(policy, profile=p, layers=layers)
    # the pull running at AT with the most left to do: still running at the next heartbeat
    running = [x for x in clean.trace if 0 <= x.started <= AT < x.ended and x.outcome == "done"]
    e = max(running, key=lambda x: (x.ended, x.transfer_id))
    assert e.ended > AT + p.heartbeat_interval
    r = run(policy, f"blip:{e.demander}@{AT}", profile=p, layers=layers)
    assert r.adopted >= 1
    assert r.failures == {}
    # the adopted pull completed as a tracked transfer (a piece that ended while its node
    # was dropped is pulled again: "dropped"; this one was taken back in time)
    assert [x.outcome for x in r.trace if x.transfer_id == e.transfer_id] == ["done"]
    every_live_node_done(p, r)


# -- every fault, on every node it can hit ------------------------------------------
@pytest.mark.parametrize("policy", ["relay", "swarm"])
@pytest.mark.parametrize("kind", ["dies", "unreachable", "corrupt", "blip"])
def test_every_fault_on_every_peer_leaves_the_live_nodes_done(policy: str, kind: str) -> None:
    # the model's invariants (a relayed flow never overtakes its upstream, time never runs
    # back) are checked as the run goes; one fault per run, on each fast node in turn
    p = paper(nodes=6)
    for n in [x.name for x in p.nodes if x.name.startswith("fast")]:
        spec = f"corrupt:{n}->*@0" if kind == "corrupt" else f"{kind}:{n}@{AT}"
        r = run(policy, spec, profile=p)
        every_live_node_done(p, r)


# -- the command line ---------------------------------------------------------------
def test_the_command_line_takes_a_fault_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sim.json"
    sizes = ",".join(str(s) for _, s in LAYERS)
    code = main(
        [
            "--profile",
            "paper",
            "--nodes",
            "10",
            "--layers",
            sizes,
            "--out",
            str(out),
            "--fault",
            "seeder-dies:fast-002@1",
            "--fault",
            "blip:slow-003@2",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "faults: dies:fast-002@1, blip:slow-003@2" in text
    notes = next(iter(json.loads(out.read_text())["systems"].values()))["notes"]
    assert notes["dead"] == {"fast-002": 1.0}
    assert main(["--profile", "paper", "--layers", sizes, "--fault", "dies:nobody@1"]) == 2
