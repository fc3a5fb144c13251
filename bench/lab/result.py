"""What one lab run measured: per-system, per-node completion times against T*.

Every system (rbd, registry-only, BitTorrent) returns a :class:`SystemResult`:
for each demander, the seconds from the moment the distribution was started
until that node held the complete, verified image; and, for a node that did
not get there, why. A :class:`LabReport` puts them side by side with the
profile's bound T* and writes the JSON that bench/sim's ``--compare`` reads::

    {"profile": "paper", "image_bytes": 10403840, "layers": [[digest, size], ...],
     "t_star": 20.8, "bound": {"origin_upload": ..., "slowest_download": ...,
                               "aggregate_upload": ..., "binding": "slowest download"},
     "systems": {"rbd": {"total": 123.4, "ratio": 5.9, "median": 60.2,
                         "slowdown_median": 2.9, "slowdown_p90": 5.1,
                         "origin_bytes": 52000000, "origin_copies": 5.0,
                         "node_seconds": {...}, "failed": {}, "notes": {...}}, ...}}

Slowdowns (each node's time over its own bound max(S/d_i, S/u_origin)) and
the origin's bytes are bench/measures.py's, computed as the simulator does;
the origin's bytes are its interface's sent bytes over the timed phase
(bench/lab/egress.py), None when a system did not reach its timed phase.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rainbowd.devcluster.profile import Bound, ClusterProfile

from ..measures import Measures, measure
from .hostcpu import CPU_BOUND_BUSY, cpu_bound


@dataclass
class SystemResult:
    system: str
    #: demander -> seconds from the start until it held the verified image
    node_seconds: dict[str, float] = field(default_factory=dict)
    #: demander -> why it did not get the image
    failed: dict[str, str] = field(default_factory=dict)
    #: anything else worth printing (wire bytes, tool versions, settings)
    notes: dict[str, Any] = field(default_factory=dict)
    #: bytes the origin's interface sent during the timed phase (bench/lab/egress.py)
    origin_bytes: int | None = None
    #: share of the host's CPU time busy during the timed phase (bench/lab/hostcpu.py)
    host_cpu_busy: float | None = None

    @property
    def complete(self) -> bool:
        return bool(self.node_seconds) and not self.failed

    @property
    def total(self) -> float:
        """Seconds until every node held the image (inf if any did not)."""
        return max(self.node_seconds.values()) if self.complete else math.inf

    @property
    def median(self) -> float:
        return statistics.median(self.node_seconds.values()) if self.node_seconds else math.inf


class LabSystem(Protocol):
    """A distribution system under test; :meth:`run` must stop everything it started."""

    name: str

    async def run(self, env: Any, *, timeout: float) -> SystemResult:
        """Distribute ``env.image`` from the origin to every demander of ``env`` and time it."""
        ...


@dataclass
class LabReport:
    profile: ClusterProfile
    image_bytes: int
    layers: list[tuple[str, int]]
    results: list[SystemResult] = field(default_factory=list)

    @property
    def bound(self) -> Bound:
        return self.profile.bound(self.image_bytes)

    def ratio(self, r: SystemResult) -> float:
        return r.total / self.bound.t_star

    def measures(self, r: SystemResult) -> Measures:
        """x T*, median and p90 slowdown, origin bytes (bench/measures.py)."""
        return measure(
            self.profile,
            self.image_bytes,
            r.node_seconds,
            complete=r.complete,
            origin_bytes=r.origin_bytes,
        )

    def to_json(self) -> dict[str, Any]:
        b = self.bound
        return {
            "profile": self.profile.name,
            "rate_scale": self.profile.rate_scale,
            "nodes": len(self.profile.nodes),
            "image_bytes": self.image_bytes,
            "layers": [list(x) for x in self.layers],
            "t_star": b.t_star,
            "bound": {
                "origin_upload": b.origin_upload,
                "slowest_download": b.slowest_download,
                "aggregate_upload": b.aggregate_upload,
                "binding": b.binding,
            },
            "systems": {
                r.system: {
                    "total": r.total if r.complete else None,
                    "ratio": self.ratio(r) if r.complete else None,
                    "median": r.median if r.node_seconds else None,
                    **{
                        k: v
                        for k, v in self.measures(r).as_dict().items()
                        if k.startswith(("slowdown_", "origin_"))
                    },
                    "host_cpu_busy": r.host_cpu_busy,
                    "cpu_bound": cpu_bound(r.host_cpu_busy),
                    "node_seconds": r.node_seconds,
                    "failed": r.failed,
                    "notes": r.notes,
                }
                for r in self.results
            },
        }

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        """``report.json`` and ``cdf.png`` into ``out_dir``; their paths."""
        out_dir.mkdir(parents=True, exist_ok=True)
        js = out_dir / "report.json"
        js.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")
        png = out_dir / "cdf.png"
        plot_cdf(self, png)
        return js, png

    def table(self) -> str:
        """The side-by-side table every run prints."""
        b = self.bound
        lines = [
            f"profile {self.profile.name}: {len(self.profile.nodes)} nodes + origin; "
            f"image {self.image_bytes / 1e6:.1f} MB in {len(self.layers)} layers",
            f"T* = {b.t_star:.1f} s (bound by the {b.binding}; origin upload "
            f"{b.origin_upload:.1f} s, slowest download {b.slowest_download:.1f} s, "
            f"aggregate upload {b.aggregate_upload:.1f} s)",
            "",
            f"{'system':<14} {'all nodes':>10} {'x T*':>7} {'median':>8} {'slow med':>8} "
            f"{'slow p90':>8} {'origin/S':>8} {'failed':>7} {'host CPU':>9}",
        ]

        def num(x: float | None) -> str:
            return f"{x:8.2f}" if x is not None else f"{'--':>8}"

        for r in self.results:
            m = self.measures(r)
            total = f"{r.total:9.1f}s" if r.complete else "       -- "
            ratio = f"{self.ratio(r):6.2f}x" if r.complete else "     --"
            med = f"{r.median:7.1f}s" if r.node_seconds else "     -- "
            cpu = "--" if r.host_cpu_busy is None else f"{100 * r.host_cpu_busy:.0f} %"
            cpu += " !" if cpu_bound(r.host_cpu_busy) else "  "
            lines.append(
                f"{r.system:<14} {total:>10} {ratio:>7} {med:>8} {num(m.slowdown_median)} "
                f"{num(m.slowdown_p90)} {num(m.origin_copies)} {len(r.failed):>7} {cpu:>9}"
            )
        bound = [r.system for r in self.results if cpu_bound(r.host_cpu_busy)]
        if bound:
            lines.append(
                f"! {', '.join(bound)}: the host's CPUs were >= {100 * CPU_BOUND_BUSY:.0f} % busy "
                "in the timed phase, so the run measured them, not the emulated network; "
                "run again with a lower --rate-scale (every node shares this host's CPUs)"
            )
        for r in self.results:
            for node, why in sorted(r.failed.items())[:5]:
                lines.append(f"  {r.system}: {node} failed: {why}")
        return "\n".join(lines)


def plot_cdf(report: LabReport, path: Path) -> None:
    """Per-node completion CDF of every system, with T* marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    n = len(report.profile.nodes)
    for r in report.results:
        xs = sorted(r.node_seconds.values())
        ys = [(i + 1) / n for i in range(len(xs))]
        label = f"{r.system} ({r.total:.1f} s)" if r.complete else f"{r.system} (incomplete)"
        ax.step([0.0, *xs], [0.0, *ys], where="post", label=label)
    t = report.bound.t_star
    ax.axvline(t, color="black", linestyle="--", linewidth=1, label=f"T* = {t:.1f} s")
    ax.set_xlabel("seconds since the distribution started")
    ax.set_ylabel("fraction of nodes holding the verified image")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.set_title(
        f"profile {report.profile.name}: {n} nodes, {report.image_bytes / 1e6:.1f} MB image"
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def layer_sizes(archive: Path) -> list[tuple[str, int]]:
    """(sha256 digest, size) of each layer of a docker-archive, in image order."""
    import hashlib
    import tarfile

    with tarfile.open(archive) as tf:
        manifest_f = tf.extractfile("manifest.json")
        if manifest_f is None:
            raise ValueError(f"{archive}: no manifest.json (not a docker-archive)")
        layers = json.load(manifest_f)[0]["Layers"]
        out = []
        for name in layers:
            f = tf.extractfile(name)
            if f is None:
                raise ValueError(f"{archive}: layer {name} missing")
            h, size = hashlib.sha256(), 0
            while block := f.read(1 << 20):
                h.update(block)
                size += len(block)
            out.append((f"sha256:{h.hexdigest()}", size))
    return out
