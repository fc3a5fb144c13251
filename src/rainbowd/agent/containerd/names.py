"""The name containerd gives an image rbd calls ``ref``: Docker's normalized reference.

containerd keeps full names (``docker.io/library/busybox:latest``); Docker and
rbd accept the short forms (``busybox``, ``busybox:latest``) and mean the same
image. Kubernetes asks the CRI for the normalized name too, so an image
loaded under the short one would not be found, and a later pull would fetch
it again. The rules are Docker's (distribution/reference's
``ParseNormalizedNamed``): a first component with a ``.`` or ``:``, or
``localhost``, is a registry host; anything else lives on ``docker.io``, and a
one-component name there under ``library/``; no tag or digest means
``:latest``.
"""

from __future__ import annotations

from typing import Final

DEFAULT_DOMAIN: Final = "docker.io"
OFFICIAL_PREFIX: Final = "library/"
DEFAULT_TAG: Final = "latest"
#: Docker's old name for its hub, which it rewrites to DEFAULT_DOMAIN
LEGACY_DOMAIN: Final = "index.docker.io"


def containerd_name(ref: str) -> str:
    """The full name of ``ref`` as containerd (and the CRI) lists it."""
    first, sep, rest = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        domain, path = (DEFAULT_DOMAIN if first == LEGACY_DOMAIN else first), rest
    else:
        domain, path = DEFAULT_DOMAIN, ref
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_PREFIX + path
    last = path.rsplit("/", 1)[-1]
    if "@" not in last and ":" not in last:
        path += ":" + DEFAULT_TAG
    return f"{domain}/{path}"
