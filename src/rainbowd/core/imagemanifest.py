"""The registry manifest of an image rbd holds, made from its ImageRecord, byte for byte.

What a node knows of an image is its :class:`~rainbowd.core.messages.ImageRecord`:
the config verbatim and each layer's digest, size and media type. That is all
a registry manifest says, so the node's registry front door serves a manifest
built here from the record. The build is deterministic (fixed key order,
compact JSON): every node holding the image builds the same bytes and so
names the image by the same manifest digest, and the config digest and every
layer digest are the source's own, so what a client pulls is the image the
origin verified.

The manifest's own digest is not the upstream registry's when the upstream
sent another serialization (or a Docker v2 manifest for OCI layers). So when
the source had a manifest (a registry, an OCI layout) the image record
carries the upstream's bytes (``ImageRecord.upstream``,
rainbowd.core.upstreammanifest) and the front door serves those; the built
one serves images whose source had none (a docker archive, an engine).

The schema follows the layers: all Docker layer types give a Docker image
manifest v2 schema 2 (what ``docker save`` images and Docker Hub use), anything
else (OCI types, zstd, which Docker's schema lacks) an OCI image manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

from rainbowd.core.digest import Digest, sha256_digest
from rainbowd.core.messages import ImageRecord

DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
#: the prefix of every Docker layer media type (rootfs.diff.tar, .tar.gzip, foreign)
_DOCKER_LAYER_PREFIX: Final = "application/vnd.docker."


@dataclass(frozen=True, slots=True)
class BuiltManifest:
    """A manifest's bytes, its media type and digest, and the blobs it names."""

    data: bytes
    media_type: str
    digest: Digest
    config_digest: Digest
    layer_digests: tuple[Digest, ...]


def manifest_for(image: ImageRecord) -> BuiltManifest:
    """The registry manifest of ``image`` (see the module docstring for which schema)."""
    docker = bool(image.layers) and all(
        layer.media_type.startswith(_DOCKER_LAYER_PREFIX) for layer in image.layers
    )
    media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    config = image.config.encode()
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {
            "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
            "digest": image.config_digest,
            "size": len(config),
        },
        "layers": [
            {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
            for layer in image.layers
        ],
    }
    data = json.dumps(doc, separators=(",", ":")).encode()
    return BuiltManifest(
        data=data,
        media_type=media_type,
        digest=sha256_digest(data),
        config_digest=Digest(image.config_digest),
        layer_digests=tuple(Digest(layer.digest) for layer in image.layers),
    )
