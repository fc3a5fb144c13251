"""Images known to the cluster: ingest state, layer manifests, and checks on ingest reports.

The origin's ingest report is the only source of chunk manifests, and every
demander later checks its chunks against them, so the report is validated
hard: every layer must come with a manifest whose digest and size match. The
upstream's own registry manifest, when the report carries one, must hash to
its digest and list exactly the image's config and layers
(rainbowd.core.upstreammanifest): every node's front door serves it as it is.
"""

from __future__ import annotations

import re

from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.digest import is_digest
from rainbowd.core.imagemanifest import manifest_for
from rainbowd.core.messages import ImageRecord, ImageView
from rainbowd.core.sources import describe
from rainbowd.core.upstreammanifest import UpstreamManifestError, check_upstream

from .errors import BadRequest
from .state import StoredImage

#: image references are names, not paths: printable, no whitespace
_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}$")


def check_ref(ref: str) -> None:
    if not _REF_RE.match(ref):
        raise BadRequest(
            f"image reference {ref!r} is not valid (letters, digits and ._/:@+- only, "
            "starting with a letter or digit, at most 255 characters)"
        )


def check_ingest(record: ImageRecord, manifests: list[ChunkManifest]) -> list[ChunkManifest]:
    """The manifests for ``record``'s layers, in layer order; BadRequest saying what is wrong."""
    if not is_digest(record.config_digest):
        raise BadRequest(f"ingest report: config digest {record.config_digest!r} is not sha256")
    by_digest: dict[str, ChunkManifest] = {}
    for m in manifests:
        other = by_digest.get(m.digest)
        if other is not None and other != m:
            raise BadRequest(f"ingest report: two different manifests for layer {m.digest}")
        by_digest[m.digest] = m
    layer_digests = {layer.digest for layer in record.layers}
    extra = sorted(set(by_digest) - layer_digests)
    if extra:
        raise BadRequest(
            f"ingest report: manifests for layers not in the image: {', '.join(extra)}"
        )
    out: list[ChunkManifest] = []
    seen: set[str] = set()
    for i, layer in enumerate(record.layers):
        if not is_digest(layer.digest):
            raise BadRequest(f"ingest report: layer {i} digest {layer.digest!r} is not sha256")
        if layer.diff_id and not is_digest(layer.diff_id):
            raise BadRequest(f"ingest report: layer {i} diff_id {layer.diff_id!r} is not sha256")
        found = by_digest.get(layer.digest)
        if found is None:
            raise BadRequest(f"ingest report: no chunk manifest for layer {i} ({layer.digest})")
        if found.size != layer.size:
            raise BadRequest(
                f"ingest report: layer {i} ({layer.digest}) is {layer.size} bytes but its "
                f"manifest says {found.size}"
            )
        if layer.digest not in seen:
            seen.add(layer.digest)
            out.append(found)
    if record.upstream is not None:
        # served byte for byte by every node's front door: it must list this image's blobs
        try:
            check_upstream(record, record.upstream)
        except UpstreamManifestError as e:
            raise BadRequest(f"ingest report: {e}") from None
    return out


def image_view(image: StoredImage, holders: list[str]) -> ImageView:
    layers = list(image.record.layers) if image.record else []
    digest, upstream = "", False
    if image.record is not None:
        if image.record.upstream is not None:
            digest, upstream = image.record.upstream.top.digest, True
        else:
            digest = manifest_for(image.record).digest
    return ImageView(
        digest=digest,
        upstream=upstream,
        ref=image.ref,
        state=image.state,
        size=image.record.size if image.record else 0,
        layers=layers,
        nodes=holders,
        origin=image.origin,
        error=image.error,
        source=describe(image.source),
        uncompressed_size=image.record.uncompressed_size if image.record else 0,
        standby_origins=list(image.standby_origins),
    )
