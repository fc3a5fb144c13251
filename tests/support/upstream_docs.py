"""An image's manifest (and a manifest list naming it) as a registry would have served them.

Tests of the upstream's own manifest (issue 17 item 3: origin, coordinator,
front door, containerd loads) need one for a record built in the test; this
is the one way they build it.
"""

from __future__ import annotations

import json
from typing import Any

from rainbowd.core.messages import ImageRecord, ManifestDoc, UpstreamManifest
from rainbowd.core.upstreammanifest import DOCKER_LIST, DOCKER_MANIFEST, doc_of

#: a platform manifest a list names and nobody holds (only its digest is ever read)
OTHER_PLATFORM = {
    "mediaType": DOCKER_MANIFEST,
    "digest": "sha256:" + "5" * 64,
    "size": 900,
    "platform": {"architecture": "s390x", "os": "linux"},
}


def manifest_dict(record: ImageRecord) -> dict[str, Any]:
    """``record``'s Docker schema 2 manifest as a JSON object (tests change fields of it)."""
    return {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": len(record.config.encode()),
            "digest": record.config_digest,
        },
        "layers": [
            {"mediaType": x.media_type, "size": x.size, "digest": x.digest} for x in record.layers
        ],
    }


def registry_manifest(record: ImageRecord) -> ManifestDoc:
    """``record``'s Docker schema 2 manifest, serialized as a registry might (indent 3)."""
    doc = manifest_dict(record)
    manifest = doc_of(json.dumps(doc, indent=3).encode(), DOCKER_MANIFEST)
    assert manifest is not None
    return manifest


def upstream_manifest(
    record: ImageRecord,
    *,
    architecture: str = "amd64",
    other_platform: bool = True,
    index: bool = True,
) -> UpstreamManifest:
    """The manifest, and (``index``) a list naming it for ``architecture`` (and another)."""
    manifest = registry_manifest(record)
    if not index:
        return UpstreamManifest(manifest=manifest)
    entries = [
        {
            "mediaType": DOCKER_MANIFEST,
            "digest": manifest.digest,
            "size": len(manifest.text.encode()),
            "platform": {"architecture": architecture, "os": "linux"},
        }
    ]
    if other_platform:
        entries.append(OTHER_PLATFORM)
    listed = {"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": entries}
    top = doc_of(json.dumps(listed, indent=2).encode(), DOCKER_LIST)
    assert top is not None
    return UpstreamManifest(manifest=manifest, index=top)
