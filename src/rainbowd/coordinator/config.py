"""Coordinator settings: defaults, an optional TOML file, then command-line flags.

Keys of the TOML file (all optional) mirror the long flags::

    listen = "0.0.0.0:7700"
    state_dir = "/var/lib/rbd-coordinator"
    state_url = "postgresql://rbd@db.example/rbd"   # default: SQLite in state_dir
    advertise_url = "http://coord-a.example:7700"   # this coordinator's URL, as agents reach
                                # it (the leader row names it; default http://LISTEN)
    join_token_file = "/etc/rbd/join-token"
    admin_token_file = "/etc/rbd/admin-token"
    metrics_token_file = "/etc/rbd/metrics-token"   # Bearer token for GET /metrics
    heartbeat_interval = 2.0
    chunk_size = 4194304        # the largest chunk; a layer under 64 of them is cut finer
                                # (rainbowd.core.chunks.layer_chunk_size, 64 KiB at least)
    policy = "swarm"            # the default: rainbowd.core.sched.scheduler.DEFAULT_POLICY
    node_down_timeout = 300.0   # a target down this long fails in its running jobs
    seeder_fault_limit = 3      # transfers spoiled by bad chunks before quarantine
    log_level = "info"
    log_json = true

    [upstreams]                 # registry hosts nodes' mirrors resolve tags of (issue 17):
    "docker.io" = "mirror.internal:5000"   # host clients pull from = host images come from
                                # (coordinator/upstreams.py); unlisted hosts are not resolved
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rainbowd.core.chunks import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from rainbowd.core.sched.scheduler import DEFAULT_POLICY, POLICIES

from .state import check_url, sqlite_file
from .upstreams import Upstream, parse_upstreams

DEFAULT_LISTEN = "127.0.0.1:7700"
DEFAULT_HEARTBEAT_INTERVAL = 2.0
DEFAULT_NODE_DOWN_TIMEOUT = 300.0
DEFAULT_SEEDER_FAULT_LIMIT = 3


class ConfigError(ValueError):
    """The configuration is unusable; the message names the setting."""


@dataclass
class CoordinatorConfig:
    state_dir: Path
    #: where the state is kept: None for SQLite in ``state_dir``, else a URL
    #: (``postgresql://...`` or ``sqlite:///PATH``; coordinator/state/__init__.py)
    state_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 7700
    join_token_file: Path | None = None
    admin_token_file: Path | None = None
    metrics_token_file: Path | None = None
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    chunk_size: int = DEFAULT_CHUNK_SIZE
    policy: str = DEFAULT_POLICY
    node_down_timeout: float = DEFAULT_NODE_DOWN_TIMEOUT
    seeder_fault_limit: int = DEFAULT_SEEDER_FAULT_LIMIT
    log_level: str = "info"
    log_json: bool | None = None
    ready_file: Path | None = None
    #: this coordinator's own URL as agents and admins reach it: what the leader row
    #: names, so standbys can send clients here ("" = http://HOST:PORT as listening)
    advertise_url: str = ""
    #: registry host clients pull from -> the upstream its images are ingested from
    #: (coordinator/upstreams.py); only these hosts' tags are resolved for mirrors
    upstreams: dict[str, Upstream] = field(default_factory=dict)

    @property
    def join_token_path(self) -> Path:
        return self.join_token_file or self.state_dir / "join-token"

    @property
    def admin_token_path(self) -> Path:
        return self.admin_token_file or self.state_dir / "admin-token"

    @property
    def metrics_token_path(self) -> Path:
        return self.metrics_token_file or self.state_dir / "metrics-token"

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite database file, or None if the state is in PostgreSQL."""
        return sqlite_file(self.state_url, self.state_dir)


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"listen address {value!r} is not HOST:PORT")
    host = host.strip("[]")
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError(f"listen address {value!r}: port {port_s!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"listen address {value!r}: port out of range")
    return host, port


def load_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None


_KNOWN = {
    "listen",
    "state_dir",
    "state_url",
    "join_token_file",
    "admin_token_file",
    "metrics_token_file",
    "heartbeat_interval",
    "chunk_size",
    "policy",
    "node_down_timeout",
    "seeder_fault_limit",
    "log_level",
    "log_json",
    "ready_file",
    "advertise_url",
    "upstreams",
}


def build(file_values: dict[str, Any], overrides: dict[str, Any]) -> CoordinatorConfig:
    """Merge the file's values with flags (flags win; None means "not given")."""
    unknown = sorted(set(file_values) - _KNOWN)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    merged: dict[str, Any] = dict(file_values)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    if not merged.get("state_dir"):
        raise ConfigError("no state directory: pass --state-dir or set state_dir in the config")
    host, port = parse_listen(str(merged.get("listen", DEFAULT_LISTEN)))

    def path(key: str) -> Path | None:
        v = merged.get(key)
        return Path(str(v)) if v else None

    try:
        interval = float(merged.get("heartbeat_interval", DEFAULT_HEARTBEAT_INTERVAL))
        chunk_size = int(merged.get("chunk_size", DEFAULT_CHUNK_SIZE))
        down_timeout = float(merged.get("node_down_timeout", DEFAULT_NODE_DOWN_TIMEOUT))
        fault_limit = int(merged.get("seeder_fault_limit", DEFAULT_SEEDER_FAULT_LIMIT))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad number in config: {e}") from None
    if not 0.05 <= interval <= 3600:
        raise ConfigError(f"heartbeat_interval {interval} outside 0.05..3600 seconds")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ConfigError(f"chunk_size {chunk_size} outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    if not 0 < down_timeout <= 30 * 86400:
        raise ConfigError(f"node_down_timeout {down_timeout} outside 0..2592000 seconds")
    if fault_limit < 1:
        raise ConfigError(f"seeder_fault_limit {fault_limit} must be at least 1")
    policy = str(merged.get("policy", DEFAULT_POLICY))
    if policy not in POLICIES:
        raise ConfigError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    log_json = merged.get("log_json")
    state_url = str(merged["state_url"]) if merged.get("state_url") else None
    if state_url is not None:
        try:
            check_url(state_url)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    try:
        upstreams = parse_upstreams(merged.get("upstreams"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return CoordinatorConfig(
        upstreams=upstreams,
        state_dir=Path(str(merged["state_dir"])),
        state_url=state_url,
        host=host,
        port=port,
        join_token_file=path("join_token_file"),
        admin_token_file=path("admin_token_file"),
        metrics_token_file=path("metrics_token_file"),
        heartbeat_interval=interval,
        chunk_size=chunk_size,
        policy=policy,
        node_down_timeout=down_timeout,
        seeder_fault_limit=fault_limit,
        log_level=str(merged.get("log_level", "info")),
        log_json=None if log_json is None else bool(log_json),
        ready_file=path("ready_file"),
        advertise_url=_advertise_url(str(merged.get("advertise_url") or "")),
    )


def _advertise_url(url: str) -> str:
    """``url`` without a trailing slash; ConfigError unless it is http(s)://HOST[:PORT]."""
    if url and not (url.startswith(("http://", "https://")) and len(url.split("://", 1)[1]) > 0):
        raise ConfigError(f"advertise_url {url!r}: write http://HOST:PORT")
    return url.rstrip("/")
