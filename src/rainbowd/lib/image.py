"""Image formats: docker-archive in (ingest) and docker-archive out (load).

An origin reads a ``docker save`` tarball into the layer store with
:func:`ingest_docker_archive`; every layer is checked against the digests the
archive itself declares before it counts as held. Any host later feeds a
complete image to its Docker engine with :func:`docker_archive_stream`, which
yields a docker-archive tar straight from the store's blobs, so a multi-GiB
image never has to exist twice on disk or once in memory.

Layers may be compressed on ingest (``compression="gzip"|"zstd"``, see
:mod:`rainbowd.lib.compression`): the stored blob is then the compressed tar,
while diff_ids stay those of the tar. Docker 20.10's ``docker load`` accepts
gzip layers but not zstd ones ("archive/tar: invalid tar header"), so the
outgoing stream inflates zstd blobs back to tar on the fly: rbd moves zstd
between hosts, and Docker gets what it can load.

Both directions speak the two layouts ``docker save`` has emitted:

- legacy (Docker <= 24): ``<hex>.json`` config, ``<id>/layer.tar`` layers;
- OCI-ish (Docker >= 25): ``blobs/sha256/<hex>`` for config and layers,
  plus ``index.json``/``oci-layout`` which we ignore (manifest.json suffices).

Blocking I/O throughout: the agent calls these via ``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

import structlog

from rainbowd.core.chunks import DEFAULT_CHUNK_SIZE, ChunkManifest, layer_chunk_size
from rainbowd.core.digest import Digest, DigestError, hex_part, is_digest, parse_digest, short
from rainbowd.core.messages import Compression, ImageRecord, LayerRef
from rainbowd.lib.compression import GZIP_MAGIC as GZIP_MAGIC
from rainbowd.lib.compression import (
    BlobKind,
    CompressionError,
    Inflater,
    compressed_copy,
    hash_layer,
    media_type,
    sniff,
)
from rainbowd.lib.store import LayerStore, StoreError

log = structlog.get_logger(__name__)

MEDIA_TAR = "application/vnd.docker.image.rootfs.diff.tar"
MEDIA_TAR_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

#: piece size of the docker-archive stream (and of reads while hashing)
STREAM_PIECE = 1024 * 1024
#: manifest.json and configs are small; refuse absurd ones instead of reading them whole
MAX_METADATA = 16 * 1024 * 1024

_HEX64 = re.compile(r"[0-9a-f]{64}")
_LEGACY_CONFIG = re.compile(r"^(?:.*/)?([0-9a-f]{64})\.json$")
_BLOB_PATH = re.compile(r"^(?:.*/)?blobs/sha256/([0-9a-f]{64})$")


class ImageError(ValueError):
    """An image archive or image record is unusable; the message names it and why."""


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def chain_ids(diff_ids: Iterable[str]) -> list[str]:
    """The ChainID of each prefix of ``diff_ids`` (how Docker names a layer stack).

    Docker only reuses a layer it already has when the whole stack below it is
    identical, so deciding what to leave out of a load needs chain IDs, not
    diff IDs: the same diff on a different base is a different layer to Docker.
    """
    out: list[str] = []
    for d in diff_ids:
        if not out:
            out.append(d)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def _digest_from_name(name: str) -> str | None:
    """The digest a member name carries (``blobs/sha256/<hex>``, ``<hex>.json``), if any."""
    m = _BLOB_PATH.match(name) or _LEGACY_CONFIG.match(name)
    return "sha256:" + m.group(1) if m else None


# --------------------------------------------------------------------------
# ingest
# --------------------------------------------------------------------------
def ingest_docker_archive(
    path: Path,
    store: LayerStore,
    *,
    ref: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    compression: Compression = "off",
) -> tuple[ImageRecord, list[ChunkManifest]]:
    """Read a ``docker save`` tarball into ``store``; return the image and its layer manifests.

    Everything the archive declares is checked: the config against the digest
    in its file name, each layer against its name (OCI layout) and, for plain
    tar layers, against the config's ``diff_ids`` (gzip layers are inflated
    while hashing to check the same). Layers are streamed from the tar member
    into the store, never read whole. On any failure the layers this call
    added are removed again, so a bad archive leaves the store as it was.

    ``compression`` other than "off" compresses plain tar layers on the way
    in (deterministically, so two origins agree on digests); gzip and zstd
    layers pass unchanged. Every LayerRef carries ``uncompressed_size``.
    """
    path = Path(path)
    where = f"docker archive {path}"
    try:
        tf = tarfile.open(path, "r:*")
    except FileNotFoundError:
        raise ImageError(f"{where}: no such file") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ImageError(f"{where}: not a tar archive ({e})") from None
    added: list[Digest] = []
    try:
        with tf:
            record, manifests = _ingest(tf, where, store, ref, chunk_size, added, compression)
    except BaseException as e:
        for d in added:
            store.remove(d)
        if added:
            log.warning("ingest rolled back", archive=str(path), removed=len(added))
        if isinstance(e, ImageError):
            raise
        if isinstance(e, (tarfile.TarError, EOFError, zlib.error)):
            raise ImageError(f"{where}: archive is truncated or corrupt ({e})") from None
        if isinstance(e, (StoreError, CompressionError)):
            raise ImageError(f"{where}: {e}") from None
        raise
    log.info(
        "image ingested",
        archive=str(path),
        ref=record.ref,
        config=short(record.config_digest),
        layers=len(record.layers),
        size=record.size,
        uncompressed_size=record.uncompressed_size,
        compression=compression,
        new_layers=len(added),
    )
    return record, manifests


def _read_small(tf: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> bytes:
    if member.size > MAX_METADATA:
        raise ImageError(f"{where}: {member.name} is {member.size} bytes, too large")
    f = tf.extractfile(member)
    if f is None:
        raise ImageError(f"{where}: {member.name} is not a regular file")
    with f:
        data = f.read()
    if len(data) != member.size:
        raise ImageError(f"{where}: {member.name} is truncated")
    return data


def _pick_entry(entries: list[dict[str, Any]], ref: str | None, where: str) -> tuple[int, str]:
    """Index of the image to ingest and the name it will be known by.

    ``ref`` is the name the image will have in rbd (and in Docker after a
    load). It picks among several images by RepoTag; an archive holding one
    image is taken whatever its tags, under the name ``ref``.
    """
    tags = [t for e in entries for t in (e.get("RepoTags") or [])]
    if ref is None:
        if len(entries) != 1:
            raise ImageError(
                f"{where}: holds {len(entries)} images; name one of: "
                + (", ".join(tags) or "(none tagged)")
            )
        entry_tags = entries[0].get("RepoTags") or []
        return 0, str(entry_tags[0]) if entry_tags else ""
    wanted = {ref} if ":" in ref.rsplit("/", 1)[-1] or "@" in ref else {ref, ref + ":latest"}
    for i, e in enumerate(entries):
        if wanted & set(e.get("RepoTags") or []):
            return i, ref
    if len(entries) == 1:
        return 0, ref
    raise ImageError(
        f"{where}: image {ref!r} not found among its {len(entries)} images; available tags: "
        + (", ".join(tags) or "(none)")
    )


def _ingest(
    tf: tarfile.TarFile,
    where: str,
    store: LayerStore,
    ref: str | None,
    chunk_size: int,
    added: list[Digest],
    compression: Compression = "off",
) -> tuple[ImageRecord, list[ChunkManifest]]:
    members = {m.name.removeprefix("./"): m for m in tf}
    if "manifest.json" not in members:
        raise ImageError(f"{where}: missing manifest.json (is it a `docker save` archive?)")
    try:
        entries = json.loads(_read_small(tf, members["manifest.json"], where))
    except ValueError as e:
        raise ImageError(f"{where}: manifest.json is not valid JSON ({e})") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ImageError(f"{where}: manifest.json is not a list of images")
    if not entries:
        raise ImageError(f"{where}: manifest.json lists no images")
    index, chosen_ref = _pick_entry(entries, ref, where)
    entry = entries[index]
    config_name = entry.get("Config")
    layer_names = entry.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layer_names, list):
        raise ImageError(f"{where}: manifest.json entry {index} lacks Config or Layers")

    # -- config ----------------------------------------------------------
    if config_name not in members:
        raise ImageError(f"{where}: config {config_name} named by manifest.json is missing")
    config_bytes = _read_small(tf, members[config_name], where)
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    named = _digest_from_name(config_name)
    if named is not None and named != config_digest:
        raise ImageError(
            f"{where}: config {config_name} digest mismatch: content is {config_digest}"
        )
    try:
        config_text = config_bytes.decode("utf-8")
        config = json.loads(config_text)
        diff_ids = config["rootfs"]["diff_ids"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ImageError(f"{where}: config {config_name} is not an image config ({e})") from None
    if not isinstance(diff_ids, list) or not all(is_digest(d) for d in diff_ids):
        raise ImageError(f"{where}: config {config_name} has malformed rootfs.diff_ids")
    if len(diff_ids) != len(layer_names):
        raise ImageError(
            f"{where}: manifest.json lists {len(layer_names)} layers but the config has "
            f"{len(diff_ids)} diff_ids"
        )
    if not chosen_ref:
        chosen_ref = config_digest
    resolved: list[tarfile.TarInfo] = []
    for name in layer_names:
        if not isinstance(name, str) or name not in members:
            raise ImageError(f"{where}: layer {name} named by manifest.json is missing")
        resolved.append(_resolve(members, members[name], where))

    # -- layers ----------------------------------------------------------
    layers: list[LayerRef] = []
    manifests: list[ChunkManifest] = []
    for name, member, diff_id in zip(layer_names, resolved, diff_ids, strict=True):
        ref_, manifest = _ingest_layer(
            tf, name, member, diff_id, where, store, chunk_size, added, compression
        )
        layers.append(ref_)
        manifests.append(manifest)
    record = ImageRecord(
        ref=chosen_ref, config_digest=config_digest, config=config_text, layers=layers
    )
    return record, manifests


def _resolve(
    members: dict[str, tarfile.TarInfo], member: tarfile.TarInfo, where: str
) -> tarfile.TarInfo:
    """Follow symlinks and hard links inside the archive (docker save links shared layers)."""
    seen = {member.name}
    while member.issym() or member.islnk():
        if member.issym():
            target = posixpath.normpath(
                posixpath.join(posixpath.dirname(member.name), member.linkname)
            )
        else:
            target = posixpath.normpath(member.linkname)
        nxt = members.get(target.removeprefix("./"))
        if nxt is None or nxt.name in seen:
            raise ImageError(f"{where}: {member.name} links to missing {member.linkname}")
        seen.add(nxt.name)
        member = nxt
    if not member.isfile():
        raise ImageError(f"{where}: {member.name} is not a regular file")
    return member


def _open_member(tf: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> IO[bytes]:
    f = tf.extractfile(member)
    if f is None:
        raise ImageError(f"{where}: layer {member.name} is not a regular file")
    return f


def _ingest_layer(
    tf: tarfile.TarFile,
    name: str,
    member: tarfile.TarInfo,
    diff_id: str,
    where: str,
    store: LayerStore,
    chunk_size: int,
    added: list[Digest],
    compression: Compression = "off",
) -> tuple[LayerRef, ChunkManifest]:
    with _open_member(tf, member, where) as f:
        head = f.read(4)
    kind = sniff(head)
    named = _digest_from_name(name)
    if kind == "tar" and compression != "off":
        with _open_member(tf, member, where) as f:
            return _ingest_compressed(
                f, name, diff_id, where, store, chunk_size, added, compression, member.size
            )
    if kind != "tar":
        # diff_id is of the inflated tar: check it (and learn the blob digest) first
        with _open_member(tf, member, where) as f:
            try:
                got = hash_layer(f, kind)
            except CompressionError as e:
                raise ImageError(f"{where}: layer {name}: {e}") from None
        if got.diff_id != diff_id:
            raise ImageError(
                f"{where}: layer {name} digest mismatch: uncompressed content is "
                f"{got.diff_id}, config says {diff_id}"
            )
        expected = got.digest
        usize = got.uncompressed_size
        if named is not None and named != expected:
            raise ImageError(f"{where}: layer {name} digest mismatch: content is {expected}")
    else:
        expected = diff_id
        usize = member.size
        if named is not None and named != diff_id:
            raise ImageError(
                f"{where}: layer {name} does not match the config: named {named}, "
                f"config says {diff_id}"
            )
    digest = parse_digest(expected)
    fresh = not store.has(digest)
    chunk = layer_chunk_size(member.size, chunk_size)  # a small layer is cut finer
    with _open_member(tf, member, where) as f:
        try:
            manifest = store.ingest(f, digest, chunk)  # type: ignore[arg-type]
        except StoreError as e:
            raise ImageError(f"{where}: layer {name} digest mismatch: {e}") from None
    if fresh:
        added.append(digest)
    if manifest.size != member.size:
        raise ImageError(f"{where}: layer {name} is truncated ({manifest.size} of {member.size})")
    layer = LayerRef(
        digest=digest,
        size=manifest.size,
        media_type=media_type(kind, oci=False),
        diff_id=diff_id,
        uncompressed_size=usize,
    )
    return layer, manifest


def ingest_compressed(
    src: IO[bytes],
    diff_id: str,
    store: LayerStore,
    chunk_size: int,
    added: list[Digest],
    compression: Compression,
    *,
    oci: bool = False,
) -> tuple[LayerRef, ChunkManifest]:
    """Compress the tar layer ``src`` into ``store``; check it is ``diff_id`` first.

    Shared by every origin that reads uncompressed layers. The compressed copy
    goes to a temp file under ``store.tmp_dir`` while both sides are hashed;
    only when the tar matches ``diff_id`` is the copy ingested (and verified
    again) under its own digest. Raises ImageError without a location prefix
    (the caller adds it) or CompressionError; ``added`` gets a new blob's digest.
    """
    with compressed_copy(src, compression, store.tmp_dir) as c:
        if c.diff_id != diff_id:
            raise ImageError(f"digest mismatch: content is {c.diff_id}, config says {diff_id}")
        digest = parse_digest(c.digest)
        fresh = not store.has(digest)
        with open(c.path, "rb") as f:
            manifest = store.ingest(f, digest, layer_chunk_size(c.size, chunk_size))
        if fresh:
            added.append(digest)
        kind: BlobKind = c.kind
        layer = LayerRef(
            digest=digest,
            size=c.size,
            media_type=media_type(kind, oci=oci),
            diff_id=diff_id,
            uncompressed_size=c.uncompressed_size,
        )
    return layer, manifest


def _ingest_compressed(
    f: IO[bytes],
    name: str,
    diff_id: str,
    where: str,
    store: LayerStore,
    chunk_size: int,
    added: list[Digest],
    compression: Compression,
    member_size: int,
) -> tuple[LayerRef, ChunkManifest]:
    try:
        layer, manifest = ingest_compressed(f, diff_id, store, chunk_size, added, compression)
    except (ImageError, CompressionError, StoreError) as e:
        raise ImageError(f"{where}: layer {name} {e}") from None
    if layer.uncompressed_size != member_size:
        raise ImageError(
            f"{where}: layer {name} is truncated ({layer.uncompressed_size} of {member_size})"
        )
    return layer, manifest


# --------------------------------------------------------------------------
# docker-archive out
# --------------------------------------------------------------------------
def tar_member(name: str, data: bytes) -> bytes:
    """A whole small tar member: header, ``data`` and padding."""
    return _tar_header(name, len(data)) + data + _padding(len(data))


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def archive_layer_name(digest: str) -> str:
    """Member name of a layer blob in archives we write (legacy layout, keyed by blob)."""
    return f"{hex_part(Digest(digest))}/layer.tar"


def docker_archive_stream(
    image: ImageRecord,
    store: LayerStore,
    *,
    skip_diff_ids: Iterable[str] = frozenset(),
    inflate_zstd: bool = True,
) -> Iterator[bytes]:
    """Yield ``image`` as a docker-archive tar, read piecewise from the store's blobs.

    Layers whose diff_id is in ``skip_diff_ids`` are left out of the tar but
    stay in manifest.json: Docker accepts that for layers it already holds.
    Every layer that is sent must be complete in the store (checked before the
    first byte is yielded), and is re-hashed while streaming; a blob that no
    longer matches its digest aborts the stream with ImageError, so Docker sees
    a broken tar and loads nothing.

    zstd blobs are inflated to their tar on the fly (``inflate_zstd``, the
    default) because Docker 20.10's load rejects zstd layers; the tar is then
    checked against the diff_id as well. Its size goes in the tar header, so
    it comes from ``uncompressed_size`` or, when that is unknown, from a
    first pass over the blob.
    """
    skip = set(skip_diff_ids)
    try:
        config_digest = parse_digest(image.config_digest)
        for layer in image.layers:
            parse_digest(layer.digest)
            parse_digest(layer.diff_id)
    except DigestError as e:
        raise ImageError(f"image {image.ref}: {e}") from None
    config_bytes = image.config.encode("utf-8")
    if "sha256:" + hashlib.sha256(config_bytes).hexdigest() != config_digest:
        raise ImageError(f"image {image.ref}: config does not match {config_digest}")
    send = layers_to_send(image, store, [x for x in image.layers if x.diff_id not in skip])
    config_name = f"{hex_part(config_digest)}.json"
    manifest = [
        {
            "Config": config_name,
            "RepoTags": [image.ref],
            "Layers": [archive_layer_name(layer.digest) for layer in image.layers],
        }
    ]
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    return _archive_pieces(
        image, store, manifest_bytes, config_name, config_bytes, send, inflate_zstd
    )


def _archive_pieces(
    image: ImageRecord,
    store: LayerStore,
    manifest_bytes: bytes,
    config_name: str,
    config_bytes: bytes,
    send: dict[str, LayerRef],
    inflate_zstd: bool = True,
) -> Iterator[bytes]:
    for name, data in ((config_name, config_bytes), ("manifest.json", manifest_bytes)):
        yield tar_member(name, data)
    for layer in send.values():
        yield from stored_blob_member(
            image, store, layer, archive_layer_name(layer.digest), inflate_zstd=inflate_zstd
        )
    yield b"\0" * (2 * tarfile.BLOCKSIZE)


def layers_to_send(
    image: ImageRecord, store: LayerStore, layers: Iterable[LayerRef]
) -> dict[str, LayerRef]:
    """``layers`` by digest, once each, after checking each is complete in ``store``.

    Checked before an archive's first byte, so a load that cannot finish
    sends the engine nothing (ImageError naming the image and the layer).
    """
    send: dict[str, LayerRef] = {}
    for layer in layers:
        if layer.digest in send:
            continue
        if not store.has(Digest(layer.digest)):
            raise ImageError(
                f"image {image.ref}: layer {layer.digest} is not complete in the store "
                f"at {store.root}"
            )
        send[layer.digest] = layer
    return send


def stored_blob_member(
    image: ImageRecord,
    store: LayerStore,
    layer: LayerRef,
    member_name: str,
    *,
    inflate_zstd: bool = False,
) -> Iterator[bytes]:
    """One tar member ``member_name`` holding ``layer``'s blob, read piecewise from the store.

    The blob is re-hashed while it streams: a blob that no longer matches its
    digest raises ImageError before its last piece goes out, so the reader
    sees a broken tar and loads nothing. ``inflate_zstd``: a zstd blob goes
    out as its inflated tar (checked against the diff_id too), for Docker.
    """
    digest = layer.digest
    d = Digest(digest)
    try:
        f: BinaryIO = store.open_blob(d)
    except StoreError as e:
        raise ImageError(f"image {image.ref}: {e}") from None
    with f:
        size = _file_size(f)
        if size != store.size(d):
            raise ImageError(f"image {image.ref}: layer {digest} has the wrong size on disk")
        if inflate_zstd and sniff(f.read(4)) == "zstd":
            f.seek(0)
            yield from _inflated_layer(image, layer, f, member_name)
            return
        f.seek(0)
        yield _tar_header(member_name, size)
        h = hashlib.sha256()
        sent = 0
        while True:
            data = f.read(STREAM_PIECE)
            if not data:
                break
            h.update(data)
            sent += len(data)
            if sent == size and "sha256:" + h.hexdigest() != digest:
                raise ImageError(f"image {image.ref}: layer {digest} is corrupt in the store")
            yield data
        if sent != size or "sha256:" + h.hexdigest() != digest:
            raise ImageError(f"image {image.ref}: layer {digest} changed while streaming")
        pad = _padding(size)
        if pad:
            yield pad


def _inflated_layer(
    image: ImageRecord, layer: LayerRef, f: BinaryIO, member_name: str
) -> Iterator[bytes]:
    """The tar member of a zstd blob, as its inflated tar, checked on both sides."""
    where = f"image {image.ref}: layer {layer.digest}"
    tar_size = layer.uncompressed_size
    try:
        if tar_size <= 0:  # not recorded: learn it (and check the blob) before the header
            got = hash_layer(f, "zstd")
            if got.digest != layer.digest or got.diff_id != layer.diff_id:
                raise ImageError(f"{where} is corrupt in the store")
            tar_size = got.uncompressed_size
            f.seek(0)
        yield _tar_header(member_name, tar_size)
        inf = Inflater(f, "zstd")
        while data := inf.read(STREAM_PIECE):
            if inf.out_size > tar_size:
                raise ImageError(f"{where} inflates to more than its recorded {tar_size} bytes")
            yield data
    except CompressionError as e:
        raise ImageError(f"{where} is corrupt in the store ({e})") from None
    if inf.digest != layer.digest:
        raise ImageError(f"{where} is corrupt in the store")
    if inf.out_size != tar_size or inf.diff_id != layer.diff_id:
        raise ImageError(
            f"{where} inflates to {inf.diff_id} ({inf.out_size} bytes), not the diff_id "
            f"{layer.diff_id} ({tar_size} bytes)"
        )
    pad = _padding(tar_size)
    if pad:
        yield pad


def _file_size(f: BinaryIO) -> int:
    f.seek(0, io.SEEK_END)
    size = f.tell()
    f.seek(0)
    return size


def write_docker_archive(image: ImageRecord, store: LayerStore, out: Path) -> Path:
    """Write the full docker-archive of ``image`` to ``out`` (for `docker load -i` or tests)."""
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for piece in docker_archive_stream(image, store):
                f.write(piece)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
