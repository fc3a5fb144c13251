"""One transfer into one demander: the least rate it needs, the seeder that fits, its start.

Why: this is where the rules of rules.py pick a seeder -- min_share and the
floor (:meth:`Fitter._fits`), best fit among holders and relays
(:meth:`Fitter._fit`), the urgent share, direct small layers, striping the
download (:meth:`Fitter._reserve_down`) -- and where a started transfer's
reservation is recorded (:meth:`Fitter._hold`). Every transfer's reason
(rainbowd.core.sched.reasons) names the rule and the numbers that chose its
seeder.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Collection
from typing import TYPE_CHECKING

from .. import reasons as rs
from ..reasons import TransferReason, Turn
from ..waiting import credited_need
from .demanders import DemanderIndex
from .sharing import shared_rate
from .state import (
    DIRECT_TRIES,
    FIT_TRIES,
    INF,
    MIN_SPEED_BPS,
    MIN_TRANSFER_BPS,
    PEER_TRIES,
    SETTER_HOLDERS,
    UNKNOWN_LAYER_BYTES,
    _down_speed,
    _Plan,
)

if TYPE_CHECKING:
    from ..records import Demand, Node, Transfer


class Fitter(DemanderIndex):
    """Serve one waiting demander: fit a seeder, reserve the rates, start the transfer."""

    def _serve(
        self,
        node: Node,
        now: float,
        turn: Turn,
        *,
        starving: bool = False,
        within_s: float = 0.0,
    ) -> Transfer | None:
        """Start one more transfer into ``node`` if a seeder fits; None if none does.

        ``starving``: no least rate (min_share) but the floor; ``within_s`` (> 0): the
        transfer must end within that many seconds at its seeder's free upload.
        """
        if node.node_id not in self._wait_key:
            return None
        # direct small layers first: they reserve nothing and make the node a seeder of them
        if self.rules.direct_s > 0:
            free, relays, pulling = self._free, self._relays, node.pulling
            wanted = [
                d
                for lr, d in node.demands.items()
                if lr not in pulling and (free.get(lr) or relays.get(lr))  # (_seedable)
            ]
            if not wanted:
                return None
            if self.rules.rarest_first:
                wanted.sort(key=self._scarcity)
            for d in wanted:
                waiting = self._by_speed.get(d.layer)
                seeder = self._direct_seeder(node, d.layer, len(waiting) if waiting else 0)
                if seeder is not None:
                    return self._begin(seeder, node, d, now, turn, direct=True)
        room = self.free_down(node) if self.rules.slots else node.speed_bps
        urgent = turn.name == rs.URGENT
        hope = self._hopes[node.node_id]
        # _need_s as of its last refresh (0: unused), at least the wait credit's
        need_s = credited_need(hope.need_s, hope.since, now, self.rules.wait_credit)
        waited = now - hope.since if need_s > hope.need_s else 0.0  # (for the reason)
        fits = self._fits(node, room, need_s, starving, within_s)
        if turn.number == rs.SETTER_NEED_S:  # never a piece's first copy (Walker._setter)
            fits = [f for f in fits if len(self._s.holders_of(f[0].layer)) >= SETTER_HOLDERS]
        if len(fits) > 1 and self.rules.rarest_first and self.rules.direct_s <= 0:
            fits.sort(key=lambda f: self._scarcity(f[0]))
        fitted = 0.0  # the whole download, where the last piece is fitted against it
        # its key holds the layers it waits for, not in flight (re-taken at each change in a
        # walk): one left is the last it asks for
        rules = self.rules
        if rules.last_fit and rules.slots and fits and len(self._wait_key[node.node_id][2]) == 1:
            down = _down_speed(node)
            if down > room:
                room = fitted = down  # the seeder to fit (rules.py, last piece fitted whole)
        for d, least in fits:
            if urgent:
                # within the urgent share; beyond it, an urgent one waits for the common walk
                seeder = self._urgent_fit(node, d.layer, room, least)
            else:
                seeder = self._fit(node, d.layer, room, least)
            if seeder is not None:
                return self._begin(
                    seeder, node, d, now, turn, urgent=urgent, waited=waited, fitted=fitted
                )
        return None

    def _fits(
        self, node: Node, room: float, need_s: float, starving: bool, within_s: float
    ) -> list[tuple[Demand, float]]:
        """The wanted layers whose best free upload reaches their least rate, with that rate.

        A fit needs no less, so the others are left before sorting (on upload-bound at
        1,000 nodes 98 % of the demanders a walk met had none). The least rate
        (``min_share``) is a share of the demander's download, or of the fastest
        holder's speed if that is lower: no seeder of the layer could give more, so
        waiting would be forever. With ``need_share``, at most ``size / need_s``: a
        transfer that ends before the demander could finish the rest of what it lacks
        delays nothing, so a slow upload may feed a demander that lacks much
        (``need_s``: _need_s, or the wait credit's, :meth:`_serve`). A starving
        demander's is 0. Then it is at least ``size / within_s`` (``within_s`` > 0)
        and never below the floor: ``MIN_TRANSFER_BPS``, or all the fastest holder
        has, or the demander's ``room``.

        ``_best_free`` and ``_seedable`` are inlined here, the same arithmetic in the
        same order: this runs for every demander a walk meets (upload-bound at 10,000
        nodes: 3.9 M calls for 86 k transfers, 63 % of a profiled run's time in
        ``_serve``). The speed walk steps over demanders by a bound on this least rate
        (rainbowd.core.sched.waiting.Bar, from the node's Hope): a change to it must
        keep Bar.admits a bound, and tests/core/test_waiting.py compares that walk
        with the plain one. The floor, min(MIN_TRANSFER_BPS, room) with the fastest
        holder's speed, is tested first (its layer-free part taken once a call): late
        in drawn-2 at 1,000 nodes, 81 % of the scheduler's time went here, nearly all
        in layers under it (session 34).
        """
        free_get, relays_get, pulling = self._free.get, self._relays.get, node.pulling
        fastest_get, sizes = self._fastest_holder.get, self._s.layer_sizes
        share = self.rules.min_share
        by_need = self.rules.need_share and need_s > 0
        down = _down_speed(node)
        floor = min(MIN_TRANSFER_BPS, room)
        fits: list[tuple[Demand, float]] = []
        for lr, d in node.demands.items():
            if lr in pulling:
                continue
            held, relayed = free_get(lr), relays_get(lr)
            if held:
                best = -held[0][0]
                if relayed and -relayed[0][0] > best:
                    best = -relayed[0][0]
            elif relayed:
                best = -relayed[0][0]
            else:
                continue  # nobody with free upload seeds it (_seedable)
            fastest = fastest_get(lr, INF)
            if best < floor and best < fastest:
                continue  # under the floor below: most layers a walk asks about end here
            if starving:
                least = 0.0
            else:
                least = share * min(down, fastest)  # (min_share)
                if by_need:
                    least = min(least, (sizes.get(lr) or UNKNOWN_LAYER_BYTES) / need_s)
            if within_s > 0:
                least = max(least, (sizes.get(lr) or UNKNOWN_LAYER_BYTES) / within_s)
            # never a trickle: at least MIN_TRANSFER_BPS, or all the fastest holder has
            least = max(least, min(floor, fastest))
            if best >= least:
                fits.append((d, least))
        return fits

    def _scarcity(self, d: Demand) -> tuple[bool, int]:
        """Rarest first: fewest copies first, tiny layers last (a copy of one costs a round
        trip; scarcity means nothing there: state.py, ``_tiny``).

        Only tiny ones: "one chunk" alone also put last the pieces of a layer split into
        one-chunk pieces (1 MiB chunks, 512 KiB pieces) and every split layer's short last
        piece, so every node fetched those last, from few holders, at the end of its
        job (simulator, 100 nodes, 16 shapes: random-asymmetric 1.21 -> 1.15 x T*, drawn-2
        1.56 -> 1.47, geometric mean 1.194 -> 1.180; drawn-2 1.48 -> 1.47 and 1.56 -> 1.43
        at 90 and 110 nodes; bench/RESULTS.md, session 11).
        """
        return (self._tiny(d.layer), self._copies(d.layer))

    def _urgent_fit(self, node: Node, layer: str, room: float, least: float) -> Node | None:
        """For an urgent demander: the best-fit holder, if its urgent share has ``least`` left.

        Urgent (slow) demanders take at most ``urgent_share`` of a seeder's
        upload, so the fast nodes that grow the seeding capacity can keep some.
        (Searching further for a seeder with urgent share left was tried: in
        the simulator it took the fast seeders' upload from the fast nodes and
        was slower at 3,000 nodes, 1.53 against 1.47 x T*.)
        """
        seeder = self._fit(node, layer, room, least)
        if seeder is None:
            return None
        left = self.rules.urgent_share * seeder.speed_bps
        left -= self._urgent_used.get(seeder.node_id, 0.0)
        return seeder if left >= least else None

    def _relay_lag(self, seeder_id: str, layer: str, rate: float) -> float:
        """How far behind a complete copy a transfer relayed by ``seeder_id`` would start.

        The relay's own lag plus one hop at the rate of the relay's *inbound*
        transfer: the relay forwards a chunk once it has all of it, and that
        takes the chunk's time on the link bringing it in (the outbound link's
        speed sets how fast the demander goes after, not when it starts).
        """
        feed = self._s.receiving(seeder_id, layer)
        up_plan = self._plans.get(feed.transfer_id) if feed is not None else None
        if up_plan is None:
            return self.hop_s(layer, rate)
        return up_plan.lag + self.hop_s(layer, up_plan.planned)

    def _fit(self, node: Node, layer: str, room: float, least: float) -> Node | None:
        """Best fit: the tightest free upload >= ``room``, else the largest (if >= ``least``).

        With relays: a complete holder that fits first (it cannot stall), then
        the tightest relay that fits, then the most room of either. With
        ``peer_share``, a seeder ``node`` pulled from before goes first where it
        offers nearly as much (rules.py, known peers).
        """
        lists = [self._free.get(layer) or []]
        if self.rules.relay:
            lists.append(self._relays.get(layer) or [])
        known = self._pulled_from.of(node.node_id) if self.rules.peer_share > 0 else ()
        if self.rules.slots:
            for idle in lists:
                # entries with free upload >= room sit before this index; the last fits tightest
                i = bisect_right(idle, (-room, "\uffff"))
                tightest: str | None = None
                # past FIT_TRIES only a known seeder is looked for
                window = PEER_TRIES if known else FIT_TRIES
                for j in range(i - 1, max(-1, i - 1 - window), -1):
                    sid = idle[j][1]
                    if not self._s.allowed(node.node_id, sid):
                        continue
                    if not known or sid in known:
                        return self._s.nodes[sid]
                    if tightest is None and i - 1 - j < FIT_TRIES:
                        tightest = sid
                if tightest is not None:
                    return self._s.nodes[tightest]
        best: tuple[float, str] | None = None
        for idle in lists:
            for neg_free, sid in idle[:FIT_TRIES]:
                if -neg_free < least:
                    break
                if self._s.allowed(node.node_id, sid):
                    if best is None or neg_free < best[0]:
                        best = (neg_free, sid)
                    break
        if best is not None and known and best[1] not in known:
            floor = max(least, -best[0] * self.rules.peer_share)
            peer = self._known_peer(node, lists, known, floor)
            if peer is not None:
                return peer
        return None if best is None else self._s.nodes[best[1]]

    def _known_peer(
        self, node: Node, lists: list[list[tuple[float, str]]], known: Collection[str], least: float
    ) -> Node | None:
        """A seeder of ``known`` among the ``PEER_TRIES`` freest of ``lists`` offering ``least``."""
        for idle in lists:
            for neg_free, sid in idle[:PEER_TRIES]:
                if -neg_free < least:
                    break
                if sid in known and self._s.allowed(node.node_id, sid):
                    return self._s.nodes[sid]
        return None

    def _direct_seeder(self, node: Node, layer: str, waiting: int) -> Node | None:
        """A holder that can send this small layer to all ``waiting`` within ``direct_s``.

        That is where a tree only adds hops: one seeder reaches everyone who
        waits for the layer at once (the DID crossover, per layer).
        """
        size = self._s.layer_sizes.get(layer, 0)
        if size <= 0:
            return None
        for _, sid in self._free.get(layer, ())[:DIRECT_TRIES]:
            seeder = self._s.nodes[sid]
            budget = self.rules.direct_s * seeder.speed_bps
            fan_out = self._direct_bytes.get(sid, 0) + size * max(1, waiting)
            if fan_out <= budget and self._s.allowed(node.node_id, sid):
                return seeder
        return None

    def _begin(
        self,
        seeder: Node,
        node: Node,
        d: Demand,
        now: float,
        turn: Turn,
        *,
        direct: bool = False,
        urgent: bool = False,
        waited: float = 0.0,
        fitted: float = 0.0,
    ) -> Transfer:
        """Reserve the rates of ``d``'s transfer from ``seeder`` and start it, with its reason.

        The reason (reasons.py) is the rule that chose the seeder with the numbers it
        weighed, and ``turn``, why ``node`` was served now. ``fitted`` (> 0): the seeder
        was fitted against that much download, the demander's whole (``last_fit``).
        """
        numbers = {rs.SEEDER_BPS: seeder.speed_bps, turn.number: turn.value}
        if waited > 0:
            numbers[rs.WAITED_S] = waited
        if self.rules.peer_share > 0 and seeder.node_id in self._pulled_from.of(node.node_id):
            numbers[rs.PULLED_BEFORE] = 1.0
        if direct:
            rule = rs.DIRECT
            numbers[rs.SIZE_BYTES] = float(self._s.layer_sizes[d.layer])
            numbers[rs.DIRECT_S] = self.rules.direct_s
            plan = _Plan(0.0, 0.0, seeder.speed_bps, True, direct=True)
        elif self.rules.slots:
            up, down = self.free_up(seeder), self._reserve_down(node, d.layer)
            if urgent:
                left = self.rules.urgent_share * seeder.speed_bps
                up = min(up, left - self._urgent_used.get(seeder.node_id, 0.0))
            rate = min(up, down)
            numbers[rs.FREE_UP_BPS], numbers[rs.FREE_DOWN_BPS] = up, down
            if fitted > 0:
                numbers[rs.FITTED_DOWN_BPS] = fitted
            if not self.min_room(node):
                # room behind the horizon, or late by its own bound (DemanderIndex.late_room)
                late = self.late_room(node)
                if late is not None:
                    numbers[late[0]] = late[1]
            relayed = self.rules.relay and d.layer not in seeder.holdings
            if relayed:
                inbound = self.relay_rate(seeder, d.layer)
                rate = min(rate, inbound)
            booked = self._booked_down(seeder, d.layer, rate)
            if booked < rate:
                numbers[rs.SHARED_BPS] = booked
            if relayed:
                rule = rs.RELAY
                lag = self._relay_lag(seeder.node_id, d.layer, rate)
                numbers[rs.INBOUND_BPS], numbers[rs.LAG_S] = inbound, lag
                plan = _Plan(rate, booked, rate, True, urgent=urgent, lag=lag)
            else:
                rule = rs.BEST_FIT
                plan = _Plan(rate, booked, rate, up <= down, urgent=urgent)
            numbers[rs.PLANNED_BPS] = rate
        else:
            rule = rs.FASTEST_IDLE
            rate = min(seeder.speed_bps, node.speed_bps)
            plan = _Plan(seeder.speed_bps, node.speed_bps, rate, seeder.speed_bps <= node.speed_bps)
        reason = TransferReason(rule=rule, policy=self.rules.name, turn=turn.name, numbers=numbers)
        return self._s.start_transfer(
            seeder, node, d, now, reason, plan_hook=lambda t: self._hold(t, plan)
        )

    def _booked_down(self, seeder: Node, layer: str, rate: float) -> float:
        """What of its download a demander books for a transfer of ``layer`` planned at ``rate``.

        With ``fair_share_s``: what the flow gets of ``seeder``'s upload beside the
        flows it sends (sharing.py; each capped at its demander's download over the
        flows into that demander: what the other end would take at most), where the
        transfer would run ``fair_share_s`` or longer at that share; else ``rate``
        (rules.py, booked as shared).
        """
        if self.rules.fair_share_s <= 0:
            return rate
        sid, nodes = seeder.node_id, self._s.nodes
        caps = []
        for t in seeder.transfers.values():
            if t.seeder != sid:
                continue
            d = nodes[t.demander]
            caps.append(_down_speed(d) / max(1, sum(d.pulling.values())))
        shared = shared_rate(seeder.speed_bps, caps)
        if shared >= rate or self._size(layer) < self.rules.fair_share_s * shared:
            return rate
        return shared

    def _reserve_down(self, node: Node, layer: str) -> float:
        """How much of ``node``'s free download a new transfer of ``layer`` may reserve.

        All of it, except under ``stripe``: while the demander has more to ask for,
        a transfer short at full rate (under ``stripe_s``) reserves at most
        ``stripe`` of its download, so a second one runs beside it. One transfer at
        a time leaves the download idle between two pieces -- the report, the next
        assignment, a connection to a new seeder: ~40 ms in the simulator's
        overheads, 14 % of a 512 KiB piece at 16 Mbit/s -- and two in flight
        overlap those gaps. Long pieces keep the full rate: finishing one sooner
        makes a new seeder sooner, which is what the ramp needs (upload-bound, 4 MiB
        pieces: striping every piece took it from 1.46 to 1.66 x T*). Simulator,
        100 nodes, suite of 16 shapes with stripe 0.5 / stripe_s 2 s: ci 1.29 ->
        1.24 x T*, homogeneous 1.71 -> 1.57, random-pareto 1.41 -> 1.29, paper
        1.14 -> 1.10; random-asymmetric's median slowdown 2.43 -> 2.89 (9 -> 10 of
        16 shapes meet every goal).
        """
        down = self.free_down(node)
        if self.rules.stripe >= 1.0 or len(node.demands) <= len(node.pulling) + 1:
            return down  # nothing else to ask for: the last one takes what there is
        if self._size(layer) / max(MIN_SPEED_BPS, down) >= self.rules.stripe_s:
            return down
        return min(down, self.rules.stripe * _down_speed(node))

    def _hold(self, t: Transfer, plan: _Plan) -> None:
        self._plans[t.transfer_id] = plan
        self._pulled_from.pulled(t.demander, t.seeder)
        self._begun += 1
        self._receiving[t.layer] = self._receiving.get(t.layer, 0) + 1
        if plan.direct:
            self._direct_bytes[t.seeder] = self._direct_bytes.get(t.seeder, 0) + (
                self._s.layer_sizes.get(t.layer, 0)
            )
        self._up_used[t.seeder] = self._up_used.get(t.seeder, 0.0) + plan.up
        if plan.urgent:
            self._urgent_used[t.seeder] = self._urgent_used.get(t.seeder, 0.0) + plan.up
        self._down_used[t.demander] = self._down_used.get(t.demander, 0.0) + plan.down
        self._idle_seen.pop(t.demander, None)
