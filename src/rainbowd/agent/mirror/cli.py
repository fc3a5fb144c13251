"""``rbd-agent mirror-config containerd|docker``: point this host's runtime at the front door.

rbd-agent mirror-config containerd [--registry HOST]... [--server URL] [--write [--certs-dir DIR]]
rbd-agent mirror-config docker [--write [--daemon-json FILE]]

Both read ``mirror_listen`` from the agent config (``--config``; or take
``--listen HOST:PORT``) and print the configuration; ``--write`` writes it
(containerd's ``hosts.toml`` files; Docker's ``daemon.json``, merged with
the keys already in it). The text is :mod:`rainbowd.agent.mirror.clientconfig`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rainbowd.agent.config import ConfigError, load_config
from rainbowd.lib.atomicfile import write_atomic

from .clientconfig import (
    CONTAINERD_CERTS_D,
    DOCKER_DAEMON_JSON,
    DOCKER_HUB,
    ClientConfigError,
    containerd_hosts_toml,
    docker_daemon_json,
    mirror_url,
    upstream_server,
)


def add_parser(sub: Any, default_config: Path) -> None:
    """The ``mirror-config`` subcommand on ``rbd-agent``'s subparsers."""
    mc = sub.add_parser(
        "mirror-config",
        help="print or write containerd's or Docker's configuration to pull through this agent",
        description=__doc__.split("\n\n")[0],
    )
    mc.add_argument("runtime", choices=["containerd", "docker"])
    mc.add_argument(
        "--config",
        type=Path,
        default=default_config,
        help=f"agent config whose mirror_listen to use (default {default_config})",
    )
    mc.add_argument("--listen", help="HOST:PORT of the front door, instead of the config's")
    mc.add_argument(
        "--registry",
        action="append",
        help=f"containerd: registry host to mirror (repeat for several; default {DOCKER_HUB})",
    )
    mc.add_argument(
        "--server",
        help="containerd: the upstream URL to fall back to (one --registry only; default "
        "https://HOST, or Docker Hub's endpoint for docker.io)",
    )
    mc.add_argument("--write", action="store_true", help="write the files instead of printing")
    mc.add_argument("--certs-dir", type=Path, default=Path(CONTAINERD_CERTS_D))
    mc.add_argument("--daemon-json", type=Path, default=Path(DOCKER_DAEMON_JSON))


def run(args: argparse.Namespace) -> int:
    try:
        listen = args.listen or load_config(args.config).mirror_listen
        if not listen:
            raise ClientConfigError(
                f"mirror_listen is off in {args.config}; set it (e.g. "
                '"127.0.0.1:5000") and restart the agent, or pass --listen'
            )
        mirror = mirror_url(listen)
        if args.runtime == "containerd":
            return _containerd(args, mirror)
        return _docker(args, mirror)
    except (ConfigError, ClientConfigError) as e:
        print(f"rbd-agent: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"rbd-agent: {e}", file=sys.stderr)
        return 1


def _containerd(args: argparse.Namespace, mirror: str) -> int:
    registries: list[str] = args.registry or [DOCKER_HUB]
    if args.server and len(registries) > 1:
        raise ClientConfigError("--server names the upstream of one --registry, not several")
    for registry in registries:
        if not registry or "/" in registry or registry in (".", ".."):
            raise ClientConfigError(f"--registry {registry!r}: a registry HOST[:PORT]")
        text = containerd_hosts_toml(mirror, server=args.server or upstream_server(registry))
        path = args.certs_dir / registry / "hosts.toml"
        if args.write:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, text.encode(), mode=0o644)
            print(f"wrote {path}")
        else:
            print(f"# {path}\n{text}")
    if args.write:
        print(
            "containerd reads these at each pull; CRI needs config_path = "
            f'"{args.certs_dir}" in [plugins."io.containerd.grpc.v1.cri".registry], ctr needs '
            f"--hosts-dir {args.certs_dir}"
        )
    return 0


def _docker(args: argparse.Namespace, mirror: str) -> int:
    path: Path = args.daemon_json
    existing: dict[str, Any] = {}
    try:
        existing = json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        pass
    except ValueError as e:
        raise ClientConfigError(f"{path} is not valid JSON ({e}); fix it first") from None
    if not isinstance(existing, dict):
        raise ClientConfigError(f"{path} does not hold a JSON object; fix it first")
    text = docker_daemon_json(mirror, existing)
    if args.write:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text.encode(), mode=0o644)
        print(f"wrote {path}; restart dockerd to use it (Docker asks mirrors for docker.io only)")
    else:
        print(f"# {path} (Docker asks mirrors for docker.io images only)\n{text}", end="")
    return 0
