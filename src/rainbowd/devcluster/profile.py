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

A group may carry ``scales = false``: :meth:`ClusterProfile.scaled` then keeps
its count (one straggler stays one straggler at 10,000 nodes) and shares the
rest among the other groups.

The image. ``payload_mib`` names the lab's demo image (busybox, a payload of
that many MiB, a small layer). Instead (or as well), ``layers`` gives the layer
sizes in bytes, image order::

    [image]
    layers = [30_000_000, 50_000_000, 3_000_000]

The simulator distributes ``layers`` when given, else the demo image of
``payload_mib``. The lab builds the demo image when ``payload_mib`` is given,
else an image of one file per layer of those sizes (bench/lab/image.py). With
neither, ``payload_mib`` is 8. Limits: 1 .. ``MAX_LAYERS`` layers, each
1 .. ``MAX_LAYER_BYTES`` bytes.

Random nodes. Instead of ``[[groups]]``, a ``[random]`` table draws the
demanders from a seed, the same nodes on every machine and every run::

    [random]
    seed = 7
    count = 40               # demanders (1 .. MAX_NODES)
    group = "rand"           # node names rand-001 ...; default "node"

    [random.up]              # the upload rate's distribution (Mbit/s)
    dist = "lognormal"       # uniform | lognormal | bimodal | pareto
    median = 8
    sigma = 1.0
    lo = 0.5                 # every draw is clamped to [lo, hi]; both required
    hi = 100

    [random.down]            # optional; absent: down = up (symmetric links)
    dist = "uniform"
    lo = 4
    hi = 64

Per distribution (besides ``lo``/``hi``): ``uniform`` none; ``lognormal``
``median`` (> 0) and ``sigma`` (>= 0); ``pareto`` ``alpha`` (> 0), its scale is
``lo``; ``bimodal`` ``fast`` and ``slow`` (Mbit/s), ``fast_share`` (0..1, the
chance a node is fast) and ``spread`` (optional, 0..1: each draw is its mode
times a uniform factor in [1 - spread, 1 + spread]). Up and down are drawn
independently, so ``[random.down]`` makes links asymmetric. Draws use only
``random.Random(seed).random()`` (Mersenne Twister, stable across Python
versions) and are rounded to 1 kbit/s. :meth:`ClusterProfile.scaled` draws
``n`` nodes from the same seed (the first ``count`` of them are the profile's).

Every number is checked: finite, in range, of the right type; a bad one
raises ProfileError naming the field.

The bound (PAPER.md, "The physical limit"): for a file of S bytes sent from a
source with upload u_s to N nodes with uploads u_i and downloads d_i, no
scheme finishes before ``max(S/u_s, S/min d_i, N*S/(u_s + sum u_i))``. One
node's own bound is ``max(S/d_i, S/u_s)`` (:func:`node_bound`): it can get the
image no faster than its download and the origin's upload allow.
"""

from __future__ import annotations

import dataclasses
import math
import random
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

ORIGIN = "origin"
#: layers of one profile image: the scheduler and the lab handle any number, but a
#: profile with more is a typo more likely than a real image (Docker caps at 127)
MAX_LAYERS = 1000
#: bytes of one layer: 64 GiB, far beyond any image the lab can build on one disk
MAX_LAYER_BYTES = 64 * 1024**3
#: demanders a [random] table may draw: the simulator's largest runs are 10,000
MAX_NODES = 1_000_000
#: the distributions a [random] table knows, and the parameters each one needs
DISTRIBUTIONS: Mapping[str, tuple[str, ...]] = {
    "uniform": (),
    "lognormal": ("median", "sigma"),
    "pareto": ("alpha",),
    "bimodal": ("fast", "slow", "fast_share"),
}
#: random rates are rounded to this (Mbit/s): 1 kbit/s, finer than tc shapes
RATE_STEP_MBIT = 0.001


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
class RateDistribution:
    """One link direction's distribution in a ``[random]`` table (Mbit/s); see the module doc."""

    dist: str
    lo: float
    hi: float
    median: float = 0.0
    sigma: float = 0.0
    alpha: float = 0.0
    fast: float = 0.0
    slow: float = 0.0
    fast_share: float = 0.0
    spread: float = 0.0

    def draw(self, rng: random.Random) -> float:
        """One rate, clamped to [lo, hi] and rounded to ``RATE_STEP_MBIT``."""
        u = rng.random()
        if self.dist == "uniform":
            x = self.lo + (self.hi - self.lo) * u
        elif self.dist == "lognormal":
            # Box-Muller from two uniforms: only random() is used, so draws do not
            # depend on how a Python version implements gauss()
            z = math.sqrt(-2.0 * math.log(1.0 - u)) * math.cos(2.0 * math.pi * rng.random())
            x = self.median * math.exp(self.sigma * z)
        elif self.dist == "pareto":
            x = self.lo * (1.0 - u) ** (-1.0 / self.alpha)
        else:  # bimodal
            mode = self.fast if u < self.fast_share else self.slow
            x = mode * (1.0 + self.spread * (2.0 * rng.random() - 1.0))
        x = round(x / RATE_STEP_MBIT) * RATE_STEP_MBIT
        return round(min(self.hi, max(self.lo, x)), 6)


@dataclass(frozen=True)
class RandomNodes:
    """A ``[random]`` table: ``count`` demanders drawn from ``seed`` (module docstring)."""

    seed: int
    count: int
    group: str
    up: RateDistribution
    down: RateDistribution | None  # None: down = up

    def nodes(self, count: int | None = None) -> tuple[ProfileNode, ...]:
        """``count`` (default: the table's) nodes; the same seed always gives the same ones."""
        rng = random.Random(self.seed)
        out = []
        for i in range(self.count if count is None else count):
            up = self.up.draw(rng)
            down = self.down.draw(rng) if self.down is not None else up
            out.append(ProfileNode(f"{self.group}-{i + 1:03d}", self.group, up, down))
        return tuple(out)


def scale_suffix(factor: float) -> str:
    """What :meth:`ClusterProfile.rates_scaled` appends to a profile's name ("" at 1)."""
    return "" if factor == 1 else f"-x{factor:g}"


@dataclass(frozen=True)
class ClusterProfile:
    name: str
    description: str
    origin: ProfileNode
    nodes: tuple[ProfileNode, ...]
    #: the lab's demo image payload; None when the profile gives only ``layers``
    payload_mib: int | None
    chunk_size: int
    heartbeat_interval: float
    #: layer sizes in bytes, image order (the simulator's image); () = the demo image's
    layers: tuple[int, ...] = ()
    #: the [random] table the nodes were drawn from, if any (scaled() re-draws)
    random: RandomNodes | None = None
    #: groups whose count scaled() keeps (``scales = false``)
    fixed_groups: frozenset[str] = frozenset()
    #: every rate of the file times this (rates_scaled(); scaled() keeps it for re-drawn nodes)
    rate_scale: float = 1.0

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

    def node_bounds(self, size_bytes: int) -> dict[str, float]:
        """Each demander's own bound t_i* (seconds) for an image of ``size_bytes``."""
        return {n.name: node_bound(size_bytes, n, self.origin.up_Bps) for n in self.nodes}

    def scaled(self, nodes: int) -> ClusterProfile:
        """The same heterogeneity with ``nodes`` demanders: each group keeps its share.

        Group counts are scaled proportionally (largest remainders get the
        leftovers) and each group's rates are re-spread over the same range, so
        ``paper`` at 1,000 nodes is 250 fast and 750 slow from 1/8 to 1/2.
        Groups with ``scales = false`` keep their count. A ``[random]``
        profile draws ``nodes`` nodes from its seed instead.
        """
        if nodes < 1 or nodes > MAX_NODES:
            raise ProfileError(
                f"profile {self.name}: cannot scale to {nodes} nodes (1 .. {MAX_NODES})"
            )
        if self.random is not None:
            out = [_times(n, self.rate_scale) for n in self.random.nodes(nodes)]
        else:
            out = self._scaled_groups(nodes)
        return dataclasses.replace(
            self,
            name=f"{self.name}@{nodes}",
            description=f"{self.description} (scaled to {nodes} nodes)",
            nodes=tuple(out),
        )

    def rates_scaled(self, factor: float) -> ClusterProfile:
        """The same cluster with every link rate (origin's too) times ``factor``.

        T* and every node's own bound scale by 1/factor, so ratios to them stay
        comparable. The lab uses it to run a profile slower when the host's CPUs,
        shared by every emulated node, would otherwise bind before the emulated
        network does (bench/lab/hostcpu.py); the simulator takes the same option
        so that ``--compare`` meets the same cluster.
        """
        if not (isinstance(factor, int | float) and math.isfinite(factor) and factor > 0):
            raise ProfileError(f"rate scale must be a finite number > 0, got {factor!r}")
        if factor == 1:
            return self
        return dataclasses.replace(
            self,
            name=f"{self.name}{scale_suffix(factor)}",
            description=f"{self.description} (every rate x {factor:g})",
            origin=_times(self.origin, factor),
            nodes=tuple(_times(n, factor) for n in self.nodes),
            rate_scale=self.rate_scale * factor,
        )

    def _scaled_groups(self, nodes: int) -> list[ProfileNode]:
        groups: dict[str, list[ProfileNode]] = {}
        for n in self.nodes:
            groups.setdefault(n.group, []).append(n)
        counts = {g: len(ns) for g, ns in groups.items() if g in self.fixed_groups}
        fixed = sum(counts.values())
        scaling = {g: ns for g, ns in groups.items() if g not in self.fixed_groups}
        if nodes < fixed or (nodes > fixed and not scaling):
            raise ProfileError(
                f"profile {self.name}: cannot scale to {nodes} nodes: groups "
                f"{', '.join(sorted(counts))} keep their {fixed} nodes (scales = false)"
            )
        total = sum(len(ns) for ns in scaling.values())
        shares = {g: len(ns) * (nodes - fixed) / total for g, ns in scaling.items()}
        counts.update({g: int(s) for g, s in shares.items()})
        for g in sorted(shares, key=lambda g: counts[g] - shares[g])[
            : nodes - sum(counts.values())
        ]:
            counts[g] += 1
        out: list[ProfileNode] = []
        for g, ns in groups.items():
            up = (min(n.up_mbit for n in ns), max(n.up_mbit for n in ns))
            down = (min(n.down_mbit for n in ns), max(n.down_mbit for n in ns))
            out += _group_nodes(g, counts[g], up, down)
        return out


def _times(node: ProfileNode, factor: float) -> ProfileNode:
    """``node`` with both link rates times ``factor``."""
    if factor == 1:
        return node
    return dataclasses.replace(
        node, up_mbit=node.up_mbit * factor, down_mbit=node.down_mbit * factor
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


def node_bound(size_bytes: int, node: ProfileNode, origin_up_Bps: float) -> float:
    """t_i* = max(S/d_i, S/u_origin): the soonest ``node`` alone could hold the image."""
    return max(size_bytes / node.down_Bps, size_bytes / origin_up_Bps)


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
    rand_t = data.get("random")
    fixed: set[str] = set()
    rand: RandomNodes | None = None
    if rand_t is not None and groups is not None:
        raise ProfileError("has both [[groups]] and [random]: use one of them")
    if rand_t is not None:
        if not isinstance(rand_t, dict):
            raise ProfileError("[random] must be a table")
        rand = _random(rand_t)
        if rand.group == ORIGIN:
            raise ProfileError(f"random.group {ORIGIN!r} is reserved")
        nodes = list(rand.nodes())
    else:
        nodes = _groups(groups, fixed)
    if not nodes:
        raise ProfileError("the groups hold no node (every count is 0)")
    payload, layers = _image(data.get("image", {}))
    chunk_kib = data.get("chunk_kib", 256)
    if not _is_int(chunk_kib) or chunk_kib < 64:
        raise ProfileError(f"chunk_kib must be an integer >= 64, got {chunk_kib!r}")
    heartbeat = data.get("heartbeat_s", 1.0)
    if not _is_number(heartbeat) or heartbeat <= 0:
        raise ProfileError(f"heartbeat_s must be a positive number, got {heartbeat!r}")
    return ClusterProfile(
        name=name,
        description=str(data.get("description", "")),
        origin=origin,
        nodes=tuple(nodes),
        payload_mib=payload,
        chunk_size=chunk_kib * 1024,
        heartbeat_interval=float(heartbeat),
        layers=layers,
        random=rand,
        fixed_groups=frozenset(fixed),
    )


def _groups(groups: Any, fixed: set[str]) -> list[ProfileNode]:
    """The nodes of the ``[[groups]]`` tables; names of ``scales = false`` groups into ``fixed``."""
    if not isinstance(groups, list) or not groups:
        raise ProfileError("needs at least one [[groups]] table (or a [random] table)")
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
        if not _is_int(count) or count < 0 or count > MAX_NODES:
            raise ProfileError(
                f"group {gname}: count must be an integer in 0 .. {MAX_NODES}, got {count!r}"
            )
        scales = g.get("scales", True)
        if not isinstance(scales, bool):
            raise ProfileError(f"group {gname}: scales must be true or false, got {scales!r}")
        if not scales:
            fixed.add(gname)
        up = _rate(g, "up_mbit", f"group {gname}")
        down = _rate(g, "down_mbit", f"group {gname}")
        nodes += _group_nodes(gname, count, up, down)
    return nodes


def _image(image: Any) -> tuple[int | None, tuple[int, ...]]:
    """``payload_mib`` (None if only ``layers`` is given) and ``layers`` of an [image] table."""
    if not isinstance(image, dict):
        raise ProfileError("[image] must be a table")
    layers_v = image.get("layers")
    layers: tuple[int, ...] = ()
    if layers_v is not None:
        if not isinstance(layers_v, list) or not 1 <= len(layers_v) <= MAX_LAYERS:
            raise ProfileError(
                f"image.layers must be a list of 1 .. {MAX_LAYERS} sizes in bytes, got {layers_v!r}"
            )
        for i, v in enumerate(layers_v):
            if not _is_int(v) or not 1 <= v <= MAX_LAYER_BYTES:
                raise ProfileError(
                    f"image.layers[{i}] must be an integer number of bytes in "
                    f"1 .. {MAX_LAYER_BYTES}, got {v!r}"
                )
        layers = tuple(layers_v)
    payload = image.get("payload_mib", None if layers else 8)
    if payload is not None and (not _is_int(payload) or payload < 1):
        raise ProfileError(f"image.payload_mib must be a positive integer, got {payload!r}")
    return payload, layers


def _random(t: Mapping[str, Any]) -> RandomNodes:
    seed = t.get("seed")
    if not _is_int(seed) or seed < 0:
        raise ProfileError(f"random.seed must be a non-negative integer, got {seed!r}")
    count = t.get("count")
    if not _is_int(count) or not 1 <= count <= MAX_NODES:
        raise ProfileError(f"random.count must be an integer in 1 .. {MAX_NODES}, got {count!r}")
    group = t.get("group", "node")
    if not isinstance(group, str) or not group:
        raise ProfileError(f"random.group must be a non-empty string, got {group!r}")
    up_t = t.get("up")
    if not isinstance(up_t, dict):
        raise ProfileError("[random] needs a [random.up] table (the upload rate's distribution)")
    down_t = t.get("down")
    if down_t is not None and not isinstance(down_t, dict):
        raise ProfileError("random.down must be a table")
    down = _distribution(down_t, "random.down") if down_t is not None else None
    return RandomNodes(seed, count, group, _distribution(up_t, "random.up"), down)


def _distribution(t: Mapping[str, Any], where: str) -> RateDistribution:
    dist = t.get("dist")
    if not isinstance(dist, str) or dist not in DISTRIBUTIONS:
        raise ProfileError(f"{where}.dist must be one of {', '.join(DISTRIBUTIONS)}, got {dist!r}")
    lo = _number(t, "lo", where, lambda x: x > 0, "> 0")
    hi = _number(t, "hi", where, lambda x: x >= lo, f">= lo ({lo})")
    params: dict[str, float] = {}
    for key in DISTRIBUTIONS[dist]:
        if key == "fast_share":
            params[key] = _number(t, key, where, lambda x: 0 <= x <= 1, "in 0 .. 1")
        elif key == "sigma":
            params[key] = _number(t, key, where, lambda x: x >= 0, ">= 0")
        else:
            params[key] = _number(t, key, where, lambda x: x > 0, "> 0")
    if dist == "bimodal" and "spread" in t:
        params["spread"] = _number(t, "spread", where, lambda x: 0 <= x <= 1, "in 0 .. 1")
    unknown = set(t) - {"dist", "lo", "hi", *params}
    if unknown:
        raise ProfileError(
            f"{where}: {', '.join(sorted(unknown))} not known for dist {dist!r} "
            f"(it takes lo, hi{''.join(', ' + k for k in DISTRIBUTIONS[dist])}"
            f"{', spread' if dist == 'bimodal' else ''})"
        )
    return RateDistribution(str(dist), lo, hi, **params)


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> TypeGuard[int | float]:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _number(
    t: Mapping[str, Any], key: str, where: str, ok: Callable[[float], bool], rule: str
) -> float:
    v = t.get(key)
    if not _is_number(v) or not ok(float(v)):
        raise ProfileError(f"{where}.{key} must be a finite number {rule}, got {v!r}")
    return float(v)


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
    """A rate (Mbit/s) or a [lo, hi] range; both positive and finite."""
    v = t.get(key)
    if _is_number(v):
        lo = hi = float(v)
    elif isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v):
        lo, hi = float(v[0]), float(v[1])
    else:
        raise ProfileError(
            f"{where}: {key} must be a finite number or [lo, hi] in Mbit/s, got {v!r}"
        )
    if lo <= 0 or hi < lo:
        raise ProfileError(f"{where}: {key} must be > 0 (and lo <= hi), got {v!r}")
    return lo, hi
