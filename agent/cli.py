"""``rbd-agent``: run the agent, or show a running agent's status.

rbd-agent run --config /etc/rbd/agent.toml
rbd-agent status [--socket PATH | --config FILE] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from rainbowd import log
from rainbowd.agent.config import AgentConfig, ConfigError, load_config
from rainbowd.agent.status import AgentNotRunning, fetch_status, render_json, render_status

DEFAULT_CONFIG = Path("/etc/rbd/agent.toml")
DEFAULT_SOCKET = Path("/var/lib/rbd/agent/agent.sock")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rbd-agent", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the agent (under systemd, normally)")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    run.add_argument("--log-level")
    run.add_argument("--log-json", action="store_true", default=None)
    st = sub.add_parser("status", help="show what this host's agent holds and does")
    st.add_argument("--socket", type=Path, help=f"status socket (default {DEFAULT_SOCKET})")
    st.add_argument("--config", type=Path, help="read the socket path from this config")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    if args.cmd == "run":
        return _run(args)
    return _status(args)


def _run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, {"log_level": args.log_level})
    except ConfigError as e:
        print(f"rbd-agent: {e}", file=sys.stderr)
        return 2
    log.configure(config.log_level, json=args.log_json)
    return asyncio.run(_serve(config))


async def _serve(config: AgentConfig) -> int:
    from rainbowd.agent.agent import Agent, EnrollmentRefused

    agent = Agent(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
    try:
        await agent.run()
    except EnrollmentRefused as e:
        print(f"rbd-agent: {e}", file=sys.stderr)
        return 3
    except ConfigError as e:  # e.g. a token file named by the config is unreadable
        print(f"rbd-agent: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"rbd-agent: {e}", file=sys.stderr)
        return 1
    return 0


def _status(args: argparse.Namespace) -> int:
    path = args.socket
    if path is None and args.config is not None:
        try:
            path = load_config(args.config).status_path
        except ConfigError as e:
            print(f"rbd-agent: {e}", file=sys.stderr)
            return 2
    if path is None:
        path = DEFAULT_SOCKET if not DEFAULT_CONFIG.exists() else _socket_from(DEFAULT_CONFIG)
    try:
        snapshot = asyncio.run(fetch_status(path))
    except AgentNotRunning as e:
        print(f"rbd-agent: {e}", file=sys.stderr)
        return 1
    print(render_json(snapshot) if args.json else render_status(snapshot))
    return 0


def _socket_from(config: Path) -> Path:
    try:
        return load_config(config).status_path
    except ConfigError:
        return DEFAULT_SOCKET


if __name__ == "__main__":
    sys.exit(main())
