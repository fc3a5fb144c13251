"""The front door lacks an image the coordinator knows: get it by P2P, then serve it (issue 17).

When a client asks the registry front door for an image the node does not
hold -- a tag the coordinator resolved to an rbd image, or an image it names
-- the front door does not send the client away at once: it asks the
coordinator for the image (``POST /v1/pulls``, coordinator/pulls.py), which
puts this node in the image's pull job (the one every node pulling the same
image joins: one ingest, one job, the normal scheduler). Once the node is in
the job, the image's record is kept for the front door and the manifest can
be answered; the layers then land in the store through the node's ordinary
pulls from peers, and a blob request for one of them streams its chunks as
they land (mirror/landing.py, told by :meth:`PullOnMiss.pull_ended` and
:meth:`PullOnMiss.progress` when to give up).

* **One request per image.** Many clients (or one client's parallel requests)
  asking for the same image share one :meth:`PullOnMiss.fetch`.
* **Never hangs.** A pull ends when every layer is held, when the
  coordinator refuses or cannot be reached, or when it stops moving for
  ``stall_s`` (rainbowd.core.stall: progress is the chunks of the image's
  layers the store holds, so a slow but steady pull is never cut short). The
  front door then answers so the client goes to its upstream itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from rainbowd.agent.mirror.catalog import ImageCatalog
from rainbowd.agent.mirror.catalog_feed import keep_for_front_door
from rainbowd.core.digest import Digest
from rainbowd.core.messages import ImageRecord, PullRequest
from rainbowd.core.stall import StallWatch
from rainbowd.lib.client import AgentClient, ApiError
from rainbowd.lib.store import LayerStore, StoreError

log = structlog.get_logger(__name__)


class _Pull:
    """One image being got for the front door: its record once joined, its waiting task."""

    def __init__(self) -> None:
        self.joined = asyncio.Event()  # set once the record is known (held or joined)
        self.record: ImageRecord | None = None
        self.task: asyncio.Task[None] | None = None
        #: chunks of the image's layers this node held at the last look (the stall count)
        self.chunks = 0


#: seconds between looks at the store while a pull runs (the image's progress count, and
#: when it is held; a blob streamed meanwhile is woken by each landed chunk, not by this)
POLL_S = 0.2
#: seconds between asks while the origin still ingests the image
INGEST_POLL_S = 1.0


class PullOnMiss:
    """``await fetch(ref)`` -> the image record once it is coming to this node, or None."""

    def __init__(
        self,
        api: AgentClient,
        store: LayerStore,
        catalog: ImageCatalog,
        *,
        node_id: str,
        stall_s: float,
        ref_of: Callable[[Digest], str | None] = lambda _d: None,
        ingesting_ref: Callable[[str, str, str], str | None] = lambda _r, _n, _t: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        #: the rbd image a manifest digest is, as the coordinator said (mirror/resolver.py)
        self.ref_of = ref_of
        #: the image the origin is reading for a tag, as the coordinator said (on demand)
        self.ingesting_ref = ingesting_ref
        self.store = store
        self.catalog = catalog
        self.node_id = node_id
        self.stall_s = stall_s
        self.clock = clock
        self._pulls: dict[str, _Pull] = {}
        #: layer -> the pull bringing it (its blob is answered once it lands)
        self._layers: dict[Digest, _Pull] = {}
        self.log = log.bind(node=node_id)

    async def fetch_manifest(self, digest: Digest) -> bool:
        """Get the image manifest ``digest`` belongs to; False if unknown or not got in time."""
        ref = self.ref_of(digest)
        if ref is None:
            return False
        return await self.fetch(ref) is not None

    async def fetch_tag(self, registry: str, repository: str, tag: str) -> bool:
        """Get the image the origin is reading for a tag (on demand); False if none or too slow."""
        ref = self.ingesting_ref(registry, repository, tag)
        if ref is None:
            return False
        return await self.fetch(ref) is not None

    async def fetch(self, ref: str) -> ImageRecord | None:
        """Get ``ref`` coming to this node: its record once the node is in the image's pull job
        (or holds it); None: unknown, refused or stalled -- the client must go upstream.

        The layers keep coming after this returns: :meth:`blob_coming` says which, and
        :meth:`pull_ended` and :meth:`progress` tell a blob streamed meanwhile when to stop.
        """
        pull = self._pulls.get(ref)
        if pull is None:
            pull = _Pull()
            pull.task = asyncio.create_task(self._fetch(ref, pull), name=f"pull-on-miss {ref}")
            self._pulls[ref] = pull
            pull.task.add_done_callback(lambda _t: self._forget(ref))
        assert pull.task is not None
        joined: asyncio.Future[object] = asyncio.ensure_future(pull.joined.wait())
        ended: asyncio.Future[object] = asyncio.shield(pull.task)
        try:
            # a client that goes away does not cancel the pull the others wait for
            await asyncio.wait({joined, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            joined.cancel()
        return pull.record if pull.joined.is_set() else None

    def blob_coming(self, digest: str) -> bool:
        """A layer a running pull of this node is bringing (its blob streams as it lands)."""
        return Digest(digest) in self._layers

    def pull_ended(self, digest: str) -> asyncio.Future[None] | None:
        """Done once the pull bringing ``digest`` ended (image held, stalled or refused)."""
        pull = self._layers.get(Digest(digest))
        return None if pull is None else pull.task

    def progress(self, digest: str) -> int:
        """Chunks of the image bringing ``digest`` held here at the last look (the stall count).

        A blob streamed while its layer lands gives up when this stops growing
        (mirror/landing.py), so a layer waiting behind the image's others is not
        cut while they move.
        """
        pull = self._layers.get(Digest(digest))
        return 0 if pull is None else pull.chunks

    def _forget(self, ref: str) -> None:
        pull = self._pulls.pop(ref, None)
        self._layers = {d: p for d, p in self._layers.items() if p is not pull}

    async def close(self) -> None:
        """Cancel the pulls still waited for (the agent stops)."""
        tasks = [p.task for p in self._pulls.values() if p.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _fetch(self, ref: str, pull: _Pull) -> None:
        started = self.clock()
        watch = StallWatch(self.stall_s, started)
        while True:
            left = watch.left(self.clock())
            try:
                reply = await self.api.pull(PullRequest(image=ref), timeout=max(left, 1.0))
            except ApiError as e:  # CoordinatorUnreachable is one
                self.log.warning("mirror_pull_refused", image=ref, error=str(e))
                return
            if reply.state == "ingesting":
                if watch.seen(0, self.clock()):
                    self.log.warning("mirror_pull_stalled", image=ref, why="still ingesting")
                    return
                await asyncio.sleep(min(INGEST_POLL_S, watch.left(self.clock())))
                continue
            record = reply.image
            if record is None:  # (a coordinator always sends it with held/joined)
                self.log.error("mirror_pull_no_record", image=ref, state=reply.state)
                return
            # the front door can answer the manifest now; each blob once its layer lands
            await keep_for_front_door(self.catalog, record, self.log)
            pull.record = record
            for lr in record.layers:
                self._layers[Digest(lr.digest)] = pull
            pull.joined.set()
            if await self._wait_for_layers(ref, pull, record, watch, reply.job_id):
                self.log.info(
                    "mirror_pull_done",
                    image=ref,
                    job=reply.job_id,
                    seconds=round(self.clock() - started, 3),
                )
            return

    async def _wait_for_layers(
        self, ref: str, pull: _Pull, record: ImageRecord, watch: StallWatch, job_id: str
    ) -> bool:
        layers = [Digest(lr.digest) for lr in record.layers]
        while True:
            held, chunks = await asyncio.to_thread(self._progress, layers)
            pull.chunks = max(pull.chunks, chunks)
            if held:
                return True
            if watch.seen(chunks, self.clock()):
                self.log.warning(
                    "mirror_pull_stalled",
                    image=ref,
                    job=job_id,
                    chunks=chunks,
                    stall_s=self.stall_s,
                )
                return False
            await asyncio.sleep(POLL_S)

    def _progress(self, layers: list[Digest]) -> tuple[bool, int]:
        """(every layer held, chunks of them in the store): what the stall watch counts."""
        partial = {d: have for d, have, _n in self.store.partials()}
        chunks, complete = 0, True
        for d in layers:
            if self.store.has(d):
                try:
                    chunks += len(self.store.manifest(d).chunks)
                except StoreError:
                    complete = False
                continue
            complete = False
            chunks += partial.get(d, 0)
        return complete, chunks
