"""The registry front door's one way to learn what a tag names: ask the coordinator.

``CoordinatorResolver`` is the :data:`~rainbowd.agent.mirror.server.Resolver`
the agent hands its MirrorServer. It sends ``POST /v1/tags/resolve`` (a
bounded reply: a digest, a media type, a ref) and turns every way that can
fail -- the coordinator knows no such tag or upstream (404), refuses,
cannot be reached, or does not answer within the timeout -- into None: the
front door then answers 404 and the client pulls from its upstream itself
(issue 17 item 4). A peer is never asked: a tag is a name anyone could
claim, and only the coordinator knows what its origin ingested and checked.
"""

from __future__ import annotations

from typing import TypeVar

import structlog

from rainbowd.core.digest import Digest, is_digest
from rainbowd.core.messages import ResolveTag
from rainbowd.lib.client import AgentClient, ApiError

log = structlog.get_logger(__name__)
#: the key of a remembered table: a digest, or (registry, repository, tag)
K = TypeVar("K")


#: manifest digests whose image ref is remembered (the refs of the latest resolutions)
MAX_REMEMBERED_REFS = 1024


class CoordinatorResolver:
    """``await resolver(registry, repository, tag)`` -> the manifest digest, or None.

    It remembers which rbd image each digest it was told belongs to
    (:meth:`ref_of`): a miss of that manifest can then ask the coordinator for
    the image itself (mirror/pull_on_miss.py). Only the coordinator's answers
    go in, never a client's words.
    """

    def __init__(self, api: AgentClient, *, node_id: str, timeout: float) -> None:
        self.api = api
        self.node_id = node_id
        self.timeout = timeout
        self._refs: dict[Digest, str] = {}
        #: (registry, repository, tag) -> the image the origin is reading for it now
        self._ingesting: dict[tuple[str, str, str], str] = {}

    def ref_of(self, digest: Digest) -> str | None:
        """The rbd image the coordinator said ``digest`` is, if it said so lately."""
        return self._refs.get(digest)

    def ingesting_ref(self, registry: str, repository: str, tag: str) -> str | None:
        """The image the coordinator said it is reading for this tag (on demand), if any."""
        return self._ingesting.get((registry, repository, tag))

    async def __call__(self, registry: str, repository: str, tag: str) -> Digest | None:
        asked = f"{registry}/{repository}:{tag}"
        try:
            reply = await self.api.resolve_tag(
                ResolveTag(registry=registry, repository=repository, tag=tag),
                timeout=self.timeout,
            )
        except ApiError as e:  # CoordinatorUnreachable is one (status 0)
            if e.status == 404:
                log.info("mirror_tag_unknown", tag=asked, node=self.node_id, why=e.message)
            else:
                log.warning("mirror_resolve_failed", tag=asked, node=self.node_id, error=str(e))
            return None
        if reply.state == "ingesting":  # added on demand: pull it once it is ready
            log.info("mirror_tag_ingesting", tag=asked, node=self.node_id, image=reply.ref)
            _remember(self._ingesting, (registry, repository, tag), reply.ref)
            return None
        self._ingesting.pop((registry, repository, tag), None)
        if not is_digest(reply.digest):
            log.error("mirror_resolve_bad_digest", tag=asked, node=self.node_id)
            return None
        log.info("mirror_tag_resolved", tag=asked, node=self.node_id, manifest=reply.digest)
        digest = Digest(reply.digest)
        _remember(self._refs, digest, reply.ref)
        return digest


def _remember(table: dict[K, str], key: K, ref: str) -> None:
    """``table[key] = ref``, newest last; past MAX_REMEMBERED_REFS the oldest go first."""
    table.pop(key, None)
    table[key] = ref
    while len(table) > MAX_REMEMBERED_REFS:
        del table[next(iter(table))]
