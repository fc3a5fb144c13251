"""The agent's local status socket and the ``rbd-agent status`` client.

The agent serves ``GET /v1/status`` (JSON) on a unix socket, reachable only
by users who can open the socket file (mode 0660). ``rbd-agent status`` reads
it and prints the host's view; when nothing answers it says the agent is not
running rather than printing a traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from rainbowd.core.units import human_bytes, human_rate


class StatusServer:
    def __init__(self, path: Path, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.snapshot = snapshot
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/status", self._status)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)  # a stale socket from a crashed run
        site = web.UnixSite(self._runner, str(self.path))
        await site.start()
        os.chmod(self.path, 0o660)

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.path.unlink(missing_ok=True)


class AgentNotRunning(RuntimeError):
    pass


async def fetch_status(path: Path, timeout: float = 5.0) -> dict[str, Any]:
    """Read the status of the agent listening on ``path``."""
    try:
        present = path.exists()
    except PermissionError:
        raise AgentNotRunning(
            f"cannot look for the status socket {path}: permission denied "
            "(run as root or as the agent's user)"
        ) from None
    if not present:
        raise AgentNotRunning(
            f"rbd-agent is not running: no status socket at {path} "
            "(start it with 'systemctl start rbd-agent', or pass --socket)"
        )
    try:
        conn = aiohttp.UnixConnector(path=str(path))
        async with (
            aiohttp.ClientSession(
                connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as session,
            session.get("http://agent/v1/status") as resp,
        ):
            resp.raise_for_status()
            data: dict[str, Any] = await resp.json()
            return data
    except aiohttp.ClientConnectorError as e:
        if isinstance(e.os_error, PermissionError):
            raise AgentNotRunning(
                f"cannot open the status socket {path}: permission denied (the agent may well "
                "be running; run as root or as a member of the agent's group)"
            ) from None
        raise AgentNotRunning(
            f"rbd-agent is not running: status socket {path} does not answer ({e})"
        ) from None
    except (aiohttp.ClientConnectionError, TimeoutError) as e:
        raise AgentNotRunning(
            f"rbd-agent is not running: status socket {path} does not answer ({e})"
        ) from None


def _others(c: dict[str, Any]) -> str:
    """The line listing every configured coordinator, when there are several."""
    urls = c.get("urls") or []
    if len(urls) < 2:
        return ""
    return "\n            configured: " + ", ".join(
        f"{u} (current)" if u == c["url"] else u for u in urls
    )


def render_status(s: dict[str, Any]) -> str:
    """The human form of a status snapshot."""
    c = s["coordinator"]
    age = c.get("last_contact_age")
    conn = "connected" if c["connected"] else "NOT CONNECTED"
    lines = [
        f"node        {s['node_id']}  (pid {s['pid']}, roles: {', '.join(s['roles']) or '-'})",
        f"coordinator {c['url']}  {conn}"
        + (f", last contact {age:.1f}s ago" if age is not None else ", never contacted")
        + _others(c)
        + (f"\n            last error: {c['last_error']}" if c.get("last_error") else ""),
        f"ssh         {s['ssh']['address']}:{s['ssh']['port']}",
        f"docker      {s['docker_url'] or 'not configured'}",
        "containerd  "
        + (
            f"{s['containerd']['address']} (namespace {s['containerd']['namespace']})"
            if s.get("containerd")
            else "not configured"
        ),
        f"mirror      {s.get('mirror_url') or 'off (mirror_listen)'}",
        f"disk        {human_bytes(s['disk']['used'])} used by rbd, "
        f"{human_bytes(s['disk']['free'])} free",
        f"layers      {len(s['holdings'])} held "
        f"({human_bytes(sum(h['size'] for h in s['holdings']))})",
    ]
    for h in s["holdings"]:
        lines.append(f"  {h['digest'][:19]}  {human_bytes(h['size']):>10}")
    store = s.get("store") or {}
    if store.get("max_bytes"):
        evicted = store.get("evicted", [])
        lines.append(
            f"store limit {human_bytes(store['max_bytes'])} (evicts above "
            f"{human_bytes(store['high_bytes'])} down to {human_bytes(store['low_bytes'])}), "
            f"{len(evicted)} layer(s) evicted"
        )
    if s["partials"]:
        lines.append(f"partial     {len(s['partials'])}")
        for p in s["partials"]:
            lines.append(f"  {p['digest'][:19]}  {p['have']}/{p['count']} chunks")
    lines.append(f"images      {len(s['images'])} loaded into Docker")
    for i in s["images"]:
        lines.append(f"  {i['ref']}  (loaded {i['loaded_at']})")
    mirrored = s.get("mirror_images") or {}
    if mirrored and s.get("mirror_url"):
        # by this digest; by tag too when the coordinator resolves the tag to it
        lines.append(f"mirror      {len(mirrored)} image(s) served, each by its digest")
        for ref, digest in mirrored.items():
            lines.append(f"  {ref}  @{digest}")
    lines.append(f"transfers   {len(s['active'])} active")
    for t in s["active"]:
        pct = 100.0 * t["bytes_done"] / t["bytes_total"] if t["bytes_total"] else 100.0
        lines.append(
            f"  {t['layer'][:19]} from {t['seeder']}: {pct:5.1f}% of "
            f"{human_bytes(t['bytes_total'])} at {human_rate(t['rate_bps'])}"
        )
    served = s.get("served_bytes") or {}
    if served:
        lines.append(
            "served      "
            + ", ".join(f"{peer} {human_bytes(n)}" for peer, n in sorted(served.items()))
        )
    if s.get("refused_clients"):
        lines.append(f"security    {s['refused_clients']} client connection(s) refused")
    for e in s.get("security_events", []):
        lines.append(f"security    {e}")
    return "\n".join(lines)


def render_json(s: dict[str, Any]) -> str:
    return json.dumps(s, indent=2, sort_keys=True)
