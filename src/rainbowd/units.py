"""Human-readable sizes and rates for CLI output."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_rate(bps: float) -> str:
    """Bytes per second as MB/s (decimal, as link speeds are quoted)."""
    return f"{bps / 1e6:.1f} MB/s"
