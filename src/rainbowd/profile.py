"""Cluster profiles: the shape of a (real or emulated) cluster, and its physical bound T*.

A profile is data, a TOML file, so the lab (bench/lab), the simulator
(bench/sim) and the tests all run the very same cluster shape::

    name = "paper"
    description = "origin + 25 fast + 75 slow (1/8 .. 1/2 of fast)"
    chunk_kib = 256          # rbd chunk size used in the run
    heartbeat_s = 1.0        # agent heartbeat interval used in the run

    [image]
    payload_mib = 8          # the demo image: busybox layer + this payload + a small layer

    [origin]
    up_mbit = 32
    down_mbit = 32

    [[groups]]
    name = "fast"
    count = 25
    up_mbit = 32
    down_mbit = 32

    [[groups]]
    name = "slow"
    count = 75
    up_mbit = [4, 16]        # [lo, hi]: spread evenly over the group, lo first
    down_mbit = [4, 16]

Rates are in Mbit/s (10^6 bit/s, what ``tc`` means by ``mbit``/1000 ``kbit``);
the ``*_Bps`` properties give bytes per second, the unit the scheduler and the
bound work in. Nodes are named ``<group>-<i>`` (``fast-001``); the origin is
``origin``.

The bound (PAPER.md, "The physical limit"): for a file of S bytes sent from a
source with upload u_s to N nodes with uploads u_i and downloads d_i, no
scheme finishes before ``max(S/u_s, S/min d_i, N*S/(u_s + sum u_i))``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ORIGIN = "origin"


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class ProfileNode:
    """One node of a profile: its name, group and link rates (Mbit/s)."""

    name: str
    group: str
    up_mbit: float
    down_mbit: float

    @property
    def up_Bps(self) -> float:
        return self.up_mbit * 1e6 / 8

    @property
    def down_Bps(self) -> float:
        return self.down_mbit * 1e6 / 8


@dataclass(frozen=True)
class Bound:
    """T* and its three terms (seconds), and which one binds."""

    t_star: float
    origin_upload: float
    slowest_download: float
    aggregate_upload: float

    @property
    def binding(self) -> str:
        terms = {
            "origin upload": self.origin_upload,
            "slowest download": self.slowest_download,
            "aggregate upload": self.aggregate_upload,
        }
        return max(terms, key=lambda k: terms[k])


@dataclass(frozen=True)
class ClusterProfile:
    name: str
    description: str
    origin: ProfileNode
    nodes: tuple[ProfileNode, ...]
    payload_mib: int
    chunk_size: int
    heartbeat_interval: float

    @property
    def all_nodes(self) -> tuple[ProfileNode, ...]:
        """The origin first, then every demander."""
        return (self.origin, *self.nodes)

    def node(self, name: str) -> ProfileNode:
        for n in self.all_nodes:
            if n.name == name:
                return n
        raise KeyError(f"profile {self.name!r} has no node {name!r}")

    def bound(self, size_bytes: int) -> Bound:
        return lower_bound(size_bytes, self.origin.up_Bps, self.nodes)

    def scaled(self, nodes: int) -> ClusterProfile:
        """The same heterogeneity with ``nodes`` demanders: each group keeps its share.

        Group counts are scaled proportionally (largest remainders get the
        leftovers) and each group's rates are re-spread over the same range, so
        ``paper`` at 1,000 nodes is 250 fast and 750 slow from 1/8 to 1/2.
        """
        if nodes < 1:
            raise ProfileError(f"profile {self.name}: cannot scale to {nodes} nodes")
        groups: dict[str, list[ProfileNode]] = {}
        for n in self.nodes:
            groups.setdefault(n.group, []).append(n)
        total = len(self.nodes)
        shares = {g: len(ns) * nodes / total for g, ns in groups.items()}
        counts = {g: int(s) for g, s in shares.items()}
        for g in sorted(shares, key=lambda g: counts[g] - shares[g])[
            : nodes - sum(counts.values())
        ]:
            counts[g] += 1
        out: list[ProfileNode] = []
        for g, ns in groups.items():
            up = (min(n.up_mbit for n in ns), max(n.up_mbit for n in ns))
            down = (min(n.down_mbit for n in ns), max(n.down_mbit for n in ns))
            out += _group_nodes(g, counts[g], up, down)
        return ClusterProfile(
            name=f"{self.name}@{nodes}",
            description=f"{self.description} (scaled to {nodes} nodes)",
            origin=self.origin,
            nodes=tuple(out),
            payload_mib=self.payload_mib,
            chunk_size=self.chunk_size,
            heartbeat_interval=self.heartbeat_interval,
        )


def lower_bound(size_bytes: int, origin_up_Bps: float, nodes: Sequence[ProfileNode]) -> Bound:
    """T* for ``size_bytes`` from an origin with upload ``origin_up_Bps`` to ``nodes``."""
    if not nodes:
        raise ProfileError("the bound needs at least one demander")
    s = float(size_bytes)
    a = s / origin_up_Bps
    b = s / min(n.down_Bps for n in nodes)
    c = len(nodes) * s / (origin_up_Bps + sum(n.up_Bps for n in nodes))
    return Bound(max(a, b, c), a, b, c)


def _group_nodes(
    group: str, count: int, up: tuple[float, float], down: tuple[float, float]
) -> list[ProfileNode]:
    def spread(lo: float, hi: float, i: int) -> float:
        return lo if count == 1 else lo + (hi - lo) * i / (count - 1)

    return [
        ProfileNode(f"{group}-{i + 1:03d}", group, spread(*up, i), spread(*down, i))
        for i in range(count)
    ]


def load_profile(path: str | Path) -> ClusterProfile:
    """Read and check a profile file; a bad one raises ProfileError naming file and field."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as e:
        raise ProfileError(f"cannot read profile {p}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"profile {p} is not valid TOML: {e}") from None
    try:
        return parse_profile(data)
    except ProfileError as e:
        raise ProfileError(f"profile {p}: {e}") from None


def parse_profile(data: Mapping[str, Any]) -> ClusterProfile:
    name = _str(data, "name")
    origin_t = _table(data, "origin")
    origin = ProfileNode(
        ORIGIN,
        ORIGIN,
        _rate(origin_t, "up_mbit", "origin")[0],
        _rate(origin_t, "down_mbit", "origin")[0],
    )
    groups = data.get("groups")
    if not isinstance(groups, list) or not groups:
        raise ProfileError("needs at least one [[groups]] table")
    nodes: list[ProfileNode] = []
    seen: set[str] = set()
    for i, g in enumerate(groups):
        if not isinstance(g, dict):
            raise ProfileError(f"groups[{i}] must be a table")
        gname = _str(g, "name", f"groups[{i}]")
        if gname in seen or gname == ORIGIN:
            raise ProfileError(f"group name {gname!r} is used twice or is reserved")
        seen.add(gname)
        count = g.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ProfileError(
                f"group {gname}: count must be a non-negative integer, got {count!r}"
            )
        up = _rate(g, "up_mbit", f"group {gname}")
        down = _rate(g, "down_mbit", f"group {gname}")
        nodes += _group_nodes(gname, count, up, down)
    if not nodes:
        raise ProfileError("the groups hold no node (every count is 0)")
    image = data.get("image", {})
    if not isinstance(image, dict):
        raise ProfileError("[image] must be a table")
    payload = image.get("payload_mib", 8)
    if not isinstance(payload, int) or payload < 1:
        raise ProfileError(f"image.payload_mib must be a positive integer, got {payload!r}")
    chunk_kib = data.get("chunk_kib", 256)
    if not isinstance(chunk_kib, int) or chunk_kib < 64:
        raise ProfileError(f"chunk_kib must be an integer >= 64, got {chunk_kib!r}")
    heartbeat = data.get("heartbeat_s", 1.0)
    if not isinstance(heartbeat, int | float) or heartbeat <= 0:
        raise ProfileError(f"heartbeat_s must be a positive number, got {heartbeat!r}")
    return ClusterProfile(
        name=name,
        description=str(data.get("description", "")),
        origin=origin,
        nodes=tuple(nodes),
        payload_mib=payload,
        chunk_size=chunk_kib * 1024,
        heartbeat_interval=float(heartbeat),
    )


def _str(t: Mapping[str, Any], key: str, where: str = "") -> str:
    v = t.get(key)
    if not isinstance(v, str) or not v:
        raise ProfileError(f"{where + '.' if where else ''}{key} must be a non-empty string")
    return v


def _table(t: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    v = t.get(key)
    if not isinstance(v, dict):
        raise ProfileError(f"needs an [{key}] table")
    return v


def _rate(t: Mapping[str, Any], key: str, where: str) -> tuple[float, float]:
    """A rate (Mbit/s) or a [lo, hi] range; both positive."""
    v = t.get(key)
    if isinstance(v, int | float) and not isinstance(v, bool):
        lo = hi = float(v)
    elif (
        isinstance(v, list)
        and len(v) == 2
        and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
    ):
        lo, hi = float(v[0]), float(v[1])
    else:
        raise ProfileError(f"{where}: {key} must be a number or [lo, hi] in Mbit/s, got {v!r}")
    if lo <= 0 or hi < lo:
        raise ProfileError(f"{where}: {key} must be > 0 (and lo <= hi), got {v!r}")
    return lo, hi
