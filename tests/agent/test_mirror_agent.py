"""A real Agent's front door: started with it, fed by its own ingest, closed when it stops.

No coordinator runs (the agent keeps trying to register, and its ingest report
is lost after a second): what is checked is the agent's own wiring. An origin
ingests the demo image the way an IngestAssignment asks; the ingest catalogs
the image; skopeo then pulls it by digest from the agent's mirror_listen, and
after stop() the port is closed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from clients import copy_by_digest, skopeo
from rainbowd.agent.agent import Agent
from rainbowd.agent.config import load_config
from rainbowd.agent.status import render_status
from rainbowd.core.messages import ArchiveSource, IngestAssignment
from waiting import wait_until

CHUNK = 256 * 1024


def make_agent(tmp: Path) -> Agent:
    cfg = tmp / "agent.toml"
    cfg.write_text(
        'node_id = "m1"\ncoordinator_url = "http://127.0.0.1:1"\n'
        f'state_dir = "{tmp / "state"}"\nlisten_address = "127.0.0.1"\nssh_port = 0\n'
        'roles = ["origin"]\nreport_retry_seconds = 1\nmirror_listen = "127.0.0.1:0"\n'
    )
    return Agent(load_config(cfg))


async def test_the_agent_serves_what_it_ingested_and_closes_with_it(
    demo_image: Path, tmp_path: Path
) -> None:
    skopeo()  # a missing one fails under CI=true before the agent starts
    agent = make_agent(tmp_path)
    run = asyncio.create_task(agent.run())
    try:
        assert agent.mirror is not None
        await wait_until(
            lambda: agent.mirror is not None and agent.mirror.bound, timeout=10, what="mirror"
        )
        url = agent.mirror.url
        assert agent.status_snapshot()["mirror_url"] == url
        await agent.assignments.ingest_and_report(
            IngestAssignment(
                ingest_id="i1",
                ref="rbd-demo:latest",
                source=ArchiveSource(path=str(demo_image)),
                chunk_size=CHUNK,
                compression="gzip",
            )
        )
        digest = agent.catalog.recorded["rbd-demo:latest"]
        shown = render_status(agent.status_snapshot())
        assert f"mirror      {url}" in shown and f"rbd-demo:latest  @{digest}" in shown
        host = url.removeprefix("http://")
        doc = await copy_by_digest(host, "rbd-demo", digest, tmp_path / "pulled")
        held = set(agent.store.holdings())
        assert {x["digest"] for x in doc["layers"]} <= held
        scrape = agent.metrics.exposition().decode()
        assert 'rbd_agent_mirror_requests_total{kind="blob",outcome="hit"}' in scrape
    finally:
        agent.stop()
        await asyncio.wait_for(run, 30)
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/v2/"):
                pass
