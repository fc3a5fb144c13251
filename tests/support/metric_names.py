"""Which sample names a scrape can show, and which ones PromQL expressions use.

A plain module (not a test, not conftest) so unit and integration tests can
both check the Grafana dashboard in deploy/ against a real scrape.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "rbd-dashboard.json"

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created"),
    "gauge": ("",),
}
_NAME = re.compile(r"\brbd_[a-z0-9_]+\b")


def exposable_names(text: str) -> set[str]:
    """Every sample name the families in ``text`` can have, samples seen yet or not.

    A labelled counter nobody has incremented shows only its HELP/TYPE lines;
    it still exists, and a dashboard may rightly query it.
    """
    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        names |= {fam.name + s for s in _SUFFIXES.get(fam.type, ("",))}
        names |= {s.name for s in fam.samples}
    return names


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> list[str]:
    """The PromQL of every target of every panel."""
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def dashboard_names() -> set[str]:
    """The rbd_ metric (sample) names the dashboard queries."""
    return {name for expr in dashboard_exprs() for name in _NAME.findall(expr)}
