"""ImageCatalog: the manifests and configs of the images this node holds, for its front door.

The layer store keeps layers only; a registry client also asks for the
image's manifest and config. The agent learns an image's record (config text
and layer descriptors) when the coordinator hands it a load, and at the
origin when it ingests one; :meth:`ImageCatalog.record` then writes the config
(after checking it hashes to the record's config digest) and the manifest
built from the record (``rainbowd.core.imagemanifest``), each named by its
digest, so both survive a restart.

When the record carries the source's own manifest (``record.upstream``: a
registry or an OCI layout source), that manifest is kept too, byte for byte,
and the index it came from when the source's tag named one, after
:func:`~rainbowd.core.upstreammanifest.check_upstream` (they must hash to their
digests and list exactly the record's config and layers). The image is then
known by the upstream's digest: ``images.json`` names it, and a pull by that
digest (or by a tag the coordinator resolves to it) gets the upstream's
bytes. An image whose source had no manifest (a docker archive, an engine)
is known by the built manifest's digest, as before.

Layout under ``root`` (the agent's ``state_dir/mirror``), kept apart from the
layer store so heartbeats, hygiene and peers never see these as layers::

    manifests/<hex>     a manifest or index, exactly the bytes served
    configs/<hex>       an image config, exactly the bytes served
    images.json         image ref -> manifest digest, for rbd-agent status (what to pull
                        by digest); never used to answer a pull by tag

Every read checks the bytes against the digest they are named by: a file that
rotted or was edited is not served (the caller answers a miss, and the client
falls back to its upstream). Blocking file I/O: call from a worker thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import structlog

from rainbowd.core.digest import Digest, hex_part, is_digest, sha256_digest
from rainbowd.core.imagemanifest import BuiltManifest, manifest_for
from rainbowd.core.messages import ImageRecord, UpstreamManifest
from rainbowd.core.upstreammanifest import (
    OCI_INDEX,
    OCI_MANIFEST,
    UpstreamManifestError,
    check_upstream,
)
from rainbowd.lib.atomicfile import write_atomic

log = structlog.get_logger(__name__)

#: a manifest or config larger than this is refused when read back (rbd's configs are
#: bounded on the wire far below it; a bigger file can only be a mistake)
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024


class CatalogError(ValueError):
    """An image record cannot be catalogued (its config does not match its digest)."""


@dataclass(frozen=True, slots=True)
class StoredManifest:
    """A manifest read back and checked: its bytes, media type and the blobs it names.

    An index names no blobs: ``children`` are the manifests it lists (this node
    keeps at most the one the origin chose), ``config_digest`` is None.
    """

    data: bytes
    media_type: str
    digest: Digest
    config_digest: Digest | None
    layer_digests: tuple[Digest, ...]
    children: tuple[Digest, ...] = ()

    @property
    def is_index(self) -> bool:
        return self.config_digest is None


class ImageCatalog:
    """Manifests and configs by digest, under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.manifest_dir = self.root / "manifests"
        self.config_dir = self.root / "configs"
        for d in (self.manifest_dir, self.config_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.refs_path = self.root / "images.json"
        #: image ref -> manifest digest of every image recorded here (rbd-agent status)
        self.recorded: dict[str, Digest] = _read_refs(self.refs_path)

    def record(self, image: ImageRecord) -> BuiltManifest:
        """Keep ``image``'s config and manifests; return the manifest built from the record.

        The image is known (``recorded[image.ref]``) by the upstream's digest
        (its index's, if any) when the record carries a manifest that passes
        its check, else by the built manifest's.

        Raises CatalogError when the config text does not hash to the
        record's config digest: such a record would make the front door serve
        an image nobody verified.
        """
        config = image.config.encode()
        actual = sha256_digest(config)
        if actual != image.config_digest:
            raise CatalogError(
                f"image {image.ref}: its config hashes to {actual}, not to the recorded "
                f"{image.config_digest}; not served"
            )
        built = manifest_for(image)
        _write_once(self.config_dir / hex_part(actual), config)
        _write_once(self.manifest_dir / hex_part(built.digest), built.data)
        known_as = built.digest
        upstream = self._upstream(image)
        if upstream is not None:
            for doc in [upstream.manifest] + ([upstream.index] if upstream.index else []):
                _write_once(self.manifest_dir / hex_part(Digest(doc.digest)), doc.text.encode())
            known_as = Digest(upstream.top.digest)
        if self.recorded.get(image.ref) != known_as:
            log.info(
                "mirror_image_recorded",
                ref=image.ref,
                manifest=known_as,
                upstream=upstream is not None,
                built=built.digest,
                layers=len(built.layer_digests),
            )
            self.recorded[image.ref] = known_as
            _write_once(self.refs_path, json.dumps(self.recorded, sort_keys=True).encode())
        return built

    @staticmethod
    def _upstream(image: ImageRecord) -> UpstreamManifest | None:
        """``image.upstream`` if it describes the image, else None (logged: built one served)."""
        if image.upstream is None:
            return None
        try:
            check_upstream(image, image.upstream)
        except UpstreamManifestError as e:
            log.error("mirror_upstream_manifest_refused", ref=image.ref, error=str(e))
            return None
        return image.upstream

    def has_config(self, digest: Digest) -> bool:
        """Whether a config named ``digest`` is kept (a stat; :meth:`config` checks the bytes)."""
        return (self.config_dir / hex_part(digest)).is_file()

    def config(self, digest: Digest) -> bytes | None:
        """The config blob named ``digest``, checked; None when not here (or not intact)."""
        return _read_checked(self.config_dir, digest, "config")

    def manifest(self, digest: Digest) -> StoredManifest | None:
        """The manifest named ``digest``, checked and parsed; None when not here (or not intact)."""
        data = _read_checked(self.manifest_dir, digest, "manifest")
        if data is None:
            return None
        try:
            return _parse(data, digest)
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            log.error("mirror_manifest_unreadable", manifest=digest, error=str(e))
            return None


def _parse(data: bytes, digest: Digest) -> StoredManifest:
    """``data`` (a manifest or an index) parsed; ValueError/KeyError/TypeError if it is not one."""
    doc = json.loads(data)
    children: tuple[str, ...] = ()
    config_digest: str | None = None
    layers: tuple[str, ...] = ()
    if "manifests" in doc and "layers" not in doc:
        children = tuple(entry["digest"] for entry in doc["manifests"])
        media_type = doc.get("mediaType") or OCI_INDEX
    else:
        config_digest = doc["config"]["digest"]
        layers = tuple(layer["digest"] for layer in doc["layers"])
        # an OCI manifest may leave its media type out (the registry's header said it)
        media_type = doc.get("mediaType") or OCI_MANIFEST
    named = (*children, *layers, *((config_digest,) if config_digest is not None else ()))
    if not all(isinstance(d, str) and is_digest(d) for d in named):
        raise ValueError("a digest in it is not sha256")
    if not isinstance(media_type, str):
        raise TypeError("its mediaType is not a string")
    return StoredManifest(
        data=data,
        media_type=media_type,
        digest=digest,
        config_digest=None if config_digest is None else Digest(config_digest),
        layer_digests=tuple(Digest(d) for d in layers),
        children=tuple(Digest(d) for d in children),
    )


def _read_refs(path: Path) -> dict[str, Digest]:
    """The refs file, or {} when it is absent or unreadable (it only feeds status)."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except ValueError as e:
        log.warning("mirror_refs_unreadable", path=str(path), error=str(e))
        return {}
    if not isinstance(doc, dict):
        return {}
    return {str(k): Digest(v) for k, v in doc.items() if isinstance(v, str) and is_digest(v)}


def _read_checked(folder: Path, digest: Digest, what: str) -> bytes | None:
    path = folder / hex_part(digest)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_DOCUMENT_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if len(data) > MAX_DOCUMENT_BYTES or sha256_digest(data) != digest:
        log.error("mirror_document_corrupt", kind=what, digest=digest, path=str(path))
        return None
    return data


def _write_once(path: Path, data: bytes) -> None:
    """Write ``data`` at ``path`` atomically, unless an intact copy is there already."""
    try:
        if path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    write_atomic(path, data)
