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


class SizeError(ValueError):
    """A size that cannot be read; the message shows the accepted forms."""


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_size(value: int | str) -> int:
    """Bytes from an integer or a string like ``"20GiB"``, ``"512 MB"``, ``"1.5TiB"``.

    Units are explicit on purpose: ``KiB``/``MiB``/``GiB``/``TiB`` are powers
    of 1024, ``kB``/``MB``/``GB``/``TB`` powers of 1000, and a bare number is
    bytes. A lone ``G`` or ``M`` is refused rather than guessed at, because the
    two readings differ by 7% at GiB scale -- enough to matter for a disk limit.
    """
    if isinstance(value, bool):
        raise SizeError(f"{value!r} is not a size; use bytes or e.g. '20GiB'")
    if isinstance(value, int):
        if value < 0:
            raise SizeError(f"{value} is negative; use bytes >= 0 or e.g. '20GiB'")
        return value
    text = value.strip()
    num = text.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ").strip()
    unit = text[len(text.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")) :]
    factor = _SIZE_UNITS.get(unit.lower())
    try:
        amount = float(num)
    except ValueError:
        amount = -1.0
    if factor is None or amount < 0 or amount != amount or amount == float("inf"):
        raise SizeError(
            f"{value!r} is not a size; use bytes (20000000000) or a number with one of "
            "B, kB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), "
            "e.g. '20GiB'"
        )
    return int(amount * factor)
