"""Agent config: the containerd keys (socket, namespace, snapshotter), checked when loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from rainbowd.agent.config import DEFAULT_CONTAINERD_NAMESPACE, ConfigError, load_config

BASE = 'node_id = "n1"\ncoordinator_url = "http://127.0.0.1:1"\nstate_dir = "/tmp/x"\n'


def write(tmp_path: Path, extra: str = "") -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(BASE + extra)
    return p


def test_containerd_is_off_by_default_and_kubernetes_namespace_is_the_default(
    tmp_path: Path,
) -> None:
    cfg = load_config(write(tmp_path))
    assert cfg.containerd_address == ""
    assert cfg.containerd_namespace == DEFAULT_CONTAINERD_NAMESPACE == "k8s.io"
    assert cfg.containerd_snapshotter == ""


def test_the_keys_are_read_and_a_unix_scheme_is_dropped(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            'containerd_address = "unix:///run/containerd/containerd.sock"\n'
            'containerd_namespace = "default"\ncontainerd_snapshotter = "native"\n',
        )
    )
    assert cfg.containerd_address == "/run/containerd/containerd.sock"
    assert cfg.containerd_namespace == "default" and cfg.containerd_snapshotter == "native"


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('containerd_address = "run/containerd.sock"', "containerd_address"),
        ('containerd_address = "tcp://10.0.0.1:1"', "containerd_address"),
        (f'containerd_address = "/{"a" * 120}.sock"', "containerd_address"),
        ('containerd_namespace = ""', "containerd_namespace"),
        ('containerd_namespace = "k8s..io"', "containerd_namespace"),
        ('containerd_namespace = "a b"', "containerd_namespace"),
        (f'containerd_namespace = "{"n" * 77}"', "containerd_namespace"),
        ('containerd_snapshotter = "../x"', "containerd_snapshotter"),
    ],
)
def test_bad_values_are_refused_naming_the_key(tmp_path: Path, line: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key) as e:
        load_config(write(tmp_path, line + "\n"))
    assert "e.g." in str(e.value)  # every refusal shows a value that works


def test_a_misspelled_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="containerd_socket"):
        load_config(write(tmp_path, 'containerd_socket = "/run/containerd/containerd.sock"\n'))
