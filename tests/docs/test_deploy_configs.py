"""The example configs in deploy/ are what operators copy: they must load as shipped."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from rainbowd.agent.config import ConfigError, load_config
from rainbowd.coordinator import config as coordinator_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_agent_example_loads() -> None:
    cfg = load_config(DEPLOY / "config" / "agent.example.toml")
    assert cfg.node_id
    assert cfg.coordinator_url.startswith("http")
    assert cfg.ssh_port == 7722
    assert cfg.metrics_address() is None  # metrics are off unless the operator opts in
    assert cfg.mirror_address() == ("127.0.0.1", 5000)  # the front door is on, on loopback


def test_prometheus_example_scrapes_the_jobs_the_dashboard_expects() -> None:
    prom = (DEPLOY / "prometheus.yml").read_text()
    dash = (DEPLOY / "grafana" / "rbd-dashboard.json").read_text()
    for job in ("rbd-coordinator", "rbd-agent"):
        assert f"job_name: {job}" in prom and f'"query": "{job}"' in dash
    assert "credentials_file:" in prom and "metrics_path: /metrics" in prom


def test_coordinator_example_loads() -> None:
    values = coordinator_config.load_file(DEPLOY / "config" / "coordinator.example.toml")
    cfg = coordinator_config.build(values, {})
    assert cfg.heartbeat_interval > 0
    assert cfg.metrics_token_path.name == "metrics-token"


def test_agent_config_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text('node_id = "a b"\ncoordinator_url = "http://x:1"\nstate_dir = "/tmp/x"\n')
    with pytest.raises(ConfigError, match="node_id"):
        load_config(bad)
    bad.write_text('node_id = "a"\ncoordinator_url = "x"\nstate_dir = "/tmp/x"\n')
    with pytest.raises(ConfigError, match="coordinator_url"):
        load_config(bad)
    bad.write_text('node_id = "a"\ncoordinator_url = "http://x"\nstate_dir = "/x"\nbogus = 1\n')
    with pytest.raises(ConfigError, match="bogus"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_systemd_units_run_the_shipped_entry_points() -> None:
    agent = (DEPLOY / "systemd" / "rbd-agent.service").read_text()
    coord = (DEPLOY / "systemd" / "rbd-coordinator.service").read_text()
    assert "rbd-agent run --config /etc/rbd/agent.toml" in agent
    assert "rbd-coordinator --config /etc/rbd/coordinator.toml" in coord
    for unit in (agent, coord):
        assert "User=rbd" in unit and "NoNewPrivileges=yes" in unit and "Restart=" in unit


def test_agent_example_documents_the_optional_keys_and_they_load(tmp_path: Path) -> None:
    """Every commented-out optional key in the example is a valid setting when uncommented."""
    text = (DEPLOY / "config" / "agent.example.toml").read_text()
    lines = text.splitlines()
    optional = [ln[2:] for ln in lines if re.fullmatch(r"# [a-z_]+ = \S+", ln)]
    assert any(ln.startswith("store_max_bytes") for ln in optional)
    uncommented = tmp_path / "agent.toml"
    uncommented.write_text(text + "\n" + "\n".join(optional) + "\n")
    cfg = load_config(uncommented)
    assert cfg.store_max_bytes == 20 * 1024**3
    assert (cfg.store_high_watermark, cfg.store_low_watermark) == (0.9, 0.8)


def test_the_standby_pair_examples_load_and_differ_only_in_their_address() -> None:
    """Both hosts' files: one database, one set of tokens, one configuration, two URLs."""
    pair = DEPLOY / "config" / "standby-pair"
    one, two = (
        coordinator_config.build(coordinator_config.load_file(pair / f"coordinator-{n}.toml"), {})
        for n in (1, 2)
    )
    assert one.state_url is not None and one.state_url.startswith("postgresql://")
    assert (one.host, one.advertise_url) == ("10.0.0.1", "http://10.0.0.1:7700")
    assert (two.host, two.advertise_url) == ("10.0.0.2", "http://10.0.0.2:7700")
    same = dataclasses.replace(two, host=one.host, advertise_url=one.advertise_url)
    assert same == one
    user = one.state_url.removeprefix("postgresql://").split("@")[0]
    assert ":" not in user, "no password in the URL: it goes in the pgpass file"


def test_the_standby_pair_drop_in_names_the_password_file_the_guide_writes() -> None:
    drop_in = (DEPLOY / "systemd" / "rbd-coordinator.service.d" / "standby-pair.conf").read_text()
    guide = (DEPLOY / "INSTALL.md").read_text()
    assert "[Service]" in drop_in and "Environment=PGPASSFILE=/etc/rbd/pgpass" in drop_in
    assert "cat > /etc/rbd/pgpass" in guide and "After=postgresql.service" in drop_in
    for path in (
        "deploy/config/standby-pair/coordinator-1.toml",
        "deploy/config/standby-pair/coordinator-2.toml",
        "deploy/systemd/rbd-coordinator.service.d/standby-pair.conf",
    ):
        assert path in guide, path
