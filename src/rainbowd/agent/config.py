"""AgentConfig: every option of rbd-agent, read from TOML, explicit defaults.

The keys are documented with examples in deploy/config/agent.example.toml.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import msgspec

from rainbowd.core.eviction import DEFAULT_HIGH_WATERMARK, DEFAULT_LOW_WATERMARK
from rainbowd.core.units import SizeError, parse_size
from rainbowd.lib.coordinators import CoordinatorListError, parse_urls

from .control.report_sender import DEFAULT_REPORT_RETRY_SECONDS, MAX_REPORT_RETRY_SECONDS
from .dataplane.ssh_limits import SshLimits

#: the registry a front-door pull names when its client does not say (Docker's mirrors)
DEFAULT_MIRROR_REGISTRY = "docker.io"
#: seconds a tag resolution may take: short, since containerd and Docker wait for it
#: before falling back to their upstream, and a healthy coordinator answers in ms
DEFAULT_MIRROR_RESOLVE_TIMEOUT = 2.0
#: the longest mirror_resolve_timeout taken (a client's own request times out near it)
MAX_MIRROR_RESOLVE_TIMEOUT = 30.0
#: seconds without progress after which a front door gives up getting an image it lacks
#: and answers 404, so the client pulls from its upstream (agent/mirror/pull_on_miss.py).
#: Progress is any new chunk of the image's layers: a slow steady pull is never cut short
DEFAULT_MIRROR_PULL_STALL_S = 30.0
#: the longest mirror_pull_stall_seconds taken (a client holds its request meanwhile)
MAX_MIRROR_PULL_STALL_S = 600.0
#: a registry host as references write it: name or IPv4 or [IPv6], optional port
_REGISTRY_HOST = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")


class ConfigError(ValueError):
    """The agent configuration is unusable; the message says which key and why."""


#: the CRI plugin's namespace (what the kubelet sees); see AgentConfig.containerd_namespace
DEFAULT_CONTAINERD_NAMESPACE = "k8s.io"
#: a unix socket path is at most 107 bytes (sun_path is 108 with its NUL)
MAX_SOCKET_PATH = 107
#: containerd's own rule for a namespace (and the one we apply to a snapshotter name):
#: alphanumerics joined by single '.', '_' or '-', at most 76 characters
_CONTAINERD_IDENT = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")
MAX_CONTAINERD_IDENT = 76


@dataclass(frozen=True)
class AgentConfig:
    node_id: str
    #: every coordinator of the cluster (config ``coordinator_url``: one URL or a list);
    #: the agent follows whichever leads (lib/coordinators.py)
    coordinator_urls: tuple[str, ...]
    state_dir: Path
    join_token_file: Path | None = None
    listen_address: str = "0.0.0.0"
    advertise_address: str = ""  # "" = this host's name resolved, or 127.0.0.1
    ssh_port: int = 7722
    roles: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    docker_url: str = ""  # "" = no Docker engine on this host
    #: containerd's socket (its [grpc] address), a load target beside Docker
    #: (agent/containerd/loader.py); "" = off: no containerd on this host
    containerd_address: str = ""
    #: the containerd namespace images are loaded into. k8s.io by default: it is the
    #: one the CRI plugin (the kubelet's view) lists and runs images from, and most
    #: containerd hosts are Kubernetes nodes; "default" is where plain ctr and
    #: nerdctl look
    containerd_namespace: str = DEFAULT_CONTAINERD_NAMESPACE
    #: the snapshotter an import unpacks into; "" = containerd's default (overlayfs),
    #: which is also the CRI's. Set it only when containerd runs another one
    containerd_snapshotter: str = ""
    speed_hint_mbps: float = 0.0
    #: download speed in Mbit/s, for asymmetric links (0 = unknown: speed_hint_mbps)
    download_hint_mbps: float = 0.0
    status_socket: Path | None = None
    log_level: str = "info"
    #: seconds to wait for the coordinator on each request
    request_timeout: float = 10.0
    #: seconds a long-poll for assignments may hang at the coordinator
    poll_wait: float = 25.0
    #: check each chunk against the manifest before serving it (catches a blob
    #: that rotted on this disk before a peer downloads it)
    verify_served: bool = True
    #: cap on the bytes/s this agent serves to peers, in Mbit/s (0 = no cap)
    max_upload_mbps: float = 0.0
    #: HOST:PORT of the Prometheus endpoint (GET /metrics); "" = off, the default:
    #: an operator opts in and picks the interface, and several agents on one
    #: host (tests, labs) do not fight over one port. 9465 is the suggested port.
    metrics_listen: str = ""
    #: file with a bearer token GET /metrics then requires (None = no token)
    metrics_token_file: Path | None = None
    #: HOST:PORT of the registry front door (agent/mirror/: the OCI distribution read
    #: API over the images this node holds); "" = off, the default here for the same
    #: reason as metrics_listen (several agents on one host would fight over one
    #: port); deploy/config/agent.example.toml turns it on at 127.0.0.1:5000, loopback:
    #: it answers without authentication, for the container runtimes of this host
    mirror_listen: str = ""
    #: the registry a pull through the front door names when the client does not say
    #: (containerd sends ``?ns=<host>``; Docker's ``registry-mirrors`` are for Docker Hub,
    #: and ``docker pull localhost:PORT/repo:tag`` names no upstream): its tags resolve
    #: through the coordinator's ``[upstreams]`` entry for it (coordinator/upstreams.py)
    mirror_registry: str = DEFAULT_MIRROR_REGISTRY
    #: seconds the front door waits for the coordinator to resolve a tag; past it the
    #: answer is 404 and the client goes to its upstream itself (issue 17 item 4)
    mirror_resolve_timeout: float = DEFAULT_MIRROR_RESOLVE_TIMEOUT
    #: seconds a front door's miss of an image the coordinator knows may go without progress
    #: while the node gets it by P2P (0 = never: a miss is a 404 at once); then 404
    mirror_pull_stall_seconds: float = DEFAULT_MIRROR_PULL_STALL_S
    #: cap on the bytes/s this agent pulls from peers, in Mbit/s (0 = no cap)
    max_download_mbps: float = 0.0
    #: most bytes rbd's own store files may take (0 = no limit); see rainbowd.core.eviction
    store_max_bytes: int = 0
    #: above this fraction of store_max_bytes, least recently used layers are evicted ...
    store_high_watermark: float = DEFAULT_HIGH_WATERMARK
    #: ... until the store is back under this fraction
    store_low_watermark: float = DEFAULT_LOW_WATERMARK
    #: SSH server limits (agent/dataplane/ssh_limits.py says why each exists): authenticated
    #: connections in total, per peer (client key), chunk channels per connection,
    #: connections not yet authenticated, and seconds allowed to authenticate
    ssh_max_connections: int = SshLimits.max_connections
    ssh_max_connections_per_peer: int = SshLimits.max_connections_per_peer
    ssh_max_channels_per_connection: int = SshLimits.max_channels_per_connection
    ssh_max_pending: int = SshLimits.max_pending
    ssh_login_timeout: float = SshLimits.login_timeout
    #: how long a final report (transfer/op/ingest/load) is retried on connection
    #: errors and 5xx before it is given up (logged as lost); see agent/control/report_sender.py
    report_retry_seconds: float = DEFAULT_REPORT_RETRY_SECONDS

    def ssh_limits(self) -> SshLimits:
        return SshLimits(
            max_connections=self.ssh_max_connections,
            max_connections_per_peer=self.ssh_max_connections_per_peer,
            max_channels_per_connection=self.ssh_max_channels_per_connection,
            max_pending=self.ssh_max_pending,
            login_timeout=self.ssh_login_timeout,
        )

    @property
    def coordinator_url(self) -> str:
        """The first configured coordinator (the only one of a single-coordinator cluster)."""
        return self.coordinator_urls[0]

    @property
    def store_dir(self) -> Path:
        return self.state_dir / "store"

    @property
    def mirror_dir(self) -> Path:
        """Manifests and configs the registry front door serves (agent/mirror/catalog.py)."""
        return self.state_dir / "mirror"

    @property
    def keys_dir(self) -> Path:
        return self.state_dir / "keys"

    @property
    def credential_file(self) -> Path:
        return self.state_dir / "credential"

    @property
    def status_path(self) -> Path:
        return self.status_socket or self.state_dir / "agent.sock"

    def advertised(self) -> str:
        if self.advertise_address:
            return self.advertise_address
        if self.listen_address not in ("0.0.0.0", "::", ""):
            return self.listen_address
        return socket.getfqdn()

    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) of the metrics endpoint, or None when it is off."""
        return _host_port(self.metrics_listen) if self.metrics_listen else None

    def mirror_address(self) -> tuple[str, int] | None:
        """(host, port) of the registry front door, or None when it is off."""
        if not self.mirror_listen:
            return None
        return _host_port(self.mirror_listen, "mirror_listen", MIRROR_EXAMPLE)

    def metrics_token(self) -> str:
        """The token GET /metrics requires ("" = none); a configured file must hold one."""
        if self.metrics_token_file is None:
            return ""
        try:
            token = self.metrics_token_file.read_text().strip()
        except OSError as e:
            raise ConfigError(
                f"metrics_token_file {self.metrics_token_file}: {e.strerror}"
            ) from None
        if not token:
            raise ConfigError(
                f"metrics_token_file {self.metrics_token_file} is empty; put a token in it "
                'or set metrics_token_file = ""'
            )
        return token

    def join_token(self) -> str:
        if self.join_token_file is None:
            return ""
        try:
            return self.join_token_file.read_text().strip()
        except OSError as e:
            raise ConfigError(f"join_token_file {self.join_token_file}: {e.strerror}") from None


class _Raw(msgspec.Struct, forbid_unknown_fields=True):
    node_id: str
    coordinator_url: str | list[str]
    state_dir: str
    join_token_file: str = ""
    listen_address: str = "0.0.0.0"
    advertise_address: str = ""
    ssh_port: int = 7722
    roles: list[str] = []
    labels: dict[str, str] = {}
    docker_url: str = ""
    containerd_address: str = ""
    containerd_namespace: str = DEFAULT_CONTAINERD_NAMESPACE
    containerd_snapshotter: str = ""
    speed_hint_mbps: float = 0.0
    download_hint_mbps: float = 0.0
    status_socket: str = ""
    log_level: str = "info"
    request_timeout: float = 10.0
    poll_wait: float = 25.0
    verify_served: bool = True
    max_upload_mbps: float = 0.0
    metrics_listen: str = ""
    metrics_token_file: str = ""
    mirror_listen: str = ""
    mirror_registry: str = DEFAULT_MIRROR_REGISTRY
    mirror_resolve_timeout: float = DEFAULT_MIRROR_RESOLVE_TIMEOUT
    mirror_pull_stall_seconds: float = DEFAULT_MIRROR_PULL_STALL_S
    max_download_mbps: float = 0.0
    store_max_bytes: int | str = 0
    store_high_watermark: float = DEFAULT_HIGH_WATERMARK
    store_low_watermark: float = DEFAULT_LOW_WATERMARK
    ssh_max_connections: int = SshLimits.max_connections
    ssh_max_connections_per_peer: int = SshLimits.max_connections_per_peer
    ssh_max_channels_per_connection: int = SshLimits.max_channels_per_connection
    ssh_max_pending: int = SshLimits.max_pending
    ssh_login_timeout: float = SshLimits.login_timeout
    report_retry_seconds: float = DEFAULT_REPORT_RETRY_SECONDS


KNOWN_ROLES = {"origin"}
#: the largest link-speed hint taken (Mbit/s): 10 Tbit/s, far above any NIC, finite
MAX_HINT_MBPS = 1e7


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> AgentConfig:
    """Read ``path`` (TOML); ``overrides`` (from CLI flags) win over the file."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} not found; copy deploy/config/agent.example.toml"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    data.update(env_overrides())
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        raw = msgspec.convert(data, _Raw)
    except msgspec.ValidationError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    return _from_raw(raw)


#: prefix of environment variables that override scalar config keys
ENV_PREFIX = "RBD_AGENT_"
_ENV_KEYS: dict[str, type] = {
    "verify_served": bool,
    "max_upload_mbps": float,
    "max_download_mbps": float,
    "request_timeout": float,
    "poll_wait": float,
    "log_level": str,
    "ssh_login_timeout": float,
    "report_retry_seconds": float,
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Config keys set as ``RBD_AGENT_<KEY>`` in the environment (between file and flags).

    Only tuning keys are read this way (not identity or trust: node_id, URLs,
    tokens stay in the file), so a systemd drop-in ``Environment=`` can tune
    one host, and tests can tune agents a LocalCluster starts, without
    rewriting configs. Values are parsed by the key's type.
    """
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for key, kind in _ENV_KEYS.items():
        name = ENV_PREFIX + key.upper()
        value = env.get(name, "").strip()
        if not value:
            continue
        if kind is bool:
            if value.lower() not in _TRUE | _FALSE:
                raise ConfigError(f"{name}={value!r}: use true or false")
            out[key] = value.lower() in _TRUE
        elif kind is float:
            try:
                out[key] = float(value)
            except ValueError:
                raise ConfigError(f"{name}={value!r}: not a number") from None
        else:
            out[key] = value
    return out


def _store_limits(raw: _Raw) -> int:
    """``store_max_bytes`` in bytes, after checking it and the watermarks."""
    try:
        max_bytes = parse_size(raw.store_max_bytes)
    except SizeError as e:
        raise ConfigError(f"store_max_bytes: {e}; 0 = no limit") from None
    high, low = raw.store_high_watermark, raw.store_low_watermark
    if not 0 < high <= 1:
        raise ConfigError(f"store_high_watermark {high}: must be a fraction in (0, 1]")
    if not 0 < low < high:
        raise ConfigError(
            f"store_low_watermark {low}: must be > 0 and below store_high_watermark {high}"
        )
    return max_bytes


def _from_raw(raw: _Raw) -> AgentConfig:
    if not raw.node_id or not all(c.isalnum() or c in "-_." for c in raw.node_id):
        raise ConfigError(f"node_id {raw.node_id!r}: use letters, digits, '-', '_' or '.'")
    try:
        urls = parse_urls(raw.coordinator_url, "coordinator_url")
    except CoordinatorListError as e:
        raise ConfigError(str(e)) from None
    if not 0 <= raw.ssh_port <= 65535:
        raise ConfigError(f"ssh_port {raw.ssh_port}: must be 0..65535")
    if raw.max_upload_mbps < 0:
        raise ConfigError(f"max_upload_mbps {raw.max_upload_mbps}: must be >= 0 (0 = no cap)")
    if raw.metrics_listen:
        _host_port(raw.metrics_listen)
    if raw.mirror_listen:
        _host_port(raw.mirror_listen, "mirror_listen", MIRROR_EXAMPLE)
    if not _REGISTRY_HOST.match(raw.mirror_registry):
        raise ConfigError(
            f"mirror_registry {raw.mirror_registry!r}: a registry HOST[:PORT], e.g. docker.io"
        )
    if not 0 < raw.mirror_resolve_timeout <= MAX_MIRROR_RESOLVE_TIMEOUT:  # False for NaN
        raise ConfigError(
            f"mirror_resolve_timeout {raw.mirror_resolve_timeout}: must be seconds in "
            f"(0, {MAX_MIRROR_RESOLVE_TIMEOUT:g}] (a client waits this long before its upstream)"
        )
    if not 0 <= raw.mirror_pull_stall_seconds <= MAX_MIRROR_PULL_STALL_S:  # False for NaN
        raise ConfigError(
            f"mirror_pull_stall_seconds {raw.mirror_pull_stall_seconds}: must be seconds in "
            f"[0, {MAX_MIRROR_PULL_STALL_S:g}] (0: a miss is answered 404 at once)"
        )
    _check_containerd(raw)
    for key in ("max_upload_mbps", "max_download_mbps"):
        if getattr(raw, key) < 0:
            raise ConfigError(f"{key} {getattr(raw, key)}: must be >= 0 (0 = no cap)")
    for key in ("speed_hint_mbps", "download_hint_mbps"):
        value = getattr(raw, key)
        if not 0 <= value <= MAX_HINT_MBPS:  # also false for NaN
            raise ConfigError(f"{key} {value}: must be 0..{MAX_HINT_MBPS:g} Mbit/s (0 = unknown)")
    try:
        _ssh_limits(raw).check()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not 1 <= raw.report_retry_seconds <= MAX_REPORT_RETRY_SECONDS:
        raise ConfigError(
            f"report_retry_seconds {raw.report_retry_seconds}: must be seconds in "
            f"1..{MAX_REPORT_RETRY_SECONDS:.0f}"
        )
    unknown = set(raw.roles) - KNOWN_ROLES
    if unknown:
        raise ConfigError(f"roles: unknown {sorted(unknown)}; known: {sorted(KNOWN_ROLES)}")
    kw: dict[str, Any] = {
        f.name: getattr(raw, f.name) for f in fields(AgentConfig) if f.name != "coordinator_urls"
    }
    kw["coordinator_urls"] = urls
    kw["store_max_bytes"] = _store_limits(raw)
    kw["containerd_address"] = raw.containerd_address.removeprefix("unix://")
    kw["state_dir"] = Path(raw.state_dir)
    kw["join_token_file"] = Path(raw.join_token_file) if raw.join_token_file else None
    kw["status_socket"] = Path(raw.status_socket) if raw.status_socket else None
    kw["metrics_token_file"] = Path(raw.metrics_token_file) if raw.metrics_token_file else None
    return AgentConfig(**kw)


def _check_containerd(raw: _Raw) -> None:
    """The containerd keys: an absolute socket path (or ""), and names containerd accepts."""
    address = raw.containerd_address.removeprefix("unix://")
    if address and (
        not address.startswith("/") or len(address.encode()) > MAX_SOCKET_PATH or "\0" in address
    ):
        raise ConfigError(
            f"containerd_address {raw.containerd_address!r}: use the absolute path of "
            f"containerd's socket (at most {MAX_SOCKET_PATH} bytes), e.g. "
            f'"/run/containerd/containerd.sock", or "" for no containerd'
        )
    for key in ("containerd_namespace", "containerd_snapshotter"):
        value = getattr(raw, key)
        if key == "containerd_snapshotter" and not value:
            continue  # containerd's default
        if len(value) > MAX_CONTAINERD_IDENT or not _CONTAINERD_IDENT.match(value):
            raise ConfigError(
                f"{key} {value!r}: use letters and digits joined by '.', '_' or '-' "
                f"(at most {MAX_CONTAINERD_IDENT}), e.g. "
                + ('"k8s.io" or "default"' if key == "containerd_namespace" else '"overlayfs"')
            )


def _ssh_limits(raw: _Raw) -> SshLimits:
    return SshLimits(
        max_connections=raw.ssh_max_connections,
        max_connections_per_peer=raw.ssh_max_connections_per_peer,
        max_channels_per_connection=raw.ssh_max_channels_per_connection,
        max_pending=raw.ssh_max_pending,
        login_timeout=raw.ssh_login_timeout,
    )


#: the example each listen key's error shows
METRICS_EXAMPLE = "127.0.0.1:9465"
MIRROR_EXAMPLE = "127.0.0.1:5000"


def _host_port(
    value: str, key: str = "metrics_listen", example: str = METRICS_EXAMPLE
) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) of a listen key; ConfigError names the key."""
    host, sep, port_s = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        what = "metrics endpoint" if key == "metrics_listen" else "registry front door"
        raise ConfigError(
            f'{key} {value!r}: use HOST:PORT, e.g. "{example}" (or "" to turn the {what} off)'
        )
    return host, int(port_s)
