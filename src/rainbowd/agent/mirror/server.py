"""MirrorServer: the read side of the OCI distribution API, on the node's own images.

``docker pull`` (with ``registry-mirrors``), containerd (a ``hosts.toml``
naming this address) and skopeo ask it for ``/v2/``, manifests and blobs; it
answers from what the node already holds and never fetches anything itself:

* a manifest by digest, when :class:`~rainbowd.agent.mirror.catalog.ImageCatalog`
  has it and the store holds its config and every layer complete (serving a
  manifest whose blobs would then be missing would break the pull half way,
  where neither client falls back cleanly);
* a blob by digest: an image config from the catalog, or a layer of the
  :class:`~rainbowd.lib.store.LayerStore` read chunk by chunk, each chunk
  checked against the layer's chunk manifest before a byte of it is sent
  (``verify_served``): a complete layer from its blob; a layer this node is
  receiving (a pull-on-miss bringing it, or -- with ``stall_s`` -- the
  puller holding a partial of it) from its partial as each chunk is verified
  there, in order, then from the blob once the partial was installed
  (mirror/landing.py; the reader is the ChunkServer's,
  agent/dataplane/chunk_source.py). A partial nothing is bringing is never
  served;
* ``Range`` on blobs: one range, 206 with ``Content-Range``, 416 past the end.

Manifests are the upstream's own bytes when the image's source had a
manifest (a registry, an OCI layout: ``ImageCatalog`` keeps them, checked
against the image), so a pull by the upstream's digest, and the digest a
client sees, are the upstream's. An image whose source had none (a docker
archive, an engine) is served under the manifest rbd builds from its record
(``rainbowd.core.imagemanifest``): same config and layers, rbd's own digest.
An index (the upstream's tag named a manifest list) is served when the node
holds the platform manifest the origin chose, with all its blobs; a client
on another platform then finds its manifest missing and goes upstream.

A tag is resolved only by asking the coordinator (``resolve``: issue 17
item 3; never a peer, so no peer can make this node serve another image
under a tag), for the registry the client names (containerd's ``?ns=``) or
else ``default_registry``. The manifest is then served only if the catalog
holds one whose bytes hash to the digest the coordinator said. No answer
within ``resolve_timeout`` (coordinator down, partitioned, slow) is a miss.

A miss (a tag nobody resolves, a digest the node lacks, a layer that failed
its check) is a 404 with the spec's ``MANIFEST_UNKNOWN`` or ``BLOB_UNKNOWN``
body: containerd and Docker then go to the upstream themselves
(``rainbowd.core.distribution`` says why each does). Before that answer, a
manifest the coordinator resolved for this node (an image it knows) is got by
P2P when ``pulls`` is set (mirror/pull_on_miss.py): the node joins the image's
pull job and the manifest goes out at once; a blob of a layer still on its way
streams as its chunks land (headers once its first chunk is here), so the
client starts before the layer is complete. A pull that stalls for
``mirror_pull_stall_seconds`` (no new chunk of the image) ends a blob not yet
begun in the same 404, and cuts one whose headers are out (logged as
``mirror_layer_unservable`` with the bytes sent): the client's digest check
refuses the short blob, never a wrong one. Such a blob counts as
``outcome="streamed"`` in ``mirror_request``.

The server is unauthenticated, like a registry mirror on loopback: it serves
only content named by its digest, which a client verifies again. It listens on
``mirror_listen`` (loopback in the example config; off when empty).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog
from aiohttp import web

from rainbowd.agent.dataplane.chunk_io import INLINE_MAX_BYTES
from rainbowd.agent.dataplane.chunk_source import read_chunk
from rainbowd.agent.dataplane.relay import RelayBoard, RelayUnavailable
from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.digest import Digest, short
from rainbowd.core.distribution import (
    API_VERSION,
    API_VERSION_HEADER,
    ApiError,
    BaseRequest,
    BlobRequest,
    ByteRange,
    ManifestRequest,
    chunk_slices,
    parse_path,
    parse_range,
)
from rainbowd.lib.httplisten import listen
from rainbowd.lib.store import CorruptBlob, LayerMissing, LayerStore, StoreError

from .catalog import ImageCatalog, StoredManifest
from .landing import LayerLanding, NotLanding

log = structlog.get_logger(__name__)

#: Content-Type of a blob (configs and layers alike), as registries send it
BLOB_TYPE = "application/octet-stream"
#: Content-Type of an error body and of the /v2/ answer
JSON_TYPE = "application/json"
#: seconds a tag resolution may take by default (the agent passes mirror_resolve_timeout)
RESOLVE_TIMEOUT = 2.0
#: a registry host as a client names it in ``?ns=`` (containerd): name or IP, optional port
_REGISTRY_HOST = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")

#: (registry, repository, tag) -> the manifest digest the coordinator says the tag
#: names, or None (no upstream, no such image, coordinator unreachable)
Resolver = Callable[[str, str, str], Awaitable[Digest | None]]


class MissPulls(Protocol):
    """Getting what the front door lacks by P2P (``PullOnMiss``, mirror/pull_on_miss.py)."""

    async def fetch_manifest(self, digest: Digest) -> bool:
        """The image of manifest ``digest`` is coming (its record kept): True; else False."""
        ...

    async def fetch_tag(self, registry: str, repository: str, tag: str) -> bool:
        """The image the origin is reading for a tag is coming (then resolve again)."""
        ...

    def blob_coming(self, digest: str) -> bool:
        """A layer a running pull is bringing to this node."""
        ...

    #: no new chunk of an image for this long: the pull and the blobs streamed from it end
    stall_s: float

    def pull_ended(self, digest: str) -> asyncio.Future[None] | None:
        """Done once the pull bringing layer ``digest`` ended (held, stalled or refused)."""
        ...

    def progress(self, digest: str) -> int:
        """A count that grows while the image bringing ``digest`` keeps landing."""
        ...


class MirrorHooks(Protocol):
    """What the front door tells the agent's metrics (``AgentMetrics`` is one)."""

    def mirror_request(self, kind: str, outcome: str) -> None: ...
    def mirror_bytes(self, nbytes: int) -> None: ...


class MirrorServer:
    """The front door on ``host:port``; start with :meth:`start`, stop with :meth:`close`."""

    def __init__(
        self,
        store: LayerStore,
        catalog: ImageCatalog,
        host: str,
        port: int,
        *,
        node_id: str,
        verify_reads: bool = True,
        hooks: MirrorHooks | None = None,
        on_served: Callable[[str], None] | None = None,
        on_corrupt: Callable[[str, str], None] | None = None,
        resolve: Resolver | None = None,
        default_registry: str = "docker.io",
        resolve_timeout: float = RESOLVE_TIMEOUT,
        pulls: MissPulls | None = None,
        relay: RelayBoard | None = None,
        stall_s: float = 0.0,
        inline_io_max: int = INLINE_MAX_BYTES,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.host = host
        self.port = port
        self.node_id = node_id
        self.verify_reads = verify_reads
        self.hooks = hooks
        #: told the layer each time one is served (the hygiene's use times)
        self.on_served = on_served
        #: told (layer, why) when a stored layer fails its check while served
        self.on_corrupt = on_corrupt
        #: asks the coordinator which manifest a tag names (None: tags are never served)
        self.resolve = resolve
        self.default_registry = default_registry
        self.resolve_timeout = resolve_timeout
        #: gets what the node lacks by P2P before answering (None: a miss is a 404)
        self.pulls = pulls
        #: the agent's board: woken as each chunk of a layer being pulled here lands (a
        #: private one if none: a blob of a pull-on-miss is then served once it is whole)
        self.relay = relay if relay is not None else RelayBoard()
        #: a layer the puller is receiving (not for a pull-on-miss) streams as it lands,
        #: until no chunk of it landed for this long (0: such a layer is a miss)
        self.stall_s = stall_s
        #: chunks up to this size are read and checked on the event loop (chunk_io.py)
        self.inline_io_max = inline_io_max
        #: layer -> responses sending it right now (hygiene must not evict these)
        self.serving: dict[str, int] = {}
        self._runner: web.AppRunner | None = None
        #: the address actually bound (port 0 asks for an ephemeral one)
        self.bound: tuple[str, int] | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the front door ("" before :meth:`start`)."""
        if self.bound is None:
            return ""
        host, port = self.bound
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def app(self) -> web.Application:
        app = web.Application()
        # one route: the name may hold slashes, so parse_path reads the whole path
        app.router.add_route("*", "/{path:.*}", self._handle)
        return app

    async def start(self) -> tuple[str, int]:
        self._runner, self.bound = await listen(self.app(), self.host, self.port, "mirror_listen")
        log.info("mirror_listening", url=self.url, node=self.node_id)
        return self.bound

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- requests ------------------------------------------------------------
    def _count(self, kind: str, outcome: str) -> None:
        if self.hooks is not None:
            self.hooks.mirror_request(kind, outcome)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        kind = "other"
        try:
            if request.method not in ("GET", "HEAD"):
                raise ApiError("UNSUPPORTED", f"{request.method}: this mirror only serves")
            req = parse_path(request.path)
            if isinstance(req, BaseRequest):
                kind = "base"
                self._count(kind, "hit")
                return web.Response(
                    body=b"{}", content_type=JSON_TYPE, headers={API_VERSION_HEADER: API_VERSION}
                )
            if isinstance(req, ManifestRequest):
                kind = "manifest"
                return await self._manifest(request, req)
            kind = "blob"
            return await self._blob(request, req)
        except ApiError as e:
            outcome = "miss" if e.status == 404 else "invalid"
            self._count(kind, outcome)
            log.debug(
                "mirror_refused",
                method=request.method,
                path=request.path[:300],
                code=e.code,
                status=e.status,
            )
            return _error(e)

    async def _manifest(self, request: web.Request, req: ManifestRequest) -> web.StreamResponse:
        digest = req.digest if req.digest is not None else await self._resolve_tag(request, req)
        stored, missing = await self._servable(digest)
        if (stored is None or missing) and self.pulls is not None:
            # an image the coordinator knows: this node gets it by P2P; the manifest goes
            # out at once, each blob once its layer has landed (_blob)
            if await self.pulls.fetch_manifest(digest):
                stored, missing = await self._servable(digest)
            missing = [d for d in missing if not self.pulls.blob_coming(d)]
        if stored is None:
            raise ApiError(
                "MANIFEST_UNKNOWN",
                f"manifest {digest} is not held by node {self.node_id}",
                {"digest": digest},
            )
        if missing:
            raise ApiError(
                "MANIFEST_UNKNOWN",
                f"manifest {digest}: node {self.node_id} does not hold all of its blobs "
                f"({len(missing)} missing, e.g. {missing[0]})",
                {"digest": digest},
            )
        self._count("manifest", "hit")
        headers = _content_headers(digest, len(stored.data))
        if request.method == "HEAD":
            return _head(stored.media_type, headers)
        self._sent(len(stored.data))
        return web.Response(body=stored.data, content_type=stored.media_type, headers=headers)

    async def _resolve_tag(self, request: web.Request, req: ManifestRequest) -> Digest:
        """The digest the coordinator says ``req``'s tag names; ApiError MANIFEST_UNKNOWN if none.

        Never from this node's own records or a peer's (module docstring).
        """
        registry = request.query.get("ns") or self.default_registry
        asked = f"{registry}/{req.name}:{req.tag}"
        if self.resolve is None or not _REGISTRY_HOST.match(registry):
            raise ApiError(
                "MANIFEST_UNKNOWN",
                f"{asked}: this mirror resolves no tags here; pull by digest or from the upstream",
                {"tag": req.tag},
            )
        assert req.tag is not None
        digest = await self._ask(registry, req.name, req.tag)
        if digest is None and self.pulls is not None:
            # the coordinator may have started reading it (on demand): get it, then ask again
            if await self.pulls.fetch_tag(registry, req.name, req.tag):
                digest = await self._ask(registry, req.name, req.tag)
        if digest is None:
            raise ApiError(
                "MANIFEST_UNKNOWN",
                f"{asked}: the coordinator names no manifest for this tag now",
                {"tag": req.tag},
            )
        log.debug("mirror_tag_resolved", tag=asked, manifest=digest, node=self.node_id)
        return digest

    async def _ask(self, registry: str, name: str, tag: str) -> Digest | None:
        """The coordinator's answer for a tag within ``resolve_timeout`` (None: no answer)."""
        assert self.resolve is not None
        try:
            async with asyncio.timeout(self.resolve_timeout):
                return await self.resolve(registry, name, tag)
        except TimeoutError:
            log.warning(
                "mirror_resolve_timeout",
                tag=f"{registry}/{name}:{tag}",
                node=self.node_id,
                after=self.resolve_timeout,
            )
            return None

    async def _servable(self, digest: Digest) -> tuple[StoredManifest | None, list[str]]:
        """The manifest ``digest`` as kept (None: not kept), and the blobs of it not held."""
        stored = await asyncio.to_thread(self.catalog.manifest, digest)
        if stored is None:
            return None, []
        return stored, await asyncio.to_thread(self._missing_blobs, stored)

    def _missing_blobs(self, stored: StoredManifest) -> list[str]:
        """What of a manifest the node cannot serve whole (blocking: stats and reads).

        An index needs one of the manifests it lists held, with all its blobs.
        """
        if stored.is_index:
            for child in stored.children:
                found = self.catalog.manifest(child)
                if found is not None and not found.is_index and not self._missing_blobs(found):
                    return []
            return [f"any of its {len(stored.children)} platform manifests"]
        missing: list[str] = []
        if stored.config_digest is not None and not self.catalog.has_config(stored.config_digest):
            missing.append(stored.config_digest)
        missing.extend(d for d in stored.layer_digests if not self.store.has(d))
        return missing

    async def _blob(self, request: web.Request, req: BlobRequest) -> web.StreamResponse:
        config = await asyncio.to_thread(self.catalog.config, req.digest)
        if config is not None:
            return self._small_blob(request, req.digest, config)
        landing = None if self.store.has(req.digest) else self._landing(req.digest)
        try:
            manifest = None if landing is None else await landing.manifest()
            if manifest is None:
                manifest = await asyncio.to_thread(self._layer_manifest, req.digest)
        except (LayerMissing, NotLanding, IndexError) as e:  # IndexError: an empty layer
            raise ApiError(
                "BLOB_UNKNOWN",
                f"blob {req.digest} is not held complete by node {self.node_id}"
                + (f" and stopped coming ({e})" if isinstance(e, NotLanding) else ""),
                {"digest": req.digest},
            ) from None
        return await self._layer(request, req.digest, manifest, landing)

    def _landing(self, digest: Digest) -> LayerLanding | None:
        """How to wait for chunks of ``digest`` if it is coming here (None: it is not)."""
        pulls = self.pulls
        if pulls is not None and pulls.blob_coming(digest):
            return LayerLanding(
                self.relay,
                self.store,
                digest,
                stall_s=pulls.stall_s,
                progress=lambda: pulls.progress(digest),
                ended=pulls.pull_ended(digest),
            )
        if self.stall_s > 0 and self.relay.receiving(digest):
            relay = self.relay
            return LayerLanding(
                relay,
                self.store,
                digest,
                stall_s=self.stall_s,
                progress=lambda: relay.landed_count(digest),
            )
        return None

    def _layer_manifest(self, digest: Digest) -> ChunkManifest:
        if not self.store.has(digest):  # a partial nothing is bringing is never served
            raise LayerMissing(f"layer {digest} is not complete here")
        return self.store.manifest(digest)

    def _small_blob(self, request: web.Request, digest: Digest, data: bytes) -> web.StreamResponse:
        rng = parse_range(request.headers.get("Range"), len(data))
        self._count("blob", "hit")
        headers = _content_headers(digest, len(data) if rng is None else rng.length)
        headers["Accept-Ranges"] = "bytes"
        status = 200
        if rng is not None:
            headers["Content-Range"] = rng.content_range()
            status = 206
            data = data[rng.start : rng.end + 1]
        if request.method == "HEAD":
            return _head(BLOB_TYPE, headers, status)
        self._sent(len(data))
        return web.Response(status=status, body=data, content_type=BLOB_TYPE, headers=headers)

    async def _layer(
        self,
        request: web.Request,
        digest: Digest,
        manifest: ChunkManifest,
        landing: LayerLanding | None,
    ) -> web.StreamResponse:
        rng = parse_range(request.headers.get("Range"), manifest.size)
        whole = rng is None
        if rng is None:
            if manifest.size == 0:
                return self._small_blob(request, digest, b"")
            rng = ByteRange(0, manifest.size - 1, manifest.size)
        headers = _content_headers(digest, rng.length)
        headers["Accept-Ranges"] = "bytes"
        status = 200 if whole else 206
        if not whole:
            headers["Content-Range"] = rng.content_range()
        if request.method == "HEAD":
            self._count("blob", "hit")
            return _head(BLOB_TYPE, headers, status)
        self.serving[digest] = self.serving.get(digest, 0) + 1
        self.store.pin_partial(digest)  # a partial streamed from is not discarded meanwhile
        try:
            return await self._send_layer(request, digest, rng, headers, status, manifest, landing)
        finally:
            self.store.unpin_partial(digest)
            left = self.serving.pop(digest, 1) - 1
            if left > 0:
                self.serving[digest] = left
            if self.on_served is not None:
                self.on_served(digest)

    async def _send_layer(
        self,
        request: web.Request,
        digest: Digest,
        rng: ByteRange,
        headers: dict[str, str],
        status: int,
        manifest: ChunkManifest,
        landing: LayerLanding | None,
    ) -> web.StreamResponse:
        """Stream ``rng`` of the layer, each chunk checked before any of its bytes go out.

        Chunks are read by the ChunkServer's own reader (``read_chunk``): from
        the blob, or -- a layer still landing (``landing``) -- from its partial
        as soon as each is verified there, in order, and from the blob once the
        partial was installed. The first chunk is read before the headers are
        sent, so a layer that rotted (or went, or stopped coming) at its start
        is still a clean 404; a failure later can only cut the connection, and
        the client's own digest check then refuses the short blob.
        """
        slices = chunk_slices(manifest.chunk_size, rng.start, rng.end)
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_type = BLOB_TYPE
        resp.content_length = rng.length
        prepared = False
        sent = 0
        from_partial = 0  # chunks read from the partial while the layer landed
        try:
            for index, first, stop in slices:
                data, partial = await read_chunk(
                    self.store,
                    digest,
                    index,
                    node=self.node_id,
                    verify=self.verify_reads,
                    inline_max=self.inline_io_max,
                    wait=None if landing is None else landing.wait,
                )
                from_partial += partial
                if not prepared:
                    await resp.prepare(request)
                    prepared = True
                piece = data[first:stop]
                await resp.write(piece)
                sent += len(piece)
                self._sent(len(piece))
        except (CorruptBlob, NotLanding, RelayUnavailable, StoreError, OSError) as e:
            if isinstance(e, CorruptBlob) and self.on_corrupt is not None:
                self.on_corrupt(digest, str(e))
            log.error(
                "mirror_layer_unservable",
                node=self.node_id,
                layer=short(digest),
                error=str(e),
                bytes_sent=sent,
                headers_sent=prepared,
                from_partial=from_partial,
            )
            self._count("blob", "error")  # once per request, whichever way it ends
            if not prepared:
                return _error(
                    ApiError(
                        "BLOB_UNKNOWN",
                        f"blob {digest} cannot be served by node {self.node_id} now",
                        {"digest": digest},
                    )
                )
            raise  # headers are out: only cutting the connection tells the client
        await resp.write_eof()
        # "streamed": some of it went out while the layer was still landing here
        self._count("blob", "streamed" if from_partial else "hit")
        log.debug(
            "mirror_layer_served",
            node=self.node_id,
            layer=short(digest),
            bytes=sent,
            status=status,
            from_partial=from_partial,
        )
        return resp

    def _sent(self, nbytes: int) -> None:
        if self.hooks is not None:
            self.hooks.mirror_bytes(nbytes)


def _content_headers(digest: Digest, length: int) -> dict[str, str]:
    return {
        "Docker-Content-Digest": digest,
        "ETag": f'"{digest}"',
        "Content-Length": str(length),
        API_VERSION_HEADER: API_VERSION,
    }


def _head(content_type: str, headers: dict[str, str], status: int = 200) -> web.Response:
    """A HEAD answer: the GET's headers, Content-Length included, and no body."""
    resp = web.Response(status=status, headers=headers)
    resp.content_type = content_type
    return resp


def _error(e: ApiError) -> web.Response:
    headers = {API_VERSION_HEADER: API_VERSION}
    if e.code == "RANGE_INVALID" and isinstance(e.detail, dict) and "size" in e.detail:
        headers["Content-Range"] = f"bytes */{e.detail['size']}"
    return web.Response(status=e.status, body=e.body(), content_type=JSON_TYPE, headers=headers)
