"""Registry origin: read an image from an OCI/Docker registry (distribution API v2).

An origin agent calls :func:`ingest_registry` to pull one image's config and
layers from a registry into its :class:`~rainbowd.lib.store.LayerStore`; from there
rbd spreads the layers to peers. Everything the registry sends is checked
before it counts: a manifest fetched by digest (and every child manifest of an
index) must hash to that digest, the config blob to the manifest's config
digest, each layer blob to its descriptor digest and size, and each layer's
uncompressed tar to the config's ``rootfs.diff_ids`` entry. Layer blobs pass
unchanged (no recompression): the blob digest the registry names is the digest
rbd moves.

Layers stream from the HTTP response into ``store.ingest`` through a small
bounded queue read by a worker thread (the store is synchronous), so a layer is
never held whole in memory and never written to disk twice; the same thread
inflates gzip layers to count and hash the tar. A bad byte anywhere fails the
call with :class:`RegistryError` (an :class:`~rainbowd.lib.image.ImageError`)
naming the image and the cause, and the layers this call added are removed
again, so a failed ingest leaves the store as it was and ``tmp/`` empty.

Auth: anonymous first; a 401 with a ``Bearer`` challenge fetches a token from
the realm (HTTP Basic with the credentials file when one is set), a ``Basic``
challenge uses the credentials file directly. Credentials are read from the
file on the origin host and never appear in logs or error messages.

The parts, one concern each: registry_names.py (references, platforms, media
types), registry_http.py (the session and its auth), registry_layers.py (a
layer's stream into the store); this module fetches and checks the manifests
and the config, and runs the ingest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.digest import Digest, is_digest, short
from rainbowd.core.messages import ImageRecord, LayerRef, RegistrySource, UpstreamManifest
from rainbowd.core.upstreammanifest import UpstreamManifestError, check_upstream, doc_of
from rainbowd.lib.image import ImageError
from rainbowd.lib.store import LayerStore, StoreError

from .registry_http import MAX_MANIFEST, RegistryClient, read_limited, ssl_context
from .registry_layers import ingest_layer
from .registry_names import (
    ACCEPT,
    CONFIG_TYPES,
    DOCKER_SCHEMA1,
    INDEX_TYPES,
    LAYER_FOREIGN,
    LAYER_GZIP,
    LAYER_TAR,
    MANIFEST_TYPES,
    Platform,
    RegistryError,
    host_platform,
    parse_platform,
    parse_reference,
    platform_matches,
)

log = structlog.get_logger(__name__)

#: a config larger than this is refused rather than read whole
MAX_CONFIG = 16 * 1024 * 1024
#: layers fetched at once (a registry serves blobs in parallel; so does the disk)
PARALLEL_LAYERS = 3


# --------------------------------------------------------------------------
# manifests and config
# --------------------------------------------------------------------------
def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class _Fetched:
    """A manifest (or index) as the registry sent it, checked: media type, parsed, bytes."""

    media: str
    doc: dict[str, Any]
    body: bytes


async def _fetch_manifest(
    client: RegistryClient, target: str, expected: str, what: str
) -> _Fetched:
    """The manifest ``target`` names; its bytes checked against ``expected`` (if set)."""
    where = client.where
    try:
        resp = await client.get(f"/manifests/{target}", accept=ACCEPT)
        async with resp:
            if resp.status == 404:
                if is_digest(target):
                    raise RegistryError(
                        f"{where}: {what} {target} not found in repo {client.ref.repository}"
                    )
                raise RegistryError(
                    f"{where}: tag {target} not found in repo {client.ref.repository}"
                )
            if resp.status != 200:
                raise RegistryError(f"{where}: {what} request answered HTTP {resp.status}")
            body = await read_limited(resp, MAX_MANIFEST, where, what)
            content_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            header_digest = resp.headers.get("Docker-Content-Digest", "")
    except TimeoutError:
        raise RegistryError(f"{where}: reading the {what} timed out") from None
    except (aiohttp.ClientError, OSError) as e:
        raise RegistryError(f"{where}: reading the {what} failed: {e}") from None
    actual = _sha256(body)
    if expected and actual != expected:
        raise RegistryError(
            f"{where}: {what} digest mismatch: content is {actual}, expected {expected}"
        )
    if header_digest and is_digest(header_digest) and header_digest != actual:
        raise RegistryError(
            f"{where}: {what} digest mismatch: content is {actual}, registry says {header_digest}"
        )
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise RegistryError(f"{where}: {what} is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise RegistryError(f"{where}: {what} is not a JSON object")
    media = str(doc.get("mediaType") or content_type)
    if media in DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
        raise RegistryError(
            f"{where}: {what} is Docker schema 1 ({media}), which is not supported; "
            "push the image again with a current client"
        )
    if media not in MANIFEST_TYPES and media not in INDEX_TYPES:
        raise RegistryError(f"{where}: {what} has unsupported media type {media!r}")
    return _Fetched(media, doc, body)


def _pick_platform(index: dict[str, Any], wanted: Platform, where: str) -> dict[str, Any]:
    entries = index.get("manifests")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise RegistryError(f"{where}: manifest list has no manifests")
    available: list[str] = []
    for entry in entries:
        plat = entry.get("platform")
        if not isinstance(plat, dict):
            continue
        if plat.get("os") == "unknown":  # attestation manifests, not images
            continue
        available.append(
            "/".join(
                str(p) for p in (plat.get("os"), plat.get("architecture"), plat.get("variant")) if p
            )
        )
        if platform_matches(wanted, plat):
            chosen: dict[str, Any] = entry
            return chosen
    raise RegistryError(
        f"{where}: no image for platform {wanted}; available: "
        + (", ".join(available) or "(none named)")
    )


def _descriptor(d: Any, where: str, what: str) -> tuple[str, int, str]:
    """(digest, size, mediaType) of a descriptor, validated."""
    if not isinstance(d, dict):
        raise RegistryError(f"{where}: {what} descriptor is malformed")
    digest, size, media = d.get("digest"), d.get("size"), d.get("mediaType", "")
    if not isinstance(digest, str) or not is_digest(digest):
        raise RegistryError(f"{where}: {what} has unsupported digest {digest!r} (sha256 only)")
    if not isinstance(size, int) or size < 0:
        raise RegistryError(f"{where}: {what} has a malformed size {size!r}")
    return digest, size, str(media)


async def _fetch_config(client: RegistryClient, digest: str, size: int, media: str) -> str:
    where = client.where
    if media and media not in CONFIG_TYPES:
        raise RegistryError(
            f"{where}: config has unsupported media type {media!r} (not a container image)"
        )
    if size > MAX_CONFIG:
        raise RegistryError(f"{where}: config is {size} bytes, larger than {MAX_CONFIG}")
    resp = await client.get(f"/blobs/{digest}")
    try:
        async with resp:
            if resp.status == 404:
                raise RegistryError(f"{where}: config blob {digest} not found in the registry")
            if resp.status != 200:
                raise RegistryError(f"{where}: config blob answered HTTP {resp.status}")
            body = await read_limited(resp, MAX_CONFIG, where, "config")
    except TimeoutError:
        raise RegistryError(f"{where}: reading config blob {short(digest)} timed out") from None
    except (aiohttp.ClientError, OSError) as e:
        raise RegistryError(f"{where}: reading config blob {short(digest)} failed: {e}") from None
    actual = _sha256(body)
    if actual != digest or len(body) != size:
        raise RegistryError(
            f"{where}: config blob digest mismatch: content is {actual} ({len(body)} bytes), "
            f"manifest says {digest} ({size} bytes)"
        )
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise RegistryError(f"{where}: config is not UTF-8 JSON") from None


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------
async def ingest_registry(
    source: RegistrySource, store: LayerStore, *, ref: str, chunk_size: int, timeout: float = 60.0
) -> tuple[ImageRecord, list[ChunkManifest]]:
    """Read ``source`` into ``store``; return the image (named ``ref``) and its layer manifests.

    ``timeout`` bounds connecting and each wait for bytes (not the whole
    transfer: a big layer on a slow link may take longer, as long as it moves).
    On failure raises RegistryError and removes the layers this call added.
    """
    reference = parse_reference(source.reference)
    where = f"registry image {reference}"
    wanted = parse_platform(source.platform) if source.platform else host_platform()
    # even an insecure (http) registry may send us to an https token realm: verify that
    ssl_ctx = ssl_context(source, where)
    added: list[Digest] = []
    client_timeout = aiohttp.ClientTimeout(
        total=None, connect=timeout, sock_connect=timeout, sock_read=timeout
    )
    connector = aiohttp.TCPConnector(ssl=ssl_ctx)
    ilog = log.bind(image=str(reference), ref=ref)
    ilog.info("registry ingest", platform=str(wanted), insecure=source.insecure)
    try:
        async with aiohttp.ClientSession(
            timeout=client_timeout, connector=connector, trust_env=False
        ) as session:
            client = RegistryClient(source=source, ref=reference, session=session, where=where)
            record, manifests = await _ingest(
                client, store, ref, wanted, bool(source.platform), chunk_size, added
            )
    except BaseException as e:
        for d in added:
            store.remove(d)
        if added:
            ilog.warning("ingest rolled back", removed=len(added))
        if isinstance(e, RegistryError):
            raise
        if isinstance(e, StoreError):
            raise RegistryError(f"{where}: {e}") from None
        if isinstance(e, ImageError):
            raise RegistryError(str(e)) from None
        if isinstance(e, TimeoutError):
            raise RegistryError(f"{where}: registry timed out after {timeout} s") from None
        if isinstance(e, aiohttp.ClientError):
            raise RegistryError(f"{where}: {e}") from None
        raise
    ilog.info(
        "image ingested",
        config=short(record.config_digest),
        layers=len(record.layers),
        size=record.size,
        new_layers=len(added),
    )
    return record, manifests


async def _ingest(
    client: RegistryClient,
    store: LayerStore,
    ref: str,
    wanted: Platform,
    explicit_platform: bool,
    chunk_size: int,
    added: list[Digest],
) -> tuple[ImageRecord, list[ChunkManifest]]:
    where = client.where
    top = await _fetch_manifest(client, client.ref.target, client.ref.digest, "manifest")
    fetched, index = top, None
    if top.media in INDEX_TYPES:
        index = top
        entry = _pick_platform(top.doc, wanted, where)
        child, _, _ = _descriptor(entry, where, f"manifest for {wanted}")
        fetched = await _fetch_manifest(client, child, child, f"manifest for {wanted}")
        if fetched.media in INDEX_TYPES:
            raise RegistryError(f"{where}: nested manifest lists are not supported")
        explicit_platform = False  # the index entry already said which platform it is
    doc = fetched.doc

    cfg_digest, cfg_size, cfg_media = _descriptor(doc.get("config"), where, "config")
    config_text = await _fetch_config(client, cfg_digest, cfg_size, cfg_media)
    try:
        config = json.loads(config_text)
        diff_ids = config["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError) as e:
        raise RegistryError(f"{where}: config is not an image config ({e})") from None
    if not isinstance(diff_ids, list) or not all(is_digest(x) for x in diff_ids):
        raise RegistryError(f"{where}: config has malformed rootfs.diff_ids")
    if explicit_platform and isinstance(config, dict):
        have = {"os": config.get("os", ""), "architecture": config.get("architecture", "")}
        if config.get("variant"):
            have["variant"] = config["variant"]
        if not platform_matches(wanted, have):
            raise RegistryError(
                f"{where}: image is for {'/'.join(str(v) for v in have.values())}, not the "
                f"requested platform {wanted}; available: only that one"
            )

    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise RegistryError(f"{where}: manifest has no layers list")
    if len(raw_layers) != len(diff_ids):
        raise RegistryError(
            f"{where}: manifest lists {len(raw_layers)} layers but the config has "
            f"{len(diff_ids)} diff_ids"
        )
    descs: list[tuple[str, int, str]] = []
    for i, raw in enumerate(raw_layers):
        digest, size, lmedia = _descriptor(raw, where, f"layer {i}")
        if lmedia in LAYER_FOREIGN:
            raise RegistryError(
                f"{where}: layer {i} ({short(digest)}) is a foreign/non-distributable layer "
                f"({lmedia}); such layers are not supported"
            )
        if lmedia not in LAYER_GZIP and lmedia not in LAYER_TAR:
            raise RegistryError(
                f"{where}: layer {i} ({short(digest)}) has unsupported media type {lmedia!r}"
            )
        descs.append((digest, size, lmedia))

    # each distinct blob once, a few at a time; results in manifest order
    unique: dict[str, int] = {}
    for i, (digest, _, _) in enumerate(descs):
        unique.setdefault(digest, i)
    results: dict[str, tuple[LayerRef, ChunkManifest]] = {}
    gate = asyncio.Semaphore(PARALLEL_LAYERS)

    async def one(i: int) -> None:
        digest, size, lmedia = descs[i]
        async with gate:
            results[digest] = await ingest_layer(
                client,
                store,
                digest=digest,
                size=size,
                media=lmedia,
                diff_id=diff_ids[i],
                chunk_size=chunk_size,
                added=added,
            )

    try:
        async with asyncio.TaskGroup() as tg:
            for i in unique.values():
                tg.create_task(one(i))
    except BaseExceptionGroup as eg:
        # report the first real cause, not the group (the others were cancelled)
        first = eg.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None

    layers: list[LayerRef] = []
    manifests: list[ChunkManifest] = []
    for i, (digest, _, _) in enumerate(descs):
        layer, manifest = results[digest]
        if layer.diff_id != diff_ids[i]:
            raise RegistryError(f"{where}: blob {short(digest)} is listed with two diff_ids")
        layers.append(layer)
        manifests.append(manifest)
    record = ImageRecord(ref=ref, config_digest=cfg_digest, config=config_text, layers=layers)
    record.upstream = _upstream(record, fetched, index, where)
    return record, manifests


def _upstream(
    record: ImageRecord, manifest: _Fetched, index: _Fetched | None, where: str
) -> UpstreamManifest | None:
    """The registry's own manifest (and index) of ``record``, to be served as they are.

    None, logged, when they cannot travel (over MAX_MANIFEST, not UTF-8) or do
    not describe the record: the image is then served under rbd's built
    manifest, which names the same blobs under another digest.
    """
    main = doc_of(manifest.body, manifest.media)
    top = doc_of(index.body, index.media) if index is not None else None
    if main is None or (index is not None and top is None):
        log.warning("upstream manifest not kept", image=where, reason="too large or not UTF-8")
        return None
    kept = UpstreamManifest(manifest=main, index=top)
    try:
        check_upstream(record, kept)
    except UpstreamManifestError as e:
        log.warning("upstream manifest not kept", image=where, reason=str(e))
        return None
    return kept


__all__ = ["ingest_registry"]
