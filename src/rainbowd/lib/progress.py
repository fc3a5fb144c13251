"""Rendering of a job's per-node progress, live or as a final report.

Live mode redraws a block of lines in place on a terminal; without a
terminal (CI, pipes, logs) it prints one line per node state change, so the
output stays readable in a log file.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

from rainbowd.core.digest import short
from rainbowd.core.messages import JobView, NodeJobState
from rainbowd.core.units import human_bytes, human_rate
from rainbowd.lib.client import AdminClient

BAR = 24


def node_line(n: NodeJobState, now: float) -> str:
    frac = n.bytes_done / n.bytes_total if n.bytes_total else (1.0 if n.state == "done" else 0.0)
    filled = int(frac * BAR)
    bar = "#" * filled + "-" * (BAR - filled)
    end = n.finished_at or now
    took = end - n.started_at if n.started_at else 0.0
    rate = human_rate(n.rate_bps) if n.state == "transferring" and n.rate_bps > 0 else ""
    extra = f"  {n.error}" if n.error else ""
    return (
        f"{n.node_id:<14} {n.state:<12} [{bar}] {100 * frac:5.1f}%  "
        f"{n.layers_done}/{n.layers_total} layers  {human_bytes(n.bytes_done):>10}  "
        f"{rate:>10}  {took:6.1f}s{extra}"
    )


def traffic(job: JobView) -> str:
    """What the job cost the network, in bytes on the wire on both sides.

    e.g. ``a copy is 66.0 MiB on the wire (190.3 MiB unpacked); 312.4 MiB sent =
    4.7 copies, to 8 nodes``. Layers a node already held (from any image) never
    move, so fewer copies than nodes can be sent. The unpacked size is the
    image's, for reference only: compressed layers travel compressed.
    """
    receivers = sum(1 for n in job.nodes if n.wire_bytes > 0)
    copy = job.copy_bytes or max((n.bytes_total for n in job.nodes), default=0)
    image = f"a copy is {human_bytes(copy)} on the wire"
    if job.image_bytes and job.image_bytes != copy:
        image += f" ({human_bytes(job.image_bytes)} unpacked)"
    if job.wire_bytes <= 0:
        return f"{image}; nothing sent" + (" yet" if job.state == "running" else "")
    plural = "" if receivers == 1 else "s"
    copies = f" = {job.wire_bytes / copy:.1f} copies" if copy else ""
    return f"{image}; {human_bytes(job.wire_bytes)} sent{copies}, to {receivers} node{plural}"


def summary(job: JobView) -> str:
    end = job.finished_at or time.time()
    done = sum(1 for n in job.nodes if n.state == "done")
    return (
        f"job {job.job_id} {job.state}: {job.image} on {done}/{len(job.nodes)} nodes "
        f"in {end - job.created_at:.1f}s; {traffic(job)}" + (f" ({job.error})" if job.error else "")
    )


def job_report(job: JobView) -> str:
    """The full per-node report of ``rbd job ID``: states, seeders used and why, times."""
    now = time.time()
    lines = [summary(job), ""]
    for n in sorted(job.nodes, key=lambda n: n.node_id):
        lines.append(node_line(n, now))
        if n.transfers:
            count = len(n.transfers)
            lines.append(
                f"    {human_bytes(n.wire_bytes)} over the wire in {count} "
                f"transfer{'' if count == 1 else 's'}"
            )
        elif n.state == "done":
            lines.append("    nothing moved: the node already held every layer")
        for t in n.transfers:
            lines.append(
                f"    {short(t.layer)} <- {t.seeder:<12} {human_bytes(t.bytes):>10} "
                f"in {t.seconds:5.2f}s  why: {t.reason.render(t.seeder)}"
            )
    return "\n".join(lines)


async def follow_job(
    admin: AdminClient,
    job_id: str,
    out: TextIO = sys.stdout,
    *,
    live: bool | None = None,
    interval: float = 0.5,
    quiet: bool = False,
) -> JobView:
    """Poll the job until it is final, showing progress; return the final view."""
    if live is None:
        live = out.isatty()
    drawn = 0
    last_state: dict[str, str] = {}
    while True:
        # polled without the nodes' transfer lists (nothing here reads them); the
        # final view returned carries them, for job_report
        job = await admin.job(job_id, transfers=False)
        if job.state != "running":
            job = await admin.job(job_id)
        now = time.time()
        nodes = sorted(job.nodes, key=lambda n: n.node_id)
        if quiet:
            pass
        elif live:
            if drawn:
                out.write(f"\x1b[{drawn}F")
            lines = [summary(job), *(node_line(n, now) for n in nodes)]
            for line in lines:
                out.write("\x1b[2K" + line + "\n")
            drawn = len(lines)
            out.flush()
        else:
            for n in nodes:
                if last_state.get(n.node_id) != n.state:
                    last_state[n.node_id] = n.state
                    out.write(node_line(n, now) + "\n")
            out.flush()
        if job.state != "running":
            return job
        await asyncio.sleep(interval)
