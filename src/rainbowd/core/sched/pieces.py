"""Pieces: a layer scheduled as runs of chunks, so several seeders feed one demander at once.

Why: with whole-layer transfers a demander handed a slow seeder waits for
that one seeder for the whole layer, and a seeder's upload is only useful to
a demander once it holds (or relays) the whole layer. On an upload-bound
cluster that leaves most upload idle (issue 13: 6.8 x T* in the lab). Split
into pieces -- runs of ``piece_chunks`` consecutive chunks -- a layer moves
as several transfers, each of one piece from one seeder:

* a demander pulls different pieces of one layer from different seeders at
  the same time (chunk-level multi-source, as Dragonfly and Kraken do), as
  many as its download has room for;
* a node seeds the pieces it holds before it holds the whole layer, so slow
  uploads contribute from the first piece on (BitTorrent's insight);
* a stalled or failed source costs one piece, and the agent keeps the chunks
  of it that landed: the next transfer of that piece moves only the rest;
* per-source rates adapt: each piece's rate is measured like any transfer.

:class:`PieceScheduler` has the public interface of
:class:`~rainbowd.core.sched.scheduler.Scheduler` in terms of *layers* (the coordinator
and the simulator speak layers) and drives an inner ``Scheduler`` whose
"layers" are pieces. A layer of one piece keeps its own digest as the piece
key, so whole-layer policies (``paper``, ``relay``...) behave exactly as
before. A piece key is ``"<layer>#<first chunk>"``.

Transfers handed out carry ``first_chunk``/``end_chunk`` (``end_chunk`` 0:
the whole layer); ``layer`` is always the layer's digest. A node *holds* a
layer once it holds every piece of it.

Pieces are sized by the policy's ``piece_bytes`` (policies/rules.py): a piece is
``max(1, piece_bytes // chunk_size)`` chunks, and with ``report_load`` at least
enough chunks that the coordinator keeps up with the done reports at the
cluster's full rate (:meth:`PieceScheduler._load_chunks`, from the nodes known
when the layer's size is learnt; a restarted coordinator splits a layer as the
pieces it adopts back were, :meth:`PieceScheduler.split_as`). A layer whose size is learnt
while transfers or demands of it are open stays whole (re-keying those
would lose track of them); one that is only held is split at once.

With ``cost_share``, pieces not yet in motion then grow mid-job to what the
measured fixed cost of a transfer asks for (transfer_cost.py,
piece_growth.py): on a loaded host a transfer's assignment
and report cost ~1 s, and one-chunk pieces would spend most of their time on
them; on an idle host they cost milliseconds and the pieces keep their size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import msgspec

from .piece_growth import PieceGrowth
from .piece_layout import Piece, piece_chunks, split_layer
from .policies import RULES
from .policies.state import PIECE_MARK, _down_speed
from .records import Transfer
from .scheduler import DEFAULT_SPEED_BPS, Scheduler, SchedulerError

#: The coordinator's time per done report (seconds): all the coordinator's CPU in a job over
#: its done reports, heartbeats and progress included, measured with bench/coordinator_load.py
#: on an otherwise idle host (session 15: 1.05 / 1.10 / 1.06 ms at 100 agents, 1.00 ms at 300,
#: 1.05 ms at 1,000; the top of that range taken). Session 8's 2.49-2.50 ms was measured while
#: other jobs kept the 2-vCPU host ~200 % busy (bench/RESULTS.md "The coordinator's cost per
#: piece report" and "Session 15").
#: Pieces are sized against it (PieceScheduler._load_chunks); the simulator charges it
#: (bench/sim/overheads.py ``coordinator_s``).
REPORT_COST_S = 0.0011


class PieceScheduler:
    """A :class:`Scheduler` over layers, splitting them into pieces (module docstring)."""

    def __init__(
        self,
        policy: str = "paper",
        *,
        default_speed_bps: float = DEFAULT_SPEED_BPS,
        new_id: Callable[[], str] | None = None,
    ) -> None:
        self.inner = Scheduler(policy, default_speed_bps=default_speed_bps, new_id=new_id)
        self._setup(policy)

    @classmethod
    def around(cls, inner: Scheduler) -> PieceScheduler:
        """Pieces over an existing ``inner`` scheduler (a test's or an experiment's variant)."""
        self = cls.__new__(cls)
        self.inner = inner
        self._setup(inner.policy)
        return self

    def _setup(self, policy: str) -> None:
        self.policy = policy
        rules = RULES.get(policy)
        self.piece_bytes = rules.piece_bytes if rules is not None else 0
        self.layer_pieces = rules.layer_pieces if rules is not None else 0
        self.report_load = rules.report_load if rules is not None else 0.0
        #: pieces not yet in motion grow to the measured cost of a transfer (piece_growth.py)
        self.growth = PieceGrowth(rules.cost_share if rules is not None else 0.0)
        #: the fixed cost of a transfer, measured from done reports (transfer_cost.py)
        self.cost_meter = self.growth.meter
        #: the coordinator's time per done report (seconds; 0: pieces are not sized by it)
        self.report_cost_s = REPORT_COST_S
        self._pieces: dict[str, list[Piece]] = {}  # layer -> its pieces (known sizes only)
        self._piece: dict[str, Piece] = {}  # piece key -> piece (split layers only)

    # -- layers and pieces --------------------------------------------------
    def pieces(self, layer: str) -> list[Piece]:
        """The pieces of ``layer`` (one, keyed by the layer, while its size is unknown)."""
        return self._pieces.get(layer) or [Piece(layer, layer, 0, 0, 0)]

    def _keys(self, layer: str) -> list[str]:
        return [p.key for p in self.pieces(layer)]

    def piece_of(self, t: Transfer) -> Piece:
        """The piece ``t`` moves."""
        key = self._key_of(t)
        return self._piece.get(key) or self.pieces(t.layer)[0]

    def _key_of(self, t: Transfer) -> str:
        return f"{t.layer}{PIECE_MARK}{t.first_chunk}" if t.end_chunk else t.layer

    def set_layer_size(self, layer: str, size: int, chunk_size: int = 0) -> None:
        """Learn ``layer``'s size and chunking, and split it into pieces if it can be."""
        if layer in self._pieces or size <= 0:
            if layer in self._pieces:
                return
            self.inner.set_layer_size(layer, size, chunk_size)
            return
        per = piece_chunks(self.piece_bytes, chunk_size, size, self.layer_pieces)
        if self.piece_bytes > 0:
            per = max(per, self._load_chunks(chunk_size), self.growth.chunks(chunk_size))
        pieces = split_layer(layer, size, chunk_size, per)
        if len(pieces) > 1 and not self._unused({layer}):
            pieces = [Piece(layer, layer, 0, 0, size)]
        self._install(layer, pieces, chunk_size)

    def _install(self, layer: str, pieces: list[Piece], chunk_size: int) -> None:
        """Make ``pieces`` the pieces of ``layer``; whole holders of it hold each of them."""
        holders = self.inner.holders(layer) if len(pieces) > 1 else []
        for h in holders:
            self.inner.remove_holding(h, layer)
        self._pieces[layer] = pieces
        for p in pieces:
            if p.key != layer:
                self._piece[p.key] = p
            self.inner.set_layer_size(p.key, p.size, chunk_size)
        for h in holders:
            for p in pieces:
                self.inner.add_holding(h, p.key)

    def _load_chunks(self, chunk_size: int) -> int:
        """Chunks per piece that keep the coordinator's done reports within its share.

        Every piece is a done report; the cluster moves at most R bytes/s (the
        smaller of its nodes' summed uploads and downloads), so pieces of P bytes
        bring R / P reports per second, costing R * cost / P of the coordinator's
        time. Kept at ``report_load``: P >= R * cost / report_load.
        """
        if self.report_load <= 0 or self.report_cost_s <= 0 or chunk_size <= 0:
            return 1
        nodes = self.inner.nodes.values()  # down ones too: a restarted coordinator's all are
        up = sum(n.speed_bps for n in nodes)
        down = sum(_down_speed(n) for n in nodes)
        need = min(up, down) * self.report_cost_s / self.report_load
        return max(1, math.ceil(need / chunk_size))

    def split_as(self, layer: str, chunks_per_piece: int) -> bool:
        """Split ``layer`` into pieces of ``chunks_per_piece`` chunks again, if it can be.

        Pieces are sized from the cluster when a layer's size is learnt
        (:meth:`_load_chunks`), so a restarted coordinator may size them otherwise
        than the one before it did; a transfer it adopts back names its piece by
        chunk range, so the layer is split as that piece was first
        (coordinator/dispatch.py). Only while no transfer or demand of the layer
        is open and every node holding a piece of it holds them all (a partial
        holding would be lost). True if the layer is split so now.
        """
        current = self._pieces.get(layer)
        if current is None or chunks_per_piece <= 0:
            return False  # its size is not known yet: it is split when it is
        chunk_size = self.inner.layer_chunks.get(current[0].key, 0)
        size = sum(p.size for p in current)
        pieces = split_layer(layer, size, chunk_size, chunks_per_piece)
        if [p.key for p in pieces] == [p.key for p in current]:
            return True
        keys = {p.key for p in current}
        if not self._unused(keys):
            return False
        holders = {h for k in keys for h in self.inner.holders(k)}
        if any(not all(self.inner.holds(h, k) for k in keys) for h in holders):
            return False
        for k in keys - {layer}:
            self._piece.pop(k, None)
            for h in holders:
                self.inner.remove_holding(h, k)
        for h in holders:
            self.inner.add_holding(h, layer)
        self._install(layer, pieces, chunk_size)
        return True

    def _unused(self, keys: set[str]) -> bool:
        """Whether nothing but holdings refer to these pieces (so they may be re-keyed)."""
        if any(lr in keys for _, lr in self.inner.pending()):
            return False
        return not any(t.layer in keys for t in self.inner.active())

    # -- nodes (forwarded) ----------------------------------------------------
    def add_node(
        self,
        node_id: str,
        speed_bps: float = 0.0,
        holdings: Iterable[str] = (),
        *,
        max_upload_bps: float | None = None,
        max_download_bps: float | None = None,
        download_bps: float = 0.0,
    ) -> None:
        items = [k for layer in holdings for k in self._keys(layer)]
        self.inner.add_node(
            node_id,
            speed_bps,
            items,
            max_upload_bps=max_upload_bps,
            max_download_bps=max_download_bps,
            download_bps=download_bps,
        )

    def node_down(self, node_id: str) -> list[Transfer]:
        return [self._outer(t) for t in self.inner.node_down(node_id)]

    def suspect(self, node_id: str) -> None:
        self.inner.suspect(node_id)

    def is_suspect(self, node_id: str) -> bool:
        return self.inner.is_suspect(node_id)

    def avoid(self, demander: str, seeder: str, until: float) -> None:
        self.inner.avoid(demander, seeder, until)

    def penalize(self, node_id: str, factor: float = 0.5) -> float:
        return self.inner.penalize(node_id, factor)

    def observe_speed(self, node_id: str, bytes_per_second: float) -> None:
        self.inner.observe_speed(node_id, bytes_per_second)

    def speed(self, node_id: str) -> float:
        return self.inner.speed(node_id)

    # -- holdings -------------------------------------------------------------
    def add_holding(self, node_id: str, layer: str) -> None:
        for k in self._keys(layer):
            self.inner.add_holding(node_id, k)

    def remove_holding(self, node_id: str, layer: str) -> None:
        for k in self._keys(layer):
            self.inner.remove_holding(node_id, k)

    def holds(self, node_id: str, layer: str) -> bool:
        """Whether ``node_id`` holds every piece of ``layer``."""
        return all(self.inner.holds(node_id, k) for k in self._keys(layer))

    def holds_piece(self, node_id: str, t: Transfer) -> bool:
        """Whether ``node_id`` holds the piece ``t`` moves."""
        return self.inner.holds(node_id, self._key_of(t))

    def holders(self, layer: str) -> list[str]:
        """Nodes holding every piece of ``layer``."""
        keys = self._keys(layer)
        common = set(self.inner.holders(keys[0]))
        for k in keys[1:]:
            common.intersection_update(self.inner.holders(k))
        return sorted(common)

    # -- demands --------------------------------------------------------------
    def demand(self, node_id: str, layer: str, job_id: str, now: float) -> bool:
        """``node_id`` needs ``layer``: every piece it lacks; False if it lacks none or asked."""
        added = False
        for k in self._keys(layer):
            added = self.inner.demand(node_id, k, job_id, now) or added
        return added

    def cancel_demand(self, node_id: str, layer: str) -> None:
        for k in self._keys(layer):
            self.inner.cancel_demand(node_id, k)

    def pending(self) -> list[tuple[str, str]]:
        """(node, layer) with a piece not yet satisfied, in arrival order."""
        seen: dict[tuple[str, str], None] = {}
        for node, key in self.inner.pending():
            p = self._piece.get(key)
            seen[(node, p.layer if p is not None else key)] = None
        return list(seen)

    def is_demanding(self, node_id: str) -> bool:
        return self.inner.is_demanding(node_id)

    # -- transfers ------------------------------------------------------------
    def _outer(self, t: Transfer) -> Transfer:
        """The inner transfer of piece ``t.layer`` as the layer's transfer with its chunk range."""
        p = self._piece.get(t.layer)
        if p is None:
            return t
        # msgspec's copy-with-changes runs in C (this runs twice per transfer; the
        # simulator's 10,000-node runs make millions)
        return msgspec.structs.replace(t, layer=p.layer, first_chunk=p.first, end_chunk=p.end)

    def active(self) -> list[Transfer]:
        return [self._outer(t) for t in self.inner.active()]

    def active_for(self, node_id: str) -> list[Transfer]:
        return [self._outer(t) for t in self.inner.active_for(node_id)]

    def is_active(self, transfer_id: str) -> bool:
        return self.inner.is_active(transfer_id)

    def adopt(self, t: Transfer) -> Transfer:
        """Take back a running transfer; its chunk range names the piece.

        A whole-layer transfer (range 0, 0) of a layer now split is adopted as
        its first piece: its demander stays locked for that piece, and the
        agent's resumable partial keeps the rest from being sent twice.
        """
        key = self._key_of(t)
        split = len(self.pieces(t.layer)) > 1
        known = self._piece.get(key)
        if not split:
            key = t.layer  # a layer scheduled whole: the transfer's own range stays with it
        elif t.end_chunk and (known is None or known.end != t.end_chunk):
            raise SchedulerError(
                f"transfer {t.transfer_id}: no piece of {t.layer} is chunks "
                f"[{t.first_chunk}, {t.end_chunk})"
            )
        elif not t.end_chunk:
            key = self._keys(t.layer)[0]
        return self._outer(self.inner.adopt(msgspec.structs.replace(t, layer=key)))

    def receiving(self, node_id: str, layer: str) -> Transfer | None:
        """An active transfer bringing a piece of ``layer`` to ``node_id``, if any."""
        for k in self._keys(layer):
            t = self.inner.receiving(node_id, k)
            if t is not None:
                return self._outer(t)
        return None

    def receiving_piece(self, node_id: str, t: Transfer) -> Transfer | None:
        """The active transfer bringing the piece ``t`` moves to ``node_id``, if any."""
        up = self.inner.receiving(node_id, self._key_of(t))
        return None if up is None else self._outer(up)

    def schedule(self, now: float) -> list[Transfer]:
        return [self._outer(t) for t in self.inner.schedule(now)]

    def complete(
        self, transfer_id: str, now: float, bytes_moved: int = 0, seconds: float = 0.0
    ) -> Transfer:
        """The demander verified the piece; it holds the layer once :meth:`holds` says so.

        ``seconds`` is the demander's own time for the pull (0: not known): with
        the coordinator's time since the assignment it measures the transfer's
        fixed cost, which sizes the pieces not yet started (piece_growth.py).
        """
        t = self.inner.complete(transfer_id, now, bytes_moved)
        if self.growth.observe(now - t.started_at, seconds, bytes_moved):
            self.growth.grow(self._pieces, self._piece, self.inner)
        return self._outer(t)

    def take_growths(self) -> list[tuple[str, int, int]]:
        """The growths since the last call: (layer, chunks a piece may have, pieces now)."""
        return self.growth.take()

    def fail(self, transfer_id: str) -> Transfer:
        return self._outer(self.inner.fail(transfer_id))
