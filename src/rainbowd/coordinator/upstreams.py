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
    "lab.internal:5000" = { upstream = "lab.internal:5000", insecure = true }

An entry written as a table also says how the origin reads the upstream
(``insecure``, ``ca_file``, ``credentials_file``: paths on the origin host)
and whether a tag no image has yet is added when a node pulls it
(``on_demand``, true by default: coordinator/pulls.py).

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
from dataclasses import dataclass
from typing import Any

from rainbowd.core.messages import RegistrySource, ResolvedTag, ResolveTag
from rainbowd.core.sources import canonical_registry, registry_name

from .errors import NotFound
from .state import StoredImage

#: a registry host as clients and references write it: name or IPv4 or [IPv6], optional port
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
#: registry hosts one coordinator maps (far more than any cluster pulls from)
MAX_UPSTREAMS = 256
#: longest path an upstream entry may name (a file on the origin host)
MAX_PATH = 4096


@dataclass(frozen=True)
class Upstream:
    """Where one registry host's images are ingested from, and how the origin reads it.

    The settings are a :class:`~rainbowd.core.messages.RegistrySource`'s, used for
    images added on demand (coordinator/pulls.py): the paths name files on the
    origin host, where the credentials live.
    """

    host: str
    insecure: bool = False  # plain HTTP (a registry on a trusted network)
    ca_file: str = ""
    credentials_file: str = ""
    #: a tag no image has is added and ingested when a node pulls it (else a 404)
    on_demand: bool = True


#: the keys an ``[upstreams]`` entry written as a table may have
_ENTRY_KEYS = {"upstream", "insecure", "ca_file", "credentials_file", "on_demand"}


def parse_upstreams(value: Any) -> dict[str, Upstream]:
    """The ``[upstreams]`` table checked: host -> :class:`Upstream`, hosts canonical.

    An entry is the upstream host (``"docker.io" = "mirror.internal:5000"``) or a
    table (``"docker.io" = { upstream = "...", insecure = true }``). ValueError
    naming the entry when a key or value is wrong.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError("upstreams must be a table of registry host = upstream host")
    if len(value) > MAX_UPSTREAMS:
        raise ValueError(f"upstreams: {len(value)} entries, at most {MAX_UPSTREAMS}")
    out: dict[str, Upstream] = {}
    for host, entry in value.items():
        fields = dict(entry) if isinstance(entry, Mapping) else {"upstream": entry}
        unknown = set(fields) - _ENTRY_KEYS
        if unknown:
            raise ValueError(
                f"upstreams: {host!r} has unknown key(s) {sorted(unknown)}; "
                f"known: {sorted(_ENTRY_KEYS)}"
            )
        upstream = fields.get("upstream")
        for what, text in (("registry host", host), ("upstream", upstream)):
            if not isinstance(text, str) or not _HOST_RE.match(text):
                raise ValueError(
                    f"upstreams: {what} {text!r} (of {host!r}) is not HOST[:PORT] "
                    "(e.g. docker.io, registry.example.com:5000)"
                )
        assert isinstance(upstream, str)
        for key in ("insecure", "on_demand"):
            if not isinstance(fields.get(key, False), bool):
                raise ValueError(f"upstreams: {host!r} {key} must be true or false")
        for key in ("ca_file", "credentials_file"):
            path = fields.get(key, "")
            if not isinstance(path, str) or len(path) > MAX_PATH or "\n" in path:
                raise ValueError(f"upstreams: {host!r} {key} must be a path on the origin host")
        out[canonical_registry(host)] = Upstream(
            host=canonical_registry(upstream),
            insecure=bool(fields.get("insecure", False)),
            ca_file=str(fields.get("ca_file", "")),
            credentials_file=str(fields.get("credentials_file", "")),
            on_demand=bool(fields.get("on_demand", True)),
        )
    return out


def resolve_tag(
    images: Mapping[str, StoredImage], upstreams: Mapping[str, Upstream], req: ResolveTag
) -> ResolvedTag:
    """The upstream manifest ``req``'s tag names (module docstring); NotFound saying why not."""
    registry = canonical_registry(req.registry)
    entry = upstreams.get(registry)
    asked = f"{registry}/{req.repository}:{req.tag}"
    if entry is None:
        known = ", ".join(sorted(upstreams)) or "none"
        raise NotFound(f"{asked}: registry {registry} has no upstream here (mapped: {known})")
    upstream = entry.host
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
