"""What a registry ingest names: references, platforms, media types, and its error.

Split from registry.py (issue 15: one concern per file): parsing what the
operator wrote (``host[:port]/repo[:tag|@digest]``, ``os/arch[/variant]``) and
the media types a registry answers with are pure and small, and the HTTP
client, the layer stream and the ingest all use them.
"""

from __future__ import annotations

import platform as _platform
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rainbowd.core.digest import is_digest
from rainbowd.lib.hostplatform import host_architecture
from rainbowd.lib.image import ImageError

# -- media types -------------------------------------------------------------
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
MANIFEST_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST)
INDEX_TYPES = (DOCKER_LIST, OCI_INDEX)
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))

CONFIG_TYPES = (
    "application/vnd.docker.container.image.v1+json",
    "application/vnd.oci.image.config.v1+json",
)
LAYER_GZIP = (
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.oci.image.layer.v1.tar+gzip",
)
LAYER_TAR = (
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.oci.image.layer.v1.tar",
)
LAYER_FOREIGN = (
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)


_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
#: Docker Hub's name and the host its API really lives on
_DOCKER_HUB = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}
_ARM_VARIANT = {"armv5tel": "v5", "armv6l": "v6", "armv7l": "v7", "armv8l": "v8"}
_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i386": "386"}


class RegistryError(ImageError):
    """Reading an image from a registry failed; the message names the image and the cause."""


# --------------------------------------------------------------------------
# references and platforms
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """A parsed ``host[:port]/repo[:tag|@sha256:hex]``."""

    host: str  # as written (for messages)
    api_host: str  # where the API is (docker.io -> registry-1.docker.io)
    repository: str
    tag: str  # "" when pinned by digest only
    digest: str  # "" when by tag

    @property
    def target(self) -> str:
        """What to ask /manifests/ for: the digest when pinned, else the tag."""
        return self.digest or self.tag

    def __str__(self) -> str:
        out = f"{self.host}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_reference(text: str) -> Reference:
    """Parse a registry reference; no tag and no digest means ``latest``."""
    where = f"registry reference {text!r}"
    if "/" not in text:
        raise RegistryError(f"{where}: expected HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]")
    host, rest = text.split("/", 1)
    if not _HOST_RE.match(host):
        raise RegistryError(f"{where}: {host!r} is not a registry host[:port]")
    digest = ""
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not is_digest(digest):
            raise RegistryError(f"{where}: digest must be sha256:<64 lowercase hex>")
    tag = ""
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            raise RegistryError(f"{where}: {tag!r} is not a valid tag")
    if not _REPO_RE.match(rest):
        raise RegistryError(f"{where}: {rest!r} is not a valid repository name (lowercase)")
    if not tag and not digest:
        tag = "latest"
    api_host = _DOCKER_HUB.get(host.lower(), host)
    if api_host != host and "/" not in rest:
        rest = f"library/{rest}"
    return Reference(host=host, api_host=api_host, repository=rest, tag=tag, digest=digest)


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def _norm_arch(arch: str) -> str:
    return _ARCH_ALIASES.get(arch.lower(), arch.lower())


def parse_platform(text: str) -> Platform:
    """``os/arch[/variant]`` with arch aliases normalized (x86_64 -> amd64)."""
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise RegistryError(f"platform {text!r}: expected os/arch[/variant], e.g. linux/amd64")
    return Platform(parts[0].lower(), _norm_arch(parts[1]), parts[2] if len(parts) == 3 else "")


def host_platform() -> Platform:
    """This host as an OCI platform: linux/<arch>[/<arm variant>]."""
    arch = host_architecture()
    variant = _ARM_VARIANT.get(_platform.machine().lower(), "") if arch == "arm" else ""
    return Platform("linux", arch, variant)


def platform_matches(wanted: Platform, entry: Mapping[str, Any]) -> bool:
    os_ = str(entry.get("os", "")).lower()
    arch = _norm_arch(str(entry.get("architecture", "")))
    variant = str(entry.get("variant", ""))
    if os_ != wanted.os or arch != wanted.architecture:
        return False
    if not wanted.variant:
        return True
    # arm64 images rarely name "v8"; treat it as the default variant
    if wanted.architecture == "arm64" and wanted.variant == "v8" and not variant:
        return True
    return variant == wanted.variant
