"""The simulator (bench/sim): the fluid max-min allocator, the event loop, the CLI.

Cases with analytic answers: one flow runs at the slower of its two links,
flows sharing a link split it, max-min fairness on a crafted graph, the
paper policy's serial times on a chain, and T* below every simulated total.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest

# the repo root (bench/ is a package there, not installed)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.sim import IDEAL, FlowNetwork, Overheads, Simulation
from bench.sim.__main__ import main
from bench.sim.calibrate import hop_report, relay_hop_overheads
from bench.sim.flows import FlowError
from rainbowd.core.chunks import layer_chunk_size
from rainbowd.core.sched.pieces import PieceScheduler
from rainbowd.core.sched.reasons import TransferReason
from rainbowd.core.sched.records import Transfer
from rainbowd.core.sched.scheduler import DEFAULT_POLICY, Scheduler
from rainbowd.devcluster.imagebuild import BUSYBOX
from rainbowd.devcluster.profile import ClusterProfile, load_profile, parse_profile

#: the reason of a transfer taken back from an agent
ADOPTED = TransferReason.adopted()

PROFILES = Path(__file__).resolve().parents[2] / "bench" / "profiles"
MBIT = 1e6 / 8  # bytes/s in one Mbit/s


def profile(origin_up: float, *nodes: tuple[str, float, float]) -> ClusterProfile:
    """A profile with one-node groups: (name, up_mbit, down_mbit) each."""
    return parse_profile(
        {
            "name": "t",
            "origin": {"up_mbit": origin_up, "down_mbit": origin_up},
            "groups": [
                {"name": name, "count": 1, "up_mbit": up, "down_mbit": down}
                for name, up, down in nodes
            ],
        }
    )


# -- the allocator ---------------------------------------------------------------
def net(**nodes: tuple[float, float]) -> FlowNetwork:
    n = FlowNetwork()
    for name, (up, down) in nodes.items():
        n.add_node(name, up, down)
    return n


def test_one_flow_runs_at_the_slower_link() -> None:
    n = net(a=(10.0, 10.0), b=(100.0, 4.0))
    assert n.add("f", "a", "b") == {"f": 4.0}
    assert n.add("g", "b", "a") == {"g": 10.0}  # a's download, b's upload: other links
    assert n.rates() == {"f": 4.0, "g": 10.0}


def test_two_flows_out_of_one_seeder_each_get_half() -> None:
    n = net(s=(10.0, 10.0), x=(1.0, 100.0), y=(1.0, 100.0))
    n.add("f1", "s", "x")
    rates = n.add("f2", "s", "y")
    assert rates == {"f1": pytest.approx(5.0), "f2": pytest.approx(5.0)}
    # one ends: the other takes the whole upload
    assert n.remove("f1") == {"f2": pytest.approx(10.0)}


def test_max_min_fairness_on_a_crafted_graph() -> None:
    # A (up 10) sends to B (down 2) and C; D (up 100) sends to C (down 50).
    # B's download caps A->B at 2, so A->C gets A's other 8; D->C the 42 left of C.
    n = net(A=(10.0, 1.0), B=(1.0, 2.0), C=(1.0, 50.0), D=(100.0, 1.0))
    n.add("ab", "A", "B")
    n.add("ac", "A", "C")
    n.add("dc", "D", "C")
    assert n.rates() == {
        "ab": pytest.approx(2.0),
        "ac": pytest.approx(8.0),
        "dc": pytest.approx(42.0),
    }
    # a per-flow cap is one more bottleneck: A->C held to 3 leaves C 47 for D->C
    n.remove("ac")
    n.add("ac", "A", "C", cap=3.0)
    assert n.rate("ac") == pytest.approx(3.0) and n.rate("dc") == pytest.approx(47.0)


def test_only_the_touched_component_is_refilled() -> None:
    n = net(a=(10.0, 10.0), b=(10.0, 10.0), c=(10.0, 10.0), d=(10.0, 10.0))
    n.add("ab", "a", "b")
    assert set(n.add("cd", "c", "d")) == {"cd"}  # shares no link with ab
    assert set(n.add("ad", "a", "d")) == {"ab", "ad", "cd"}  # joins both
    assert set(n.remove("ab")) == {"ad", "cd"}


def test_flow_errors() -> None:
    n = net(a=(1.0, 1.0))
    with pytest.raises(FlowError, match="unknown node 'ghost'"):
        n.add("f", "a", "ghost")
    n.add("f", "a", "a")  # loopback is still two links
    with pytest.raises(FlowError, match="exists already"):
        n.add("f", "a", "a")
    with pytest.raises(FlowError, match="no flow 'g'"):
        n.remove("g")
    with pytest.raises(FlowError, match="> 0"):
        n.add_node("z", 0.0, 1.0)


@pytest.mark.parametrize("seed", range(20))
def test_random_allocations_are_max_min_fair(seed: int) -> None:
    """Feasible, and every flow has a bottleneck: a full link where no flow gets more."""
    rng = random.Random(seed)
    names = [f"n{i}" for i in range(rng.randint(2, 8))]
    caps = {name: (rng.uniform(1, 20), rng.uniform(1, 20)) for name in names}
    n = net(**caps)
    flows: dict[str, tuple[str, str]] = {}
    for i in range(rng.randint(1, 25)):
        if flows and rng.random() < 0.3:
            fid = rng.choice(sorted(flows))
            n.remove(fid)
            del flows[fid]
        else:
            src, dst = rng.choice(names), rng.choice(names)
            n.add(f"f{i}", src, dst)
            flows[f"f{i}"] = (src, dst)
    rates = n.rates()
    assert set(rates) == set(flows)
    links: dict[tuple[str, str], list[str]] = {}
    for fid, (src, dst) in flows.items():
        links.setdefault(("up", src), []).append(fid)
        links.setdefault(("down", dst), []).append(fid)

    def cap(link: tuple[str, str]) -> float:
        up, down = caps[link[1]]
        return up if link[0] == "up" else down

    for link, users in links.items():
        assert sum(rates[f] for f in users) <= cap(link) * (1 + 1e-9)
    for fid, (src, dst) in flows.items():
        assert any(
            sum(rates[f] for f in links[link]) >= cap(link) * (1 - 1e-9)
            and rates[fid] >= max(rates[f] for f in links[link]) * (1 - 1e-9)
            for link in (("up", src), ("down", dst))
        ), f"{fid} has no bottleneck"


# -- the event loop ------------------------------------------------------------------
def test_one_seeder_one_demander_takes_size_over_the_slower_link() -> None:
    p = profile(32, ("a", 8, 16))
    size = 4_000_000
    r = Simulation(p, [("l", size)], IDEAL).run()
    assert r.node_seconds == {"a-001": pytest.approx(size / (16 * MBIT))}
    # the real system's overheads add on top, as documented
    o = Overheads(efficiency=0.8, assign_s=0.002, connect_s=0.03, finish_s=0.005, verify_Bps=1e8)
    r = Simulation(p, [("l", size)], o).run()
    expect = 0.002 + 0.03 + size / (16 * MBIT * 0.8) + 0.005 + size / 1e8 + o.coordinator_s
    assert r.total == pytest.approx(expect)
    assert r.transfers == 1 and r.new_connections == 1 and not r.failed


def test_paper_policy_on_a_chain_gives_the_serial_times() -> None:
    # origin (10 Mbit/s up) -> a (asked first), then b waits. When a is done, the
    # origin's measured speed is 10 Mbit/s and a's hint is 40: a serves b.
    p = profile(10, ("a", 40, 20), ("b", 1, 100))
    s = 5_000_000
    r = Simulation(p, [("l", s)], IDEAL).run()
    t_a = s / (10 * MBIT)
    assert r.node_seconds["a-001"] == pytest.approx(t_a)
    assert r.node_seconds["b-001"] == pytest.approx(t_a + s / (40 * MBIT))
    # with a setup delay the chain is serial: each hop pays it once, and its report
    o = Overheads(efficiency=1.0, assign_s=0.01, connect_s=0.1, finish_s=0.0, verify_Bps=1e300)
    r = Simulation(p, [("l", s)], o).run()
    hop = 0.11 + o.coordinator_s
    assert r.node_seconds["b-001"] == pytest.approx(t_a + s / (40 * MBIT) + 2 * hop)


def test_layers_move_in_image_order_and_reuse_connections() -> None:
    p = profile(8, ("a", 1, 8))
    layers = [("l1", 1_000_000), ("l2", 2_000_000), ("l3", 10_000)]
    o = Overheads(efficiency=1.0, assign_s=0.0, connect_s=0.5, channel_s=0.1, finish_s=0.0)
    r = Simulation(p, layers, o).run()
    total = sum(size for _, size in layers)
    # one connection to the origin, then a channel per further layer
    fixed = 0.5 + 2 * 0.1 + 3 * o.coordinator_s  # a connection, two channels, three reports
    assert r.total == pytest.approx(total / (8 * MBIT) + total / o.verify_Bps + fixed)
    assert r.new_connections == 1 and r.transfers == 3


def test_reports_arriving_together_queue_at_the_coordinator() -> None:
    """The coordinator applies one done report at a time: the second waits for the first."""
    p = profile(16, ("a", 8, 8), ("b", 8, 8))
    cost = 0.25
    o = dataclasses.replace(IDEAL, coordinator_s=cost)
    r = Simulation(p, [("l", 1_000_000)], o, scheduler=SendAllAtOnce("fastest")).run()
    wire = 1_000_000 / (8 * MBIT)
    assert sorted(r.node_seconds.values()) == pytest.approx([wire + cost, wire + 2 * cost])
    assert r.coordinator_busy_s == pytest.approx(2 * cost)
    assert r.report_wait_max_s == pytest.approx(cost)


class SendAllAtOnce(Scheduler):
    """A policy beyond ``paper``: the origin sends every demander every layer at once."""

    def schedule(self, now: float) -> list[Transfer]:
        out = []
        for node, layer in self.pending():
            if self.receiving(node, layer) is None:
                tid = f"x-{node}-{layer}"
                out.append(self.adopt(Transfer(tid, layer, "origin", node, "j", now, ADOPTED, 0.0)))
        return out


class RelayThroughF(Scheduler):
    """origin -> f-001, and f-001 relays to s-001 while still receiving (both at once)."""

    def schedule(self, now: float) -> list[Transfer]:
        if self.active():
            return []
        return [
            self.adopt(Transfer(f"x-{d}", "l", seeder, d, "j", now, ADOPTED, 0.0))
            for seeder, d in (("origin", "f-001"), ("f-001", "s-001"))
            if (d, "l") in self.pending()
        ]


def test_a_relayed_flow_starts_a_chunk_on_the_link_into_the_relay_behind() -> None:
    # f's first chunk lands after its time on the 32 Mbit/s link into f (not on s's
    # 4 Mbit/s link out of it), plus the hop's fixed cost; then s runs at its own link
    p = profile(32, ("f", 32, 32), ("s", 4, 4))
    size = 2_000_000
    o = dataclasses.replace(IDEAL, relay_hop_s=0.1)
    r = Simulation(p, [("l", size)], o, scheduler=RelayThroughF("paper")).run()
    hop = layer_chunk_size(size, p.chunk_size) / (32 * MBIT) + 0.1  # the layer's own chunks
    assert r.node_seconds["f-001"] == pytest.approx(size / (32 * MBIT))
    assert r.node_seconds["s-001"] == pytest.approx(hop + size / (4 * MBIT))


def test_flows_sharing_a_link_speed_up_when_one_ends() -> None:
    # the origin (10 Mbit/s) feeds 4 flows at 2.5 each: l1 (s bytes) and l2 (3 s)
    # to a and to b. When the l1 flows end, the l2 flows have 2 s left and get 5
    # each: the origin's link stays full, so everyone is done at 8 s / 10 Mbit/s.
    p = profile(10, ("a", 1, 100), ("b", 1, 100))
    s = 1_000_000
    sim = Simulation(p, [("l1", s), ("l2", 3 * s)], IDEAL, scheduler=SendAllAtOnce())
    r = sim.run()
    t1 = s / (2.5 * MBIT)
    assert r.node_seconds == {"a-001": pytest.approx(2 * t1), "b-001": pytest.approx(2 * t1)}
    assert r.total == pytest.approx(8 * s / (10 * MBIT))
    assert r.transfers == 4 and not r.failed


@pytest.mark.parametrize("seed", range(15))
def test_t_star_never_exceeds_the_simulated_total(seed: int) -> None:
    rng = random.Random(seed)
    groups = [
        {
            "name": f"g{i}",
            "count": rng.randint(1, 12),
            "up_mbit": sorted([rng.uniform(1, 64), rng.uniform(1, 64)]),
            "down_mbit": sorted([rng.uniform(1, 64), rng.uniform(1, 64)]),
        }
        for i in range(rng.randint(1, 3))
    ]
    origin = rng.uniform(1, 64)
    p = parse_profile(
        {"name": "r", "origin": {"up_mbit": origin, "down_mbit": origin}, "groups": groups}
    )
    layers = [(f"l{i}", rng.randint(1, 5_000_000)) for i in range(rng.randint(1, 4))]
    for o in (IDEAL, Overheads()):
        r = Simulation(p, layers, o).run()
        assert not r.failed and len(r.node_seconds) == len(p.nodes)
        assert r.total >= p.bound(sum(s for _, s in layers)).t_star * (1 - 1e-9)


def test_a_thousand_node_paper_run_is_faster_than_real_time() -> None:
    p = load_profile(PROFILES / "paper.toml").scaled(1000)
    layers = [("busybox", 1_996_800), ("payload", 8_396_800), ("files", 10_240)]
    r = Simulation(p, layers).run()
    assert not r.failed and len(r.node_seconds) == 1000
    bound = p.bound(sum(s for _, s in layers)).t_star
    assert r.total >= bound
    assert r.wall_seconds < r.total
    assert r.transfers == 3000


def test_where_each_transfer_costs_a_second_pieces_grow_and_the_job_ends_sooner() -> None:
    """Charged a loaded lab's fixed costs (session 16: assignment 0.22 s, report 0.9 s),
    ``swarm`` grows its untouched pieces (core/sched/piece_growth.py): fewer transfers,
    every node holds the image, and it is done sooner than in one-chunk pieces."""
    p = load_profile(PROFILES / "paper.toml").scaled(20).rates_scaled(0.25)
    layers = [("busybox", 1_996_800), ("payload", 8_396_800), ("files", 10_240)]
    lab = Overheads(assign_s=0.22, connect_s=0.17, finish_s=0.9)
    fixed = PieceScheduler("swarm")
    fixed.growth.cost_share = 0.0  # pieces keep their first size
    runs = {
        "grown": Simulation(p, layers, lab, policy="swarm").run(),
        "fixed": Simulation(p, layers, lab, scheduler=fixed).run(),
    }
    for r in runs.values():
        assert not r.failed and len(r.node_seconds) == len(p.nodes)
    assert runs["grown"].transfers < runs["fixed"].transfers / 2
    assert runs["grown"].total < runs["fixed"].total
    # an idle host's costs: the pieces keep their size, the same run to the transfer
    idle = {}
    for share in (0.25, 0.0):
        sched = PieceScheduler("swarm")
        sched.growth.cost_share = share
        idle[share] = Simulation(p, layers, Overheads(), scheduler=sched).run()
    assert idle[0.25].transfers == idle[0.0].transfers
    assert idle[0.25].total == idle[0.0].total


# -- the command line ------------------------------------------------------------------
def test_cli_simulates_the_lab_runs_own_profile_and_refuses_another(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lab = tmp_path / "lab.json"
    layers = [["sha256:" + "a" * 64, 1_000_000]]
    system = {"rbd": {"total": 5.0, "node_seconds": {"fast-001": 1.0}, "failed": {}}}
    doc = {"profile": "ci-x0.5", "rate_scale": 0.5, "layers": layers, "systems": system}
    lab.write_text(json.dumps(doc))
    out = tmp_path / "sim.json"
    assert main(["--out", str(out), "--compare", str(lab)]) == 0
    ci = load_profile(PROFILES / "ci.toml")
    assert json.loads(out.read_text())["t_star"] == pytest.approx(
        ci.rates_scaled(0.5).bound(1_000_000).t_star
    )
    capsys.readouterr()
    assert main(["--profile", "paper", "--out", str(out), "--compare", str(lab)]) == 2
    err = capsys.readouterr().err
    assert "lab run is of profile 'ci', not 'paper'" in err and "leave --profile out" in err


def test_cli_writes_the_lab_shape_and_compares(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layers = [["sha256:" + "a" * 64, 1_000_000], ["sha256:" + "b" * 64, 3_000_000]]
    lab = tmp_path / "lab.json"
    lab_doc: dict[str, Any] = {
        "profile": "ci",
        "nodes": 6,
        "image_bytes": 4_000_000,
        "layers": layers,
        "systems": {"rbd": {"total": 5.0, "node_seconds": {"fast-001": 1.0}, "failed": {}}},
    }
    lab.write_text(json.dumps(lab_doc))
    out = tmp_path / "sim.json"
    assert main(["--profile", "ci", "--out", str(out), "--compare", str(lab)]) == 0
    doc = json.loads(out.read_text())
    assert doc["profile"] == "ci" and doc["image_bytes"] == 4_000_000
    assert doc["layers"] == layers  # the lab's own layers are simulated
    assert set(doc["bound"]) >= {"origin_upload", "slowest_download", "aggregate_upload"}
    sim = doc["systems"][f"sim:{DEFAULT_POLICY}"]  # no --policy: the coordinator's
    assert sim["total"] == max(sim["node_seconds"].values())
    assert sim["ratio"] == pytest.approx(sim["total"] / doc["t_star"])
    assert len(sim["node_seconds"]) == 6 and sim["failed"] == {}
    assert sim["notes"]["overheads"]["efficiency"] == 0.95
    printed = capsys.readouterr().out
    assert f"sim:{DEFAULT_POLICY}" in printed and "T* =" in printed
    err = (sim["total"] - 5.0) / 5.0
    assert (
        f"rbd (lab) 5.00 s vs sim:{DEFAULT_POLICY} {sim['total']:.2f} s: error {err:+.1%}"
        in printed
    )
    assert sim["notes"]["chunk_size"] == 128 * 1024  # the ci profile's
    paper = ["--policy", "paper"]
    assert main(["--profile", "ci", "--chunk-kib", "64", "--out", str(out), *paper]) == 0
    assert json.loads(out.read_text())["systems"]["sim:paper"]["notes"]["chunk_size"] == 65536
    assert main(["--profile", "ci", "--chunk-kib", "16", "--out", str(out)]) == 2
    assert main(["--profile", "nope", "--out", str(out)]) == 2
    assert (
        main(["--profile", "ci", "--out", str(out), "--compare", str(lab), "--lab-system", "bt"])
        == 2
    )


def test_cli_charges_the_transfer_costs_the_lab_run_measured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A lab run that measured its per-transfer costs is simulated with them; a flag wins."""
    layers = [["sha256:" + "a" * 64, 4_000_000]]
    costs = {"pulls": 50, "new_connections": 20, "assign_s": 0.1, "connect_s": 1.0}
    rbd = {"total": 5.0, "notes": {"transfer_costs": {**costs, "finish_s": "junk"}}}
    lab = tmp_path / "lab.json"
    lab.write_text(json.dumps({"layers": layers, "systems": {"rbd": rbd}}))
    out = tmp_path / "sim.json"
    compare = ["--profile", "ci", "--out", str(out), "--compare", str(lab)]

    def charged() -> dict[str, float]:
        sim = json.loads(out.read_text())["systems"][f"sim:{DEFAULT_POLICY}"]
        return dict(sim["notes"]["overheads"])

    assert main(compare) == 0
    got = charged()
    assert (got["assign_s"], got["connect_s"]) == (0.1, 1.0)
    assert got["finish_s"] == Overheads().finish_s  # not a number in the file: the default
    printed = capsys.readouterr().out
    assert "measured in the lab run, charged: assign_s 100 ms, connect_s 1000 ms" in printed
    assert main([*compare, "--connect-ms", "30"]) == 0
    assert charged()["connect_s"] == 0.03 and charged()["assign_s"] == 0.1
    assert main(["--profile", "ci", "--out", str(out)]) == 0  # no lab run: the defaults
    assert charged()["connect_s"] == Overheads().connect_s


def test_cli_meets_a_lab_run_at_its_rate_scale(tmp_path: Path) -> None:
    """A lab report made with ``--rate-scale`` is simulated at the same rates (and T*)."""
    layers = [["sha256:" + "a" * 64, 4_000_000]]
    base: dict[str, Any] = {"layers": layers, "systems": {"rbd": {"total": 5.0}}}
    t_star = {}
    for scale in (1.0, 0.5):
        lab = tmp_path / f"lab-{scale}.json"
        lab.write_text(json.dumps({**base, "rate_scale": scale}))
        out = tmp_path / f"sim-{scale}.json"
        assert main(["--profile", "ci", "--out", str(out), "--compare", str(lab)]) == 0
        t_star[scale] = json.loads(out.read_text())["t_star"]
    assert t_star[0.5] == pytest.approx(2 * t_star[1.0])
    out = tmp_path / "sim.json"
    quarter = ["--rate-scale", "0.25", "--layers", "4000000"]
    assert main(["--profile", "ci", "--out", str(out), *quarter]) == 0
    assert json.loads(out.read_text())["t_star"] == pytest.approx(4 * t_star[1.0])
    assert main(["--profile", "ci", "--out", str(out), "--rate-scale", "0"]) == 2


def test_cli_takes_any_profile_file_its_layers_or_given_layers(tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    bimodal = str(PROFILES / "bimodal.toml")
    assert main(["--profile", bimodal, "--nodes", "6", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["layers"] == [
        ["layer-1", 30_000_000],
        ["layer-2", 50_000_000],
        ["layer-3", 3_000_000],
    ]
    (name,) = doc["systems"]
    assert name == f"sim:{DEFAULT_POLICY}" and doc["nodes"] == 6
    assert main(["--profile", bimodal, "--layers", "1000,2000", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["layers"] == [["layer-1", 1000], ["layer-2", 2000]]
    assert main(["--profile", "bimodal", "--policy", "nope", "--out", str(out)]) == 2


def test_cli_says_how_long_the_coordinator_was_busy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each done report costs ``--coordinator-ms``; an ideal coordinator (0) costs nothing."""
    out = tmp_path / "sim.json"
    busy = {}
    for ms in ("0", "2"):
        args = ["--profile", "ci", "--nodes", "6", "--coordinator-ms", ms, "--out", str(out)]
        assert main(args) == 0
        (system,) = json.loads(out.read_text())["systems"].values()
        notes = system["notes"]
        busy[ms] = notes["coordinator_busy_s"]
        said = capsys.readouterr().out
        assert f"the coordinator busy {busy[ms]:.1f} s on {notes['reports']} done reports" in said
        # the scheduler's own CPU is measured, not simulated: some, and said
        assert notes["scheduler_cpu_s"] > 0
        assert f"the scheduler's own CPU here: {notes['scheduler_cpu_s']:.1f} s" in said
    assert busy["0"] == 0
    # at least one done report per demander and layer (ci: 3 layers)
    assert busy["2"] >= 6 * 3 * 0.002
    assert busy["2"] == pytest.approx(notes["reports"] * 0.002)


@pytest.mark.skipif(not BUSYBOX.is_file(), reason=f"{BUSYBOX} missing (busybox-static)")
def test_the_demo_image_layers_are_measured() -> None:
    from bench.sim.image import demo_layers

    layers = demo_layers(1)
    assert len(layers) == 3
    sizes = [s for _, s in layers]
    assert 1024 * 1024 < sizes[1] < 1024 * 1024 + 64 * 1024  # the payload layer
    assert all(name.startswith("sha256:") for name, _ in layers)


def test_hop_calibration_counts_only_first_round_relay_hops_between_equal_links() -> None:
    p = dataclasses.replace(profile(32, ("a", 32, 32), ("s", 4, 4)).scaled(12), chunk_size=131072)
    fast = [n.name for n in p.nodes if n.group == "a"]
    slow = next(n.name for n in p.nodes if n.group == "s")
    wire = 131072 / (32 * MBIT * 0.95)
    size = 8_000_000

    def t(seeder: str, demander: str, assigned: float, done: float, nbytes: int = size) -> Any:
        return dict(
            layer="L", seeder=seeder, demander=demander, assigned=assigned, done=done, bytes=nbytes
        )

    a1, a2, a3, a4, a5 = fast[:5]
    timeline = [
        t("origin", a1, 0.0, 2.0),  # from the origin: no hop
        t(a1, a2, 0.0, 2.0 + wire + 0.010),  # a hop
        t(a2, a3, 0.2, 2.0 + 2 * wire + 0.030),  # a hop, 20 ms more than the last
        t(a3, slow, 0.0, 16.0),  # into a slower link: finishes late for its own sake
        t(a1, a4, 2.5, 4.5),  # assigned after a1 was done: not relayed
        t(a4, a5, 3.0, 4.6),  # relayed, but in a later round (a4 waited for a1)
        dict(t(a1, a5, 0.0, 2.1, 1000), layer="tiny"),  # one chunk: never relayed
        t(a5, fast[5], 0.0, None),  # not done: no finish to compare
    ]
    hops = relay_hop_overheads(timeline, p, 0.95)
    assert hops == [pytest.approx(0.010), pytest.approx(0.020)]
    lab = {"systems": {"rbd:relay": {"notes": {"timeline": timeline}}}}
    line = hop_report(lab, "rbd:relay", p, dataclasses.replace(IDEAL, efficiency=0.95))
    assert "2 first-round hops" in line and "median 15 ms" in line
    assert "no transfer timeline" in hop_report({"systems": {}}, "rbd:relay", p, IDEAL)
