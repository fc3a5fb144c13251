"""The registry front door's rules: paths, names, digests, error bodies, ranges, chunk slices."""

from __future__ import annotations

import hashlib
import json

import pytest

from rainbowd.core.digest import sha256_digest
from rainbowd.core.distribution import (
    MAX_NAME_LENGTH,
    ApiError,
    BaseRequest,
    BlobRequest,
    ByteRange,
    ManifestRequest,
    chunk_slices,
    error_body,
    parse_path,
    parse_range,
)
from rainbowd.core.imagemanifest import DOCKER_MANIFEST, OCI_MANIFEST, manifest_for
from rainbowd.core.messages import ImageRecord, LayerRef

D = "sha256:" + "ab" * 32


def code_of(path: str) -> str:
    with pytest.raises(ApiError) as e:
        parse_path(path)
    return e.value.code


def test_base_and_routes() -> None:
    assert parse_path("/v2/") == BaseRequest()
    assert parse_path("/v2") == BaseRequest()
    assert parse_path(f"/v2/library/busybox/manifests/{D}") == ManifestRequest(
        name="library/busybox",
        digest=D,
        tag=None,  # type: ignore[arg-type]
    )
    assert parse_path("/v2/team/app/manifests/1.0-rc_2") == ManifestRequest(
        name="team/app", digest=None, tag="1.0-rc_2"
    )
    assert parse_path(f"/v2/a/blobs/{D}") == BlobRequest(name="a", digest=D)  # type: ignore[arg-type]


def test_a_name_may_hold_a_component_called_blobs_or_manifests() -> None:
    req = parse_path(f"/v2/x/manifests/y/blobs/{D}")
    assert req == BlobRequest(name="x/manifests/y", digest=D)  # type: ignore[arg-type]
    req = parse_path(f"/v2/x/blobs/y/manifests/{D}")
    assert isinstance(req, ManifestRequest) and req.name == "x/blobs/y"


@pytest.mark.parametrize(
    "name",
    ["Upper/case", "a//b", "/a", "a/", "-a", "a-", "a..b", "a___b", "a b", "a/b:c", "é"],
)
def test_names_outside_the_grammar_are_name_invalid(name: str) -> None:
    assert code_of(f"/v2/{name}/blobs/{D}") == "NAME_INVALID"


@pytest.mark.parametrize("name", ["a", "a.b", "a_b", "a__b", "a---b", "a0/b-1/c.d", "x" * 255])
def test_names_in_the_grammar_are_taken(name: str) -> None:
    assert isinstance(parse_path(f"/v2/{name}/blobs/{D}"), BlobRequest)


def test_a_name_past_the_cap_is_refused() -> None:
    assert code_of(f"/v2/{'a' * (MAX_NAME_LENGTH + 1)}/blobs/{D}") == "NAME_INVALID"


@pytest.mark.parametrize(
    "digest",
    [
        "sha512:" + "ab" * 64,  # another algorithm: not taken
        "sha256:" + "AB" * 32,  # upper case
        "sha256:" + "ab" * 31,  # short
        "sha256:" + "ab" * 33,  # long
        "latest",  # a tag where a blob digest must be
    ],
)
def test_blob_digests_are_sha256_only(digest: str) -> None:
    assert code_of(f"/v2/a/blobs/{digest}") == "DIGEST_INVALID"


def test_manifest_references_tell_tags_from_digests() -> None:
    assert code_of("/v2/a/manifests/sha512:" + "ab" * 64) == "DIGEST_INVALID"
    assert code_of("/v2/a/manifests/.hidden") == "TAG_INVALID"
    assert code_of("/v2/a/manifests/" + "t" * 129) == "TAG_INVALID"


def test_other_routes_are_unsupported() -> None:
    assert code_of("/v2/_catalog") == "UNSUPPORTED"
    assert code_of("/v2/a/tags/list") == "UNSUPPORTED"
    assert code_of("/v1/a") == "UNSUPPORTED"


def test_error_body_is_the_spec_document() -> None:
    doc = json.loads(error_body("BLOB_UNKNOWN", "no", {"digest": D}))
    assert doc == {"errors": [{"code": "BLOB_UNKNOWN", "message": "no", "detail": {"digest": D}}]}
    assert json.loads(error_body("MANIFEST_UNKNOWN", "m")) == {
        "errors": [{"code": "MANIFEST_UNKNOWN", "message": "m"}]
    }
    e = ApiError("MANIFEST_UNKNOWN", "m")
    assert e.status == 404 and ApiError("NAME_INVALID", "n").status == 400


def test_ranges() -> None:
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-9", 100) == ByteRange(0, 9, 100)
    assert parse_range("bytes=90-", 100) == ByteRange(90, 99, 100)
    assert parse_range("bytes=90-500", 100) == ByteRange(90, 99, 100)  # clamped to the end
    assert parse_range("bytes=-10", 100) == ByteRange(90, 99, 100)
    assert parse_range("bytes=-500", 100) == ByteRange(0, 99, 100)
    r = parse_range("bytes=10-19", 100)
    assert r is not None and r.length == 10 and r.content_range() == "bytes 10-19/100"


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "items=0-1", "bytes=9-2", "bytes=-", "junk"])
def test_ranges_not_taken_are_ignored(header: str) -> None:
    assert parse_range(header, 100) is None


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=200-300", "bytes=-0"])
def test_ranges_past_the_end_are_416(header: str) -> None:
    with pytest.raises(ApiError) as e:
        parse_range(header, 100)
    assert e.value.status == 416 and e.value.detail == {"size": 100}


def test_chunk_slices_cover_exactly_the_range() -> None:
    data = bytes(range(256)) * 4  # 1024 bytes in chunks of 100
    chunks = [data[i : i + 100] for i in range(0, len(data), 100)]
    for start, end in [(0, 1023), (0, 0), (99, 100), (150, 349), (1000, 1023), (250, 250)]:
        got = b"".join(chunks[i][a:b] for i, a, b in chunk_slices(100, start, end))
        assert got == data[start : end + 1], (start, end)
    assert [i for i, _, _ in chunk_slices(100, 150, 349)] == [1, 2, 3]
    with pytest.raises(ValueError):
        chunk_slices(100, 5, 4)


def _image(media_types: list[str]) -> ImageRecord:
    config = '{"architecture":"amd64","os":"linux"}'
    return ImageRecord(
        ref="demo:1",
        config_digest=sha256_digest(config.encode()),
        config=config,
        layers=[
            LayerRef(
                digest="sha256:" + hashlib.sha256(bytes([i])).hexdigest(),
                size=10 + i,
                media_type=t,
                diff_id="sha256:" + hashlib.sha256(bytes([i, i])).hexdigest(),
            )
            for i, t in enumerate(media_types)
        ],
    )


def test_manifest_for_is_deterministic_and_names_the_records_blobs() -> None:
    image = _image(["application/vnd.docker.image.rootfs.diff.tar.gzip"] * 2)
    a, b = manifest_for(image), manifest_for(image)
    assert a.data == b.data and a.digest == sha256_digest(a.data)
    doc = json.loads(a.data)
    assert doc["schemaVersion"] == 2 and doc["mediaType"] == a.media_type == DOCKER_MANIFEST
    assert doc["config"] == {
        "mediaType": "application/vnd.docker.container.image.v1+json",
        "digest": image.config_digest,
        "size": len(image.config.encode()),
    }
    assert [(x["digest"], x["size"], x["mediaType"]) for x in doc["layers"]] == [
        (x.digest, x.size, x.media_type) for x in image.layers
    ]
    assert a.layer_digests == tuple(x.digest for x in image.layers)


def test_oci_or_zstd_layers_make_an_oci_manifest() -> None:
    for types in (
        ["application/vnd.oci.image.layer.v1.tar+gzip"],
        [
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ],
    ):
        built = manifest_for(_image(types))
        doc = json.loads(built.data)
        assert built.media_type == OCI_MANIFEST == doc["mediaType"]
        assert doc["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
