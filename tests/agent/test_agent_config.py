"""Agent config: environment overrides of tuning keys (file < RBD_AGENT_* < flags)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rainbowd.agent.config import ConfigError, env_overrides, load_config

BASE = 'node_id = "n1"\ncoordinator_url = "http://127.0.0.1:1"\nstate_dir = "/tmp/x"\n'


def write(tmp_path: Path, extra: str = "") -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(BASE + extra)
    return p


def test_defaults_verify_served_and_no_upload_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RBD_AGENT_VERIFY_SERVED", raising=False)
    monkeypatch.delenv("RBD_AGENT_MAX_UPLOAD_MBPS", raising=False)
    cfg = load_config(write(tmp_path))
    assert cfg.verify_served is True and cfg.max_upload_mbps == 0.0


def test_environment_overrides_the_file_and_flags_override_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, 'max_upload_mbps = 100.0\nlog_level = "info"\n')
    monkeypatch.setenv("RBD_AGENT_MAX_UPLOAD_MBPS", "128")
    monkeypatch.setenv("RBD_AGENT_VERIFY_SERVED", "false")
    monkeypatch.setenv("RBD_AGENT_LOG_LEVEL", "debug")
    cfg = load_config(path)
    assert cfg.max_upload_mbps == 128.0 and cfg.verify_served is False
    assert cfg.log_level == "debug"
    assert load_config(path, {"log_level": "warning"}).log_level == "warning"


def test_identity_keys_are_not_read_from_the_environment() -> None:
    assert env_overrides({"RBD_AGENT_NODE_ID": "evil", "RBD_AGENT_COORDINATOR_URL": "x"}) == {}


@pytest.mark.parametrize(
    ("name", "value"),
    [("RBD_AGENT_VERIFY_SERVED", "maybe"), ("RBD_AGENT_MAX_UPLOAD_MBPS", "fast")],
)
def test_bad_environment_values_are_named(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        env_overrides({name: value})


def test_negative_upload_cap_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RBD_AGENT_MAX_UPLOAD_MBPS", raising=False)
    with pytest.raises(ConfigError, match="max_upload_mbps"):
        load_config(write(tmp_path, "max_upload_mbps = -1.0\n"))


def test_download_cap_from_file_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RBD_AGENT_MAX_DOWNLOAD_MBPS", raising=False)
    assert load_config(write(tmp_path)).max_download_mbps == 0.0
    path = write(tmp_path, "max_download_mbps = 200\n")
    assert load_config(path).max_download_mbps == 200.0
    monkeypatch.setenv("RBD_AGENT_MAX_DOWNLOAD_MBPS", "64")
    assert load_config(path).max_download_mbps == 64.0
    monkeypatch.setenv("RBD_AGENT_MAX_DOWNLOAD_MBPS", "slow")
    with pytest.raises(ConfigError, match="RBD_AGENT_MAX_DOWNLOAD_MBPS"):
        load_config(path)
    monkeypatch.delenv("RBD_AGENT_MAX_DOWNLOAD_MBPS")
    with pytest.raises(ConfigError, match="max_download_mbps"):
        load_config(write(tmp_path, "max_download_mbps = -5\n"))


def test_a_download_hint_is_read_and_bad_hints_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RBD_SPEED_HINT_MBPS", raising=False)
    cfg = load_config(write(tmp_path, "speed_hint_mbps = 4.0\ndownload_hint_mbps = 64.0\n"))
    assert (cfg.speed_hint_mbps, cfg.download_hint_mbps) == (4.0, 64.0)
    for bad in ("nan", "inf", "-1.0", "1e9"):
        with pytest.raises(ConfigError, match="download_hint_mbps"):
            load_config(write(tmp_path, f"download_hint_mbps = {bad}\n"))


def test_the_front_doors_registry_and_resolve_timeout_are_checked(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path))
    assert (cfg.mirror_registry, cfg.mirror_resolve_timeout) == ("docker.io", 2.0)
    cfg = load_config(
        write(
            tmp_path,
            'mirror_registry = "registry.example.com:5000"\nmirror_resolve_timeout = 0.5\n',
        )
    )
    assert (cfg.mirror_registry, cfg.mirror_resolve_timeout) == ("registry.example.com:5000", 0.5)
    for bad in ('"http://x"', '"a b"', '""'):
        with pytest.raises(ConfigError, match="mirror_registry"):
            load_config(write(tmp_path, f"mirror_registry = {bad}\n"))
    for value in ("0.0", "-1.0", "nan", "inf", "31.0"):
        with pytest.raises(ConfigError, match="mirror_resolve_timeout"):
            load_config(write(tmp_path, f"mirror_resolve_timeout = {value}\n"))


def test_the_front_doors_pull_stall_is_checked(tmp_path: Path) -> None:
    assert load_config(write(tmp_path)).mirror_pull_stall_seconds == 30.0
    off = load_config(write(tmp_path, "mirror_pull_stall_seconds = 0.0\n"))
    assert off.mirror_pull_stall_seconds == 0.0  # a miss is a 404 at once
    for value in ("-1.0", "nan", "inf", "601.0"):
        with pytest.raises(ConfigError, match="mirror_pull_stall_seconds"):
            load_config(write(tmp_path, f"mirror_pull_stall_seconds = {value}\n"))
