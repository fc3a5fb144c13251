"""Nodes of the cluster and the trust list the coordinator pushes to agents.

This is bookkeeping only (no scheduling, no I/O): who is enrolled, how to
reach and authenticate each node over SSH, who is up, who is quarantined,
what each holds. The trust list is every enrolled, non-quarantined node; its
version rises on every change so agents can tell they are out of date.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rainbowd.core.messages import NodeView, PeerInfo, TrustList

from .mailbox import Mailbox
from .state import StoredNode

#: a node is down after this many heartbeat intervals without a heartbeat
MISSED_HEARTBEATS = 3


@dataclass
class Node:
    """One enrolled node: its persisted identity plus what it last reported."""

    info: StoredNode
    mailbox: Mailbox
    up: bool = False
    last_seen: float = 0.0
    load: float = 0.0
    disk_free: int = 0
    disk_used: int = 0
    holdings: set[str] = field(default_factory=set)
    #: layer -> when it was recorded as held (coordinator/holdings.py: a heartbeat built
    #: before that moment may not list it yet); absent = recorded before this run
    holding_since: dict[str, float] = field(default_factory=dict)
    down_since: float = 0.0  # when it last went down (restored nodes: the restart)
    epoch: int = 0  # registrations this run: a dropped poll of an older agent process is stale
    polls: int = 0  # long-polls of this node waiting right now
    # transfer id -> (layer, seeder) as its last heartbeat listed them (to read late reports)
    reported_active: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def node_id(self) -> str:
        return self.info.node_id

    @property
    def quarantined(self) -> bool:
        return self.info.quarantined

    @property
    def usable(self) -> bool:
        """Up and not quarantined: a node work may be given to now."""
        return self.up and not self.info.quarantined

    @property
    def docker(self) -> bool:
        return self.info.docker

    @property
    def containerd(self) -> bool:
        return self.info.containerd

    @property
    def mirror(self) -> bool:
        return self.info.mirror

    def peer(self) -> PeerInfo:
        i = self.info
        return PeerInfo(
            node_id=i.node_id,
            address=i.address,
            ssh_port=i.ssh_port,
            host_key=i.host_key,
            client_key=i.client_key,
        )

    def stored(self) -> StoredNode:
        """The persisted form, with current holdings and last-seen time."""
        self.info.holdings = sorted(self.holdings)
        self.info.last_seen = self.last_seen
        return self.info

    def view(self, speed_bps: float, busy: bool, suspect: bool = False) -> NodeView:
        """``state`` is "down" while it is down or suspect (given no work until it reports)."""
        i = self.info
        return NodeView(
            node_id=i.node_id,
            address=i.address,
            ssh_port=i.ssh_port,
            roles=list(i.roles),
            labels=dict(i.labels),
            docker=i.docker,
            state="up" if self.up and not suspect else "down",
            speed_bps=speed_bps,
            holdings=len(self.holdings),
            load=self.load,
            disk_free=self.disk_free,
            disk_used=self.disk_used,
            busy=busy,
            last_seen=self.last_seen,
            quarantined=i.quarantined,
            quarantine_reason=i.quarantine_reason,
            suspect=suspect,
            containerd=i.containerd,
            mirror=i.mirror,
        )


class Cluster:
    """Enrolled nodes and the versioned trust list."""

    def __init__(self, trust_version: int = 0) -> None:
        self.nodes: dict[str, Node] = {}
        self.trust_version = trust_version
        self._trust: TrustList | None = None

    def add(self, info: StoredNode, seq: int = 0) -> Node:
        node = Node(info=info, mailbox=Mailbox(seq), holdings=set(info.holdings))
        node.last_seen = info.last_seen
        self.nodes[info.node_id] = node
        return node

    def get(self, node_id: str) -> Node | None:
        return self.nodes.get(node_id)

    def usable(self, node_id: str) -> bool:
        """``node_id`` is enrolled, up and not quarantined."""
        node = self.nodes.get(node_id)
        return node is not None and node.usable

    def remove(self, node_id: str) -> None:
        self.nodes.pop(node_id, None)

    def origins(self) -> list[str]:
        """Ids of usable nodes with the origin role, sorted."""
        return sorted(
            n.node_id for n in self.nodes.values() if "origin" in n.info.roles and not n.quarantined
        )

    # -- trust -----------------------------------------------------------
    def trust(self) -> TrustList:
        if self._trust is None or self._trust.version != self.trust_version:
            trusted = [self.nodes[nid] for nid in sorted(self.nodes)]
            peers = [n.peer() for n in trusted if not n.quarantined]
            self._trust = TrustList(version=self.trust_version, peers=peers)
        return self._trust

    def trust_changed(self) -> None:
        """The set of trusted peers (or one's keys/address) changed: bump and wake all polls."""
        self.trust_version += 1
        self._trust = None
        for node in self.nodes.values():
            node.mailbox.wake()

    def stale(self, now: float, interval: float) -> list[Node]:
        """Up nodes that missed MISSED_HEARTBEATS heartbeats."""
        limit = MISSED_HEARTBEATS * interval
        return [n for n in self.nodes.values() if n.up and now - n.last_seen > limit]
