"""The example Grafana dashboard is valid, and queries only metrics rbd really exposes.

The scrape here is real: a Coordinator and an Agent object with their own
registries, exposed with prometheus_client (the integration test checks the
same against a running cluster). A renamed metric fails this test instead of
leaving an empty panel in an operator's Grafana.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator_support import open_state
from metric_names import dashboard, dashboard_exprs, dashboard_names, exposable_names
from rainbowd.agent.agent import Agent
from rainbowd.agent.config import load_config
from rainbowd.coordinator.core import Coordinator


def _scrapes(tmp_path: Path) -> tuple[set[str], set[str]]:
    store = open_state(tmp_path)
    try:
        coordinator = Coordinator(store, join_token="j", admin_token="a")
        coord_names = exposable_names(coordinator.metrics.exposition().decode())
    finally:
        store.close()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'node_id = "n"\ncoordinator_url = "http://127.0.0.1:1"\nstate_dir = "{tmp_path / "a"}"\n'
    )
    agent = Agent(load_config(cfg))
    agent.metrics.refresh_store()
    return coord_names, exposable_names(agent.metrics.exposition().decode())


@pytest.mark.backends("sqlite")  # touches no state store
def test_dashboard_is_grafana_json() -> None:
    d = dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["type"] in ("timeseries", "stat"), p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
    # panels do not overlap
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine


@pytest.mark.backends("sqlite")  # touches no state store
def test_every_expression_is_balanced_and_scoped_to_its_job() -> None:
    for expr in dashboard_exprs():
        for open_, close in ("()", "{}", "[]"):
            assert expr.count(open_) == expr.count(close), expr
        job = "$agent_job" if "rbd_agent_" in expr else "$coordinator_job"
        assert f'job=~"{job}"' in expr, expr


def test_dashboard_names_exist_in_a_real_scrape(tmp_path: Path) -> None:
    coord, agent = _scrapes(tmp_path)
    used = dashboard_names()
    assert used, "the dashboard queries no rbd metric"
    missing = sorted(used - coord - agent)
    assert not missing, f"the dashboard queries metrics nobody exposes: {missing}"


def _base(name: str) -> str:
    for suffix in ("_total", "_bucket", "_count", "_sum", "_created"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def test_dashboard_shows_every_metric(tmp_path: Path) -> None:
    """The converse: a new metric gets a panel (or this test says which has none)."""
    coord, agent = _scrapes(tmp_path)
    exposed = {_base(n) for n in coord | agent if n.startswith("rbd_")}
    shown = {_base(n) for n in dashboard_names()}
    assert not sorted(exposed - shown), f"metrics without a panel: {sorted(exposed - shown)}"
