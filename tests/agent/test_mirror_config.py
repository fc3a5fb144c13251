"""mirror_listen in the agent config, and ``rbd-agent mirror-config`` for containerd and Docker."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from rainbowd.agent.cli import main
from rainbowd.agent.config import ConfigError, load_config
from rainbowd.agent.mirror.clientconfig import (
    ClientConfigError,
    containerd_hosts_toml,
    docker_daemon_json,
    mirror_url,
    upstream_server,
)


def _cfg(tmp_path: Path, extra: str = "") -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(
        f'node_id = "n"\ncoordinator_url = "http://127.0.0.1:1"\nstate_dir = "{tmp_path}"\n{extra}'
    )
    return p


def test_mirror_listen_is_off_by_default_and_checked_at_load(tmp_path: Path) -> None:
    cfg = load_config(_cfg(tmp_path))
    assert cfg.mirror_listen == "" and cfg.mirror_address() is None
    cfg = load_config(_cfg(tmp_path, 'mirror_listen = "127.0.0.1:5000"\n'))
    assert cfg.mirror_address() == ("127.0.0.1", 5000)
    assert cfg.mirror_dir == tmp_path / "mirror"
    assert load_config(_cfg(tmp_path, 'mirror_listen = "[::1]:5000"\n')).mirror_address() == (
        "::1",
        5000,
    )
    for bad in ("5000", "host:", "host:http", "h:70000", ":5000"):
        with pytest.raises(ConfigError, match=r"mirror_listen .*127\.0\.0\.1:5000"):
            load_config(_cfg(tmp_path, f'mirror_listen = "{bad}"\n'))


def test_the_client_sees_the_front_door_on_loopback() -> None:
    assert mirror_url("127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert mirror_url("0.0.0.0:5000") == "http://127.0.0.1:5000"
    assert mirror_url("[::]:5000") == "http://[::1]:5000"
    assert mirror_url("10.0.0.7:5000") == "http://10.0.0.7:5000"
    with pytest.raises(ClientConfigError, match="fixed port"):
        mirror_url("127.0.0.1:0")


def test_hosts_toml_puts_the_mirror_first_and_the_upstream_as_server() -> None:
    doc = tomllib.loads(
        containerd_hosts_toml("http://127.0.0.1:5000", server=upstream_server("docker.io"))
    )
    assert doc["server"] == "https://registry-1.docker.io"
    assert doc["host"] == {"http://127.0.0.1:5000": {"capabilities": ["pull", "resolve"]}}
    assert upstream_server("registry.example.com:5000") == "https://registry.example.com:5000"


def test_daemon_json_keeps_other_keys_and_adds_insecure_only_off_loopback() -> None:
    doc = json.loads(
        docker_daemon_json(
            "http://127.0.0.1:5000",
            {
                "log-driver": "journald",
                "registry-mirrors": ["https://m.example", "http://127.0.0.1:5000/"],
            },
        )
    )
    assert doc == {
        "log-driver": "journald",
        "registry-mirrors": ["http://127.0.0.1:5000", "https://m.example"],
    }
    doc = json.loads(docker_daemon_json("http://10.0.0.7:5000"))
    assert doc["insecure-registries"] == ["10.0.0.7:5000"]


def test_mirror_config_prints_and_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cfg(tmp_path, 'mirror_listen = "127.0.0.1:5000"\n')
    certs = tmp_path / "certs.d"
    assert (
        main(["mirror-config", "containerd", "--config", str(cfg), "--certs-dir", str(certs)]) == 0
    )
    out = capsys.readouterr().out
    assert (
        f"# {certs}/docker.io/hosts.toml" in out
        and 'server = "https://registry-1.docker.io"' in out
    )
    assert not certs.exists()  # printing writes nothing
    argv = [
        "mirror-config",
        "containerd",
        "--config",
        str(cfg),
        "--certs-dir",
        str(certs),
        "--write",
    ]
    assert main([*argv, "--registry", "registry.example.com:5000", "--registry", "docker.io"]) == 0
    one = tomllib.loads((certs / "registry.example.com:5000" / "hosts.toml").read_text())
    assert one["server"] == "https://registry.example.com:5000"
    assert "http://127.0.0.1:5000" in one["host"]
    assert (certs / "docker.io" / "hosts.toml").is_file()
    daemon = tmp_path / "docker" / "daemon.json"
    daemon.parent.mkdir()
    daemon.write_text('{"data-root": "/srv/docker"}')
    argv = [
        "mirror-config",
        "docker",
        "--config",
        str(cfg),
        "--daemon-json",
        str(daemon),
        "--write",
    ]
    assert main(argv) == 0
    assert json.loads(daemon.read_text()) == {
        "data-root": "/srv/docker",
        "registry-mirrors": ["http://127.0.0.1:5000"],
    }


def test_mirror_config_refuses_when_the_mirror_is_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["mirror-config", "docker", "--config", str(_cfg(tmp_path))]) == 2
    assert "mirror_listen is off" in capsys.readouterr().err
    cfg = _cfg(tmp_path, 'mirror_listen = "127.0.0.1:5000"\n')
    argv = ["mirror-config", "containerd", "--config", str(cfg), "--server", "https://x"]
    assert main([*argv, "--registry", "a", "--registry", "b"]) == 2
    assert "one --registry" in capsys.readouterr().err
    daemon = tmp_path / "daemon.json"
    daemon.write_text("{not json")
    assert (
        main(["mirror-config", "docker", "--config", str(cfg), "--daemon-json", str(daemon)]) == 2
    )
    assert "not valid JSON" in capsys.readouterr().err
