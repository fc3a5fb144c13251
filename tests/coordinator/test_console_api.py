"""The web console's server side against the real app: the page, its headers, its one view.

The page is static and public but holds no data; the data it shows needs the
admin token. ``GET /v1/jobs/{id}/transfers`` lists a job's transfers in
flight (the transfer graph's live edges) with why each seeder was chosen.
The browser side is driven for real in tests/integration/test_console.py.
"""

from __future__ import annotations

import json

import aiohttp
from test_coordinator_api import error_of, raw
from test_coordinator_flow import agent

from coordinator_support import ADMIN, Running, fake_image, ingest
from rainbowd.coordinator.http.console import ASSETS, load_assets
from rainbowd.core.messages import (
    CreateJob,
    Heartbeat,
    SecurityEvent,
    TransferFailed,
    TransferProgress,
)
from rainbowd.core.sched.reasons import FASTEST_IDLE, SEEDER_BPS
from rainbowd.lib.client import AdminClient

JSON_ADMIN = {"Accept": "application/json", "Authorization": f"Bearer {ADMIN}"}


async def test_console_page_is_public_static_and_locked_down(coord: Running) -> None:
    status, ctype, body = await raw(coord.url, "GET", "/console")
    assert status == 200 and ctype == "text/html"
    page = body.decode()
    assert '<script src="/console/app.js"' in page and 'id="login-form"' in page
    # no data in the page itself, and nothing from another origin
    assert ADMIN not in page and "http://" not in page and "https://" not in page
    async with aiohttp.ClientSession() as s, s.get(coord.url + "/console") as r:
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Cache-Control"] == "no-store"


async def test_console_assets_are_served_with_their_types(coord: Running) -> None:
    for name, want in (("app.js", "text/javascript"), ("console.css", "text/css")):
        status, ctype, body = await raw(coord.url, "GET", f"/console/{name}")
        assert (status, ctype) == (200, want), name
        assert body == load_assets()[name].body
    js = (await raw(coord.url, "GET", "/console/app.js"))[2].decode()
    # agent-supplied strings are rendered as text, never parsed as HTML
    assert "innerHTML" not in js and "eval(" not in js
    assert "Authorization" in js and "sessionStorage" in js
    status, ctype, body = await raw(coord.url, "GET", "/console/secrets.txt")
    assert status == 404 and "no such endpoint" in error_of(ctype, body)
    status, _, _ = await raw(coord.url, "GET", "/console/../v1/nodes")
    assert status in (401, 404)  # normalized by the client or refused; never a file read


def test_every_shipped_file_is_in_the_package() -> None:
    assets = load_assets()
    assert set(assets) == set(ASSETS)
    assert all(len(a.body) > 200 for a in assets.values())


async def test_job_transfers_need_the_admin_token(coord: Running) -> None:
    status, ctype, body = await raw(coord.url, "GET", "/v1/jobs/j-x/transfers")
    assert status == 401 and "admin token" in error_of(ctype, body)
    wrong = {"Accept": "application/json", "Authorization": "Bearer nope"}
    status, ctype, body = await raw(coord.url, "GET", "/v1/jobs/j-x/transfers", headers=wrong)
    assert status == 403 and "admin token is wrong" in error_of(ctype, body)
    status, ctype, body = await raw(coord.url, "GET", "/v1/jobs/j-x/transfers", headers=JSON_ADMIN)
    assert status == 404 and "no job 'j-x'" in error_of(ctype, body)


async def test_job_transfers_show_live_edges_with_progress_and_reason(
    coord: Running, admin: AdminClient
) -> None:
    origin = await agent(coord.url, "origin", roles=["origin"], speed=100e6)
    a = await agent(coord.url, "a", speed=50e6)
    try:
        img = fake_image(sizes=(150_000, 70_000))
        await ingest(admin, origin.c, img)
        await origin.take()
        job = await admin.create_job(CreateJob(image=img.record.ref, targets=["a"]))
        path = f"/v1/jobs/{job.job_id}/transfers"

        ta = await a.transfer()
        await a.c.transfer_progress(
            ta.transfer_id, TransferProgress(bytes_done=60_000, bytes_total=150_000, rate_bps=7e6)
        )
        status, ctype, body = await raw(coord.url, "GET", path, headers=JSON_ADMIN)
        assert (status, ctype) == (200, "application/json")
        [edge] = json.loads(body)["transfers"]
        assert edge["transfer_id"] == ta.transfer_id
        assert (edge["seeder"], edge["demander"], edge["layer"]) == ("origin", "a", img.digests[0])
        assert (edge["bytes_done"], edge["bytes_total"], edge["rate_bps"]) == (60_000, 150_000, 7e6)
        # the reason is the record (rule and numbers), not a sentence to parse
        assert edge["reason"] == {
            "rule": "fastest-idle",
            "policy": "paper",
            "turn": "",
            "numbers": {"seeder_bps": 100e6, "slower_idle": 0.0},
            "text": "",
        }

        # once done it leaves the live list and shows as the job's recorded SeederUse; the
        # next transfer has moved nothing yet, so it shows no rate (not the previous one's)
        await a.done(ta)
        ta2 = await a.transfer()
        live = json.loads((await raw(coord.url, "GET", path, headers=JSON_ADMIN))[2])["transfers"]
        assert [t["layer"] for t in live] == [img.digests[1]]
        assert live[0]["bytes_done"] == 0 and live[0]["rate_bps"] == 0.0
        view = await admin.job(job.job_id)
        [uses] = [n.transfers for n in view.nodes if n.node_id == "a"]
        assert [(u.seeder, u.layer) for u in uses] == [("origin", img.digests[0])]
        assert (uses[0].reason.rule, uses[0].reason.numbers[SEEDER_BPS]) == (FASTEST_IDLE, 100e6)
        assert "fastest idle seeder" in uses[0].reason.render()

        await a.done(ta2)
        live = json.loads((await raw(coord.url, "GET", path, headers=JSON_ADMIN))[2])["transfers"]
        assert live == []
    finally:
        await origin.c.close()
        await a.c.close()


async def test_node_view_says_suspect_and_why_quarantined(
    coord: Running, admin: AdminClient
) -> None:
    origin = await agent(coord.url, "origin", roles=["origin"], speed=100e6)
    a = await agent(coord.url, "a", speed=50e6)
    try:
        img = fake_image(sizes=(150_000,))
        await ingest(admin, origin.c, img)
        await origin.take()
        await admin.create_job(CreateJob(image=img.record.ref, targets=["a"]))
        ta = await a.transfer()
        await a.c.transfer_failed(
            ta.transfer_id, TransferFailed(kind="unreachable", reason="connection refused")
        )
        nodes = {n.node_id: n for n in (await admin.nodes()).nodes}
        assert nodes["origin"].suspect and nodes["origin"].state == "down"
        assert not nodes["a"].suspect

        # its next heartbeat clears suspicion; a host key mismatch quarantines it, with why
        await origin.c.heartbeat(Heartbeat(holdings=img.digests))
        nodes = {n.node_id: n for n in (await admin.nodes()).nodes}
        assert not nodes["origin"].suspect and nodes["origin"].state == "up"
        # (a pulled from it; the coordinator's own probe sees the wrong key too)
        coord.probe_says("mismatch")
        await a.c.security_event(
            SecurityEvent(kind="host_key_mismatch", peer="origin", detail="key SHA256:evil")
        )
        await coord.coordinator.host_key_checks.wait()
        status, _, body = await raw(coord.url, "GET", "/v1/nodes", headers=JSON_ADMIN)
        assert status == 200
        doc = {n["node_id"]: n for n in json.loads(body)["nodes"]}
        assert doc["origin"]["quarantined"] is True
        assert "host key mismatch" in doc["origin"]["quarantine_reason"]
        assert doc["a"]["quarantine_reason"] == "" and doc["a"]["suspect"] is False
    finally:
        await origin.c.close()
        await a.c.close()
