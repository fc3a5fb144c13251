"""AgentStatus: everything ``rbd-agent status`` prints, gathered as plain data.

Its own concern: which parts of the agent the status JSON reads and how it
names them. The status socket (status.py) serves what this returns and
renders it for people; the agent only hands over its parts.
"""

from __future__ import annotations

import os
import time
from typing import Any

import asyncssh

from rainbowd.agent.config import AgentConfig
from rainbowd.agent.control.report_sender import ReportSender
from rainbowd.agent.dataplane.keys import public_line
from rainbowd.agent.dataplane.relay import RelayBoard
from rainbowd.agent.dataplane.ssh_server import ChunkServer
from rainbowd.agent.hygiene import StoreHygiene
from rainbowd.agent.mirror.catalog import ImageCatalog
from rainbowd.agent.mirror.server import MirrorServer
from rainbowd.agent.view import AgentView
from rainbowd.lib.client import AgentClient
from rainbowd.lib.store import LayerStore, StoreError


class AgentStatus:
    """The status snapshot of one agent, read from its parts on each call."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        api: AgentClient,
        store: LayerStore,
        view: AgentView,
        host_key: asyncssh.SSHKey,
        server: ChunkServer,
        relay: RelayBoard,
        hygiene: StoreHygiene,
        reports: ReportSender,
        catalog: ImageCatalog,
        mirror: MirrorServer | None,
    ) -> None:
        self.config = config
        self.api = api
        self.store = store
        self.view = view
        self.host_key = host_key
        self.server = server
        self.relay = relay
        self.hygiene = hygiene
        self.reports = reports
        self.catalog = catalog
        self.mirror = mirror

    def snapshot(self, *, ssh_port: int, metrics_url: str) -> dict[str, Any]:
        """Everything ``rbd-agent status`` prints, as plain data."""
        cfg = self.config
        view = self.view
        holdings = []
        for d in self.store.holdings():
            try:
                holdings.append({"digest": d, "size": self.store.size(d)})
            except StoreError:
                continue
        now = time.time()
        return {
            "node_id": cfg.node_id,
            "pid": os.getpid(),
            "coordinator": {
                # the one asked first: the leader once one answered
                "url": self.api.base_url,
                "urls": list(cfg.coordinator_urls),
                "registered": view.registered,
                "last_contact_age": (now - view.last_contact) if view.last_contact else None,
                # the contact's own time: a watcher tells one contact from the next exactly
                "last_contact_at": view.last_contact or None,
                "connected": bool(view.last_contact)
                and now - view.last_contact < max(30.0, 3 * view.heartbeat_interval),
                "last_error": view.last_error,
                "trust_version": view.trust_version,
            },
            "ssh": {
                "address": cfg.advertised(),
                "port": ssh_port,
                "host_key": public_line(self.host_key),
            },
            "roles": cfg.roles,
            "docker_url": cfg.docker_url,
            "containerd": {"address": cfg.containerd_address, "namespace": cfg.containerd_namespace}
            if cfg.containerd_address
            else None,
            "holdings": holdings,
            "partials": [
                {"digest": d, "have": have, "count": n} for d, have, n in self.store.partials()
            ],
            "images": [{"ref": r, "loaded_at": t} for r, t in sorted(view.images.items())],
            "active": [
                {
                    "transfer_id": w.transfer_id,
                    "layer": w.layer,
                    "seeder": w.seeder,
                    "bytes_done": w.bytes_done,
                    "bytes_total": w.bytes_total,
                    "rate_bps": w.rate_bps,
                    "seconds": now - w.started,
                }
                for w in view.pulling()
            ],
            # pulls ended whose report the coordinator has not taken yet
            "reporting": view.reporting_transfers(),
            "disk": {"used": self.store.bytes_used(), "free": self.store.bytes_free()},
            "metrics_url": metrics_url,
            "mirror_url": self.mirror.url if self.mirror is not None else "",
            # ref -> manifest digest the front door serves (pull REPO@DIGEST from it)
            "mirror_images": dict(sorted(self.catalog.recorded.items())),
            "store": self.hygiene.status(),
            "served_bytes": dict(self.server.bytes_served),
            "relayed_chunks": self.relay.relayed_chunks,
            "corrupt_layers": dict(self.server.corrupt_layers),
            "refused_clients": len(self.server.refused_clients),
            "ssh_refused": dict(self.server.gate.refused),
            # idle peer connections closed to admit another peer at the limit (ssh_limits.py)
            "ssh_idle_closed": self.server.gate.evicted,
            # peers with an authenticated SSH connection open now, and how many each
            "ssh_peers": dict(self.server.gate.per_peer),
            "reports": {
                "sent": self.reports.sent,
                "retries": self.reports.retries,
                "refused": self.reports.refused,
                "lost": self.reports.lost,
            },
            "origin_reads": view.origin_reads,
            "security_events": list(view.security_events),
        }
