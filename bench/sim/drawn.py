"""Cluster shapes drawn whole from a seed, for the suite's ``--random N``.

bench/profiles/random-*.toml fix a distribution and draw the nodes from a
seed. :func:`drawn_profile` goes one step further: the seed also picks the
shape -- which distribution the uploads follow (uniform, lognormal, pareto,
bimodal mixture), whether downloads follow their own (asymmetric links) or
equal the uploads, their parameters, the origin's rate and the image (1 to 5
layers of 100 kB .. 80 MB). The profile goes through
:func:`rainbowd.devcluster.profile.parse_profile` like a file would, so it is checked the
same way and scales the same way (``scaled(n)`` re-draws n nodes from the seed).

Only ``random.Random(seed).random()`` is used, so a seed gives the same shape
on every machine and Python version.
"""

from __future__ import annotations

import math
import random
from typing import Any

from rainbowd.devcluster.profile import ClusterProfile, parse_profile

#: demanders of a drawn profile before scaling (the suite scales to --nodes)
DRAWN_NODES = 40
#: the distributions a drawn shape picks from, in a fixed order (the draw indexes it)
KINDS = ("uniform", "lognormal", "pareto", "bimodal")
#: a drawn image's layers: count 1 .. MAX_DRAWN_LAYERS, each clamped to this range (bytes)
MAX_DRAWN_LAYERS = 5
LAYER_BYTES = (100_000, 80_000_000)


def _between(rng: random.Random, lo: float, hi: float) -> float:
    return lo + (hi - lo) * rng.random()


def _pick(rng: random.Random, options: tuple[str, ...]) -> str:
    return options[min(len(options) - 1, int(rng.random() * len(options)))]


def _distribution(rng: random.Random) -> dict[str, Any]:
    """A [random.up]/[random.down] table around a scale of 2 .. 32 Mbit/s."""
    m = 2 ** _between(rng, 1, 5)
    kind = _pick(rng, KINDS)
    if kind == "uniform":
        d: dict[str, Any] = {"lo": m / 8, "hi": m * 2}
    elif kind == "lognormal":
        d = {"median": m, "sigma": _between(rng, 0.3, 1.5), "lo": m / 16, "hi": m * 8}
    elif kind == "pareto":
        d = {"alpha": _between(rng, 1.0, 2.5), "lo": m / 4, "hi": m * 16}
    else:
        fast, slow = m * _between(rng, 2, 8), m / _between(rng, 2, 8)
        d = {
            "fast": fast,
            "slow": slow,
            "fast_share": _between(rng, 0.1, 0.5),
            "spread": _between(rng, 0.0, 0.4),
            "lo": slow / 2,
            "hi": fast * 2,
        }
    return {"dist": kind, **{k: round(v, 3) for k, v in d.items()}}


def drawn_profile(seed: int) -> ClusterProfile:
    """The whole cluster shape (and image) drawn from ``seed``; named ``drawn-<seed>``."""
    if seed < 0:
        raise ValueError(f"a drawn profile's seed must be >= 0, got {seed}")
    rng = random.Random(f"rbd-drawn-shape:{seed}")  # str seeds hash with sha512: stable
    origin = round(2 ** _between(rng, 1, 6), 3)
    up = _distribution(rng)
    down = _distribution(rng) if rng.random() < 0.5 else None
    layers = [
        int(min(LAYER_BYTES[1], max(LAYER_BYTES[0], 10e6 * math.exp(_between(rng, -2.3, 2.0)))))
        for _ in range(1 + int(rng.random() * MAX_DRAWN_LAYERS))
    ]
    table: dict[str, Any] = {"seed": seed, "count": DRAWN_NODES, "group": "rand", "up": up}
    if down is not None:
        table["down"] = down
    links = "asymmetric" if down else "symmetric"
    return parse_profile(
        {
            "name": f"drawn-{seed}",
            "description": f"drawn from seed {seed}: up {up['dist']}, {links} links, "
            f"{len(layers)} layers of {sum(layers) / 1e6:.1f} MB",
            "chunk_kib": 1024,
            "image": {"layers": layers},
            "origin": {"up_mbit": origin, "down_mbit": origin},
            "random": table,
        }
    )
