"""Registry names and their upstreams: which manifest a tag a node's mirror was asked for names.

A node's registry front door is asked for ``registry/repository:tag`` (the
registry is the host the client pulled from: ``docker.io``,
``registry.example.com:5000``). Which manifest that tag names is said here
and only here (issue 17 item 3): a peer could claim anything, the coordinator
knows what its origin ingested and checked.

The coordinator config maps each registry host clients pull from to the
upstream its images are ingested from (``[upstreams]`` in the TOML)::

    [upstreams]
    "docker.io" = "mirror.internal:5000"     # Docker Hub's images, via a pull-through cache
    "registry.example.com:5000" = "registry.example.com:5000"

A tag resolves to the newest ready image whose source is a registry
reference on that upstream with that repository and tag, and whose record
carries the upstream's own manifest (rainbowd.core.upstreammanifest): the
reply is its digest (the index's, when the tag named one), the digest the
upstream itself answers for the tag. A registry not mapped, or a tag no such
image has, is NotFound: the mirror answers 404 and the client goes to its
upstream itself (item 4).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from rainbowd.core.messages import RegistrySource, ResolvedTag, ResolveTag
from rainbowd.core.sources import canonical_registry, registry_name

from .errors import NotFound
from .state import StoredImage

#: a registry host as clients and references write it: name or IPv4 or [IPv6], optional port
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
#: registry hosts one coordinator maps (far more than any cluster pulls from)
MAX_UPSTREAMS = 256


def parse_upstreams(value: Any) -> dict[str, str]:
    """The ``[upstreams]`` table checked: host -> upstream host, both canonical.

    ValueError naming the entry when a key or value is not a ``host[:port]``.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError("upstreams must be a table of registry host = upstream host")
    if len(value) > MAX_UPSTREAMS:
        raise ValueError(f"upstreams: {len(value)} entries, at most {MAX_UPSTREAMS}")
    out: dict[str, str] = {}
    for host, upstream in value.items():
        for what, text in (("registry host", host), ("upstream", upstream)):
            if not isinstance(text, str) or not _HOST_RE.match(text):
                raise ValueError(
                    f"upstreams: {what} {text!r} (of {host!r}) is not HOST[:PORT] "
                    "(e.g. docker.io, registry.example.com:5000)"
                )
        out[canonical_registry(host)] = canonical_registry(upstream)
    return out


def resolve_tag(
    images: Mapping[str, StoredImage], upstreams: Mapping[str, str], req: ResolveTag
) -> ResolvedTag:
    """The upstream manifest ``req``'s tag names (module docstring); NotFound saying why not."""
    registry = canonical_registry(req.registry)
    upstream = upstreams.get(registry)
    asked = f"{registry}/{req.repository}:{req.tag}"
    if upstream is None:
        known = ", ".join(sorted(upstreams)) or "none"
        raise NotFound(f"{asked}: registry {registry} has no upstream here (mapped: {known})")
    best: StoredImage | None = None
    for image in images.values():
        if image.state != "ready" or image.record is None or image.record.upstream is None:
            continue
        if not isinstance(image.source, RegistrySource):
            continue
        if registry_name(image.source.reference) != (upstream, req.repository, req.tag):
            continue
        if best is None or image.created_at > best.created_at:
            best = image
    if best is None or best.record is None or best.record.upstream is None:
        raise NotFound(f"{asked}: no ready image of {upstream}/{req.repository}:{req.tag}")
    top = best.record.upstream.top
    return ResolvedTag(digest=top.digest, media_type=top.media_type, ref=best.ref)
