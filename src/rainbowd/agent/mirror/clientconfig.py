"""What a container runtime on this host needs to pull through the agent's front door.

``rbd-agent mirror-config containerd|docker`` prints (or writes) these:

* containerd: ``/etc/containerd/certs.d/<registry>/hosts.toml``, containerd's
  registry host configuration (its ``docs/hosts.md``): the front door as the
  first ``[host]``, with the ``pull`` and ``resolve`` capabilities, and the
  upstream as ``server``, which containerd falls back to when the front door
  answers a miss (404) or is down. One file per registry host the node pulls
  from (``docker.io``, ``registry.example.com:5000``, ...); containerd reads
  the directory at each pull, no restart needed. CRI reads it once its
  ``config_path`` points at the directory; ``ctr`` takes ``--hosts-dir``.
* Docker: ``registry-mirrors`` in ``/etc/docker/daemon.json``. Docker asks
  mirrors only for Docker Hub images (``docker.io/...``) and moves on to Hub
  on any registry error a mirror answers; a loopback mirror may be plain
  HTTP (Docker trusts 127.0.0.0/8 as insecure by default), another address
  must be listed in ``insecure-registries`` too, which is added. dockerd
  reads the file at start: restart it after.

Pure text from the agent's ``mirror_listen``; the CLI does the file work.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

#: the registry host Docker Hub images are named by, and the endpoint it serves from
DOCKER_HUB = "docker.io"
DOCKER_HUB_SERVER = "https://registry-1.docker.io"
#: where containerd's registry host configuration lives (CRI's usual config_path)
CONTAINERD_CERTS_D = "/etc/containerd/certs.d"
DOCKER_DAEMON_JSON = "/etc/docker/daemon.json"


class ClientConfigError(ValueError):
    """The front door's address cannot be turned into a client configuration."""


def mirror_url(listen: str) -> str:
    """The URL a client on this host uses for a front door listening on ``listen``.

    A wildcard address (0.0.0.0, ::) is reached on loopback.
    """
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) == 0:
        raise ClientConfigError(
            f"mirror_listen {listen!r}: set it to HOST:PORT with a fixed port (e.g. "
            '"127.0.0.1:5000") in the agent config first'
        )
    if host == "0.0.0.0":
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def upstream_server(registry: str) -> str:
    """The endpoint a registry host name is served from (Docker Hub's is not docker.io)."""
    if registry == DOCKER_HUB:
        return DOCKER_HUB_SERVER
    return f"https://{registry}"


def containerd_hosts_toml(mirror: str, *, server: str) -> str:
    """``hosts.toml`` sending a registry's pulls to ``mirror`` first, then to ``server``."""
    return (
        "# written by rbd-agent mirror-config: pulls try this node's rbd front door first;\n"
        "# on a miss (404) or when it is down, containerd goes to the server itself\n"
        f'server = "{server}"\n'
        "\n"
        f'[host."{mirror}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )


def docker_daemon_json(mirror: str, existing: dict[str, Any] | None = None) -> str:
    """``daemon.json`` with ``mirror`` first in ``registry-mirrors``, other keys kept."""
    doc = dict(existing or {})
    mirrors = [m for m in doc.get("registry-mirrors", []) if m.rstrip("/") != mirror]
    doc["registry-mirrors"] = [mirror, *mirrors]
    host = mirror.split("://", 1)[1]
    bare = host.rsplit(":", 1)[0].strip("[]")
    if not _loopback(bare):
        insecure = list(doc.get("insecure-registries", []))
        if host not in insecure:
            doc["insecure-registries"] = [*insecure, host]
    return json.dumps(doc, indent=2) + "\n"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
