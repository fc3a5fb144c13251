"""An image as an OCI image layout tar, streamed from the store (what ``ctr images import`` reads).

The tar holds ``oci-layout``, the config, the manifest and the layer blobs
under ``blobs/sha256/<hex>``, and an ``index.json`` whose one entry names the
manifest and carries the image's name in containerd's own annotation
(``io.containerd.image.name``), so the import creates exactly that name with
no ``--base-name`` guessing.

The manifest is the one the registry front door serves
(``agent/mirror/catalog.py``), byte for byte, so containerd and the front
door name the image by the same digest: the upstream's own manifest when the
record carries one that describes it (``ImageRecord.upstream``, checked by
:func:`rainbowd.core.upstreammanifest.check_upstream`), with the index its
tag named when there is one (``index.json`` then names the index, and the
platform manifests the origin did not choose are not in the tar: containerd
imports and unpacks the one for its platform), else
:func:`rainbowd.core.imagemanifest.manifest_for` of the record. A
docker-archive would not do: containerd makes up its own manifest for one,
with a digest of its own.

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
from rainbowd.core.upstreammanifest import UpstreamManifestError, check_upstream
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
    """``image`` as an OCI layout tar named ``name``; what its name points at, and the pieces.

    The first is the manifest (or index) the image is then listed by in
    containerd: the digest to check the import against.

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
    docs = served_documents(image)
    top = docs[-1]
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": top.media_type,
                "digest": top.digest,
                "size": len(top.data),
                "annotations": {CONTAINERD_NAME: name},
            }
        ],
    }
    index_bytes = json.dumps(index, separators=(",", ":")).encode()
    return top, _pieces(image, store, docs, config, index_bytes, send)


def served_documents(image: ImageRecord) -> list[BuiltManifest]:
    """The manifest (and index) the front door serves ``image`` by; the one its name takes last.

    The upstream's own when the record carries one that describes the image,
    else the one built from the record (module docstring).
    """
    built = manifest_for(image)
    up = image.upstream
    if up is None:
        return [built]
    try:
        check_upstream(image, up)
    except UpstreamManifestError:
        return [built]  # the catalog refuses it too, and serves the built one
    docs = [up.manifest] + ([up.index] if up.index is not None else [])
    return [
        BuiltManifest(
            data=d.text.encode(),
            media_type=d.media_type,
            digest=Digest(d.digest),
            config_digest=built.config_digest,
            layer_digests=built.layer_digests,
        )
        for d in docs
    ]


def _pieces(
    image: ImageRecord,
    store: LayerStore,
    docs: list[BuiltManifest],
    config: bytes,
    index: bytes,
    send: dict[str, LayerRef],
) -> Iterator[bytes]:
    yield tar_member("oci-layout", OCI_LAYOUT)
    yield tar_member(blob_name(image.config_digest), config)
    for doc in docs:
        yield tar_member(blob_name(doc.digest), doc.data)
    for layer in send.values():
        yield from stored_blob_member(image, store, layer, blob_name(layer.digest))
    yield tar_member("index.json", index)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)
