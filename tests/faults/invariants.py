"""The invariants every fault test checks (issue: durability and fault tolerance).

1. Holdings never revert: once an agent holds a layer it keeps holding it
   (the paper's consistency rule: requesting -> holding, never back) --
   unless the agent evicted it explicitly (a store limit; the coordinator
   accepted the eviction and ``rbd-agent status`` lists it under
   ``store.evicted``, recorded before the file goes).
2. No duplicate transfer: no node completes a transfer of the same layer twice.
3. Every job reaches a final state, and every failed node has a reason.

:class:`InvariantMonitor` samples every running agent's status while the test
injects faults, and :meth:`InvariantMonitor.check_jobs` checks the jobs at the
end. A test does::

    async with InvariantMonitor(cluster) as inv:
        ... inject faults, wait for jobs ...
    await inv.check_jobs(timeout=60)   # raises AssertionError naming what broke
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from types import TracebackType

from rainbowd.agent.status import AgentNotRunning
from rainbowd.core import messages as m
from rainbowd.devcluster.localcluster import LocalCluster
from waiting import wait_until


class InvariantMonitor:
    def __init__(self, cluster: LocalCluster, interval: float = 0.2) -> None:
        self.cluster = cluster
        self.interval = interval
        self.held: dict[str, set[str]] = {}
        # node -> eviction records (digest, at) that already excused a lost layer
        self.evictions: dict[str, set[tuple[str, float]]] = {}
        self.violations: list[str] = []
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> InvariantMonitor:
        await self.sample()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.sample()
        assert not self.violations, "invariants broken:\n" + "\n".join(self.violations)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.sample()

    async def sample(self) -> None:
        """Read every running agent's holdings; record any layer that disappeared."""
        self.samples += 1
        for node in list(self.cluster.nodes):
            if not self.cluster.running(node):
                continue
            try:
                status = await self.cluster.agent_status(node)
            except (AgentNotRunning, OSError):
                continue  # starting or stopping: nothing to read
            now = {h["digest"] for h in status["holdings"]}
            records = status.get("store", {}).get("evicted", [])
            consumed = self.evictions.setdefault(node, set())
            # each eviction record excuses one disappearance of its layer
            unexcused = {(e["digest"], e["at"]) for e in records} - consumed
            before = self.held.setdefault(node, set())
            lost = before - now
            for layer in sorted(lost):
                record = next((r for r in sorted(unexcused) if r[0] == layer), None)
                if record is not None:
                    consumed.add(record)
                    unexcused.discard(record)
                    before.discard(layer)
                    lost.discard(layer)
            # an agent deletes its own copy once its server found it corrupt (it must stop
            # advertising it: coordinator/holdings.py); that disappearance is accounted for
            corrupt = set(status.get("corrupt_layers", {}))
            before -= lost & corrupt
            lost -= corrupt
            if lost:
                self.violations.append(f"{node} lost held layers {sorted(lost)}")
            before |= now

    async def check_jobs(self, timeout: float = 60.0) -> list[m.JobView]:
        """Wait for every job to be final; check reasons and duplicate transfers."""
        async with self.cluster.admin() as admin:

            async def all_final() -> list[m.JobView] | None:
                jobs = (await admin.jobs()).jobs
                return None if any(j.state == "running" for j in jobs) else jobs

            jobs = await wait_until(all_final, timeout=timeout, what="every job to be final")
            sizes = {
                layer.digest: layer.size
                for image in (await admin.images()).images
                for layer in image.layers
            }
        problems: list[str] = []
        # a layer may come in pieces from several seeders (one line per seeder), but never
        # more of its bytes than it has: a layer sent twice shows as bytes beyond its size
        per_node: Counter[tuple[str, str]] = Counter()
        for job in jobs:
            if job.state == "failed" and not job.error:
                problems.append(f"job {job.job_id} failed without a reason")
            for n in job.nodes:
                if n.state == "failed" and not n.error:
                    problems.append(f"job {job.job_id}: {n.node_id} failed without a reason")
                for t in n.transfers:
                    per_node[(n.node_id, t.layer)] += t.bytes
        for (node, layer), got in per_node.items():
            size = sizes.get(layer)
            if size is None or got > size:
                problems.append(f"{node} received {got} B of layer {layer} ({size} B)")
        assert not problems, "\n".join(problems)
        return jobs
