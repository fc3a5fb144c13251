"""LayerPuller: fetch a layer's missing chunks from an assigned seeder over SSH.

Trust: the seeder's host key is pinned from the assignment (which the
coordinator filled from its trust list); nothing is read from ``~/.ssh``
(no config, no known_hosts, no agent, no default identities), so a spoofed
address or DNS name fails the handshake with :class:`HostKeyMismatch`.

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

Throughput: requests are pipelined, keeping ``max(window, 32 MiB worth)``
chunks requested but not yet received; the SSH channel's receive window is
the hard bound, and the reader pauses the channel when verification/disk
falls behind. Hashing and disk writes run in a worker thread (hashlib drops
the GIL on large buffers) while the event loop keeps decrypting packets.

Protocol state (the request window, the chunk due next, and what each frame
or error code from the seeder means) is :class:`~rainbowd.core.chunksession.FetchSession`'s,
tested without sockets; :meth:`LayerPuller._fetch` is the I/O loop driving it.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh
import structlog

from rainbowd.core import chunkproto
from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.chunksession import FetchFailure, FetchSession
from rainbowd.core.digest import Digest, short
from rainbowd.core.messages import FailureKind, PeerInfo, TransferAssignment, TransferFailed
from rainbowd.lib.store import ChunkRejected, LayerStore, PartialLayer, StoreError

from ..metrics import AgentMetrics
from .chunk_io import INLINE_MAX_BYTES, runs_inline
from .keys import KeyFormatError, fingerprint, key_blob, parse_public_line
from .pacing import RatePacer
from .relay import RelayBoard
from .ssh_server import CHANNEL_MAX_PKTSIZE, CHANNEL_WINDOW, COMPRESSION_ALGS, ENCRYPTION_ALGS

log = structlog.get_logger(__name__)

ProgressCallback = Callable[[int, int, float], None]

#: the slowest a seeder may deliver a chunk before the pull gives up on it: a chunk may take
#: ``chunk_timeout`` or chunk_size / this, whichever is longer (chunk_wait_s). A flat 60 s
#: failed every 4 MiB chunk from a seeder sharing 1.5 Mbit/s between three demanders (the
#: namespace lab's bimodal profile: 15 of 26 failed transfers, each costing a slow node
#: 60 s); 16 KiB/s (0.13 Mbit/s) is below any uplink rbd plans for and still ends a
#: dribbling seeder's hold on a 4 MiB chunk within 256 s
MIN_CHUNK_RATE_BPS = 16 * 1024
#: chunks decoded but not yet verified before the channel is paused
QUEUE_HIGH_WATER = 4
#: persist the partial's bitmap (fdatasync + bitmap rewrite) after this many
#: bytes (or PartialLayer.FLUSH_SECONDS, whichever is first). A SIGKILL re-fetches
#: at most this much plus what was in flight; 8 MiB costs no measurable
#: throughput (bench/transfer_bench.py) and keeps a resume "only the missing
#: chunks" in practice, where 32 MiB was a whole small layer.
FLUSH_BYTES = 8 * 1024 * 1024
#: free space kept in hand beyond a layer's missing bytes before a pull starts
#: (bitmap, manifest and filesystem metadata need a little room too)
DISK_HEADROOM = 256 * 1024
#: minimum seconds between two on_progress calls
PROGRESS_INTERVAL = 0.25
#: SSH user name; the server ignores it (the key is the identity)
SSH_USER = "rbd"
#: connection attempts repeated after a seeder refused our client key (see LayerPuller._dial)
TRUST_RETRIES = 2
#: seconds between them: longer than ssh_server.TRUST_REFRESH_INTERVAL, so the seeder may
#: fetch its trust list again before the next attempt
TRUST_RETRY_DELAY = 1.5


class PullError(Exception):
    """A pull failed; ``kind`` is a FailureKind, ``reason`` names seeder, address and layer."""

    def __init__(
        self, kind: FailureKind, reason: str, seeder_fault: bool = False, not_held: bool = False
    ) -> None:
        super().__init__(reason)
        self.kind: FailureKind = kind
        self.reason = reason
        self.seeder_fault = seeder_fault
        #: the seeder answered not_held (the coordinator then stops counting it a holder)
        self.not_held = not_held

    def to_failed(self) -> TransferFailed:
        """The control-plane message reporting this failure."""
        return TransferFailed(
            reason=self.reason,
            kind=self.kind,
            seeder_fault=self.seeder_fault,
            not_held=self.not_held,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind!r}, {self.reason!r}, {self.seeder_fault})"


class HostKeyMismatch(PullError):
    """The seeder presented a host key other than the pinned one (spoofing?)."""

    def __init__(self, reason: str, presented: str | None = None) -> None:
        super().__init__("security", reason, seeder_fault=True)
        #: fingerprint of the key the far end presented, if it got that far
        self.presented = presented


@dataclass(frozen=True, slots=True)
class PullResult:
    bytes_moved: int  # chunk bytes fetched by this pull (resume moves less than the layer)
    seconds: float
    chunks_fetched: int
    #: the layer is installed (complete and verified); False: its piece is in, others missing
    installed: bool = True


class _Client(asyncssh.SSHClient):
    """Records the host key a seeder presented when it is not the pinned one."""

    def __init__(self) -> None:
        self.presented: str | None = None
        self.closed = False

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.presented = fingerprint(key)
        return False  # only the pinned key (known_hosts) is ever accepted

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True


def chunk_wait_s(chunk_size: int, chunk_timeout: float) -> float:
    """Seconds a pull waits for its next chunk: ``chunk_timeout``, or longer for big chunks.

    A chunk arrives whole, so a slow seeder is silent for a whole chunk's time:
    the wait is at least that time at ``MIN_CHUNK_RATE_BPS``.
    """
    return max(chunk_timeout, chunk_size / MIN_CHUNK_RATE_BPS)


class _ChunkClientSession(asyncssh.SSHClientSession[bytes]):
    """Client end of a chunk channel: decodes frames into a queue with backpressure.

    Working on raw packets (not asyncssh streams) saves a buffer copy and a
    task switch per packet; the queue holds whole chunks, and reading is
    paused when ``QUEUE_HIGH_WATER`` of them wait for verification, which
    stops SSH window adjusts and so throttles the seeder.
    """

    def __init__(self, max_chunk: int) -> None:
        self.decoder = chunkproto.Decoder("client", max_chunk=max_chunk)
        self.events: asyncio.Queue[chunkproto.Event | BaseException | None] = asyncio.Queue()
        self.chan: asyncssh.SSHClientChannel[bytes] | None = None
        self._chunks_queued = 0
        self._paused = False
        self._done = False

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        self.chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._done or datatype is not None:
            return
        try:
            evs = self.decoder.feed(data)
        except chunkproto.ProtocolError as e:
            self._finish(e)
            return
        for ev in evs:
            if isinstance(ev, chunkproto.Chunk):
                self._chunks_queued += 1
            self.events.put_nowait(ev)
        if self._chunks_queued >= QUEUE_HIGH_WATER and not self._paused and self.chan:
            self._paused = True
            self.chan.pause_reading()

    def eof_received(self) -> bool:
        try:
            self.decoder.eof()
        except chunkproto.ProtocolError as e:
            self._finish(e)
        else:
            self._finish(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc if exc is not None else None)

    def _finish(self, item: BaseException | None) -> None:
        if not self._done:
            self._done = True
            self.events.put_nowait(item)
            if item is not None and self.chan is not None:
                self.chan.close()

    async def next_event(self, timeout: float) -> chunkproto.Event | BaseException | None:
        # asyncio.timeout, not wait_for: wait_for wraps the get in a new task, per chunk
        async with asyncio.timeout(timeout):
            ev = await self.events.get()
        if isinstance(ev, chunkproto.Chunk):
            self._chunks_queued -= 1
            if self._paused and self._chunks_queued < QUEUE_HIGH_WATER and self.chan:
                self._paused = False
                self.chan.resume_reading()
        return ev

    def send(self, frame: bytes) -> None:
        assert self.chan is not None
        self.chan.write(frame)

    def close(self) -> None:
        self._done = True
        if self.chan is not None:
            self.chan.close()


@dataclass(slots=True)
class _PullCounters:
    """One pull's byte and chunk counters, and the seeder label its metrics carry.

    Not a transfer record (the pull's identity is its ``TransferAssignment``):
    counters kept outside ``_fetch`` so a failure can still log and count them.
    """

    peer: str = ""  # the seeder's node id (metrics label)
    moved: int = 0  # bytes of verified chunks written
    fetched: int = 0  # verified chunks written


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


_ConnKey = tuple[str, bytes, str, int]


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
        self.client_key = client_key
        self.node_id = node_id
        self.connect_timeout = connect_timeout
        self.chunk_timeout = chunk_timeout
        self.window = window
        self.encryption_algs = encryption_algs or ENCRYPTION_ALGS
        #: bytes received, chunk failures and pull durations (agent/metrics.py)
        self.metrics = metrics if metrics is not None else AgentMetrics()
        #: shared by every pull of this agent: the download cap is per node
        self.download_pacer = RatePacer(max_download_bps)
        #: tells this agent's ChunkServer which chunks of a pull have landed (cut-through)
        self.relay = relay
        #: chunks up to this size are checked and written on the event loop (chunk_io.py)
        self.inline_io_max = inline_io_max
        self._conns: dict[_ConnKey, asyncssh.SSHClientConnection] = {}
        self._clients: dict[_ConnKey, _Client] = {}
        self._locks: dict[_ConnKey, asyncio.Lock] = {}
        #: the pulls of each layer: overlapping ranges wait (see the module docstring)
        self._layers: dict[str, _LayerPulls] = {}
        self._pull_ids = itertools.count(1)
        #: see _dial (an attribute so tests of a refused key need not wait)
        self.trust_retry_delay = TRUST_RETRY_DELAY
        self._log = log.bind(node=node_id)

    def pulling(self, digest: str) -> int:
        """How many pulls of ``digest`` are running or waiting."""
        entry = self._layers.get(digest)
        return 0 if entry is None else entry.users

    def overlapping(self, digest: str, first: int, end: int) -> bool:
        """Whether a running pull of ``digest`` covers a chunk of [first, end)."""
        entry = self._layers.get(digest)
        return entry is not None and entry.overlaps(first, end)

    # -- connections -----------------------------------------------------
    async def connection(self, seeder: PeerInfo) -> asyncssh.SSHClientConnection:
        """The cached SSH connection to ``seeder`` (opened and authenticated if needed)."""
        where = f"seeder {seeder.node_id} at {seeder.address}:{seeder.ssh_port}"
        try:
            pinned = parse_public_line(seeder.host_key)
        except KeyFormatError as e:
            raise PullError("security", f"{where}: trust list host key unusable: {e}") from None
        key: _ConnKey = (seeder.node_id, key_blob(pinned), seeder.address, seeder.ssh_port)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            conn = self._conns.get(key)
            if conn is not None and not self._clients[key].closed:
                return conn
            self._conns.pop(key, None)
            client = _Client()
            try:
                conn = await self._dial(seeder, pinned, client)
            except asyncssh.HostKeyNotVerifiable as e:
                presented = client.presented
                reason = (
                    f"{where} presented host key {presented or '(unknown)'}, but the trust list "
                    f"pins {fingerprint(pinned)}: possible spoofing, not pulling ({e.reason})"
                )
                self._log.error(
                    "host_key_mismatch",
                    seeder=seeder.node_id,
                    address=seeder.address,
                    presented=presented,
                    pinned=fingerprint(pinned),
                )
                raise HostKeyMismatch(reason, presented) from None
            except asyncssh.PermissionDenied as e:
                raise PullError(
                    "security",
                    f"{where} refused our client key {fingerprint(self.client_key)} "
                    f"(not on its trust list yet?): {e.reason}",
                ) from None
            except TimeoutError as e:
                raise PullError("unreachable", f"{where}: connect timed out ({e})") from None
            except asyncssh.DisconnectError as e:
                raise PullError(
                    "unreachable", f"{where}: SSH handshake failed: {e.reason}"
                ) from None
            except OSError as e:
                raise PullError("unreachable", f"{where}: cannot connect: {e}") from None
            self._conns[key] = conn
            self._clients[key] = client
            self._log.info(
                "seeder_connected",
                seeder=seeder.node_id,
                address=f"{seeder.address}:{seeder.ssh_port}",
                cipher=conn.get_extra_info("send_cipher"),
            )
            return conn

    async def _dial(
        self, seeder: PeerInfo, pinned: asyncssh.SSHKey, client: _Client
    ) -> asyncssh.SSHClientConnection:
        """Connect and authenticate; a refused client key is tried again a few times.

        A seeder refusing our key most likely has not heard of this node yet
        (its trust list is behind; it fetches the list when it meets an
        unknown key, at most once per ssh_server.TRUST_REFRESH_INTERVAL), so
        the connection is retried TRUST_RETRIES times, TRUST_RETRY_DELAY apart,
        before the pull fails (kind ``security``, not the seeder's fault).
        """
        for attempt in range(TRUST_RETRIES + 1):
            try:
                return await asyncssh.connect(
                    seeder.address,
                    seeder.ssh_port,
                    client_factory=lambda: client,
                    username=SSH_USER,
                    config=[],
                    known_hosts=([pinned], [], []),
                    client_keys=[self.client_key],
                    agent_path=None,
                    agent_forwarding=False,
                    x509_trusted_certs=None,
                    x509_trusted_cert_paths=[],
                    pkcs11_provider=None,
                    password=None,
                    public_key_auth=True,
                    password_auth=False,
                    kbdint_auth=False,
                    host_based_auth=False,
                    gss_auth=False,
                    gss_kex=False,
                    preferred_auth=["publickey"],
                    encryption_algs=self.encryption_algs,
                    compression_algs=COMPRESSION_ALGS,
                    connect_timeout=self.connect_timeout,
                    login_timeout=self.connect_timeout,
                    keepalive_interval=30,
                    tcp_keepalive=True,
                    client_version="rbd",
                )
            except asyncssh.PermissionDenied:
                if attempt == TRUST_RETRIES:
                    raise
                self._log.info("client_key_refused_retry", seeder=seeder.node_id, attempt=attempt)
                await asyncio.sleep(self.trust_retry_delay)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Close every cached connection."""
        conns = list(self._conns.values())
        self._conns.clear()
        self._clients.clear()
        for conn in conns:
            conn.close()
        for conn in conns:
            await conn.wait_closed()

    # -- pulling ---------------------------------------------------------
    async def pull(
        self,
        assignment: TransferAssignment,
        on_progress: ProgressCallback | None = None,
    ) -> PullResult:
        """Fetch the missing chunks of the assignment's range from its seeder.

        Installs the layer when no chunk of it is missing afterwards (see the
        module docstring). Raises PullError (HostKeyMismatch for a wrong host
        key); on cancellation the partial is flushed and CancelledError
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
        counters = _PullCounters(peer=seeder.node_id)
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
                conn = await self.connection(seeder)
                done_of = (present, range_bytes)
                await self._fetch(
                    conn, partial, missing, done_of, t0, where, plog, on_progress, counters
                )
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

    async def _commit_if_complete(
        self, partial: PartialLayer, where: str, counters: _PullCounters
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
                f"node {self.node_id}: layer {manifest.digest} needs {_mib(needed)}"
                f"{f' more ({_mib(present)} already received)' if present else ''}, "
                f"{_mib(free)} free on {self.store.root}"
            )
            plog.error("pull_refused_disk_full", needed=needed, free=free, present=present)
            raise PullError("disk", reason)

    async def _write(self, partial: PartialLayer, index: int, data: bytes) -> None:
        """Check and write one received chunk; persist the bitmap when due.

        A layer of small chunks is checked and written on the loop (agent/dataplane/chunk_io.py);
        the flush (``fdatasync`` and a renamed bitmap) always runs in a thread.
        Neither is cut off by cancellation (see :func:`_uninterrupted`).
        """
        if not runs_inline(partial.manifest.chunk_size, self.inline_io_max):
            await _uninterrupted(partial.write_chunk, index, data)
            return
        partial.put_chunk(index, data)
        if partial.flush_due():
            await _uninterrupted(partial.flush)

    def _disk_error(self, e: OSError, manifest: ChunkManifest, what: str) -> PullError:
        """A PullError of kind ``disk`` naming node, layer, need and free space."""
        try:
            free = _mib(self.store.bytes_free())
        except OSError:
            free = "unknown"
        cause = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "disk error"
        return PullError(
            "disk",
            f"node {self.node_id}: layer {manifest.digest} ({_mib(manifest.size)}): "
            f"{cause} {what}, {free} free on {self.store.root}: {e}",
        )

    async def _open_channel(
        self, conn: asyncssh.SSHClientConnection, manifest: ChunkManifest, where: str
    ) -> _ChunkClientSession:
        try:
            _chan, session = await conn.create_session(
                lambda: _ChunkClientSession(manifest.chunk_size),
                subsystem=chunkproto.SUBSYSTEM,
                encoding=None,
                env={},
                send_env=[],
                request_pty=False,
                x11_forwarding=False,
                window=CHANNEL_WINDOW,
                max_pktsize=CHANNEL_MAX_PKTSIZE,
            )
        except asyncssh.ChannelOpenError as e:
            raise PullError("io", f"{where}: chunk channel refused: {e.reason}") from None
        except (asyncssh.Error, OSError) as e:
            raise PullError("io", f"{where}: cannot open chunk channel: {e}") from None
        assert isinstance(session, _ChunkClientSession)
        return session

    async def _fetch(
        self,
        conn: asyncssh.SSHClientConnection,
        partial: PartialLayer,
        missing: list[int],
        done_of: tuple[int, int],
        t0: float,
        where: str,
        plog: Any,
        on_progress: ProgressCallback | None,
        counters: _PullCounters,
    ) -> None:
        """Fetch ``missing`` over one channel; the FetchSession (chunksession) says what to do.

        This loop only waits for events, writes chunks, paces and reports
        progress; which chunks to request, which one is due and what each
        frame means are the session's.
        """
        manifest = partial.manifest
        present, total = done_of  # bytes of the range already here, and of the whole range
        channel = await self._open_channel(conn, manifest, where)
        fetch = FetchSession(
            manifest.digest,
            missing,
            chunk_size=manifest.chunk_size,
            window=self.window,
            where=where,
        )
        last_progress = 0.0
        wait_s = chunk_wait_s(manifest.chunk_size, self.chunk_timeout)
        try:
            if (frame := fetch.next_request()) is not None:
                channel.send(frame)
            while not fetch.done:
                try:
                    ev = await channel.next_event(wait_s)
                except TimeoutError:
                    raise self._chunk_failure(fetch.timed_out(wait_s), counters, plog) from None
                if isinstance(ev, chunkproto.Chunk):
                    self.metrics.received(counters.peer, len(ev.data))
                step = fetch.receive(ev)
                if isinstance(step, FetchFailure):
                    raise self._chunk_failure(step, counters, plog)
                if step is None:
                    continue
                await self._land(partial, fetch, step, where, plog, counters)
                await self.download_pacer.pace(len(step.data))
                if (frame := fetch.next_request()) is not None:
                    channel.send(frame)
                now = time.monotonic()
                if on_progress is not None and now - last_progress >= PROGRESS_INTERVAL:
                    last_progress = now
                    on_progress(
                        present + counters.moved, total, counters.moved / max(now - t0, 1e-9)
                    )
        finally:
            channel.close()

    async def _land(
        self,
        partial: PartialLayer,
        fetch: FetchSession,
        chunk: chunkproto.Chunk,
        where: str,
        plog: Any,
        counters: _PullCounters,
    ) -> None:
        """Verify and write the chunk due, and tell the relay and the counters it landed."""
        try:
            await self._write(partial, chunk.index, chunk.data)
        except ChunkRejected as e:
            failure = fetch.chunk_rejected(chunk.index, len(chunk.data), str(e))
            raise self._chunk_failure(failure, counters, plog) from None
        except OSError as e:
            raise self._disk_error(e, partial.manifest, f"writing chunk {chunk.index}") from None
        except StoreError as e:  # the shared partial was discarded under us
            raise PullError("io", f"node {self.node_id}: {where}: {e}") from None
        fetch.chunk_written(chunk.index)
        if self.relay is not None:
            self.relay.landed(partial.manifest.digest, chunk.index)
        counters.moved += len(chunk.data)
        counters.fetched += 1

    def _chunk_failure(
        self, failure: FetchFailure, counters: _PullCounters, plog: Any
    ) -> PullError:
        """Log and count a failure the FetchSession named; the PullError that ends the pull."""
        if failure.log_event:
            plog.error(failure.log_event, **dict(failure.log_fields))
        self.metrics.chunk_failure(counters.peer, failure.metric)
        return PullError(
            failure.kind,
            failure.reason,
            seeder_fault=failure.seeder_fault,
            not_held=failure.not_held,
        )


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


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


async def _uninterrupted(func: Callable[..., object], *args: Any) -> None:
    """Run ``func`` in a thread and let it finish even if we are cancelled.

    A chunk write cut off by cancellation would otherwise race the partial's
    close(): the thread could pwrite to a file descriptor already closed (or
    reused), so the write always completes before cancellation proceeds.
    """
    task = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        try:
            await task
        except Exception:
            pass
        raise


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
