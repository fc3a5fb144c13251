"""rbd in the lab: the real coordinator and agents, one agent per node namespace.

The coordinator runs in the hub (unshaped: its traffic is control messages),
the origin agent and every demander in their own shaped namespaces, each
started exactly as systemd would (rainbowd.devcluster.localcluster). Untimed set-up:
start everything, wait until every node is up, ingest the image at the
origin. Timed: from the job's creation (``rbd distribute IMAGE --to all``)
until each node holds every layer, checked chunk by chunk and by digest --
the coordinator's own per-node ``finished_at``. Speed hints are the profile's
upload rates and download hints its download rates, as an operator would
configure ``speed_hint_mbps`` and ``download_hint_mbps``.

The policy is the coordinator's default (rainbowd.core.sched.scheduler.DEFAULT_POLICY)
unless one is named, so ``rbd`` in a lab report is what an operator gets
without configuring one; the system is named ``rbd`` for the default,
``rbd:<policy>`` for any other.
"""

from __future__ import annotations

from typing import Any

from rainbowd.core import messages as m
from rainbowd.core.sched.scheduler import DEFAULT_POLICY
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec

from . import transfer_costs
from .env import COORDINATOR_PORT, LabEnv
from .image import REF
from .result import SystemResult


class RbdSystem:
    """``rbd`` with one scheduling policy; named ``rbd`` for the coordinator's default
    policy, ``rbd:<policy>`` for another (so two reports' ``rbd`` rows are comparable
    only if DEFAULT_POLICY was the same; the report's ``policy`` note says which)."""

    def __init__(
        self,
        policy: str = DEFAULT_POLICY,
        *,
        start_timeout: float = 300.0,
        log_level: str = "warning",
    ) -> None:
        self.policy = policy
        self.log_level = log_level
        self.name = "rbd" if policy == DEFAULT_POLICY else f"rbd:{policy}"
        self.start_timeout = start_timeout

    def cluster(
        self,
        env: LabEnv,
        *,
        agent_config: dict[str, Any] | None = None,
        coordinator_config: dict[str, Any] | None = None,
    ) -> LocalCluster:
        """The coordinator in the hub and one agent per node (``agent_config`` for each)."""
        lab = env.lab
        admin_port = lab.forward(env.hub, COORDINATOR_PORT)
        specs = [
            NodeSpec(
                n.name,
                roles=["origin"] if n.name == env.origin else [],
                host=env.address(n.name),
                speed_hint_mbps=n.up_mbit,
                download_hint_mbps=n.down_mbit,
                config=dict(agent_config or {}),
            )
            for n in env.profile.all_nodes
        ]
        return LocalCluster(
            env.workdir / self.name.replace(":", "-"),
            specs,
            host=env.address(env.hub),
            port=COORDINATOR_PORT,
            admin_url=f"http://127.0.0.1:{admin_port}",
            prefix_for=lambda name: (
                env.prefix(env.hub, central=True) if name == "coordinator" else env.prefix(name)
            ),
            chunk_size=env.profile.chunk_size,
            heartbeat_interval=env.profile.heartbeat_interval,
            policy=self.policy,
            log_level=self.log_level,
            coordinator_config=coordinator_config,
        )

    async def run(self, env: LabEnv, *, timeout: float) -> SystemResult:
        result = SystemResult(self.name, notes={"policy": self.policy})
        cluster = self.cluster(env)
        try:
            await cluster.start(timeout=self.start_timeout)
            async with cluster.admin() as admin:
                image = await admin.ingest(
                    m.CreateImage(ref=REF, source=m.ArchiveSource(path=str(env.image))),
                    timeout=120,
                )
                if image.state != "ready":
                    raise RuntimeError(f"rbd: ingest of {REF} at the origin failed: {image.error}")
                env.timed_start()
                job = await admin.create_job(m.CreateJob(image=REF, targets=["all"]))
                try:
                    final = await admin.wait_job(job.job_id, timeout=timeout)
                except TimeoutError:
                    final = await admin.job(job.job_id)
                env.timed_end()
            self._collect(final, set(env.demanders), result, timeout)
        finally:
            await cluster.stop()
        # the per-transfer costs this run imposed, when its logs list every transfer
        # (--log-level info): `python -m bench.sim --compare` charges them
        costs = transfer_costs.measure(cluster.root / "logs")
        if costs is not None:
            result.notes["transfer_costs"] = costs.as_notes()
        return result

    @staticmethod
    def _collect(job: m.JobView, demanders: set[str], result: SystemResult, timeout: float) -> None:
        transfers: list[dict[str, Any]] = []
        for n in job.nodes:
            if n.node_id not in demanders:
                continue  # the origin is a target of "all" too; it holds the image already
            if n.state == "done" and n.finished_at:
                result.node_seconds[n.node_id] = n.finished_at - job.created_at
            else:
                why = n.error or f"state {n.state} after {timeout:.0f} s"
                result.failed[n.node_id] = why
            transfers += [
                {
                    "layer": t.layer,
                    "seeder": t.seeder,
                    "demander": n.node_id,
                    # seconds from the job's creation: the timeline a slow tail is read from
                    "assigned": round(t.started_at - job.created_at, 3) if t.started_at else None,
                    "done": round(t.finished_at - job.created_at, 3) if t.finished_at else None,
                    "seconds": round(t.seconds, 3),
                    "bytes": t.bytes,
                    "rule": t.reason.rule,  # reasons.py: best-fit, relay, ...
                }
                for t in n.transfers
            ]
        from_origin = sum(1 for t in transfers if t["seeder"] == "origin")
        result.notes.update(
            {
                "job": job.job_id,
                "job_state": job.state,
                "wire_bytes": job.wire_bytes,
                "transfers": len(transfers),
                "transfers_from_origin": from_origin,
                # one entry per layer and seeder of a node, as the job records them
                # (coordinator/jobs.py NodeProgress.record): the pieces it took from that
                # seeder summed, from the first one's assignment to the last one's report --
                # not one transfer each, so its bytes / seconds is no transfer's rate (the
                # agents' logs have each pull: transfer_costs.py)
                "timeline": transfers,
            }
        )
