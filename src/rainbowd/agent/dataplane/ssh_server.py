"""ChunkServer: the agent's SSH server, which serves layer chunks to trusted peers.

What it accepts, and why so little:

* **Authentication**: public key only, and only keys that are some peer's
  ``client_key`` in the coordinator's current trust list. No passwords, no
  keyboard-interactive, no host-based or GSS auth, no ``authorized_keys``
  file and no config file read from the host. Which keys, the list's refresh
  when an unknown key knocks, and the record of refused keys are
  :class:`~rainbowd.agent.dataplane.ssh_trust.ClientTrust`'s (ssh_trust.py).
* **Channels**: only ``session`` channels, and on them only the
  :data:`~rainbowd.core.chunkproto.SUBSYSTEM` subsystem. Shell, exec, pty,
  X11/agent forwarding, SFTP/SCP, TCP/unix forwarding and tun/tap are all
  *refused at request time* (the SSH channel request fails), because the
  session object answers False to ``shell_requested``/``exec_requested`` and
  the server refuses everything else asyncssh would otherwise offer. A peer
  with a trusted key can read the layers it could anyway pull and nothing else.
* **Serving**: complete (verified, immutable) layers in the
  :class:`~rainbowd.lib.store.LayerStore`; any verified chunk of a partial layer
  (a layer pulled here piece by piece, whether a pull of it runs now or not:
  its bit is set in the partial's bitmap); and -- with a
  :class:`~agent.relay.RelayBoard` (cut-through relay) -- a chunk a pull
  here is bringing right now is waited for (woken by the puller when it
  lands) up to ``relay_wait_s`` seconds, then answered with ERROR
  ``unavailable`` so the demander fails over. A chunk neither here nor
  covered by a running pull is answered after at most ``relay_start_s``
  (the pull that brings it may be on its way), at once if its pull ended
  without it. A partial being served is pinned in the store (never discarded
  meanwhile). Every chunk is read through the store by
  :func:`~rainbowd.agent.dataplane.chunk_source.read_chunk` (the one reader the
  registry front door shares; :meth:`~rainbowd.lib.store.LayerStore.read_blob_chunk`,
  :meth:`~rainbowd.lib.store.LayerStore.read_partial_chunk`), in a worker thread
  unless the chunk is small (agent/dataplane/chunk_io.py), so the event loop keeps every
  other transfer moving; the next chunks are read while the current one
  drains (``await writer.drain()`` is the flow control: the demander's SSH
  window bounds what is in flight). What to read next, the frames and the
  ERROR answering each failed read are :class:`~rainbowd.core.chunksession.ServeSession`'s.
* **Verify before sending** (``verify_reads``, on by default): each chunk read
  from disk is checked against the layer's stored chunk manifest (one sha256
  per chunk, in the same thread as the read). A blob that rotted on disk
  (bit flip, bad sector, someone editing it) is answered with an ERROR frame
  ``corrupt`` instead of bad bytes (and ``on_corrupt`` is told, so the agent
  drops its copy and stops advertising it): the demander fails the transfer at once as
  the seeder's fault (the coordinator counts it against us and re-plans), no
  bad byte crosses the wire, and this node learns *its own* copy is bad
  (:attr:`ChunkServer.corrupt_layers`, shown by ``rbd-agent status``). The
  demander still checks every chunk itself: a seeder is never trusted.
  Measured cost in bench/transfer_bench.py: see bench/README.md.
* **Upload cap** (``max_upload_bps``, off by default): paces chunk writes so
  this host's uplink is not saturated by serving (and lets tests make a
  loopback transfer last long enough to break it on purpose).
* **Connection limits** (:class:`~agent.ssh_limits.SshLimits`): connections in
  total, per peer, not yet authenticated, channels per connection, login
  timeout, and all of it under the descriptor limit; see agent/dataplane/ssh_limits.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

import asyncssh
import structlog
from asyncssh.stream import SSHServerStreamSession

from rainbowd.core import chunkproto
from rainbowd.core.chunksession import (
    ReadFailure,
    Refusal,
    ServeSession,
    bad_request_frame,
    internal_error_frame,
)
from rainbowd.core.digest import Digest, short
from rainbowd.core.messages import TrustList
from rainbowd.lib.store import CorruptBlob, LayerMissing, LayerStore

from .chunk_io import INLINE_MAX_BYTES
from .chunk_source import Where, read_chunk
from .keys import fingerprint
from .pacing import RatePacer
from .relay import RelayBoard, RelayNotPulling, RelayUnavailable
from .ssh_limits import ConnectionGate, SshLimits, fd_budget
from .ssh_trust import ClientTrust, OnRefused, RefreshTrust, RefusedClient

log = structlog.get_logger(__name__)

#: AES-GCM first: AES-NI makes it the fastest here; chacha20 as the fallback
ENCRYPTION_ALGS = [
    "aes128-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes256-gcm@openssh.com",
]
#: layers are compressed already (or incompressible): zlib would only burn CPU
COMPRESSION_ALGS = ["none"]
#: SSH channel window and packet size used on both ends of a chunk channel.
#: Larger packets than OpenSSH's 32 KiB cut the per-packet Python overhead of
#: asyncssh, which is what bounds throughput; both ends are asyncssh.
CHANNEL_WINDOW = 8 * 1024 * 1024
CHANNEL_MAX_PKTSIZE = 256 * 1024
#: pending REQUEST frames per channel before the server stops reading more
MAX_PENDING_REQUESTS = 16


#: what each exception of a chunk read means on the wire (chunksession.ServeSession.refuse);
#: a subclass before its base (RelayNotPulling is a RelayUnavailable)
READ_FAILURES: tuple[tuple[type[Exception], ReadFailure], ...] = (
    (LayerMissing, "layer_missing"),
    (IndexError, "bad_index"),
    (RelayNotPulling, "relay_not_pulling"),
    (RelayUnavailable, "relay_unavailable"),
    (CorruptBlob, "corrupt"),
)


def read_failure(error: BaseException) -> ReadFailure | None:
    """The answerable failure ``error`` is, or None (the channel then fails ``internal``)."""
    return next((failure for kind, failure in READ_FAILURES if isinstance(error, kind)), None)


class ChunkServer:
    """Serve complete layers of ``store`` to peers on the trust list, over SSH."""

    def __init__(
        self,
        store: LayerStore,
        host_key: asyncssh.SSHKey,
        *,
        node_id: str,
        on_refused: OnRefused | None = None,
        limits: SshLimits | None = None,
        verify_reads: bool = True,
        max_upload_bps: float = 0.0,
        on_served: Callable[[str], None] | None = None,
        relay: RelayBoard | None = None,
        relay_wait_s: float = 20.0,
        relay_start_s: float = 5.0,
        inline_io_max: int = INLINE_MAX_BYTES,
        refresh_trust: RefreshTrust | None = None,
        on_corrupt: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self._clock = clock
        #: told (layer, why) each time a stored blob fails its manifest while serving
        self.on_corrupt = on_corrupt
        #: chunks up to this size are read and checked on the event loop (chunk_io.py)
        self.inline_io_max = inline_io_max
        #: chunks of layers still being pulled here (None: serve complete layers only)
        self.relay = relay
        #: longest wait for a chunk a relay does not have yet; below the demander's
        #: chunk timeout (60 s), so the demander hears "unavailable" and fails over
        self.relay_wait_s = relay_wait_s
        #: how long a request for a layer not held waits for a pull of it to start
        #: (a relay's own assignment may arrive after its demander connects)
        self.relay_start_s = relay_start_s
        #: called with a layer's digest after chunks of it were sent (its use time)
        self.on_served = on_served
        #: layer -> requests being answered right now (such a layer is not evicted)
        self.serving: dict[str, int] = {}
        self.verify_reads = verify_reads
        self.max_upload_bps = max_upload_bps
        #: chunks served from a partial layer (pulled here piece by piece, or being pulled)
        self.partial_chunks_served = 0
        #: layers whose stored blob failed verification while serving: digest -> why
        self.corrupt_layers: dict[str, str] = {}
        self._pacer = RatePacer(max_upload_bps)
        self.host_key = host_key
        self.node_id = node_id
        self.limits = limits or SshLimits()
        self.limits.check()
        #: counts connections by state and admits or refuses them (agent/dataplane/ssh_limits.py)
        self.gate = ConnectionGate(self.limits, fd_budget())
        #: bytes of chunk data served, per demanding peer (node id)
        self.bytes_served: dict[str, int] = {}
        #: chunks served per demanding peer (node id)
        self.chunks_served: dict[str, int] = {}
        self._conns: dict[_PeerConnection, None] = {}
        self._listener: asyncssh.SSHAcceptor | None = None
        self._log = log.bind(node=node_id)
        #: the client keys let in, the trust list's refresh and the keys refused (ssh_trust.py)
        self.trust = ClientTrust(
            log=self._log,
            refresh_trust=refresh_trust,
            on_refused=on_refused,
            on_update=self._drop_untrusted,
            clock=clock,
        )

    # -- trust -----------------------------------------------------------
    def update_trust(self, trust: TrustList) -> None:
        """Replace the set of client keys allowed in; drop connections no longer trusted."""
        self.trust.update(trust)

    def trusted_peer(self, blob: bytes) -> str | None:
        return self.trust.peer_of(blob)

    @property
    def trust_version(self) -> int:
        """The version of the trust list in force (-1 before the first)."""
        return self.trust.trust_version

    @property
    def trust_refreshes(self) -> int:
        """Fetches of the trust list made for unknown keys."""
        return self.trust.trust_refreshes

    @property
    def refused_clients(self) -> list[RefusedClient]:
        """Recent refused client keys (newest last), see also :attr:`refused_count`."""
        return self.trust.refused_clients

    @property
    def refused_count(self) -> int:
        """Client keys refused since start (past the records kept)."""
        return self.trust.refused_count

    def _evict_idle(self, newcomer: _PeerConnection) -> None:
        """Close the peer connection idle longest to admit ``newcomer`` (if any is idle).

        Idle: admitted, no chunk channel open. Its demander reconnects when it
        pulls from here again (a handshake); a connection with a pull running is
        never closed for another (ssh_limits.py, ``max_connections``).
        """
        idle = [
            pc
            for pc in self._conns
            if pc is not newcomer and pc.counted == "peer" and pc.channels == 0
        ]
        if not idle:
            return
        victim = min(idle, key=lambda pc: pc.idle_since)
        self.gate.closed(victim.peer, was_pending=False)
        victim.counted = ""  # counted out here: its close must not count it again
        self.gate.evicted += 1
        self._log.info(
            "peer_idle_closed",
            peer=victim.peer,
            address=victim.address,
            idle_s=round(self._clock() - victim.idle_since, 3),
            admitted=newcomer.peer,
        )
        victim.disconnect()

    def _drop_untrusted(self, trusted: Mapping[bytes, str]) -> None:
        """After a trust list update: close the connections whose peer it no longer trusts."""
        for pc in list(self._conns):
            if pc.key_blob is not None and trusted.get(pc.key_blob) != pc.peer:
                self._log.warning("peer_untrusted_disconnect", peer=pc.peer, address=pc.address)
                pc.disconnect()

    # -- lifecycle -------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 = ephemeral); return the bound port."""
        if self._listener is not None:
            raise RuntimeError("ChunkServer already started")
        self._listener = await asyncssh.listen(
            host,
            port,
            server_factory=lambda: _PeerConnection(self),
            server_host_keys=[self.host_key],
            server_version="rbd",
            config=None,
            authorized_client_keys=None,
            known_client_hosts=None,
            public_key_auth=True,
            password_auth=False,
            kbdint_auth=False,
            host_based_auth=False,
            gss_host=None,
            gss_kex=False,
            gss_auth=False,
            allow_pty=False,
            agent_forwarding=False,
            x11_forwarding=False,
            sftp_factory=None,
            allow_scp=False,
            line_editor=False,
            encryption_algs=ENCRYPTION_ALGS,
            compression_algs=COMPRESSION_ALGS,
            login_timeout=self.limits.login_timeout,
            keepalive_interval=30,
            tcp_keepalive=True,
            window=CHANNEL_WINDOW,
            max_pktsize=CHANNEL_MAX_PKTSIZE,
            reuse_address=True,
        )
        bound = int(self._listener.get_port())
        self._log.info("chunk_server_listening", host=host, port=bound, max_open=self.gate.max_open)
        return bound

    async def close(self) -> None:
        """Stop listening and close every peer connection."""
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()
            self._listener = None
        for pc in list(self._conns):
            pc.disconnect()
        for pc in list(self._conns):
            await pc.wait_closed()
        self._conns.clear()

    # -- serving ---------------------------------------------------------
    async def _pace(self, nbytes: int) -> None:
        """Hold the sender to ``max_upload_bps`` across all channels (see pacing.py)."""
        if self._pacer.bps != self.max_upload_bps:
            self._pacer = RatePacer(self.max_upload_bps)
        await self._pacer.pace(nbytes)

    async def _serve_channel(
        self,
        peer: str,
        stdin: asyncssh.SSHReader[bytes],
        stdout: asyncssh.SSHWriter[bytes],
    ) -> None:
        """Speak chunkproto on one subsystem channel until the peer closes it."""
        plog = self._log.bind(peer=peer)
        requests: asyncio.Queue[chunkproto.Request | chunkproto.ProtocolError | None] = (
            asyncio.Queue(MAX_PENDING_REQUESTS)
        )
        reader = asyncio.create_task(self._read_requests(stdin, requests, plog))
        try:
            await self._send_chunks(peer, requests, stdout, plog)
        except chunkproto.ProtocolError as e:
            plog.warning("chunk_channel_protocol_error", error=str(e))
            stdout.write(bad_request_frame(e))
        except (asyncssh.Error, ConnectionError, BrokenPipeError) as e:
            plog.info("chunk_channel_lost", error=str(e))
        except Exception as e:
            plog.exception("chunk_channel_failed")
            stdout.write(internal_error_frame(e))
        finally:
            reader.cancel()
            try:
                await reader
            except (asyncio.CancelledError, Exception):
                pass
            chan = stdout.channel
            if isinstance(chan, asyncssh.SSHServerChannel):
                chan.exit(0)
            else:
                chan.close()

    async def _read_requests(
        self,
        stdin: asyncssh.SSHReader[bytes],
        requests: asyncio.Queue[chunkproto.Request | chunkproto.ProtocolError | None],
        plog: Any,
    ) -> None:
        dec = chunkproto.Decoder("server")
        try:
            while data := await stdin.read(65536):
                for ev in dec.feed(data):
                    assert isinstance(ev, chunkproto.Request)
                    await requests.put(ev)
            dec.eof()
            await requests.put(None)
        except chunkproto.ProtocolError as e:
            await requests.put(e)
        except (asyncssh.Error, ConnectionError) as e:
            plog.debug("chunk_channel_read_ended", error=str(e))
            await requests.put(None)

    async def _send_chunks(
        self,
        peer: str,
        requests: asyncio.Queue[chunkproto.Request | chunkproto.ProtocolError | None],
        stdout: asyncssh.SSHWriter[bytes],
        plog: Any,
    ) -> None:
        """Answer requests in order; what to read and send is the ServeSession's (chunksession)."""
        while True:
            req = await requests.get()
            if req is None:
                return
            if isinstance(req, chunkproto.ProtocolError):
                raise req
            if not await self._answer(peer, req, stdout, plog):
                return

    async def _answer(
        self,
        peer: str,
        req: chunkproto.Request,
        stdout: asyncssh.SSHWriter[bytes],
        plog: Any,
    ) -> bool:
        """Send the chunks of one request and its END; False if a read failed (ERROR sent)."""
        layer = req.layer
        answer = ServeSession(req, node_id=self.node_id, max_packet=CHANNEL_MAX_PKTSIZE)
        reads: list[asyncio.Task[tuple[int, bytes]]] = []
        t0 = time.monotonic()
        self.serving[layer] = self.serving.get(layer, 0) + 1
        self.store.pin_partial(layer)
        try:
            reads += [asyncio.create_task(self._read(layer, i)) for i in answer.reads_to_start()]
            while reads:
                try:
                    index, data = await reads.pop(0)
                except Exception as e:
                    failure = read_failure(e)
                    if failure is None:
                        raise
                    self._refuse(answer.refuse(failure, str(e)), layer, plog, stdout)
                    return False
                reads += [
                    asyncio.create_task(self._read(layer, i)) for i in answer.chunk_arrived(index)
                ]
                await self._pace(len(data))
                for frame in answer.chunk_frames(index, data):
                    stdout.write(frame)
                self.bytes_served[peer] = self.bytes_served.get(peer, 0) + len(data)
                self.chunks_served[peer] = self.chunks_served.get(peer, 0) + 1
                await stdout.drain()
            stdout.write(answer.end_frame())
        finally:
            for t in reads:
                t.cancel()
            if reads:
                await asyncio.gather(*reads, return_exceptions=True)
            left = self.serving.pop(layer, 1) - 1
            if left > 0:
                self.serving[layer] = left
            self.store.unpin_partial(layer)
            if answer.bytes_sent and self.on_served is not None:
                self.on_served(layer)
        plog.debug(
            "chunks_served",
            layer=short(layer),
            chunks=len(req.chunks),
            bytes=answer.bytes_sent,
            seconds=round(time.monotonic() - t0, 4),
        )
        return True

    def _refuse(
        self, refusal: Refusal, layer: Digest, plog: Any, stdout: asyncssh.SSHWriter[bytes]
    ) -> None:
        """Log and record a failed read as the ServeSession says, and send its ERROR frame."""
        if refusal.marks_corrupt and layer not in self.corrupt_layers:
            self.corrupt_layers[layer] = refusal.message
        if refusal.log_level:
            getattr(plog, refusal.log_level)(refusal.log_event, **dict(refusal.log_fields))
        if refusal.marks_corrupt and self.on_corrupt is not None:
            self.on_corrupt(layer, refusal.message)
        stdout.write(refusal.frame)

    async def _read(self, layer: Digest, index: int) -> tuple[int, bytes]:
        """Chunk ``index`` of ``layer``, from the stored blob or a partial of it (module docstring).

        The read itself is chunk_source.read_chunk's (shared with the registry front door);
        a chunk a pull here is bringing is waited for on the relay board (:meth:`_relay_wait`).
        """
        relay = self.relay
        data, from_partial = await read_chunk(
            self.store,
            layer,
            index,
            node=self.node_id,
            verify=self.verify_reads,
            inline_max=self.inline_io_max,
            wait=self._relay_wait if relay is not None else None,
        )
        if from_partial:
            self.partial_chunks_served += 1
            if relay is not None:
                relay.relayed_chunks += 1
        return index, data

    async def _relay_wait(self, layer: Digest, index: int) -> Where | None:
        """Where chunk ``index`` is once a pull here lands it, within the relay bounds."""
        assert self.relay is not None
        try:
            return await self.relay.wait_chunk(
                layer,
                index,
                self.relay_wait_s,
                lambda: self.store.has(layer),
                self.relay_start_s,
            )
        except RelayNotPulling as e:
            if not await asyncio.to_thread(self.store.has_partial, layer):
                raise
            # some chunks of it are here, not this one: "unavailable", not "not held"
            raise RelayUnavailable(f"chunk {index} is not among those here ({e})") from None


class _ChunkSession(SSHServerStreamSession[bytes]):
    """A session channel that accepts the chunk subsystem and refuses everything else.

    Answering False here makes asyncssh reply CHANNEL_FAILURE to the request,
    so ``conn.run('id')`` on the client fails at request time instead of
    getting a channel that is opened and then closed.
    """

    def __init__(self, pc: _PeerConnection) -> None:
        super().__init__(pc.handle_session)
        self._pc = pc

    def connection_lost(self, exc: Exception | None) -> None:
        self._pc.channels -= 1
        if self._pc.channels == 0:
            self._pc.idle_since = self._pc.server._clock()
        super().connection_lost(exc)

    def pty_requested(self, term_type: str, term_size: Any, term_modes: Any) -> bool:
        return False

    def shell_requested(self) -> bool:
        self._pc.log.warning("ssh_request_refused", request="shell")
        return False

    def exec_requested(self, command: str) -> bool:
        self._pc.log.warning("ssh_request_refused", request="exec", command=command[:80])
        return False

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem == chunkproto.SUBSYSTEM:
            return True
        self._pc.log.warning("ssh_request_refused", request="subsystem", subsystem=subsystem[:80])
        return False

    def break_received(self, msec: int) -> bool:
        return False


class _PeerConnection(asyncssh.SSHServer):
    """One inbound SSH connection: authenticates the peer and hands out chunk sessions."""

    def __init__(self, server: ChunkServer) -> None:
        self.server = server
        self.conn: asyncssh.SSHServerConnection | None = None
        self.address = "?"
        self.peer = "?"
        self.key_blob: bytes | None = None
        self._refused: set[str] = set()
        self._closed = asyncio.Event()
        self.log: Any = server._log
        #: how the gate counts this connection: not at all, pending, as a peer, or refused
        self.counted: str = ""
        #: chunk channels open now on this connection
        self.channels = 0
        #: when its last chunk channel closed (or it was admitted): the longest idle is the
        #: one closed when a new peer finds the server full (ChunkServer._evict_idle)
        self.idle_since = 0.0

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peername = conn.get_extra_info("peername")
        if peername:
            self.address = f"{peername[0]}:{peername[1]}"
        self.log = self.server._log.bind(address=self.address)
        why = self.server.gate.accept()
        if why:
            self._refuse(why)
        else:
            self.counted = "pending"

    def _refuse(self, why: str) -> None:
        """Close this connection with "too many connections"; log the first and every 100th."""
        gate = self.server.gate
        n = sum(gate.refused.values())
        if n == 1 or n % 100 == 0:
            self.log.warning("ssh_connection_refused", reason=why, refused_total=n)
        message = f"node {self.server.node_id}: {why}"
        assert self.conn is not None
        conn = self.conn
        # after connection_made returns (asyncssh sends its version string then)
        asyncio.get_running_loop().call_soon(
            conn.disconnect, asyncssh.DISC_TOO_MANY_CONNECTIONS, message
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._conns.pop(self, None)
        if self.counted:
            peer = self.peer if self.counted == "peer" else None
            self.server.gate.closed(peer, was_pending=self.counted == "pending")
            self.counted = ""
        self._closed.set()
        if self.key_blob is not None:
            self.log.info("peer_disconnected", error=str(exc) if exc else None)

    def disconnect(self) -> None:
        if self.conn is not None:
            self.conn.close()

    async def wait_closed(self) -> None:
        if self.conn is not None:
            await self.conn.wait_closed()

    def begin_auth(self, username: str) -> bool:
        return True  # authentication is always required

    def public_key_auth_supported(self) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        blob = bytes(key.public_data)
        peer = self.server.trusted_peer(blob)
        if peer is None:  # a node enrolled after our last list? (asyncssh awaits this)
            await self.server.trust.refresh_for_unknown_key()
            peer = self.server.trusted_peer(blob)
        if peer is None:
            fp = fingerprint(key)
            if fp not in self._refused:  # a client may offer the same key twice
                self._refused.add(fp)
                self.server.trust.record_refusal(fp, self.address)
            return False
        # the last key validated before auth_completed is the one that signed
        self.peer, self.key_blob = peer, blob
        return True

    def auth_completed(self) -> None:
        self.log = self.log.bind(peer=self.peer)
        if self.counted == "pending":
            if self.server.gate.full_for(self.peer):
                self.server._evict_idle(self)
            why = self.server.gate.authenticated(self.peer)
            if why:
                self.counted = "refused"
                self._refuse(why)
                return
            self.counted = "peer"
            self.idle_since = self.server._clock()
        self.server._conns[self] = None
        self.log.info("peer_authenticated")

    def session_requested(self) -> tuple[asyncssh.SSHServerChannel[bytes], _ChunkSession] | bool:
        assert self.conn is not None
        limit = self.server.limits.max_channels_per_connection
        if self.counted != "peer" or self.channels >= limit:
            self.server.gate.refused["channel"] = self.server.gate.refused.get("channel", 0) + 1
            self.log.warning("ssh_channel_refused", channels=self.channels, limit=limit)
            return False
        self.channels += 1
        chan = self.conn.create_server_channel(
            encoding=None, window=CHANNEL_WINDOW, max_pktsize=CHANNEL_MAX_PKTSIZE
        )
        return chan, _ChunkSession(self)

    async def handle_session(
        self,
        stdin: asyncssh.SSHReader[bytes],
        stdout: asyncssh.SSHWriter[bytes],
        stderr: asyncssh.SSHWriter[bytes],
    ) -> None:
        await self.server._serve_channel(self.peer, stdin, stdout)

    # everything else asyncssh could offer stays refused (these are its
    # defaults; spelled out so a future asyncssh default cannot open them)
    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool:
        return False

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        return False
