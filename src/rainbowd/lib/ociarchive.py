"""An image as an OCI image layout tar, streamed from the store (what ``ctr images import`` reads).

The tar holds ``oci-layout``, the config, the manifest and the layer blobs
under ``blobs/sha256/<hex>``, and an ``index.json`` whose one entry names the
manifest and carries the image's name in containerd's own annotation
(``io.containerd.image.name``), so the import creates exactly that name with
no ``--base-name`` guessing.

The manifest is :func:`rainbowd.core.imagemanifest.manifest_for` of the
record, byte for byte the one the registry front door serves
(``agent/mirror/catalog.py``), so containerd and the front door name the
image by the same digest; a docker-archive would not do: containerd makes up
its own manifest for one, with a digest of its own.

Layers go out as stored (compressed), named by their digest, and re-hashed
while streaming (:func:`rainbowd.lib.image.stored_blob_member`): a rotten
blob breaks the tar before its end, and containerd commits no blob whose
bytes do not match its digest. Layers in ``skip`` (the content store has them
already) are left out of the tar; the manifest still names them, which
containerd's import accepts, since it reads only the manifest and config
from the archive's references. ``index.json`` is the last member: a stream
cut short (a rotten blob, the agent stopping) never reaches it, so the
import creates no image from it. The tar never exists whole: a blocking
generator of pieces, pulled from a worker thread.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable, Iterator

from rainbowd.core.digest import Digest, DigestError, hex_part, parse_digest, sha256_digest
from rainbowd.core.imagemanifest import BuiltManifest, manifest_for
from rainbowd.core.messages import ImageRecord, LayerRef
from rainbowd.lib.image import ImageError, layers_to_send, stored_blob_member, tar_member
from rainbowd.lib.ocilayout import CONTAINERD_NAME
from rainbowd.lib.store import LayerStore

#: the marker file of an OCI image layout, as the image-spec fixes it
OCI_LAYOUT = json.dumps({"imageLayoutVersion": "1.0.0"}, separators=(",", ":")).encode()


def blob_name(digest: str) -> str:
    """The member name of a blob in an OCI image layout."""
    return f"blobs/sha256/{hex_part(Digest(digest))}"


def oci_archive_stream(
    image: ImageRecord,
    store: LayerStore,
    name: str,
    *,
    skip: Iterable[str] = frozenset(),
) -> tuple[BuiltManifest, Iterator[bytes]]:
    """``image`` as an OCI layout tar named ``name``; the manifest it carries, and the pieces.

    Checked before the first piece: every digest parses, the config matches
    its digest, and every layer not in ``skip`` is complete in the store
    (ImageError otherwise, naming the image).
    """
    try:
        for d in (image.config_digest, *(layer.digest for layer in image.layers)):
            parse_digest(d)
    except DigestError as e:
        raise ImageError(f"image {image.ref}: {e}") from None
    config = image.config.encode()
    if sha256_digest(config) != image.config_digest:
        raise ImageError(f"image {image.ref}: config does not match {image.config_digest}")
    left_out = set(skip)
    send = layers_to_send(image, store, [x for x in image.layers if x.digest not in left_out])
    built = manifest_for(image)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": built.media_type,
                "digest": built.digest,
                "size": len(built.data),
                "annotations": {CONTAINERD_NAME: name},
            }
        ],
    }
    index_bytes = json.dumps(index, separators=(",", ":")).encode()
    return built, _pieces(image, store, built, config, index_bytes, send)


def _pieces(
    image: ImageRecord,
    store: LayerStore,
    built: BuiltManifest,
    config: bytes,
    index: bytes,
    send: dict[str, LayerRef],
) -> Iterator[bytes]:
    yield tar_member("oci-layout", OCI_LAYOUT)
    yield tar_member(blob_name(image.config_digest), config)
    yield tar_member(blob_name(built.digest), built.data)
    for layer in send.values():
        yield from stored_blob_member(image, store, layer, blob_name(layer.digest))
    yield tar_member("index.json", index)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)
