"""Store eviction: the pure policy, size parsing and the agent's store_* config keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from rainbowd.agent.config import ConfigError, load_config
from rainbowd.core.eviction import EvictionError, StoreEntry, StoreLimits, plan
from rainbowd.core.units import SizeError, parse_size

MiB = 1024 * 1024
LIMITS = StoreLimits(100 * MiB, high=0.9, low=0.8)


def entries(*spec: tuple[str, int, float]) -> list[StoreEntry]:
    return [StoreEntry(d, mib * MiB, t) for d, mib, t in spec]


def test_nothing_happens_at_or_below_the_high_watermark() -> None:
    es = entries(("a", 30, 1.0), ("b", 30, 2.0), ("c", 30, 3.0))
    p = plan(es, 90 * MiB, LIMITS)
    assert p.evict == [] and p.freed == 0


def test_least_recently_used_go_first_until_under_the_low_watermark() -> None:
    es = entries(("new", 20, 30.0), ("old", 20, 10.0), ("mid", 20, 20.0), ("x", 35, 40.0))
    p = plan(es, 95 * MiB, LIMITS)
    # 95 -> 75 after "old" is already <= 80: one layer is enough
    assert p.evict == ["old"]
    assert p.used_after == 75 * MiB and p.shortfall == 0
    p = plan(es, 105 * MiB, LIMITS)
    assert p.evict == ["old", "mid"]  # 105 -> 85 -> 65


def test_hysteresis_between_the_watermarks() -> None:
    """After an eviction the store sits below low; growing back to high triggers nothing."""
    es = entries(("a", 10, 1.0), ("b", 10, 2.0))
    assert plan(es, 85 * MiB, LIMITS).evict == []  # between low and high: left alone
    assert plan(es, 91 * MiB, LIMITS).evict == ["a", "b"]  # 91 -> 71


def test_pins_are_never_evicted_even_if_that_leaves_the_store_over() -> None:
    es = entries(("old", 20, 1.0), ("pinned", 40, 0.5), ("newer", 10, 2.0))
    p = plan(es, 100 * MiB, LIMITS, pinned={"pinned"})
    assert "pinned" not in p.evict
    assert p.evict == ["old"]
    assert p.used_after == 80 * MiB and p.shortfall == 0
    p = plan(es, 100 * MiB, LIMITS, pinned={"pinned", "old"})
    assert p.evict == ["newer"] and p.shortfall == 10 * MiB


def test_only_rbd_files_count() -> None:
    """``used`` is the store's own size: a full disk with a small store evicts nothing."""
    es = entries(("a", 10, 1.0))
    assert plan(es, 10 * MiB, LIMITS).evict == []


def test_partials_count_but_are_not_candidates() -> None:
    # 60 MiB of partials + 35 complete: the complete ones go, the partial bytes stay
    es = entries(("a", 20, 1.0), ("b", 15, 2.0))
    p = plan(es, 95 * MiB, LIMITS)
    assert p.evict == ["a"] and p.used_after == 75 * MiB


def test_ties_are_broken_by_digest() -> None:
    es = entries(("b", 10, 1.0), ("a", 10, 1.0))
    assert plan(es, 91 * MiB, LIMITS).evict == ["a", "b"]


@pytest.mark.parametrize(
    ("max_bytes", "high", "low"), [(0, 0.9, 0.8), (10, 0.8, 0.9), (10, 1.2, 0.5), (10, 0.9, 0.0)]
)
def test_bad_limits_are_refused(max_bytes: int, high: float, low: float) -> None:
    with pytest.raises(EvictionError):
        StoreLimits(max_bytes, high, low)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        ("20GiB", 20 * 1024**3),
        ("20 GiB", 20 * 1024**3),
        ("1.5TiB", int(1.5 * 1024**4)),
        ("512MB", 512 * 10**6),
        ("10kB", 10_000),
        ("3b", 3),
        ("2mib", 2 * MiB),
    ],
)
def test_parse_size(text: int | str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "20G", "-1GiB", "lots", "1e400GiB", -5, True, "nan"])
def test_parse_size_refuses_bad_values_with_the_forms_that_work(text: int | str) -> None:
    with pytest.raises(SizeError, match="GiB"):
        parse_size(text)


BASE = 'node_id = "n1"\ncoordinator_url = "http://127.0.0.1:1"\nstate_dir = "/tmp/x"\n'


def config(tmp_path: Path, extra: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(BASE + extra)
    return p


def test_store_config_defaults_and_sizes(tmp_path: Path) -> None:
    cfg = load_config(config(tmp_path, ""))
    assert cfg.store_max_bytes == 0  # no limit
    assert (cfg.store_high_watermark, cfg.store_low_watermark) == (0.9, 0.8)
    cfg = load_config(config(tmp_path, 'store_max_bytes = "20GiB"\n'))
    assert cfg.store_max_bytes == 20 * 1024**3
    cfg = load_config(config(tmp_path, "store_max_bytes = 1000000\nstore_low_watermark = 0.5\n"))
    assert cfg.store_max_bytes == 1_000_000 and cfg.store_low_watermark == 0.5


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('store_max_bytes = "20G"\n', "store_max_bytes"),
        ("store_max_bytes = -1\n", "store_max_bytes"),
        ("store_max_bytes = 1.5\n", "store_max_bytes"),
        ("store_high_watermark = 1.5\n", "store_high_watermark"),
        ("store_low_watermark = 0.95\n", "store_low_watermark"),
        ("store_low_watermark = 0\n", "store_low_watermark"),
    ],
)
def test_bad_store_config_names_the_key(tmp_path: Path, extra: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(config(tmp_path, extra))
