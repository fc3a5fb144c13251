"""The upstream's own manifest is checked against its image wherever it arrives.

rainbowd.core.upstreammanifest: the coordinator runs ``check_upstream`` at the
door of an ingest report and every agent before it catalogs the bytes; a
manifest that passed is served byte for byte by every node's front door, so
each way one could describe another image is tried here.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from rainbowd.core.digest import sha256_digest
from rainbowd.core.messages import ImageRecord, LayerRef, ManifestDoc, UpstreamManifest
from rainbowd.core.sources import registry_name
from rainbowd.core.upstreammanifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    UpstreamManifestError,
    check_upstream,
    doc_of,
)
from rainbowd.core.wirebounds import MAX_MANIFEST
from upstream_docs import manifest_dict

GZ = "application/vnd.docker.image.rootfs.diff.tar.gzip"
CONFIG = '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'


def record() -> ImageRecord:
    return ImageRecord(
        ref="app:1",
        config_digest=sha256_digest(CONFIG.encode()),
        config=CONFIG,
        layers=[
            LayerRef(
                digest="sha256:" + "a" * 64, size=10, media_type=GZ, diff_id="sha256:" + "b" * 64
            ),
            LayerRef(
                digest="sha256:" + "c" * 64, size=20, media_type=GZ, diff_id="sha256:" + "d" * 64
            ),
        ],
    )


def manifest_doc(image: ImageRecord, **change: Any) -> dict[str, Any]:
    doc = manifest_dict(image)
    doc.update(change)
    return doc


def as_doc(doc: dict[str, Any], media: str = DOCKER_MANIFEST) -> ManifestDoc:
    """Serialized the way a registry client might (indented: not rbd's compact form)."""
    data = json.dumps(doc, indent=3).encode()
    made = doc_of(data, media)
    assert made is not None
    return made


def index_of(child: ManifestDoc, media: str = DOCKER_LIST, size: int | None = None) -> ManifestDoc:
    entry = {
        "mediaType": child.media_type,
        "digest": child.digest,
        "size": len(child.text.encode()) if size is None else size,
        "platform": {"architecture": "amd64", "os": "linux"},
    }
    return as_doc({"schemaVersion": 2, "mediaType": media, "manifests": [entry]}, media)


def test_the_upstreams_manifest_and_index_of_the_image_pass() -> None:
    image = record()
    manifest = as_doc(manifest_doc(image))
    check_upstream(image, UpstreamManifest(manifest=manifest))
    index = index_of(manifest)
    up = UpstreamManifest(manifest=manifest, index=index)
    check_upstream(image, up)
    assert up.top == index
    # an OCI manifest may leave mediaType out: the registry's Content-Type said it
    oci = manifest_doc(image)
    del oci["mediaType"]
    check_upstream(image, UpstreamManifest(manifest=as_doc(oci, OCI_MANIFEST)))


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"layers": []}, "layers are not the image's"),
        ({"config": {"digest": "sha256:" + "e" * 64, "size": 5}}, "config is not the image's"),
        ({"mediaType": OCI_MANIFEST}, "it says it is"),
    ],
)
def test_a_manifest_describing_another_image_is_refused(change: dict[str, Any], says: str) -> None:
    image = record()
    with pytest.raises(UpstreamManifestError, match=says):
        check_upstream(image, UpstreamManifest(manifest=as_doc(manifest_doc(image, **change))))


def test_each_way_a_layer_list_can_differ_is_refused() -> None:
    image = record()
    base = manifest_doc(image)
    for i, key, value in [
        (0, "size", 11),
        (1, "digest", "sha256:" + "f" * 64),
        (0, "mediaType", "x"),
    ]:
        doc = json.loads(json.dumps(base))
        doc["layers"][i][key] = value
        with pytest.raises(UpstreamManifestError, match="layers"):
            check_upstream(image, UpstreamManifest(manifest=as_doc(doc)))
    swapped = json.loads(json.dumps(base))
    swapped["layers"].reverse()
    with pytest.raises(UpstreamManifestError, match="layers"):
        check_upstream(image, UpstreamManifest(manifest=as_doc(swapped)))


def test_bytes_that_do_not_hash_to_their_digest_are_refused() -> None:
    image = record()
    good = as_doc(manifest_doc(image))
    lying = ManifestDoc(digest="sha256:" + "0" * 64, media_type=good.media_type, text=good.text)
    with pytest.raises(UpstreamManifestError, match="hash to"):
        check_upstream(image, UpstreamManifest(manifest=lying))
    edited = ManifestDoc(digest=good.digest, media_type=good.media_type, text=good.text + " ")
    with pytest.raises(UpstreamManifestError, match="hash to"):
        check_upstream(image, UpstreamManifest(manifest=edited))


def test_wrong_media_types_and_non_objects_are_refused() -> None:
    image = record()
    good = as_doc(manifest_doc(image))
    with pytest.raises(UpstreamManifestError, match="media type"):
        check_upstream(image, UpstreamManifest(manifest=as_doc(manifest_doc(image), DOCKER_LIST)))
    not_object = doc_of(b"[1, 2]", DOCKER_MANIFEST)
    assert not_object is not None
    with pytest.raises(UpstreamManifestError, match="not a JSON object"):
        check_upstream(image, UpstreamManifest(manifest=not_object))
    # a manifest where the index belongs
    with pytest.raises(UpstreamManifestError, match="media type"):
        check_upstream(image, UpstreamManifest(manifest=good, index=good))


def test_an_index_that_does_not_list_the_manifest_is_refused() -> None:
    image = record()
    manifest = as_doc(manifest_doc(image))
    other = as_doc(manifest_doc(image, layers=[]))
    for index in (index_of(other), index_of(manifest, size=1), index_of(other, OCI_INDEX)):
        with pytest.raises(UpstreamManifestError, match="does not list"):
            check_upstream(image, UpstreamManifest(manifest=manifest, index=index))


def test_what_cannot_travel_is_not_made_a_document() -> None:
    assert doc_of(b"\xff\xfe{}", DOCKER_MANIFEST) is None  # not UTF-8
    assert doc_of(b" " * (MAX_MANIFEST + 1), DOCKER_MANIFEST) is None
    made = doc_of(b"{}", DOCKER_MANIFEST)
    assert made is not None and made.digest == sha256_digest(b"{}") and made.text == "{}"


@pytest.mark.parametrize(
    ("reference", "name"),
    [
        ("127.0.0.1:5000/rbd/demo:v1", ("127.0.0.1:5000", "rbd/demo", "v1")),
        ("registry.example.com:5000/app", ("registry.example.com:5000", "app", "latest")),
        ("docker.io/alpine:3.19", ("docker.io", "library/alpine", "3.19")),
        ("Index.Docker.io/x/y:z", ("docker.io", "x/y", "z")),
        ("host/a/b:t@sha256:" + "0" * 64, ("host", "a/b", "t")),
        ("host/a@sha256:" + "0" * 64, None),  # pinned by digest alone: no tag names it
        ("no-slash", None),
    ],
)
def test_registry_names_of_references(reference: str, name: tuple[str, str, str] | None) -> None:
    assert registry_name(reference) == name
