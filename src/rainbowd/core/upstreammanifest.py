"""The upstream's own manifest of an image: checked against the image it claims to describe.

rbd's registry front door (``rainbowd.agent.mirror``) used to serve only a
manifest it built from the image record (``rainbowd.core.imagemanifest``):
same config and layers, but another serialization, so another digest than the
one the upstream registry names the image by. A client pulling
``repo@sha256:<upstream digest>``, or comparing digests, saw a different image.
So the origin keeps the source's manifest bytes (and, when the tag named a
manifest list, that list) in the image record (:class:`~rainbowd.core.messages.UpstreamManifest`).

Those bytes come from an origin node and are served by every node, so they are
checked wherever they arrive (the coordinator at the door, each agent before
it catalogs them) by :func:`check_upstream`:

* each document hashes to the digest it is named by, and is a JSON object of
  a manifest (or index) media type rbd knows;
* the manifest lists exactly the record's config (digest and size of the
  config text) and the record's layers, in order, with their sizes and media
  types: a client following it fetches only blobs rbd verified;
* an index lists the manifest (its digest and size) among its entries.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
from typing import Any, Final

from rainbowd.core.digest import sha256_digest
from rainbowd.core.messages import ImageRecord, ManifestDoc, UpstreamManifest
from rainbowd.core.wirebounds import MAX_MANIFEST

DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPES: Final = (DOCKER_MANIFEST, OCI_MANIFEST)
INDEX_TYPES: Final = (DOCKER_LIST, OCI_INDEX)


class UpstreamManifestError(ValueError):
    """An upstream manifest that does not describe its image; the message says how."""


def doc_of(data: bytes, media_type: str) -> ManifestDoc | None:
    """``data`` as a ManifestDoc, or None when it cannot be one (too big, not UTF-8).

    The origin calls this on what its source sent; None means the image is
    served under rbd's own manifest, which is never wrong, only not the
    upstream's digest.
    """
    if len(data) > MAX_MANIFEST:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return ManifestDoc(digest=sha256_digest(data), media_type=media_type, text=text)


def check_upstream(record: ImageRecord, upstream: UpstreamManifest) -> None:
    """Raise UpstreamManifestError unless ``upstream`` describes ``record`` (module docstring)."""
    manifest = _parsed(upstream.manifest, MANIFEST_TYPES, "manifest")
    config = manifest.get("config")
    want_config = (record.config_digest, len(record.config.encode()))
    if not isinstance(config, dict) or (config.get("digest"), config.get("size")) != want_config:
        raise UpstreamManifestError(
            f"upstream manifest {upstream.manifest.digest}: its config is not the image's "
            f"({record.config_digest}, {want_config[1]} bytes)"
        )
    layers = manifest.get("layers")
    listed = [
        (d.get("digest"), d.get("size"), d.get("mediaType")) if isinstance(d, dict) else None
        for d in (layers if isinstance(layers, list) else [])
    ]
    want = [(x.digest, x.size, x.media_type) for x in record.layers]
    if not isinstance(layers, list) or listed != want:
        raise UpstreamManifestError(
            f"upstream manifest {upstream.manifest.digest}: its layers are not the image's "
            f"({len(listed)} listed, {len(want)} in the image, or they differ in digest, "
            "size or media type)"
        )
    if upstream.index is None:
        return
    index = _parsed(upstream.index, INDEX_TYPES, "index")
    entries = index.get("manifests")
    child = (upstream.manifest.digest, len(upstream.manifest.text.encode()))
    if not isinstance(entries, list) or not any(
        isinstance(e, dict) and (e.get("digest"), e.get("size")) == child for e in entries
    ):
        raise UpstreamManifestError(
            f"upstream index {upstream.index.digest} does not list the manifest "
            f"{upstream.manifest.digest} ({child[1]} bytes)"
        )


def _parsed(doc: ManifestDoc, types: tuple[str, ...], what: str) -> dict[str, Any]:
    """The JSON object of ``doc``, after checking its digest and media type."""
    data = doc.text.encode()
    actual = sha256_digest(data)
    if actual != doc.digest:
        raise UpstreamManifestError(
            f"upstream {what}: its bytes hash to {actual}, not to the {doc.digest} it is named by"
        )
    if doc.media_type not in types:
        raise UpstreamManifestError(
            f"upstream {what} {doc.digest}: media type {doc.media_type!r} is not one of "
            f"{', '.join(types)}"
        )
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise UpstreamManifestError(f"upstream {what} {doc.digest} is not JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise UpstreamManifestError(f"upstream {what} {doc.digest} is not a JSON object")
    declared = parsed.get("mediaType")
    if declared is not None and declared != doc.media_type:
        raise UpstreamManifestError(
            f"upstream {what} {doc.digest}: it says it is {declared!r}, sent as {doc.media_type!r}"
        )
    return parsed
