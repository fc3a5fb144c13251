"""The OCI image layout origin: read an image from an ``oci:`` directory into the store.

An OCI image layout (what ``skopeo copy … oci:DIR:TAG``, ``buildah push
oci:…`` or ``docker buildx --output type=oci`` write) is a directory with an
``oci-layout`` marker, an ``index.json`` naming images by the
``org.opencontainers.image.ref.name`` annotation, and content-addressed blobs
under ``blobs/sha256/``. Nothing in it is trusted: every blob read on the way
(a nested index, the manifest, the config, each layer) is checked against the
digest and size its parent descriptor gives, and each layer's tar against the
config's diff_id, before it counts as held.

Layers are judged by their bytes, not by the media type a descriptor claims
(skopeo writes uncompressed tars labelled ``tar+gzip`` when told to keep
layers uncompressed): plain tars are compressed on ingest when asked, gzip
and zstd blobs pass unchanged.

Blocking I/O: the agent calls :func:`ingest_oci_layout` via ``asyncio.to_thread``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO

import structlog

from rainbowd.core.chunks import DEFAULT_CHUNK_SIZE, ChunkManifest, layer_chunk_size
from rainbowd.core.digest import Digest, DigestError, hex_part, parse_digest, sha256_digest, short
from rainbowd.core.messages import Compression, ImageRecord, LayerRef, UpstreamManifest
from rainbowd.core.upstreammanifest import UpstreamManifestError, check_upstream, doc_of
from rainbowd.lib.compression import CompressionError, hash_layer, media_type, sniff
from rainbowd.lib.hostplatform import host_architecture
from rainbowd.lib.image import MAX_METADATA, ImageError, ingest_compressed
from rainbowd.lib.store import LayerStore, StoreError

log = structlog.get_logger(__name__)

REF_NAME = "org.opencontainers.image.ref.name"
#: containerd and buildkit also record the full image name here
CONTAINERD_NAME = "io.containerd.image.name"

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_INDEX_TYPES = {MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST}
_MANIFEST_TYPES = {MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST}

#: nested indexes followed at most (a loop of indexes is refused, not followed forever)
MAX_INDEX_DEPTH = 4


class _Fail(Exception):
    """A cause, without the layout/image prefix the entry point adds."""


def ingest_oci_layout(
    path: Path,
    store: LayerStore,
    *,
    ref: str,
    tag: str = "",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    compression: Compression = "off",
    platform: str = "",
) -> tuple[ImageRecord, list[ChunkManifest]]:
    """Read image ``tag`` of the OCI layout at ``path`` into ``store`` as ``ref``.

    ``tag`` is matched against the ``org.opencontainers.image.ref.name`` (or
    ``io.containerd.image.name``) annotation of index.json's entries; "" takes
    the layout's only image. An index is followed to the manifest for
    ``platform`` ("os/arch[/variant]"; "" = this host's). ``compression``
    applies to plain tar layers. On any failure the layers this call added are
    removed again and ImageError names the layout, the image and the cause.
    """
    path = Path(path)
    where = f"OCI layout {path} image {tag!r}" if tag else f"OCI layout {path}"
    want = _parse_platform(platform, where)
    added: list[Digest] = []
    try:
        record, manifests = _ingest(path, store, ref, tag, want, chunk_size, compression, added)
    except BaseException as e:
        for d in added:
            store.remove(d)
        if added:
            log.warning("ingest rolled back", layout=str(path), removed=len(added))
        if isinstance(e, _Fail):
            raise ImageError(f"{where}: {e}") from None
        if isinstance(e, ImageError):
            raise ImageError(f"{where}: {e}") from None
        if isinstance(e, (StoreError, CompressionError, OSError)):
            raise ImageError(f"{where}: {e}") from None
        raise
    log.info(
        "image ingested",
        layout=str(path),
        tag=tag,
        ref=record.ref,
        config=short(record.config_digest),
        layers=len(record.layers),
        size=record.size,
        uncompressed_size=record.uncompressed_size,
        compression=compression,
        new_layers=len(added),
    )
    return record, manifests


# --------------------------------------------------------------------------
# platform
# --------------------------------------------------------------------------
def _parse_platform(platform: str, where: str) -> tuple[str, str, str]:
    if not platform:
        return "linux", host_architecture(), ""
    parts = platform.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ImageError(f"{where}: platform {platform!r} is not os/arch[/variant]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else ""


def _platform_str(p: Any) -> str:
    if not isinstance(p, dict):
        return "(no platform)"
    s = f"{p.get('os', '?')}/{p.get('architecture', '?')}"
    return s + (f"/{p['variant']}" if p.get("variant") else "")


def _matches(p: Any, want: tuple[str, str, str]) -> bool:
    if not isinstance(p, dict):
        return False
    os_, arch, variant = want
    if p.get("os") != os_ or p.get("architecture") != arch:
        return False
    return not variant or p.get("variant") == variant


# --------------------------------------------------------------------------
# blobs
# --------------------------------------------------------------------------
def _descriptor(d: Any, what: str) -> tuple[Digest, int, str]:
    if not isinstance(d, dict):
        raise _Fail(f"{what} is not a descriptor")
    try:
        digest = parse_digest(d.get("digest", ""))
    except DigestError as e:
        raise _Fail(f"{what}: {e}") from None
    size = d.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _Fail(f"{what} {digest} has no valid size")
    media = d.get("mediaType", "")
    return digest, size, media if isinstance(media, str) else ""


def _blob_path(root: Path, digest: Digest) -> Path:
    return root / "blobs" / "sha256" / hex_part(digest)


def _open_blob(root: Path, digest: Digest, size: int, what: str) -> BinaryIO:
    """Open a blob whose descriptor says ``size``; a missing or short file is an error."""
    p = _blob_path(root, digest)
    try:
        f = open(p, "rb")
    except FileNotFoundError:
        raise _Fail(f"{what} {digest} is missing (no blobs/sha256/{hex_part(digest)})") from None
    actual = os.fstat(f.fileno()).st_size
    if actual != size:
        f.close()
        if actual < size:
            raise _Fail(f"{what} {digest} is truncated ({actual} of {size} bytes)")
        raise _Fail(f"{what} {digest} is {actual} bytes, its descriptor says {size}")
    return f


def _read_json_blob(root: Path, digest: Digest, size: int, what: str) -> tuple[bytes, Any]:
    if size > MAX_METADATA:
        raise _Fail(f"{what} {digest} is {size} bytes, too large")
    with _open_blob(root, digest, size, what) as f:
        data = f.read(size + 1)
    if sha256_digest(data) != digest:
        raise _Fail(f"{what} digest mismatch: content is {sha256_digest(data)}, not {digest}")
    try:
        return data, json.loads(data)
    except ValueError as e:
        raise _Fail(f"{what} {digest} is not valid JSON ({e})") from None


def _read_top(root: Path) -> list[Any]:
    if not root.is_dir():
        raise _Fail("no such directory")
    marker = root / "oci-layout"
    try:
        layout = json.loads(marker.read_bytes()[: MAX_METADATA + 1])
    except FileNotFoundError:
        raise _Fail("not an OCI image layout (no oci-layout file)") from None
    except ValueError as e:
        raise _Fail(f"oci-layout is not valid JSON ({e})") from None
    version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
    if not isinstance(version, str) or not version.startswith("1."):
        raise _Fail(f"unsupported imageLayoutVersion {version!r} (expected 1.x)")
    try:
        raw = (root / "index.json").read_bytes()
    except FileNotFoundError:
        raise _Fail("not an OCI image layout (no index.json)") from None
    if len(raw) > MAX_METADATA:
        raise _Fail("index.json is too large")
    try:
        index = json.loads(raw)
    except ValueError as e:
        raise _Fail(f"index.json is not valid JSON ({e})") from None
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list):
        raise _Fail("index.json has no manifests list")
    if not manifests:
        raise _Fail("index.json lists no images")
    return manifests


def _names(d: Any) -> list[str]:
    ann = d.get("annotations") if isinstance(d, dict) else None
    if not isinstance(ann, dict):
        return []
    return [str(ann[k]) for k in (REF_NAME, CONTAINERD_NAME) if isinstance(ann.get(k), str)]


def _pick_by_tag(entries: list[Any], tag: str) -> list[Any]:
    tags = sorted({n for e in entries for n in _names(e)[:1]})
    if not tag:
        if len(entries) == 1:
            return entries
        raise _Fail(
            f"holds {len(entries)} images; name one of: " + (", ".join(tags) or "(none tagged)")
        )
    chosen = [e for e in entries if tag in _names(e)]
    if not chosen:
        raise _Fail("tag not found; available: " + (", ".join(tags) or "(no tagged images)"))
    return chosen


def _pick_platform(entries: list[Any], want: tuple[str, str, str], what: str) -> Any:
    platforms = [e.get("platform") if isinstance(e, dict) else None for e in entries]
    if len(entries) == 1 and not isinstance(platforms[0], dict):
        return entries[0]  # a plain manifest: nothing to choose
    fits = [e for e, p in zip(entries, platforms, strict=True) if _matches(p, want)]
    if not fits:
        have = ", ".join(sorted({_platform_str(p) for p in platforms}))
        raise _Fail(f"{what} has no manifest for platform {'/'.join(filter(None, want))}; {have}")
    return fits[0]


def _resolve_manifest(
    root: Path, entries: list[Any], want: tuple[str, str, str]
) -> tuple[Digest, dict[str, Any], list[tuple[bytes, str]]]:
    """Follow descriptors (through nested indexes) to one image manifest.

    Returns its digest, its document, and the (bytes, media type) of each
    document on the way, the tag's first and the manifest's last.
    """
    entry = _pick_platform(entries, want, "index.json")
    path: list[tuple[bytes, str]] = []
    for _ in range(MAX_INDEX_DEPTH + 1):
        digest, size, media = _descriptor(entry, "manifest")
        data, doc = _read_json_blob(root, digest, size, f"manifest {digest}")
        if not isinstance(doc, dict):
            raise _Fail(f"manifest {digest} is not a JSON object")
        kind = doc.get("mediaType") or media
        path.append((data, str(kind)))
        if kind in _INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
            children = doc.get("manifests")
            if not isinstance(children, list) or not children:
                raise _Fail(f"index {digest} lists no manifests")
            entry = _pick_platform(children, want, f"index {digest}")
            continue
        if kind and kind not in _MANIFEST_TYPES:
            raise _Fail(f"manifest {digest} has unsupported media type {kind!r}")
        return digest, doc, path
    raise _Fail(f"indexes nest deeper than {MAX_INDEX_DEPTH}")


def _upstream(record: ImageRecord, path: list[tuple[bytes, str]]) -> UpstreamManifest | None:
    """The layout's own manifest (and the index naming it) of ``record``, to serve as they are.

    Kept only when the tag names the manifest itself or one index listing
    it (deeper nesting has no place in a registry's answer for one tag), when
    the documents can travel (``doc_of``) and when the manifest still lists
    the record's blobs: with ``compression`` asked of uncompressed layers it
    does not, and the image is served under rbd's built manifest.
    """
    if len(path) > 2:
        return None
    docs = [doc_of(data, media) for data, media in path]
    main = docs[-1]
    top = docs[0] if len(docs) == 2 else None
    if main is None or (len(docs) == 2 and top is None):
        return None
    kept = UpstreamManifest(manifest=main, index=top)
    try:
        check_upstream(record, kept)
    except UpstreamManifestError as e:
        log.info("layout manifest not kept", image=record.ref, reason=str(e))
        return None
    return kept


# --------------------------------------------------------------------------
# ingest
# --------------------------------------------------------------------------
def _ingest(
    root: Path,
    store: LayerStore,
    ref: str,
    tag: str,
    want: tuple[str, str, str],
    chunk_size: int,
    compression: Compression,
    added: list[Digest],
) -> tuple[ImageRecord, list[ChunkManifest]]:
    entries = _pick_by_tag(_read_top(root), tag)
    manifest_digest, manifest, path = _resolve_manifest(root, entries, want)
    oci = (manifest.get("mediaType") or MEDIA_OCI_MANIFEST) != MEDIA_DOCKER_MANIFEST

    config_digest, config_size, _ = _descriptor(manifest.get("config"), "config")
    config_bytes, config = _read_json_blob(root, config_digest, config_size, "config")
    try:
        config_text = config_bytes.decode("utf-8")
        diff_ids = config["rootfs"]["diff_ids"]
        if not isinstance(diff_ids, list):
            raise TypeError("rootfs.diff_ids is not a list")
        diff_ids = [parse_digest(d) for d in diff_ids]
    except (UnicodeDecodeError, KeyError, TypeError, DigestError) as e:
        raise _Fail(f"config {config_digest} is not an image config ({e})") from None
    descs = manifest.get("layers")
    if not isinstance(descs, list):
        raise _Fail(f"manifest {manifest_digest} has no layers list")
    if len(descs) != len(diff_ids):
        raise _Fail(
            f"manifest {manifest_digest} lists {len(descs)} layers but the config has "
            f"{len(diff_ids)} diff_ids"
        )
    layers: list[LayerRef] = []
    chunk_manifests: list[ChunkManifest] = []
    for i, (desc, diff_id) in enumerate(zip(descs, diff_ids, strict=True)):
        layer, cm = _ingest_layer(
            root, desc, diff_id, i, store, chunk_size, compression, added, oci
        )
        layers.append(layer)
        chunk_manifests.append(cm)
    record = ImageRecord(ref=ref, config_digest=config_digest, config=config_text, layers=layers)
    record.upstream = _upstream(record, path)
    return record, chunk_manifests


def _ingest_layer(
    root: Path,
    desc: Any,
    diff_id: Digest,
    index: int,
    store: LayerStore,
    chunk_size: int,
    compression: Compression,
    added: list[Digest],
    oci: bool,
) -> tuple[LayerRef, ChunkManifest]:
    digest, size, claimed = _descriptor(desc, f"layer {index}")
    what = f"layer {index} {digest}"
    with _open_blob(root, digest, size, f"layer {index}") as f:
        kind = sniff(f.read(4))
        f.seek(0)
        if kind == "tar":
            if digest != diff_id:
                raise _Fail(
                    f"{what} is an uncompressed tar, so its digest should be the config's "
                    f"diff_id {diff_id}"
                )
            if compression != "off":
                try:
                    layer, cm = ingest_compressed(
                        f, diff_id, store, chunk_size, added, compression, oci=oci
                    )
                except ImageError as e:
                    raise _Fail(f"{what} {e}") from None
                if layer.uncompressed_size != size:
                    raise _Fail(f"{what} changed while reading")
                _note_media(claimed, layer.media_type, what, kind)
                return layer, cm
            usize = size
        else:
            try:
                got = hash_layer(f, kind)
            except CompressionError as e:
                raise _Fail(f"{what}: {e}") from None
            if got.digest != digest:
                raise _Fail(f"{what} digest mismatch: content is {got.digest}")
            if got.diff_id != diff_id:
                raise _Fail(
                    f"{what} digest mismatch: uncompressed content is {got.diff_id}, "
                    f"config says {diff_id}"
                )
            usize = got.uncompressed_size
            f.seek(0)
        fresh = not store.has(digest)
        try:
            cm = store.ingest(f, digest, layer_chunk_size(size, chunk_size))
        except StoreError as e:
            raise _Fail(f"{what} digest mismatch: {e}") from None
        if fresh:
            added.append(digest)
    if cm.size != size:
        raise _Fail(f"{what} is {cm.size} bytes, its descriptor says {size}")
    media = media_type(kind, oci=oci)
    _note_media(claimed, media, what, kind)
    layer = LayerRef(
        digest=digest, size=size, media_type=media, diff_id=diff_id, uncompressed_size=usize
    )
    return layer, cm


def _note_media(claimed: str, actual: str, what: str, kind: str) -> None:
    """Log when a descriptor's media type does not say what the bytes are."""
    if not claimed or claimed == actual:
        return
    suffix = {"tar": ".tar", "gzip": "gzip", "zstd": "zstd"}[kind]
    if kind == "tar" and claimed.endswith((".tar", "diff.tar")):
        return
    if kind != "tar" and claimed.endswith(suffix):
        return
    log.warning(
        "layer media type does not match its content", layer=what, claimed=claimed, content=kind
    )
