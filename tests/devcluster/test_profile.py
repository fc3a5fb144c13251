"""Cluster profiles: the shipped files load, rates spread as documented, T* is the paper's."""

from __future__ import annotations

from pathlib import Path

import pytest

from rainbowd.devcluster.profile import ProfileError, load_profile, lower_bound, parse_profile

PROFILES = Path(__file__).resolve().parents[2] / "bench" / "profiles"


def _minimal(**over: object) -> dict[str, object]:
    data: dict[str, object] = {
        "name": "t",
        "origin": {"up_mbit": 80, "down_mbit": 80},
        "groups": [{"name": "g", "count": 3, "up_mbit": [10, 30], "down_mbit": 40}],
    }
    data.update(over)
    return data


def test_shipped_profiles_load_with_the_documented_shapes() -> None:
    paper = load_profile(PROFILES / "paper.toml")
    fast = [n for n in paper.nodes if n.group == "fast"]
    slow = [n for n in paper.nodes if n.group == "slow"]
    assert (len(fast), len(slow)) == (25, 75)
    rate = paper.origin.up_mbit
    assert all(n.up_mbit == rate for n in fast)
    # slow nodes spread evenly over 1/8 .. 1/2 of the fast rate
    assert min(n.up_mbit for n in slow) == rate / 8
    assert max(n.up_mbit for n in slow) == rate / 2
    assert len(load_profile(PROFILES / "ci.toml").nodes) <= 8
    assert {n.up_mbit for n in load_profile(PROFILES / "homogeneous.toml").all_nodes} == {16.0}


def test_spread_is_even_and_names_are_stable() -> None:
    p = parse_profile(_minimal())
    assert [n.name for n in p.nodes] == ["g-001", "g-002", "g-003"]
    assert [n.up_mbit for n in p.nodes] == [10.0, 20.0, 30.0]
    assert p.nodes[0].up_Bps == 10e6 / 8
    assert p.all_nodes[0].name == "origin"


def test_bound_is_the_max_of_the_three_terms() -> None:
    p = parse_profile(_minimal())
    s = 10_000_000
    b = p.bound(s)
    assert b.origin_upload == pytest.approx(s / 10e6)  # 80 Mbit/s = 10 MB/s
    assert b.slowest_download == pytest.approx(s / 5e6)  # 40 Mbit/s
    assert b.aggregate_upload == pytest.approx(3 * s / (10e6 + 7.5e6))
    assert b.t_star == max(b.origin_upload, b.slowest_download, b.aggregate_upload)
    assert b.binding == "slowest download"


def test_bound_of_the_papers_cluster_is_about_12_5_seconds() -> None:
    """PAPER.md: 200 MB, 1 Gbps origin, 25 x 1 Gbps + 75 x 128..512 Mbps -> T* ~ 12.5 s."""
    paper = parse_profile(
        _minimal(
            origin={"up_mbit": 1000, "down_mbit": 1000},
            groups=[
                {"name": "fast", "count": 25, "up_mbit": 1000, "down_mbit": 1000},
                {"name": "slow", "count": 75, "up_mbit": [128, 512], "down_mbit": [128, 512]},
            ],
        )
    )
    assert paper.bound(200_000_000).t_star == pytest.approx(12.5)


def test_scaled_keeps_the_shares_and_the_ranges() -> None:
    paper = load_profile(PROFILES / "paper.toml")
    big = paper.scaled(1000)
    assert len(big.nodes) == 1000
    assert sum(n.group == "fast" for n in big.nodes) == 250
    slow = [n.up_mbit for n in big.nodes if n.group == "slow"]
    assert (min(slow), max(slow)) == (4.0, 16.0)
    assert big.bound(10_000_000).slowest_download == paper.bound(10_000_000).slowest_download
    assert len(paper.scaled(7).nodes) == 7


@pytest.mark.parametrize(
    ("over", "word"),
    [
        ({"name": ""}, "name"),
        ({"origin": {"up_mbit": 0, "down_mbit": 1}}, "up_mbit"),
        ({"groups": []}, "groups"),
        ({"groups": [{"name": "g", "count": -1, "up_mbit": 1, "down_mbit": 1}]}, "count"),
        ({"groups": [{"name": "g", "count": 1, "up_mbit": [3, 1], "down_mbit": 1}]}, "lo <= hi"),
        ({"groups": [{"name": "g", "count": 0, "up_mbit": 1, "down_mbit": 1}]}, "no node"),
        ({"image": {"payload_mib": 0}}, "payload_mib"),
        ({"chunk_kib": 1}, "chunk_kib"),
    ],
)
def test_bad_profiles_name_the_field(over: dict[str, object], word: str) -> None:
    with pytest.raises(ProfileError, match=word):
        parse_profile(_minimal(**over))


def test_bad_file_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "broken.toml"
    f.write_text("name = [")
    with pytest.raises(ProfileError, match=r"broken\.toml"):
        load_profile(f)
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(tmp_path / "absent.toml")
    with pytest.raises(ProfileError, match="at least one demander"):
        lower_bound(1, 1.0, [])


# -- issue 13: layers, [random], scales = false, the suite's files -----------------------
def _random(**over: object) -> dict[str, object]:
    table: dict[str, object] = {
        "seed": 7,
        "count": 50,
        "group": "r",
        "up": {"dist": "lognormal", "median": 8, "sigma": 1.0, "lo": 0.5, "hi": 100},
    }
    table.update(over)
    data = _minimal(random=table)
    del data["groups"]
    return data


def test_every_suite_profile_loads_and_scales_to_the_suite_sizes() -> None:
    files = sorted(PROFILES.glob("*.toml"))
    names = {f.stem for f in files}
    assert names >= {
        "ci", "homogeneous", "paper", "bimodal", "upload-bound", "slow-origin",
        "straggler", "big-layer", "many-small",
    }  # fmt: skip
    assert sum(n.startswith("random-") for n in names) >= 3
    for f in files:
        p = load_profile(f)
        assert p.name == f.stem
        for n in (100, 1000, 10_000):
            s = p.scaled(n)
            assert len(s.nodes) == n and len({x.name for x in s.nodes}) == n
            assert s.layers == p.layers and s.payload_mib == p.payload_mib


def test_the_issues_shapes_are_as_the_issue_gives_them() -> None:
    bimodal = load_profile(PROFILES / "bimodal.toml")
    assert bimodal.layers == (30_000_000, 50_000_000, 3_000_000)
    assert bimodal.payload_mib is None and bimodal.chunk_size == 4 * 1024 * 1024
    rates = sorted(n.down_mbit for n in bimodal.nodes)
    assert rates == [1.5] * 30 + [24.0] * 10 and bimodal.origin.up_mbit == 24
    # T* of the issue's bimodal run: 776 s was 1.75 x T*
    assert bimodal.bound(sum(bimodal.layers)).t_star == pytest.approx(776 / 1.75, rel=0.01)
    up = load_profile(PROFILES / "upload-bound.toml")
    assert {n.down_mbit for n in up.nodes} == {8.0}
    assert min(n.up_mbit for n in up.nodes) == 0.5 and max(n.up_mbit for n in up.nodes) == 8
    b = up.bound(sum(up.layers))
    assert b.binding == "aggregate upload" and b.t_star == pytest.approx(149, abs=1)
    slow_origin = load_profile(PROFILES / "slow-origin.toml")
    assert slow_origin.origin.up_mbit < max(n.up_mbit for n in slow_origin.nodes)
    many = load_profile(PROFILES / "many-small.toml")
    assert len(many.layers) == 40 and min(many.layers) >= 100_000
    assert max(many.layers) <= 2_000_000
    assert len(load_profile(PROFILES / "big-layer.toml").layers) == 1


def test_a_group_that_does_not_scale_keeps_its_count() -> None:
    straggler = load_profile(PROFILES / "straggler.toml")
    for n in (40, 100, 10_000):
        s = straggler.scaled(n)
        assert sum(x.group == "straggler" for x in s.nodes) == 1
        assert s.bound(10**7).slowest_download == straggler.bound(10**7).slowest_download
    two = {"name": "g", "count": 2, "up_mbit": 1, "down_mbit": 1, "scales": False}
    fixed = parse_profile(_minimal(groups=[two]))
    with pytest.raises(ProfileError, match="cannot scale to 5 nodes: groups g keep their 2"):
        fixed.scaled(5)  # nothing else to grow
    assert len(fixed.scaled(2).nodes) == 2
    with pytest.raises(ProfileError, match="cannot scale to 1 nodes"):
        parse_profile(_minimal(groups=[two, {**two, "name": "h", "scales": True}])).scaled(1)
    with pytest.raises(ProfileError, match="scales must be true or false"):
        parse_profile(
            _minimal(
                groups=[{"name": "g", "count": 2, "up_mbit": 1, "down_mbit": 1, "scales": "no"}]
            )
        )


def test_layers_replace_the_payload_and_are_checked() -> None:
    p = parse_profile(_minimal(image={"layers": [10, 20]}))
    assert p.layers == (10, 20) and p.payload_mib is None
    both = parse_profile(_minimal(image={"layers": [10], "payload_mib": 2}))
    assert both.layers == (10,) and both.payload_mib == 2
    assert parse_profile(_minimal()).payload_mib == 8 and parse_profile(_minimal()).layers == ()
    for bad, word in [
        ([], "1 .. 1000"),
        ([0], r"layers\[0\]"),
        ([1, True], r"layers\[1\]"),
        ([1.5], r"layers\[0\]"),
        ([2**40 * 65], r"layers\[0\]"),
        ("10", "list"),
        ([1] * 1001, "1 .. 1000"),
    ]:
        with pytest.raises(ProfileError, match=word):
            parse_profile(_minimal(image={"layers": bad}))


def test_random_nodes_are_the_same_for_a_seed_and_differ_between_seeds() -> None:
    a, b = parse_profile(_random()), parse_profile(_random())
    assert a.nodes == b.nodes and len(a.nodes) == 50
    assert [n.name for n in a.nodes[:2]] == ["r-001", "r-002"]
    assert all(n.up_mbit == n.down_mbit for n in a.nodes)  # no [random.down]: symmetric
    assert all(0.5 <= n.up_mbit <= 100 for n in a.nodes)
    assert len({n.up_mbit for n in a.nodes}) > 40  # really drawn, not one value
    assert parse_profile(_random(seed=8)).nodes != a.nodes
    big = a.scaled(1000)
    assert big.nodes[:50] == a.nodes and len(big.nodes) == 1000  # the same seed, more draws
    assert big.random == a.random


def test_a_pinned_draw_so_that_a_python_upgrade_cannot_move_the_suite() -> None:
    p = load_profile(PROFILES / "random-lognormal.toml")
    assert [n.up_mbit for n in p.nodes[:4]] == [10.893, 7.579, 2.633, 11.351]


@pytest.mark.parametrize(
    ("dist", "lo", "hi"),
    [
        ({"dist": "uniform", "lo": 2, "hi": 4}, 2, 4),
        ({"dist": "pareto", "alpha": 1.1, "lo": 1, "hi": 50}, 1, 50),
        (
            {
                "dist": "bimodal",
                "fast": 30,
                "slow": 2,
                "fast_share": 0.3,
                "spread": 0.2,
                "lo": 1,
                "hi": 40,
            },
            1,
            40,
        ),
        ({"dist": "lognormal", "median": 10, "sigma": 0, "lo": 1, "hi": 40}, 10, 10),
    ],
)
def test_each_distribution_stays_in_its_bounds(
    dist: dict[str, object], lo: float, hi: float
) -> None:
    p = parse_profile(_random(count=400, down=dist))
    downs = [n.down_mbit for n in p.nodes]
    assert lo <= min(downs) and max(downs) <= hi
    assert any(n.up_mbit != n.down_mbit for n in p.nodes)  # asymmetric links
    if dist["dist"] == "bimodal":
        fast = sum(d >= 20 for d in downs) / len(downs)
        assert 0.2 < fast < 0.4  # ~fast_share of the nodes in the fast mode
        assert all(d >= 24 or d <= 2.4 for d in downs)  # within spread of a mode


@pytest.mark.parametrize(
    ("over", "word"),
    [
        ({"seed": -1}, "random.seed"),
        ({"seed": 1.5}, "random.seed"),
        ({"count": 0}, "random.count"),
        ({"count": 2_000_000}, "random.count"),
        ({"group": ""}, "random.group"),
        ({"group": "origin"}, "reserved"),
        ({"up": None}, r"random\.up\]"),
        ({"up": {"dist": "normal", "lo": 1, "hi": 2}}, "random.up.dist must be one of"),
        (
            {"up": {"dist": "uniform", "lo": 0, "hi": 2}},
            r"random.up.lo must be a finite number > 0",
        ),
        ({"up": {"dist": "uniform", "lo": 3, "hi": 2}}, r"random.up.hi .* >= lo"),
        ({"up": {"dist": "uniform", "lo": 1, "hi": float("inf")}}, "random.up.hi"),
        ({"up": {"dist": "uniform", "lo": float("nan"), "hi": 2}}, "random.up.lo"),
        ({"up": {"dist": "pareto", "lo": 1, "hi": 2}}, "random.up.alpha"),
        ({"up": {"dist": "lognormal", "median": 1, "sigma": -1, "lo": 1, "hi": 2}}, "sigma"),
        (
            {"up": {"dist": "bimodal", "fast": 9, "slow": 1, "fast_share": 2, "lo": 1, "hi": 9}},
            "fast_share",
        ),
        ({"up": {"dist": "uniform", "lo": 1, "hi": 2, "median": 3}}, "median not known"),
        ({"down": "fast"}, "random.down must be a table"),
    ],
)
def test_bad_random_tables_name_the_field(over: dict[str, object], word: str) -> None:
    with pytest.raises(ProfileError, match=word):
        parse_profile(_random(**over))


def test_groups_and_random_together_are_refused() -> None:
    data = _random()
    data["groups"] = _minimal()["groups"]
    with pytest.raises(ProfileError, match="use one of them"):
        parse_profile(data)
    with pytest.raises(ProfileError, match="finite number"):
        parse_profile(_minimal(origin={"up_mbit": float("inf"), "down_mbit": 1}))


def test_a_nodes_own_bound_is_its_download_or_the_origins_upload() -> None:
    p = parse_profile(_minimal())  # origin 80 up; g: down 40 Mbit/s
    s = 10_000_000
    assert p.node_bounds(s) == {n.name: pytest.approx(s / 5e6) for n in p.nodes}
    slow_origin = parse_profile(_minimal(origin={"up_mbit": 8, "down_mbit": 8}))
    assert list(slow_origin.node_bounds(s).values()) == [pytest.approx(s / 1e6)] * 3
