"""The web console: a static single page served by the coordinator, and its one extra view.

``GET /console`` serves ``console-ui/index.html`` (with ``app.js`` and
``console.css`` beside it, shipped as package data; the folder is not named
``console`` so it is not mistaken for this module or a namespace package). The page itself holds no
data and is public; everything it shows comes from the admin API
(``/v1/nodes``, ``/v1/jobs``, ``/v1/security-events``, ``/v1/images``) with
the admin token the operator types once, sent as ``Authorization: Bearer``.
It polls once a second rather than using Server-Sent Events because the
browser's ``EventSource`` cannot send an ``Authorization`` header: the token
would have to travel in the URL (and into access logs and history), and an
SSE stream would need its own keep-alive and reconnect logic, while a poll
reuses the authenticated JSON API unchanged and recovers by itself.

The only endpoint added for the console is ``GET /v1/jobs/{id}/transfers``
(admin): a job's transfers *in flight* (seeder, demander, layer, bytes so
far, rate, why that seeder), the live edges of the transfer graph; finished
transfers are already in the job view.

Everything is served with a strict Content-Security-Policy (scripts and
styles from this origin only, no inline code, fetches to this origin only)
and ``no-store``: the page renders agent-supplied strings (node ids, reasons,
event details) as text, never as HTML, and the CSP is the second wall.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from rainbowd.core.messages import ActiveTransferList, ActiveTransferView

from ..core import Coordinator
from . import common as api

#: file name -> content type of everything the console ships
ASSETS = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "console.css": "text/css",
}

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class ConsoleAssetMissing(RuntimeError):
    """A console file is not in the installed package (a broken install)."""


@dataclass(frozen=True)
class _Asset:
    body: bytes
    content_type: str


def load_assets() -> dict[str, _Asset]:
    """Read the shipped files once, so a broken install fails at start, not on first visit."""
    folder = resources.files(__package__ or "rainbowd.coordinator.http") / "console-ui"
    out: dict[str, _Asset] = {}
    for name, ctype in ASSETS.items():
        try:
            out[name] = _Asset(folder.joinpath(name).read_bytes(), ctype)
        except OSError as e:
            raise ConsoleAssetMissing(
                f"web console file {name} is missing from the rainbowd.coordinator package "
                f"({e}); reinstall rbd"
            ) from None
    return out


def _serve(asset: _Asset) -> web.Response:
    return web.Response(
        body=asset.body,
        content_type=asset.content_type,
        charset="utf-8",
        headers=SECURITY_HEADERS,
    )


def active_transfers(c: Coordinator, job_id: str) -> ActiveTransferList:
    """Transfers in flight that feed a node of job ``job_id``, oldest first.

    A transfer serves every job that needs that layer on that demander (two
    jobs can share one), so it is listed for each such job, not only the one
    whose demand started it. Raises NotFound (via ``job_view``) for an
    unknown job, with the coordinator's usual message.
    """
    c.job_view(job_id)
    job = c.jobs[job_id]
    out: list[ActiveTransferView] = []
    for t in sorted(c.scheduler.active(), key=lambda t: (t.started_at, t.transfer_id)):
        p = job.nodes.get(t.demander)
        if p is None or (t.job_id != job_id and not p.needs(t.layer)):
            continue
        done = p.partial.get(t.layer, 0)
        out.append(
            ActiveTransferView(
                transfer_id=t.transfer_id,
                layer=t.layer,
                seeder=t.seeder,
                demander=t.demander,
                reason=t.reason,
                started_at=t.started_at,
                bytes_done=done,
                bytes_total=p.sizes.get(t.layer, 0),
                # the node's last reported rate; until this transfer reports, it is another's
                rate_bps=p.rate_bps if done > 0 else 0.0,
            )
        )
    return ActiveTransferList(transfers=out)


def routes() -> list[web.RouteDef]:
    """The console's routes; ``app.create_app`` adds them. Reads the shipped files now."""
    assets = load_assets()

    async def page(request: web.Request) -> web.Response:
        return _serve(assets["index.html"])

    async def slash(request: web.Request) -> web.Response:
        raise web.HTTPPermanentRedirect("/console")

    async def asset(request: web.Request) -> web.Response:
        found = assets.get(request.match_info["name"])
        if found is None or request.match_info["name"] == "index.html":
            raise web.HTTPNotFound()
        return _serve(found)

    async def job_transfers(request: web.Request) -> web.Response:
        c = api.admin(request)
        return api.reply(request, active_transfers(c, request.match_info["id"]))

    return [
        web.get("/console", page),
        web.get("/console/", slash),
        web.get("/console/{name}", asset),
        web.get("/v1/jobs/{id}/transfers", job_transfers),
    ]
