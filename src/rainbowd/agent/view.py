"""What the agent knows of its own work, as ``rbd-agent status`` and heartbeats show it.

A module of its own because every part of the agent reads or writes it: the
coordinator link (contact, trust version, registered), the assignment runner
(active pulls, loaded images, security events), the status snapshot and the
metrics scrape. It holds state only; nothing here talks to anyone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rainbowd.core import messages as m


@dataclass
class ActiveWork:
    """A pull this agent runs: its assignment, kept by reference, and its progress so far.

    The transfer's identity and plan are the coordinator's ``TransferAssignment``
    (not copied: the properties read it); the agent adds only when the pull
    started and what the puller last said of it, for heartbeats, progress
    reports and ``rbd-agent status``.
    """

    assignment: m.TransferAssignment
    started: float  # wall clock (status shows seconds since)
    bytes_total: int  # of its chunk range
    bytes_done: int = 0
    rate_bps: float = 0.0
    #: the pull ended and its done/failed report is on its way: kept (and listed in
    #: heartbeats as reporting) until the coordinator took the report, so a heartbeat
    #: that overtakes the report does not make the transfer look abandoned
    reporting: bool = False

    @property
    def transfer_id(self) -> str:
        return self.assignment.transfer_id

    @property
    def layer(self) -> str:
        return self.assignment.layer.digest

    @property
    def seeder(self) -> str:
        return self.assignment.seeder.node_id


@dataclass
class AgentView:
    """What ``rbd-agent status`` shows; updated by the agent as it works."""

    registered: bool = False
    last_contact: float = 0.0
    heartbeat_interval: float = 2.0
    trust_version: int = 0
    active: dict[str, ActiveWork] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)  # ref -> loaded at (iso)
    origin_reads: int = 0
    security_events: list[str] = field(default_factory=list)
    last_error: str = ""

    def pulling(self) -> list[ActiveWork]:
        """The transfers still pulling (not those whose report is on its way)."""
        return [w for w in self.active.values() if not w.reporting]

    def active_transfers(self) -> list[m.ActiveTransfer]:
        """The active pulls as a heartbeat lists them."""
        return [
            m.ActiveTransfer(
                transfer_id=w.transfer_id,
                layer=w.layer,
                seeder=w.seeder,
                bytes_done=w.bytes_done,
                bytes_total=w.bytes_total,
                rate_bps=w.rate_bps,
            )
            for w in self.pulling()
        ]

    def reporting_transfers(self) -> list[str]:
        """Transfers whose pull ended and whose report the coordinator has not taken yet."""
        return [w.transfer_id for w in self.active.values() if w.reporting]

    def progress(self) -> list[m.ProgressItem]:
        """Progress of every active transfer (sent with the next batch of reports)."""
        return [
            m.ProgressItem(
                transfer_id=w.transfer_id,
                progress=m.TransferProgress(
                    bytes_done=w.bytes_done, bytes_total=w.bytes_total, rate_bps=w.rate_bps
                ),
            )
            for w in self.pulling()
        ]
