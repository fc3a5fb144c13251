"""ImageCatalog: the manifests and configs of the images this node holds, for its front door.

The layer store keeps layers only; a registry client also asks for the
image's manifest and config. The agent learns an image's record (config text
and layer descriptors) when the coordinator hands it a load, and at the
origin when it ingests one; :meth:`ImageCatalog.record` then writes the config
(after checking it hashes to the record's config digest) and the manifest
built from the record (``rainbowd.core.imagemanifest``), each named by its
digest, so both survive a restart.

Layout under ``root`` (the agent's ``state_dir/mirror``), kept apart from the
layer store so heartbeats, hygiene and peers never see these as layers::

    manifests/<hex>     a manifest, exactly the bytes served
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
from rainbowd.core.messages import ImageRecord
from rainbowd.lib.atomicfile import write_atomic

log = structlog.get_logger(__name__)

#: a manifest or config larger than this is refused when read back (rbd's configs are
#: bounded on the wire far below it; a bigger file can only be a mistake)
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024


class CatalogError(ValueError):
    """An image record cannot be catalogued (its config does not match its digest)."""


@dataclass(frozen=True, slots=True)
class StoredManifest:
    """A manifest read back and checked: its bytes, media type and the blobs it names."""

    data: bytes
    media_type: str
    digest: Digest
    config_digest: Digest
    layer_digests: tuple[Digest, ...]


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
        """Keep ``image``'s config and manifest; return the manifest (its digest names it).

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
        if self.recorded.get(image.ref) != built.digest:
            log.info(
                "mirror_image_recorded",
                ref=image.ref,
                manifest=built.digest,
                media_type=built.media_type,
                layers=len(built.layer_digests),
            )
            self.recorded[image.ref] = built.digest
            _write_once(self.refs_path, json.dumps(self.recorded, sort_keys=True).encode())
        return built

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
            doc = json.loads(data)
            config_digest = doc["config"]["digest"]
            layers = tuple(layer["digest"] for layer in doc["layers"])
            media_type = doc["mediaType"]
        except (ValueError, KeyError, TypeError) as e:
            log.error("mirror_manifest_unreadable", manifest=digest, error=str(e))
            return None
        if not all(is_digest(d) for d in (config_digest, *layers)):
            log.error("mirror_manifest_unreadable", manifest=digest, error="bad digest in it")
            return None
        return StoredManifest(
            data=data,
            media_type=str(media_type),
            digest=digest,
            config_digest=Digest(config_digest),
            layer_digests=tuple(Digest(d) for d in layers),
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
