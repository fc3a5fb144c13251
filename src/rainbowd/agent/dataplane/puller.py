"""LayerPuller: fetch a layer's missing chunks from an assigned seeder over SSH.

Trust: the seeder's host key is pinned from the assignment (which the
coordinator filled from its trust list); nothing is read from ``~/.ssh``
(no config, no known_hosts, no agent, no default identities), so a spoofed
address or DNS name fails the handshake with a HostKeyMismatch
(seeder_connections.py).

Integrity: every chunk is checked against the manifest the *coordinator*
gave us (``PartialLayer.write_chunk``) before it is written, and the whole
digest is checked by ``commit()`` before the layer is atomically installed.
A chunk that fails the check is the seeder's fault (SSH already protects the
bytes in transit) and aborts the pull with kind ``verify``.

Resumption: only the missing chunks are requested, and whatever happens
(error, seeder gone, task cancelled) the partial's bitmap is flushed, so the
next pull, from this seeder or another, moves only what is still missing.
After a SIGKILL, at most FLUSH_BYTES (or PartialLayer.FLUSH_SECONDS worth) of
received chunks are fetched again.

Pieces: an assignment may name a run of chunks, [first_chunk, end_chunk), of
its layer (one *piece*); the pull fetches only the missing chunks of that
range. Pulls of one layer whose ranges do not overlap run at once, from
different seeders, into one shared partial (``LayerStore.share_partial``:
each chunk written once, bitmap updates and flushes serialized). A pull whose
range overlaps a running one waits for it, then fetches only what is still
missing (nothing, if the layer was installed meanwhile), so no chunk is moved
twice. When a pull has its range and no chunk of the layer is missing, the
layer is committed (whole digest, atomic install; exactly once, whichever pull
gets there first) before the pull returns; a pull that leaves chunks of other
pieces missing returns with the layer still partial (its chunks flushed), and
one that fails keeps the chunks it got for the next transfer of its piece.

Disk: before any byte moves, the free space of the store is checked against
the layer's missing bytes; a pull that cannot fit fails at once with kind
``disk`` and a reason naming node, layer, bytes needed and bytes free, and
a partial is never committed unless every chunk is present and the whole
digest matches (``PartialLayer.commit``).

The parts: the loop that moves the chunks is
:class:`~rainbowd.agent.dataplane.chunk_fetch.ChunkFetcher` (chunk_fetch.py),
stopping on a failure with a PullError (pull_failures.py) reported as it
is; the
seeder's connection (pinned host key, client-key retries) is
:class:`~rainbowd.agent.dataplane.seeder_connections.SeederConnections`'s;
this module keeps the course of a pull (the layer's running pulls, disk
space, the install).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import asyncssh
import structlog

from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.digest import Digest, short
from rainbowd.core.messages import TransferAssignment
from rainbowd.lib.store import LayerStore, PartialLayer, StoreError

from ..metrics import AgentMetrics
from .chunk_channels import ChunkChannels
from .chunk_fetch import ChunkFetcher, ProgressCallback, PullCounters
from .chunk_io import INLINE_MAX_BYTES
from .pacing import RatePacer
from .pull_failures import PullError, disk_reason, mib
from .relay import RelayBoard
from .seeder_connections import SeederConnections
from .ssh_server import ENCRYPTION_ALGS

log = structlog.get_logger(__name__)

#: persist the partial's bitmap (fdatasync + bitmap rewrite) after this many
#: bytes (or PartialLayer.FLUSH_SECONDS, whichever is first). A SIGKILL re-fetches
#: at most this much plus what was in flight; 8 MiB costs no measurable
#: throughput (bench/transfer_bench.py) and keeps a resume "only the missing
#: chunks" in practice, where 32 MiB was a whole small layer.
FLUSH_BYTES = 8 * 1024 * 1024
#: free space kept in hand beyond a layer's missing bytes before a pull starts
#: (bitmap, manifest and filesystem metadata need a little room too)
DISK_HEADROOM = 256 * 1024


@dataclass(frozen=True, slots=True)
class PullResult:
    bytes_moved: int  # chunk bytes fetched by this pull (resume moves less than the layer)
    seconds: float
    chunks_fetched: int
    #: the layer is installed (complete and verified); False: its piece is in, others missing
    installed: bool = True


@dataclass(slots=True)
class _LayerPulls:
    """The pulls of one layer: ranges running now; dropped when nobody runs or waits."""

    running: dict[int, tuple[int, int]] = field(default_factory=dict)  # id -> [first, end)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    users: int = 0

    def overlaps(self, first: int, end: int) -> bool:
        return any(f < end and first < e for f, e in self.running.values())

    def wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class LayerPuller:
    """Pull layers chunk by chunk from seeders into ``store``."""

    def __init__(
        self,
        store: LayerStore,
        client_key: asyncssh.SSHKey,
        *,
        node_id: str,
        connect_timeout: float = 10.0,
        chunk_timeout: float = 60.0,
        window: int = 4,
        encryption_algs: list[str] | None = None,
        metrics: AgentMetrics | None = None,
        max_download_bps: float = 0.0,
        relay: RelayBoard | None = None,
        inline_io_max: int = INLINE_MAX_BYTES,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.store = store
        self.node_id = node_id
        self.chunk_timeout = chunk_timeout
        self.window = window
        #: bytes received, chunk failures and pull durations (agent/metrics.py)
        self.metrics = metrics if metrics is not None else AgentMetrics()
        #: shared by every pull of this agent: the download cap is per node
        self.download_pacer = RatePacer(max_download_bps)
        #: tells this agent's ChunkServer which chunks of a pull have landed (cut-through)
        self.relay = relay
        #: chunks up to this size are checked and written on the event loop (chunk_io.py)
        self.inline_io_max = inline_io_max
        #: the pulls of each layer: overlapping ranges wait (see the module docstring)
        self._layers: dict[str, _LayerPulls] = {}
        self._pull_ids = itertools.count(1)
        self._log = log.bind(node=node_id)
        #: the SSH connection to each seeder, opened once and pinned (seeder_connections.py)
        self.connections = SeederConnections(
            client_key,
            connect_timeout=connect_timeout,
            encryption_algs=encryption_algs or ENCRYPTION_ALGS,
            log=self._log,
        )
        #: the idle chunk channel(s) the last pulls from each seeder left (chunk_channels.py)
        self.channels = ChunkChannels(self.metrics)

    def pulling(self, digest: str) -> int:
        """How many pulls of ``digest`` are running or waiting."""
        entry = self._layers.get(digest)
        return 0 if entry is None else entry.users

    def overlapping(self, digest: str, first: int, end: int) -> bool:
        """Whether a running pull of ``digest`` covers a chunk of [first, end)."""
        entry = self._layers.get(digest)
        return entry is not None and entry.overlaps(first, end)

    async def close(self) -> None:
        """Close every idle chunk channel and cached seeder connection."""
        self.channels.close()
        await self.connections.close()

    # -- pulling ---------------------------------------------------------
    async def pull(
        self,
        assignment: TransferAssignment,
        on_progress: ProgressCallback | None = None,
    ) -> PullResult:
        """Fetch the missing chunks of the assignment's range from its seeder.

        Installs the layer when no chunk of it is missing afterwards (see the
        module docstring). Raises PullError (HostKeyMismatch for a wrong host
        key; both in pull_failures.py); on cancellation the partial is flushed and CancelledError
        propagates (report "cancelled"). A pull overlapping a running pull of
        the same layer waits for it.
        """
        digest = assignment.layer.digest
        first, end = assignment.chunk_range()
        entry = self._layers.get(digest)
        if entry is None:
            entry = self._layers[digest] = _LayerPulls()
        entry.users += 1
        pull_id = next(self._pull_ids)
        try:
            if entry.overlaps(first, end):
                self._log.info(
                    "pull_waits_for_running_pull",
                    layer=short(digest),
                    transfer=assignment.transfer_id,
                )
            while entry.overlaps(first, end):
                await entry.changed.wait()
            entry.running[pull_id] = (first, end)
            t0 = time.monotonic()
            try:
                result = await self._pull(assignment, on_progress)
            except BaseException as e:
                self.metrics.transfer_ended(_outcome(e), time.monotonic() - t0)
                raise
            self.metrics.transfer_ended("done", time.monotonic() - t0)
            return result
        finally:
            if entry.running.pop(pull_id, None) is not None:
                entry.wake()
            entry.users -= 1
            if entry.users == 0 and self._layers.get(digest) is entry:
                del self._layers[digest]

    async def _pull(
        self,
        assignment: TransferAssignment,
        on_progress: ProgressCallback | None,
    ) -> PullResult:
        manifest = assignment.layer
        digest = Digest(manifest.digest)
        seeder = assignment.seeder
        first, end = assignment.chunk_range()
        piece = "" if (first, end) == (0, manifest.count) else f" chunks [{first}, {end})"
        where = (
            f"seeder {seeder.node_id} at {seeder.address}:{seeder.ssh_port}, layer {digest}{piece}"
        )
        plog = self._log.bind(
            layer=short(digest), seeder=seeder.node_id, transfer=assignment.transfer_id
        )
        if piece:
            plog = plog.bind(first_chunk=first, end_chunk=end)
        t0 = time.monotonic()
        if await asyncio.to_thread(self.store.has, digest):
            plog.info("pull_skipped_already_held")
            return PullResult(0, 0.0, 0)
        await self._check_space(manifest, first, end, plog)
        try:
            partial = await asyncio.to_thread(self.store.share_partial, manifest)
        except OSError as e:
            raise self._disk_error(e, manifest, "opening its partial") from None
        except StoreError as e:
            raise PullError("io", f"node {self.node_id}: {where}: {e}") from None
        # instance override of the class default (4 chunks): sync per ~FLUSH_BYTES
        # (and per PartialLayer.FLUSH_SECONDS), whatever the chunk size
        partial.FLUSH_EVERY = max(1, FLUSH_BYTES // manifest.chunk_size)
        counters = PullCounters(peer=seeder.node_id)
        relay = self.relay
        token = 0
        if relay is not None:
            token = relay.begin(
                manifest, partial.data_path, list(partial.bitmap.present()), first, end
            )
        range_bytes = _range_bytes(manifest, first, end)
        installed = False
        try:
            missing = partial.missing_in(first, end)
            present = range_bytes - sum(manifest.chunk_length(i) for i in missing)
            plog.info("pull_started", missing=len(missing), chunks=end - first)
            if missing:
                async with self.connections.use(seeder) as conn:
                    fetcher = self._fetcher(partial, counters, where, plog)
                    await fetcher.fetch(conn, missing, (present, range_bytes), t0, on_progress)
            installed = await self._commit_if_complete(partial, where, counters)
        except BaseException as e:
            await _shield_release(self.store, partial)
            if isinstance(e, PullError):
                plog.warning("pull_failed", kind=e.kind, reason=e.reason, moved=counters.moved)
            elif isinstance(e, asyncio.CancelledError):
                plog.info("pull_cancelled", moved=counters.moved)
            raise
        else:
            await _shield_release(self.store, partial)
        finally:
            if relay is not None:
                why = "" if installed else f"pull from {seeder.node_id} ended"
                relay.end(digest, installed=installed, why=why, token=token)
        seconds = time.monotonic() - t0
        moved, fetched = counters.moved, counters.fetched
        if on_progress is not None:
            on_progress(range_bytes, range_bytes, moved / seconds if seconds > 0 else 0.0)
        plog.info(
            "pull_done",
            bytes=moved,
            chunks=fetched,
            seconds=round(seconds, 3),
            mbps=round(moved / seconds / 1e6, 1) if seconds > 0 else None,
            installed=installed,
        )
        return PullResult(moved, seconds, fetched, installed)

    def _fetcher(
        self, partial: PartialLayer, counters: PullCounters, where: str, plog: Any
    ) -> ChunkFetcher:
        """The fetch loop of one pull, with this puller's settings and shared parts."""
        return ChunkFetcher(
            self.store,
            partial,
            counters,
            where=where,
            log=plog,
            node_id=self.node_id,
            window=self.window,
            chunk_timeout=self.chunk_timeout,
            inline_io_max=self.inline_io_max,
            metrics=self.metrics,
            pacer=self.download_pacer,
            relay=self.relay,
            channels=self.channels,
        )

    def _disk_error(self, e: OSError, manifest: ChunkManifest, what: str) -> PullError:
        """A PullError of kind ``disk`` naming this node, the layer, need and free space."""
        reason = disk_reason(
            e, node_id=self.node_id, store=self.store, manifest=manifest, what=what
        )
        return PullError("disk", reason)

    async def _commit_if_complete(
        self, partial: PartialLayer, where: str, counters: PullCounters
    ) -> bool:
        """Install the layer if no chunk of it is missing; True if it is installed (by anyone).

        ``PartialLayer.commit`` runs the whole-digest check and the install once;
        a pull arriving second waits for it and gets the same outcome.
        """
        manifest = partial.manifest
        if not partial.complete():
            return await asyncio.to_thread(self.store.has, Digest(manifest.digest))
        try:
            await asyncio.to_thread(partial.commit)
        except OSError as e:
            raise self._disk_error(e, manifest, "installing it") from None
        except StoreError as e:
            # every chunk matched yet the whole did not: the manifest is wrong
            self.metrics.chunk_failure(counters.peer, "layer_digest")
            raise PullError("verify", f"{where}: {e}") from None
        return True

    async def _check_space(self, manifest: ChunkManifest, first: int, end: int, plog: Any) -> None:
        """Fail fast (kind ``disk``) if the store cannot hold the range's missing bytes.

        Checked before the partial is created, so a pull that cannot fit
        leaves nothing behind and moves nothing; the reason names the node,
        the layer, what is needed and what is free, which is what an operator
        needs to act on.
        """
        shared = self.store.shared_partial(manifest.digest)
        if shared is not None and shared.manifest == manifest:
            missing = shared.missing_in(first, end)
        else:
            missing = await asyncio.to_thread(self.store.partial_missing, manifest, first, end)
        needed = sum(manifest.chunk_length(i) for i in missing)
        present = _range_bytes(manifest, first, end) - needed
        free = await asyncio.to_thread(self.store.bytes_free)
        if needed + DISK_HEADROOM > free:
            reason = (
                f"node {self.node_id}: layer {manifest.digest} needs {mib(needed)}"
                f"{f' more ({mib(present)} already received)' if present else ''}, "
                f"{mib(free)} free on {self.store.root}"
            )
            plog.error("pull_refused_disk_full", needed=needed, free=free, present=present)
            raise PullError("disk", reason)


def _outcome(e: BaseException) -> str:
    """The ``outcome`` label of a pull that raised ``e``."""
    if isinstance(e, PullError):
        return e.kind
    if isinstance(e, asyncio.CancelledError):
        return "cancelled"
    return "error"


def _range_bytes(manifest: ChunkManifest, first: int, end: int) -> int:
    """Bytes of chunks [first, end) of the layer."""
    if end <= first:
        return 0
    return min(manifest.size, end * manifest.chunk_size) - first * manifest.chunk_size


async def _shield_release(store: LayerStore, partial: PartialLayer) -> None:
    """Let go of the shared partial, its bitmap persisted even while being cancelled.

    So the next pull resumes, and a pull reporting its chunks done has them on disk.
    """
    task = asyncio.ensure_future(asyncio.to_thread(store.release_partial, partial))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
    except OSError as e:
        log.warning("partial_flush_failed", layer=short(partial.digest), error=str(e))
