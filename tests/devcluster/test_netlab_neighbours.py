"""NetLab fits the host's ARP cache to the lab: a 100-node lab overflowed the kernel default.

The limits are global (one table for every namespace); with the default cap of
1024 entries, a paper-profile lab (101 namespaces plus the hub, every node
pulling from many) got "neighbor table overflow!" and connects failed with
EHOSTUNREACH. These tests use a directory standing in for /proc/sys.
"""

from __future__ import annotations

from pathlib import Path

from rainbowd.devcluster.netlab import neighbour_limits, raise_neighbour_limits


def _sysctl(tmp_path: Path, **values: int) -> Path:
    for name, value in values.items():
        (tmp_path / name).write_text(f"{value}\n")
    return tmp_path


def test_a_100_node_lab_needs_more_than_the_kernel_default() -> None:
    limits = neighbour_limits(101)
    assert limits["gc_thresh2"] >= 101 * 101
    assert limits["gc_thresh3"] > limits["gc_thresh2"] > 1024


def test_low_limits_are_raised_to_fit_the_lab(tmp_path: Path) -> None:
    sysctl = _sysctl(tmp_path, gc_thresh1=128, gc_thresh2=512, gc_thresh3=1024)
    changed = raise_neighbour_limits(101, sysctl)
    assert changed == neighbour_limits(101)
    for name, value in changed.items():
        assert int((sysctl / name).read_text()) == value
    assert (sysctl / "gc_thresh1").read_text() == "128\n"  # the floor of collection: kept


def test_higher_limits_are_never_lowered(tmp_path: Path) -> None:
    sysctl = _sysctl(tmp_path, gc_thresh2=1_000_000, gc_thresh3=2_000_000)
    assert raise_neighbour_limits(101, sysctl) == {}
    assert (sysctl / "gc_thresh3").read_text() == "2000000\n"


def test_a_missing_sysctl_leaves_the_lab_to_build(tmp_path: Path) -> None:
    assert raise_neighbour_limits(101, tmp_path / "absent") == {}
