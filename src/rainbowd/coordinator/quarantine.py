"""The quarantine service: what reports about peers count, and what they cost the accused.

The evidence rules are in coordinator/evidence.py: a report about a peer counts
only if the coordinator assigned the reporter a transfer from that peer that is
running or ended within ``EVIDENCE_WINDOW``; any other is refused (403) and
recorded as an ``unfounded_report`` against the reporter. A host-key claim
makes the coordinator probe the seeder's host key itself
(coordinator/hostkey_probe.py); only its own probe seeing a key other than the
pinned one quarantines the seeder. Bad chunks make that pair avoid each other
(the job driver's rule, rainbowd.core.sched.jobdriver); the seeder is penalized once two
different demanders have reported it and quarantined once
``seeder_fault_limit`` different demanders have -- never on one node's word,
and an origin never on peers' word at all. A quarantined node stays out until
an admin clears it.
"""

from __future__ import annotations

import structlog

from rainbowd.core.digest import short
from rainbowd.core.messages import (
    SecurityEvent,
    SecurityEventList,
    SecurityEventView,
    TransferFailed,
)
from rainbowd.core.sched.jobdriver import Blame
from rainbowd.core.sched.records import Transfer

from .cluster import MISSED_HEARTBEATS, Node
from .context import ServiceContext
from .dispatch import Dispatch
from .errors import Forbidden, NotFound
from .evidence import COORDINATOR, PeerEvidence, unfounded
from .holdings_service import HoldingsService
from .hostkey_probe import HostKeyChecks, ProbeOutcome
from .jobs_service import JobsService
from .liveness import Liveness
from .views import unknown_node

log = structlog.get_logger(__name__)


class Quarantine:
    """Peer reports, security events, quarantine and its clearing; see the module docstring."""

    def __init__(
        self,
        ctx: ServiceContext,
        jobs: JobsService,
        dispatch: Dispatch,
        holdings: HoldingsService,
        liveness: Liveness,
        evidence: PeerEvidence,
        host_key_checks: HostKeyChecks,
    ) -> None:
        self.ctx = ctx
        self.jobs = jobs
        self.dispatch = dispatch
        self.holdings = holdings
        self.liveness = liveness
        self.evidence = evidence
        self.host_key_checks = host_key_checks

    def blame_seeder(self, t: Transfer, m: TransferFailed, blame: Blame, now: float) -> None:
        """The evidence side of a failed transfer that blames its seeder (the quarantine policy).

        The scheduler's side (suspect, avoid, rest) is already applied by the
        job driver (rainbowd.core.sched.jobdriver), which also decided ``blame``; here
        are what the coordinator alone knows: holdings, security events, the
        host-key probe and the bad-chunk verdict over several demanders.
        """
        ctx = self.ctx
        seeder = ctx.cluster.get(t.seeder)
        if seeder is None or seeder.quarantined:
            return
        why = f"transfer {t.transfer_id} to {t.demander} failed: {m.kind}: {m.reason}"
        if m.not_held:
            what = f"it answered not_held to {t.demander} (transfer {t.transfer_id})"
            self.holdings.lost(seeder, [t.layer], now, what)
        if blame is Blame.HOST_KEY:
            ctx.store.add_security_event(t.demander, t.seeder, f"transfer_{m.kind}", m.reason)
            self.probe_host_key(seeder)
        elif blame is Blame.TRUST_BEHIND:
            # the seeder refused the demander's client key: its trust list is behind
            # (evidence.py), nobody's attack. Wake its poll so it fetches the list now.
            seeder.mailbox.wake()
            log.info("seeder's trust list is behind; re-planning", seeder=t.seeder, why=why)
        elif blame is Blame.BAD_CHUNKS:
            ctx.store.add_security_event(t.demander, t.seeder, f"transfer_{m.kind}", m.reason)
            self.judge_bad_chunks(seeder, t.demander, why, now)
        elif blame is Blame.RELAY:
            # a relay (still receiving the layer) could not provide a chunk: its upstream's
            # fault, so no suspicion and no penalty; the pair rests, so the re-plan prefers
            # another seeder while the relay's own pull recovers
            log.info(
                "relay could not serve; re-planning",
                relay=t.seeder,
                demander=t.demander,
                layer=short(t.layer),
            )
        elif blame is Blame.SUSPECT:
            log.warning(
                "seeder suspect: no new work until it reports",
                node=t.seeder,
                demander=t.demander,
                layer=short(t.layer),
                kind=m.kind,
            )

    def seeder_fault(self, seeder: Node, demander: str, why: str, now: float) -> None:
        """Bad bytes from ``seeder`` (a backed bad_chunk event): the pair avoid each other;
        penalty and quarantine need several different demanders (evidence.py)."""
        self.ctx.driver.bad_peer(demander, seeder.node_id, now)
        self.judge_bad_chunks(seeder, demander, why, now)

    def judge_bad_chunks(self, seeder: Node, demander: str, why: str, now: float) -> None:
        """Count ``demander``'s word against ``seeder``: nothing yet, a penalty, or quarantine."""
        ctx = self.ctx
        ctx.metrics.seeder_fault(seeder.node_id)
        origin, limit = "origin" in seeder.info.roles, ctx.settings.seeder_fault_limit
        verdict, n = self.evidence.bad_chunk_verdict(
            seeder.node_id, demander, origin=origin, limit=limit
        )
        seeder.info.seeder_faults = n
        ctx.save_node(seeder)
        if verdict == "quarantine":
            why = f"{n} demanders reported bad chunks (last: {why})"
            self.quarantine(seeder.node_id, why, now)
            return
        speed = ctx.driver.penalize(seeder.node_id) if verdict == "penalize" else 0.0
        log.warning(
            "bad chunks reported",
            node=seeder.node_id,
            demander=demander,
            demanders_reporting=n,
            verdict=verdict,
            origin=origin,
            speed_bps=round(speed or ctx.scheduler.speed(seeder.node_id)),
        )

    def check_backed(self, node: Node, peer: str, what: str, now: float) -> None:
        """Refuse (403, recorded against ``node``) a report about ``peer`` with no transfer."""
        active = self.ctx.scheduler.active_for(node.node_id)
        if self.evidence.backed(node.node_id, peer, active, now):
            return
        why = unfounded(node.node_id, peer, what, self.evidence.window)
        self.ctx.store.add_security_event(COORDINATOR, node.node_id, "unfounded_report", why)
        log.warning("report about a peer refused", reporter=node.node_id, peer=peer, what=what)
        raise Forbidden(why)

    def host_key_claim(self, seeder: Node, reporter: str, now: float) -> None:
        """A backed host-key claim (an event): the pair avoid each other; we probe the key."""
        self.ctx.driver.bad_peer(reporter, seeder.node_id, now)
        self.probe_host_key(seeder)

    def probe_host_key(self, seeder: Node) -> None:
        """Look at ``seeder``'s host key ourselves; only our own probe can quarantine it."""
        i = seeder.info
        self.host_key_checks.request(
            i.node_id, i.address, i.ssh_port, i.host_key, self.host_key_probed
        )

    def host_key_probed(self, node_id: str, pinned: str, outcome: ProbeOutcome) -> None:
        ctx = self.ctx
        node = ctx.cluster.get(node_id)
        if node is None or node.quarantined or node.info.host_key != pinned:
            return  # gone, already out, or re-registered with another key meanwhile
        where = f"{node.info.address}:{node.info.ssh_port}"
        if outcome.state != "mismatch":
            log.warning("host key claim not confirmed", node=node_id, probe=outcome.state)
            return
        now = ctx.clock()
        why = (
            f"host key mismatch: the coordinator's own probe of {where} was shown "
            f"{outcome.detail}, not the key {node_id} enrolled with"
        )
        ctx.store.add_security_event(COORDINATOR, node_id, "host_key_mismatch", why)
        self.quarantine(node_id, why, now)
        self.dispatch.schedule(now)

    def security_events(self, limit: int = 1000) -> SecurityEventList:
        """The most recent security events, oldest first."""
        rows = self.ctx.store.security_events()[-limit:]
        return SecurityEventList(
            events=[
                SecurityEventView(at=at, reporter=r, peer=p, kind=k, detail=d)
                for at, r, p, k, d in rows
            ]
        )

    def security_event(self, node: Node, ev: SecurityEvent) -> None:
        """Record ``node``'s event; one accusing a peer must be backed (evidence.py) or is 403."""
        ctx = self.ctx
        now = ctx.clock()
        peer = ctx.cluster.get(ev.peer)
        accuses = peer is not None and peer.node_id != node.node_id
        if accuses and ev.kind != "client_key_refused":
            self.check_backed(node, ev.peer, ev.kind, now)
        ctx.store.add_security_event(node.node_id, ev.peer, ev.kind, ev.detail)
        log.warning(
            "security event", reporter=node.node_id, peer=ev.peer, kind=ev.kind, detail=ev.detail
        )
        if peer is None or not accuses or peer.quarantined:
            return
        if ev.kind == "host_key_mismatch":
            self.host_key_claim(peer, node.node_id, now)
        elif ev.kind == "bad_chunk":
            self.seeder_fault(peer, node.node_id, f"{node.node_id}: {ev.detail}", now)
        self.dispatch.schedule(now)

    def quarantine(self, node_id: str, reason: str, now: float) -> None:
        ctx = self.ctx
        node = ctx.cluster.get(node_id)
        if node is None or node.quarantined:
            return
        node.info.quarantined, node.info.quarantine_reason = True, reason
        ctx.metrics.quarantined()
        node.up = False
        self.dispatch.aborted(ctx.driver.node_down(node_id), f"seeder {node_id} quarantined")
        for job, p in list(self.jobs.jobs_of(node_id)):
            if not p.final:
                p.fail(f"node {node_id} quarantined: {reason}", now)
                self.jobs.node_failed(job, p, now)
        ctx.cluster.trust_changed()
        ctx.save_node(node)
        ctx.save_trust_version()
        log.error("node quarantined", node=node_id, reason=reason)

    def clear_quarantine(self, node_id: str) -> None:
        """An admin lets ``node_id`` back in (a no-op for a node not quarantined)."""
        ctx = self.ctx
        node = ctx.cluster.get(node_id)
        if node is None:
            raise NotFound(unknown_node(ctx.cluster, node_id))
        if node.quarantined:
            node.info.quarantined, node.info.quarantine_reason = False, ""
            node.info.seeder_faults = 0
            self.evidence.forget(node_id)
            if ctx.clock() - node.last_seen <= MISSED_HEARTBEATS * ctx.settings.heartbeat_interval:
                self.liveness.bring_up(node, ctx.clock())
            ctx.cluster.trust_changed()
            ctx.save_node(node)
            ctx.save_trust_version()
            log.warning("quarantine cleared by admin", node=node_id)
            self.dispatch.schedule(ctx.clock())
