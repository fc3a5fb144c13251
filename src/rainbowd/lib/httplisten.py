"""Start a small aiohttp server on a configured address and learn the port it got.

The agent's metrics endpoint and its registry front door both listen on an
address an operator sets (``metrics_listen``, ``mirror_listen``); a port
already taken must name that setting and say how to fix it, and port 0 must
come back as the real port so status and tests can find the server.
"""

from __future__ import annotations

from aiohttp import web


async def listen(
    app: web.Application, host: str, port: int, setting: str
) -> tuple[web.AppRunner, tuple[str, int]]:
    """Serve ``app`` on ``host:port``; return the runner (to clean up) and the bound address.

    An address that cannot be bound raises OSError naming ``setting``.
    """
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(
            e.errno,
            f"{setting} {host}:{port}: cannot listen ({e.strerror}); "
            f'choose another address or port, or set {setting} = "" to turn it off',
        ) from None
    sockets = getattr(site._server, "sockets", None) or []
    addr = sockets[0].getsockname() if sockets else (host, port)
    return runner, (str(addr[0]), int(addr[1]))
