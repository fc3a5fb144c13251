"""EngineLoads: a load assignment carried into every engine this node has.

Its own concern: which engines a load goes into (Docker, containerd), the
layers pinned while an engine reads them (so hygiene never evicts a layer
mid-load) and the one report a load ends with.
"""

from __future__ import annotations

import time

from structlog.typing import FilteringBoundLogger

from rainbowd.agent.containerd.loader import ContainerdLoader
from rainbowd.agent.control.report_sender import ReportSender
from rainbowd.agent.docker.loader import DockerLoader
from rainbowd.agent.hygiene import StoreHygiene
from rainbowd.agent.loadstream import Loader
from rainbowd.agent.mirror.catalog import ImageCatalog
from rainbowd.agent.mirror.catalog_feed import keep_for_front_door
from rainbowd.agent.view import AgentView
from rainbowd.core import messages as m
from rainbowd.lib.client import AgentClient
from rainbowd.lib.store import LayerStore


class EngineLoads:
    """Load images from the store into Docker and/or containerd, and report each load."""

    def __init__(
        self,
        *,
        node_id: str,
        docker: DockerLoader | None,
        containerd: ContainerdLoader | None,
        store: LayerStore,
        catalog: ImageCatalog,
        hygiene: StoreHygiene,
        api: AgentClient,
        reports: ReportSender,
        view: AgentView,
        log: FilteringBoundLogger,
    ) -> None:
        self.node_id = node_id
        self.docker = docker
        # containerd is a load target too (agent/containerd/): a node without Docker runs
        # what rbd distributes, and a node with both gets every image into both
        self.containerd = containerd
        self.store = store
        self.catalog = catalog
        self.hygiene = hygiene
        self.api = api
        self.reports = reports
        self.view = view
        self.log = log
        #: layer -> image loads reading it now (never evicted meanwhile)
        self.loading: dict[str, int] = {}

    def engines(self) -> list[tuple[str, Loader]]:
        """The engines a load goes into, by name: Docker, then containerd, as configured."""
        engines: list[tuple[str, Loader]] = []
        if self.docker is not None:
            engines.append(("Docker", self.docker))
        if self.containerd is not None:
            engines.append(("containerd", self.containerd))
        return engines

    async def load(self, a: m.LoadAssignment) -> None:
        """Load ``a.image`` into every engine this node has; one failure fails the load.

        Every engine, not one: the agent cannot know which runtime will run
        the image (a Kubernetes node's containerd, a Docker beside it for
        builds), and an engine left out would pull it from the registry
        anyway. A load is done only when each engine holds the image, so the
        job never reports "done" for a node where one of them lacks it.
        """
        llog = self.log.bind(image=a.image.ref, load=a.load_id)
        if a.catalog_only:  # no engine here: the registry front door is the image's user
            await keep_for_front_door(self.catalog, a.image, self.log)
            llog.info("image catalogued for the front door")
            await self.reports.send(
                f"load {a.load_id} of {a.image.ref} done",
                lambda rid: self.api.load_done(
                    a.load_id, m.LoadDone(seconds=0.0, layers_sent=0), rid
                ),
            )
            return
        engines = self.engines()
        if not engines:
            reason = (
                f"node {self.node_id} has no Docker engine (docker_url) nor containerd "
                "(containerd_address) configured"
            )
            await self.reports.send(
                f"load {a.load_id} of {a.image.ref} failed",
                lambda rid: self.api.load_failed(a.load_id, m.TaskFailed(reason=reason), rid),
            )
            return
        # every layer is held (that is when a load is sent): the front door may serve it
        await keep_for_front_door(self.catalog, a.image, self.log)
        layers = [lr.digest for lr in a.image.layers]
        for d in layers:
            self.loading[d] = self.loading.get(d, 0) + 1
        seconds, layers_sent, failed = 0.0, 0, ""
        try:
            for engine, loader in engines:
                try:
                    result = await loader.load(a.image, self.store)
                except Exception as e:  # engine errors come in many types; all are reported
                    failed = f"node {self.node_id} could not load {a.image.ref} into {engine}: {e}"
                    llog.warning("image load failed", engine=engine, error=str(e))
                    break
                seconds += result.seconds
                layers_sent += result.layers_sent
                llog.info("image loaded", engine=engine, layers_sent=result.layers_sent)
        finally:
            for d in layers:
                left = self.loading.pop(d, 1) - 1
                if left > 0:
                    self.loading[d] = left
                self.hygiene.used(d)
        if failed:
            await self.reports.send(
                f"load {a.load_id} of {a.image.ref} failed",
                lambda rid: self.api.load_failed(a.load_id, m.TaskFailed(reason=failed), rid),
            )
            return
        self.view.images[a.image.ref] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        await self.reports.send(
            f"load {a.load_id} of {a.image.ref} done",
            lambda rid: self.api.load_done(
                a.load_id, m.LoadDone(seconds=seconds, layers_sent=layers_sent), rid
            ),
        )
