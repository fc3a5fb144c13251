"""bench/takeover.py's arithmetic: nearest-rank percentiles and the log's timestamps.

The benchmark itself runs real processes for a minute (bench/RESULTS.md,
"Standby takeover"); what it computes from their samples is checked here.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.takeover import Run, log_time, percentile, summarize


def test_nearest_rank_with_ten_samples_makes_p99_the_maximum() -> None:
    values = [float(v) for v in range(1, 11)]
    assert percentile(values, 0.90) == 9.0
    assert percentile(values, 0.99) == 10.0
    assert percentile(values, 0.50) == 5.0
    assert percentile([4.2], 0.99) == 4.2


def test_a_log_timestamp_is_read_as_utc() -> None:
    at = datetime(2026, 12, 3, 18, 56, 4, 504000, tzinfo=UTC).timestamp()
    assert log_time({"timestamp": "2026-12-03T18:56:04.504000Z"}) == at


def test_summary_of_each_measure() -> None:
    runs = [Run("ab"[i % 2], 0.0, 3.0 + i / 10, 0.05, 4.0, 4.0 + i / 10, 5.0) for i in range(10)]
    s = summarize(runs)
    assert s["first_assignment_s"]["p99"] == s["first_assignment_s"]["max"] == 4.9
    assert s["first_assignment_s"]["median"] == 4.45  # between the 5th and 6th
    assert s["restore_s"]["min"] == 0.05
