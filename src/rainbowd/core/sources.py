"""Image sources as operators write them (``--from``) and as people read them.

archive:/srv/images/app.tar           docker save output on the origin host
oci:/srv/layouts/app[:tag]            OCI image layout directory (tag = ref.name)
registry:HOST[:PORT]/REPO[:TAG|@sha256:...]
docker:NAME[:TAG]                     an image in a Docker engine at the origin
"""

from __future__ import annotations

from rainbowd.core.messages import (
    ArchiveSource,
    DockerEngineSource,
    ImageSource,
    OciLayoutSource,
    RegistrySource,
)

SCHEMES = ("archive", "oci", "registry", "docker")


class SourceError(ValueError):
    """A ``--from`` value that names no usable source; the message shows the forms."""


def parse_source(
    text: str,
    *,
    insecure: bool = False,
    ca_file: str = "",
    credentials_file: str = "",
    platform: str = "",
) -> ImageSource:
    scheme, sep, rest = text.partition(":")
    if not sep or scheme not in SCHEMES or not rest:
        raise SourceError(
            f"--from {text!r}: expected one of archive:PATH, oci:PATH[:TAG], "
            "registry:HOST/REPO[:TAG|@sha256:DIGEST], docker:IMAGE"
        )
    registry_opts = bool(insecure or ca_file or credentials_file or platform)
    if registry_opts and scheme != "registry":
        raise SourceError(
            f"--from {text!r}: --insecure, --ca-file, --credentials-file and --platform "
            "apply to registry: sources only"
        )
    if scheme == "archive":
        return ArchiveSource(path=rest)
    if scheme == "oci":
        path, tag = rest, ""
        head, colon, tail = rest.rpartition(":")
        if colon and "/" not in tail and head:
            path, tag = head, tail
        return OciLayoutSource(path=path, tag=tag)
    if scheme == "docker":
        return DockerEngineSource(image=rest)
    if "/" not in rest:
        raise SourceError(
            f"--from {text!r}: a registry reference needs the registry host, "
            "e.g. registry:registry.example.com:5000/team/app:1.0"
        )
    return RegistrySource(
        reference=rest,
        insecure=insecure,
        ca_file=ca_file,
        credentials_file=credentials_file,
        platform=platform,
    )


def describe(source: ImageSource) -> str:
    """The ``--from`` form of ``source`` (what ``rbd images`` shows)."""
    if isinstance(source, ArchiveSource):
        return f"archive:{source.path}"
    if isinstance(source, OciLayoutSource):
        return f"oci:{source.path}" + (f":{source.tag}" if source.tag else "")
    if isinstance(source, DockerEngineSource):
        return f"docker:{source.image}"
    return f"registry:{source.reference}" + (" (http)" if source.insecure else "")


def check_source(source: ImageSource) -> None:
    """Raise SourceError if ``source`` names nothing (an empty path or reference)."""
    if isinstance(source, ArchiveSource | OciLayoutSource):
        if not source.path:
            raise SourceError(f"{source.__class__.__name__}: path is empty")
    elif isinstance(source, DockerEngineSource):
        if not source.image:
            raise SourceError("docker source: image is empty")
    elif not source.reference or "/" not in source.reference:
        raise SourceError(
            f"registry source {source.reference!r}: expected HOST[:PORT]/REPO[:TAG|@sha256:...]"
        )


#: the names Docker Hub goes by in references (both mean docker.io)
DOCKER_HUB_NAMES = ("docker.io", "index.docker.io")


def canonical_registry(host: str) -> str:
    """``host`` as rbd compares registry hosts: lowercase, Docker Hub's aliases as docker.io."""
    host = host.lower()
    return "docker.io" if host in DOCKER_HUB_NAMES else host


def registry_name(reference: str) -> tuple[str, str, str] | None:
    """(registry host, repository, tag) a registry source's reference names, or None.

    The host is :func:`canonical_registry`'s; a Docker Hub repository without
    a namespace gets ``library/`` (what clients ask a registry for); no tag
    and no digest is ``latest``; a reference pinned by digest alone has no tag
    (None: no tag resolves to it). The origin parses references strictly
    (agent/origin/registry_names.py) before anything is ingested; this only
    re-reads one it took.
    """
    host, sep, rest = reference.partition("/")
    if not sep or not rest:
        return None
    rest, at, _digest = rest.partition("@")
    name, colon, tag = rest.rpartition(":")
    if not colon or "/" in tag:
        name, tag = rest, ("" if at else "latest")
    if not tag or not name:
        return None
    host = canonical_registry(host)
    if host == "docker.io" and "/" not in name:
        name = f"library/{name}"
    return host, name, tag
