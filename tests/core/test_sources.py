"""``--from`` values (parse, describe, check) and the origin's dispatch on the source kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rainbowd.agent.origin import ingest as origin
from rainbowd.core.chunks import MIN_CHUNK_SIZE
from rainbowd.core.messages import (
    ArchiveSource,
    Compression,
    CreateImage,
    DockerEngineSource,
    ImageSource,
    IngestAssignment,
    OciLayoutSource,
    RegistrySource,
    decode,
    encode,
)
from rainbowd.core.sources import SourceError, check_source, describe, parse_source
from rainbowd.lib.image import ImageError
from rainbowd.lib.store import LayerStore


@pytest.mark.parametrize(
    ("text", "source"),
    [
        ("archive:/srv/images/app.tar", ArchiveSource(path="/srv/images/app.tar")),
        ("archive:relative/app.tar", ArchiveSource(path="relative/app.tar")),
        ("oci:/srv/layouts/app", OciLayoutSource(path="/srv/layouts/app")),
        ("oci:/srv/layouts/app:1.0", OciLayoutSource(path="/srv/layouts/app", tag="1.0")),
        ("docker:busybox:latest", DockerEngineSource(image="busybox:latest")),
        ("docker:sha256:abc", DockerEngineSource(image="sha256:abc")),
        (
            "registry:registry.example.com:5000/team/app:1.0",
            RegistrySource(reference="registry.example.com:5000/team/app:1.0"),
        ),
        (
            "registry:reg.local/app@sha256:" + "a" * 64,
            RegistrySource(reference="reg.local/app@sha256:" + "a" * 64),
        ),
    ],
)
def test_parse_and_describe_round_trip(text: str, source: ImageSource) -> None:
    parsed = parse_source(text)
    assert parsed == source
    assert describe(parsed) == text
    assert parse_source(describe(parsed)) == parsed
    check_source(parsed)
    # and it survives the wire inside a CreateImage
    req = CreateImage(ref="app:1", source=parsed, compression="zstd")
    back = decode(encode(req), CreateImage)
    assert back.source == parsed and back.compression == "zstd"


def test_oci_path_with_a_colon_in_a_directory_is_not_a_tag() -> None:
    # the part after the last colon holds a '/': it is part of the path
    assert parse_source("oci:/srv/a:b/layout") == OciLayoutSource(path="/srv/a:b/layout")


def test_registry_options_are_kept_and_shown() -> None:
    src = parse_source(
        "registry:127.0.0.1:5000/app:1",
        insecure=True,
        ca_file="/etc/ca.pem",
        credentials_file="/etc/rbd/creds",
        platform="linux/arm64/v8",
    )
    assert src == RegistrySource(
        reference="127.0.0.1:5000/app:1",
        insecure=True,
        ca_file="/etc/ca.pem",
        credentials_file="/etc/rbd/creds",
        platform="linux/arm64/v8",
    )
    assert describe(src) == "registry:127.0.0.1:5000/app:1 (http)"


@pytest.mark.parametrize(
    "text",
    ["", "app.tar", "/srv/app.tar", "archive:", "oci:", "docker:", "http://x/y", "ftp:/x"],
)
def test_unusable_forms_are_refused_with_the_forms_listed(text: str) -> None:
    with pytest.raises(SourceError) as e:
        parse_source(text)
    msg = str(e.value)
    assert repr(text) in msg
    for form in ("archive:PATH", "oci:PATH[:TAG]", "registry:HOST/REPO", "docker:IMAGE"):
        assert form in msg, msg


def test_registry_reference_needs_a_host() -> None:
    with pytest.raises(SourceError, match="registry host"):
        parse_source("registry:busybox:latest")


@pytest.mark.parametrize(
    "opts",
    [
        {"insecure": True},
        {"ca_file": "/ca.pem"},
        {"credentials_file": "/creds"},
        {"platform": "linux/amd64"},
    ],
)
def test_registry_options_on_other_sources_are_refused(opts: dict[str, Any]) -> None:
    with pytest.raises(SourceError, match="registry: sources only"):
        parse_source("archive:/srv/app.tar", **opts)


@pytest.mark.parametrize(
    "source",
    [
        ArchiveSource(path=""),
        OciLayoutSource(path=""),
        DockerEngineSource(image=""),
        RegistrySource(reference=""),
        RegistrySource(reference="busybox"),
    ],
)
def test_check_source_refuses_empty_or_hostless(source: ImageSource) -> None:
    with pytest.raises(SourceError):
        check_source(source)


def test_describe_docker_source_with_its_own_engine() -> None:
    src = DockerEngineSource(image="app:1", docker_url="unix:///run/other.sock")
    assert describe(src) == "docker:app:1"


# --------------------------------------------------------------------------
# the origin's dispatch on the source kind (rainbowd.agent.origin.ingest)
# --------------------------------------------------------------------------
def _assignment(source: ImageSource, compression: Compression = "off") -> IngestAssignment:
    return IngestAssignment(
        ingest_id="i-1",
        ref="app:1",
        source=source,
        chunk_size=MIN_CHUNK_SIZE,
        compression=compression,
    )


async def test_origin_reads_an_archive_with_the_assigned_compression(
    demo_image: Path, tmp_path: Path
) -> None:
    store = LayerStore(tmp_path / "store")
    plain, _ = await origin.ingest(
        _assignment(ArchiveSource(path=str(demo_image))), store, docker_url=""
    )
    assert plain.ref == "app:1" and len(plain.layers) == 3
    packed_store = LayerStore(tmp_path / "packed")
    packed, manifests = await origin.ingest(
        _assignment(ArchiveSource(path=str(demo_image)), "gzip"), packed_store, docker_url=""
    )
    # same image for Docker (diff ids), smaller blobs to move, same uncompressed size
    assert [x.diff_id for x in packed.layers] == [x.diff_id for x in plain.layers]
    assert packed.size < plain.size
    assert packed.uncompressed_size == plain.uncompressed_size
    assert [mf.digest for mf in manifests] == [x.digest for x in packed.layers]


async def test_origin_errors_name_the_image_and_cause(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    with pytest.raises(ImageError, match="nonexistent"):
        await origin.ingest(
            _assignment(ArchiveSource(path=str(tmp_path / "nonexistent.tar"))), store, docker_url=""
        )
    with pytest.raises(ImageError, match=r"app:1.*docker_url"):
        await origin.ingest(_assignment(DockerEngineSource(image="busy:1")), store, docker_url="")
