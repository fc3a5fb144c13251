"""Cluster profiles: the shipped files load, rates spread as documented, T* is the paper's."""

from __future__ import annotations

from pathlib import Path

import pytest

from rainbowd.profile import ProfileError, load_profile, lower_bound, parse_profile

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
