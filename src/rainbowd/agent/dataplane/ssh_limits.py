"""How many SSH connections and channels the agent's chunk server lets in, and why.

A node's SSH port is open to the network, so whoever can reach it can make it
hold sockets: idle TCP connections that never finish the handshake, trusted
peers opening connection after connection, or channel after channel on one
connection. Each costs a file descriptor and memory; with no bound, 300 idle
TCP connections were enough to make an agent run out of descriptors and exit
("Too many open files" in its heartbeat path). These limits bound all of it:

``max_connections``
    authenticated peer connections in total. A demander keeps one cached
    connection per seeder (its most recent ones: agent/dataplane/seeder_connections.py),
    so this is roughly "peers pulling from me, or likely to again". At the limit
    a newly authenticated peer is not refused while some connection is idle (no
    chunk channel open): the one idle longest is closed to make room
    (:meth:`ConnectionGate.full_for`; counted in :attr:`ConnectionGate.evicted`).
    Without that, in a cluster of more nodes than the limit a seeder held the
    idle connections of the first 256 demanders it served and refused every
    later one for good.
``max_connections_per_peer``
    authenticated connections of one peer (one client key, i.e. one node).
    An honest demander needs one (a second only while a broken one closes).
``max_channels_per_connection``
    chunk channels open at once on one connection. A demander opens one per
    piece it is pulling from this seeder at once, and keeps up to two idle for
    its next pulls (agent/dataplane/chunk_channels.py).
``max_pending``
    connections not yet authenticated (TCP accepted, handshake or auth under
    way), like sshd's MaxStartups: beyond it a new connection is closed at once.
``login_timeout``
    seconds a connection may take to authenticate before it is closed, so a
    pending slot is freed even if the client just sits there.

Over a limit, the connection is closed with SSH disconnect code 12 ("too many
connections") and a message naming this node and the limit; a channel over the
limit is refused when it is opened. Either way the demander sees an
``unreachable``/``io`` failure (never a ``security`` one) and the coordinator
re-plans. Refusals are counted (:attr:`ConnectionGate.refused`), shown by
``rbd-agent status``.

File descriptors: the total of open connections (pending or not) is also held
under the process's ``RLIMIT_NOFILE`` soft limit minus :data:`FD_RESERVE`, so
inbound SSH alone can never take the descriptors the agent needs for its store,
its coordinator requests and its own pulls. If descriptors still run out (the
kernel refuses ``accept``), asyncio pauses the listener for a second and tries
again; the agent keeps running.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field

#: descriptors kept for everything but inbound SSH: store files and partials,
#: coordinator HTTP, outgoing pulls (one connection per seeder), Docker, the
#: status and metrics sockets, logs. Measured: an idle agent holds ~25.
FD_RESERVE = 64
#: never admit fewer than this many inbound connections, however low the limit
#: (an agent that can serve nobody is useless; it logs the squeeze at start)
MIN_INBOUND = 4


@dataclass(frozen=True)
class SshLimits:
    """The chunk server's connection limits (agent config keys ``ssh_*``)."""

    #: authenticated connections in total
    max_connections: int = 256
    #: authenticated connections of one peer (one client key, one node)
    max_connections_per_peer: int = 4
    #: chunk channels open at once on one connection
    max_channels_per_connection: int = 16
    #: connections accepted but not yet authenticated
    max_pending: int = 32
    #: seconds a connection may take to authenticate
    login_timeout: float = 10.0

    def check(self) -> None:
        """ValueError naming the field if a limit is not a positive, finite number."""
        for name in (
            "max_connections",
            "max_connections_per_peer",
            "max_channels_per_connection",
            "max_pending",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= 1_000_000:
                raise ValueError(f"ssh_{name} {value!r}: must be an integer in 1..1000000")
        t = self.login_timeout
        if not 0.1 <= t <= 3600:  # also refuses NaN
            raise ValueError(f"ssh_login_timeout {t!r}: must be seconds in 0.1..3600")


def fd_budget(reserve: int = FD_RESERVE) -> int:
    """How many inbound connections the descriptor limit leaves room for."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(MIN_INBOUND, int(soft) - reserve)


@dataclass
class ConnectionGate:
    """Counts connections by state and says whether one more may come in.

    Pure bookkeeping (no sockets), so the rules are testable on their own; the
    chunk server calls it from its asyncssh callbacks.
    """

    limits: SshLimits
    #: most connections open at once, pending or not (from :func:`fd_budget`)
    max_open: int
    open: int = 0
    pending: int = 0
    per_peer: dict[str, int] = field(default_factory=dict)
    #: connections refused so far, by reason ("open", "pending", "peer")
    refused: dict[str, int] = field(default_factory=dict)
    #: idle peer connections closed to admit another peer (module docstring)
    evicted: int = 0

    def accept(self) -> str:
        """Count a new TCP connection; "" if admitted, else why not (it must be closed)."""
        if self.open >= min(self.max_open, self.limits.max_connections + self.limits.max_pending):
            return self._refuse(
                "open",
                f"too many connections ({self.open} open, limit "
                f"{min(self.max_open, self.limits.max_connections + self.limits.max_pending)})",
            )
        if self.pending >= self.limits.max_pending:
            return self._refuse(
                "pending",
                f"too many unauthenticated connections (limit {self.limits.max_pending}); "
                "try again later",
            )
        self.open += 1
        self.pending += 1
        return ""

    def authenticated(self, peer: str) -> str:
        """A pending connection authenticated as ``peer``: "" if it may stay, else why not."""
        self.pending -= 1
        have = self.per_peer.get(peer, 0)
        total = sum(self.per_peer.values())
        if have >= self.limits.max_connections_per_peer:
            return self._refuse(
                "peer",
                f"peer {peer} already has {have} connections (limit "
                f"{self.limits.max_connections_per_peer})",
            )
        if total >= self.limits.max_connections:
            return self._refuse(
                "open", f"too many peer connections (limit {self.limits.max_connections})"
            )
        self.per_peer[peer] = have + 1
        return ""

    def full_for(self, peer: str) -> bool:
        """Whether ``peer``, authenticating now, would be refused for the total alone.

        Not for its own count (``max_connections_per_peer``): closing another's
        idle connection would not let it in.
        """
        return (
            self.per_peer.get(peer, 0) < self.limits.max_connections_per_peer
            and sum(self.per_peer.values()) >= self.limits.max_connections
        )

    def closed(self, peer: str | None, was_pending: bool) -> None:
        """A counted connection closed (``peer``: the node it was admitted as, if any)."""
        self.open -= 1
        if was_pending:
            self.pending -= 1
        if peer is not None:
            left = self.per_peer.get(peer, 1) - 1
            if left > 0:
                self.per_peer[peer] = left
            else:
                self.per_peer.pop(peer, None)

    def _refuse(self, reason: str, message: str) -> str:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        return message
