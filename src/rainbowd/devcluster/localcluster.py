"""LocalCluster: a real coordinator and real agents as processes on one host.

``rbd demo`` and the integration tests use it; each process is started
exactly as systemd would start it (its console entry point, a TOML config,
its own state directory), only on loopback with ephemeral ports. Processes are
stopped by PID, never by name, and every one is reaped on :meth:`stop` even
if start-up failed half-way.

The same cluster can run spread over network namespaces (rainbowd.devcluster.netlab),
so that links can be cut and shaped per node. The hooks for that, all
optional: ``prefix_for(name)`` gives the command prefix each process is
started with (``ip netns exec <ns>``; ``name`` is "coordinator" or a node
id), ``NodeSpec.host`` the address an agent listens on and advertises,
``host``/``port`` where the coordinator listens (a fixed ``port`` is needed
when ``host`` is not an address of the test's own namespace), and
``admin_url`` how the test process reaches the coordinator when that is not
``url`` (e.g. a forwarder from loopback into the lab). Status sockets are
unix sockets on the shared file system and need no hook.

``agent_metrics=True`` turns on every agent's Prometheus endpoint (an
ephemeral port on its address); :meth:`LocalCluster.metrics_url` says where.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Self

import aiohttp

from rainbowd.agent.status import fetch_status
from rainbowd.lib.client import AdminClient

_ENTRY = {
    "coordinator": "from rainbowd.coordinator.cli import main; import sys; sys.exit(main())",
    "agent": "from rainbowd.agent.cli import main; import sys; sys.exit(main())",
}


class ClusterError(RuntimeError):
    """A process of the local cluster did not come up; the message says which and why."""


@dataclass
class NodeSpec:
    node_id: str
    roles: list[str] = field(default_factory=list)
    docker_url: str = ""
    speed_hint_mbps: float = 0.0
    download_hint_mbps: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)
    #: the address the agent listens on and advertises ("" = the cluster's host)
    host: str = ""
    #: more agent config keys (e.g. store_max_bytes, max_download_mbps), written as given
    config: dict[str, Any] = field(default_factory=dict)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class _Proc:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None


class LocalCluster:
    def __init__(
        self,
        root: Path,
        nodes: list[NodeSpec],
        *,
        host: str = "127.0.0.1",
        heartbeat_interval: float = 1.0,
        chunk_size: int = 0,
        log_level: str = "info",
        port: int = 0,
        admin_url: str = "",
        prefix_for: Callable[[str], Sequence[str]] | None = None,
        policy: str = "",
        agent_metrics: bool = False,
        state_url: str = "",
        coordinator_config: dict[str, Any] | None = None,
    ) -> None:
        self.root = Path(root)
        self.nodes = {n.node_id: n for n in nodes}
        self.host = host
        self.heartbeat_interval = heartbeat_interval
        self.chunk_size = chunk_size
        self.log_level = log_level
        self.port = port
        self._admin_url = admin_url
        self.prefix_for = prefix_for
        self.policy = policy
        self.agent_metrics = agent_metrics
        #: the coordinator's --state-url ("" = SQLite in its state dir)
        self.state_url = state_url
        #: written as the coordinator's --config (keys the flags do not set: upstreams)
        self.coordinator_config = coordinator_config or {}
        self.join_token = secrets.token_urlsafe(24)
        self.admin_token = secrets.token_urlsafe(24)
        self._procs: dict[str, _Proc] = {}

    # -- paths -----------------------------------------------------------
    @property
    def url(self) -> str:
        """The coordinator's URL as the agents see it."""
        return f"http://{self.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        """The coordinator's URL as the test process sees it (``url`` unless told otherwise)."""
        return self._admin_url or self.url

    @property
    def coordinator_dir(self) -> Path:
        return self.root / "coordinator"

    @property
    def admin_token_file(self) -> Path:
        return self.coordinator_dir / "admin-token"

    def agent_dir(self, node_id: str) -> Path:
        return self.root / "agents" / node_id

    def agent_config(self, node_id: str) -> Path:
        return self.agent_dir(node_id) / "agent.toml"

    def status_socket(self, node_id: str) -> Path:
        return self.agent_dir(node_id) / "agent.sock"

    def log_path(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def admin(self) -> AdminClient:
        return AdminClient(self.admin_url, self.admin_token)

    # -- lifecycle -------------------------------------------------------
    async def start(self, timeout: float = 60.0) -> None:
        try:
            await self.start_coordinator(timeout)
            for node_id in self.nodes:
                self.start_agent(node_id)
            await self.wait_nodes_up(list(self.nodes), timeout)
        except BaseException:
            await self.stop()
            raise

    async def start_coordinator(self, timeout: float = 30.0) -> None:
        d = self.coordinator_dir
        d.mkdir(parents=True, exist_ok=True)
        join_file = d / "join-token"
        _write_secret(join_file, self.join_token)
        _write_secret(self.admin_token_file, self.admin_token)
        if not self.port:
            self.port = free_port(self.host)
        argv = [
            "--listen",
            f"{self.host}:{self.port}",
            "--state-dir",
            str(d),
            "--join-token-file",
            str(join_file),
            "--admin-token-file",
            str(self.admin_token_file),
            "--heartbeat-interval",
            str(self.heartbeat_interval),
            "--log-level",
            self.log_level,
            "--log-json",
        ]
        if self.chunk_size:
            argv += ["--chunk-size", str(self.chunk_size)]
        if self.policy:
            argv += ["--policy", self.policy]
        if self.state_url:
            argv += ["--state-url", self.state_url]
        if self.coordinator_config:
            conf = d / "coordinator.toml"
            conf.write_text(_toml(self.coordinator_config))
            argv += ["--config", str(conf)]
        self._spawn("coordinator", "coordinator", argv)
        await self._wait_health(timeout)

    def start_agent(self, node_id: str) -> None:
        spec = self.nodes[node_id]
        d = self.agent_dir(node_id)
        d.mkdir(parents=True, exist_ok=True)
        cfg = {
            "node_id": node_id,
            "coordinator_url": self.url,
            "join_token_file": str(self.coordinator_dir / "join-token"),
            "state_dir": str(d),
            "listen_address": spec.host or self.host,
            "advertise_address": spec.host or self.host,
            "ssh_port": 0,
            "roles": spec.roles,
            "labels": spec.labels,
            "docker_url": spec.docker_url,
            "speed_hint_mbps": spec.speed_hint_mbps,
            "download_hint_mbps": spec.download_hint_mbps,
            "status_socket": str(self.status_socket(node_id)),
            "log_level": self.log_level,
            **spec.config,
        }
        if self.agent_metrics:
            cfg["metrics_listen"] = f"{spec.host or self.host}:0"
        self.agent_config(node_id).write_text(_toml(cfg))
        self._spawn(
            node_id, "agent", ["run", "--config", str(self.agent_config(node_id)), "--log-json"]
        )

    def _spawn(self, name: str, kind: str, args: list[str]) -> None:
        log_path = self.log_path(name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        prefix = list(self.prefix_for(name)) if self.prefix_for is not None else []
        proc = _Proc(name, [*prefix, sys.executable, "-c", _ENTRY[kind], *args], log_path)
        proc.log_file = open(log_path, "ab")
        proc.popen = subprocess.Popen(
            proc.argv,
            stdout=proc.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=die_with_parent,
        )
        self._procs[name] = proc

    def pid(self, name: str) -> int:
        p = self._procs[name].popen
        assert p is not None
        return p.pid

    def running(self, name: str) -> bool:
        p = self._procs.get(name)
        return p is not None and p.popen is not None and p.popen.poll() is None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one process (by PID) and reap it."""
        proc = self._procs.pop(name)
        assert proc.popen is not None
        if proc.popen.poll() is None:
            proc.popen.send_signal(sig)
            try:
                proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        if proc.log_file is not None:
            proc.log_file.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """SIGTERM every process (agents first), then SIGKILL what lingers."""
        names = [n for n in self._procs if n != "coordinator"]
        if "coordinator" in self._procs:
            names.append("coordinator")
        for name in names:
            p = self._procs[name].popen
            if p is not None and p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for name in names:
            p = self._procs[name].popen
            while p is not None and p.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110 (polling a child process)
                await asyncio.sleep(0.05)
        for name in names:
            self.kill(name, signal.SIGKILL)

    def exit_code(self, name: str) -> int | None:
        p = self._procs[name].popen
        return None if p is None else p.poll()

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path(name).read_text().splitlines()[-lines:])
        except OSError:
            return ""

    async def _wait_health(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if not self.running("coordinator"):
                    raise ClusterError(
                        "rbd-coordinator exited at start:\n" + self.log_tail("coordinator")
                    )
                try:
                    async with session.get(f"{self.admin_url}/v1/health") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise ClusterError(f"rbd-coordinator did not answer on {self.admin_url} in {timeout:.0f}s")

    async def wait_nodes_up(self, node_ids: list[str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        async with self.admin() as admin:
            while True:
                for n in node_ids:
                    if not self.running(n):
                        raise ClusterError(f"rbd-agent {n} exited at start:\n" + self.log_tail(n))
                up = {v.node_id for v in (await admin.nodes()).nodes if v.state == "up"}
                if set(node_ids) <= up:
                    return
                if time.monotonic() > deadline:
                    missing = sorted(set(node_ids) - up)
                    raise ClusterError(f"agents not up after {timeout:.0f}s: {missing}")
                await asyncio.sleep(0.1)

    async def agent_status(self, node_id: str) -> dict[str, Any]:
        return await fetch_status(self.status_socket(node_id))

    async def metrics_url(self, node_id: str) -> str:
        """Where the agent's GET /metrics listens (needs ``agent_metrics=True``)."""
        url = str((await self.agent_status(node_id)).get("metrics_url", ""))
        if not url:
            raise ClusterError(f"agent {node_id} has no metrics endpoint (agent_metrics=False?)")
        return url


def die_with_parent() -> None:
    """For ``preexec_fn``: the child gets SIGKILL when its parent dies (``PR_SET_PDEATHSIG``).

    Kept across exec (also ``ip netns exec``'s), so a cluster whose runner
    was killed with SIGKILL does not live on without an owner.
    """
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def _write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


def _toml(cfg: dict[str, Any]) -> str:
    """A flat TOML document (strings, numbers, booleans, lists of strings, one-level tables
    whose values may be inline tables of those)."""
    import json

    def value(v: Any) -> str:
        if isinstance(v, dict):  # an inline table: { "k" = v, ... }
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)  # (JSON's strings, numbers, true/false and lists read as TOML)

    lines, tables = [], []
    for k, v in cfg.items():
        if isinstance(v, dict):
            tables.append(f"\n[{k}]")
            # keys quoted: a bare docker.io would be a dotted key
            tables += [f"{json.dumps(tk)} = {value(tv)}" for tk, tv in v.items()]
        else:
            lines.append(f"{k} = {value(v)}")
    return "\n".join(lines + tables) + "\n"
