"""How long from `rbd distribute` to the demander holding its assignment?

A real rbd-coordinator process on loopback; two enrolled agents played by
this script over the real HTTP/msgpack API (an origin and one demander, no
data plane: only the control plane is measured). For each of R single-layer
images the script creates a job and times until the demander's long-poll
(`GET /v1/assignments`, already waiting) returns the TransferAssignment; the
demander then reports the transfer done so the next round starts clean.

    .venv/bin/python bench/assignment_latency.py [--rounds 200]

Prints the median and p99 in milliseconds and writes bench/out/assignment.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from agentsim import make_image, register_request
from rainbowd.core import messages as m
from rainbowd.devcluster.localcluster import LocalCluster
from rainbowd.lib.client import AgentClient


async def run(rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="rbd-bench-") as tmp:
        cluster = LocalCluster(Path(tmp), [], log_level="warning")
        await cluster.start_coordinator()
        try:
            return await _measure(cluster, rounds)
        finally:
            await cluster.stop()


async def _measure(cluster: LocalCluster, rounds: int) -> dict[str, float]:
    samples: list[float] = []
    async with (
        AgentClient(cluster.url) as origin,
        AgentClient(cluster.url) as demander,
        cluster.admin() as admin,
    ):
        for client, nid, roles in ((origin, "origin", ["origin"]), (demander, "d1", [])):
            reply = await client.register(register_request(nid, cluster.join_token, roles))
            client.set_credential(nid, reply.credential)
        o_cursor = d_cursor = 0
        for i in range(rounds):
            ref = f"bench/img:{i}"
            record, manifests = make_image(ref)
            await admin.add_image(m.CreateImage(ref=ref, source=m.ArchiveSource(path="/x")))
            batch = await origin.assignments(o_cursor, 0, 5)
            o_cursor = batch.cursor
            ingest = next(a for a in batch.assignments if isinstance(a, m.IngestAssignment))
            await origin.ingest_done(
                ingest.ingest_id, m.IngestDone(image=record, manifests=manifests)
            )
            poll = asyncio.create_task(demander.assignments(d_cursor, 0, 10))
            await asyncio.sleep(0.02)  # the long-poll is parked at the coordinator
            t0 = time.perf_counter()
            await admin.create_job(m.CreateJob(image=ref, targets=["d1"]))
            batch = await poll
            samples.append((time.perf_counter() - t0) * 1000)
            d_cursor = batch.cursor
            for a in batch.assignments:
                if isinstance(a, m.TransferAssignment):
                    await demander.transfer_done(
                        a.transfer_id, m.TransferDone(bytes_moved=a.layer.size, seconds=0.01)
                    )
    samples.sort()
    return {
        "rounds": rounds,
        "median_ms": statistics.median(samples),
        "p99_ms": samples[min(len(samples) - 1, int(0.99 * len(samples)))],
        "max_ms": samples[-1],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("bench/out/assignment.json"))
    args = p.parse_args()
    result = asyncio.run(run(args.rounds))
    print(
        f"assignment latency over {result['rounds']} jobs (job created -> long-poll returns): "
        f"median {result['median_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
        f"max {result['max_ms']:.1f} ms"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
