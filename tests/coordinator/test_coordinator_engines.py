"""Which nodes get a load: one with Docker or containerd (or both) or a registry front door.

A node tells the coordinator at registration which engines it can load into
(``docker``, ``containerd``) and whether it runs the front door (``mirror``);
the coordinator keeps that with the node (and across its own restart) and
sends a LoadAssignment when a node holding every layer has any of them (a
mirror-only node needs the image record to serve it). The job stays
"loading" until the agent reports, so no node is "done" before its engine
holds the image; a node with none of them is done when it holds the layers.
"""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from coordinator_support import Running, enroll, fake_image, ingest, poll, register_request, start
from rainbowd.core import messages as m
from rainbowd.core.messages import CreateJob, LoadAssignment, LoadDone, RegisterRequest
from rainbowd.lib.client import AdminClient


@pytest.mark.parametrize(
    ("docker", "containerd", "mirror", "loads"),
    [
        (False, True, False, True),
        (True, True, False, True),
        (True, False, False, True),
        (False, False, True, True),
        (False, False, False, False),
    ],
)
async def test_a_node_with_any_engine_or_a_front_door_is_sent_a_load(
    coord: Running, admin: AdminClient, docker: bool, containerd: bool, mirror: bool, loads: bool
) -> None:
    origin = await enroll(coord.url, "origin", roles=["origin"])
    img = fake_image(sizes=(70_000,))
    await ingest(admin, origin, img)
    n = await enroll(
        coord.url, "n", docker=docker, containerd=containerd, mirror=mirror, holdings=img.digests
    )
    (view,) = [x for x in (await admin.nodes()).nodes if x.node_id == "n"]
    assert (view.docker, view.containerd, view.mirror) == (docker, containerd, mirror)
    job = await admin.create_job(CreateJob(image=img.record.ref, targets=["n"]))
    (p,) = job.nodes
    if not loads:
        assert p.state == "done" and job.state == "done"
        assert not [a for a in await poll(n) if isinstance(a, LoadAssignment)]
    else:
        assert p.state == "loading" and job.state != "done"
        (load,) = [a for a in await poll(n) if isinstance(a, LoadAssignment)]
        assert load.image == img.record
        await n.load_done(load.load_id, LoadDone(seconds=0.5, layers_sent=1))
        assert (await admin.job(job.job_id)).state == "done"
    for c in (origin, n):
        await c.close()


async def test_the_engines_are_kept_across_a_coordinator_restart(tmp_path: Path) -> None:
    r = await start(tmp_path)
    c = await enroll(r.url, "n", containerd=True)
    await c.close()
    await r.stop()
    r2 = await start(tmp_path)
    try:
        node = r2.coordinator.cluster.get("n")
        assert node is not None and node.containerd and not node.docker
    finally:
        await r2.stop()


def test_an_older_agents_registration_decodes_without_the_containerd_field() -> None:
    wire = m.to_wire(register_request("old", docker=True))
    assert isinstance(wire, dict)
    del wire["containerd"]
    req = m.decode(msgpack.packb(wire), RegisterRequest)
    assert req.docker and not req.containerd
