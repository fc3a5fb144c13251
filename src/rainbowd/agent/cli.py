"""``rbd-agent``: run the agent, show a running agent's status, or set up its mirror's clients.

rbd-agent run --config /etc/rbd/agent.toml
rbd-agent status [--socket PATH | --config FILE] [--json]
rbd-agent mirror-config containerd|docker [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from rainbowd.agent.config import AgentConfig, ConfigError, load_config
from rainbowd.agent.mirror import cli as mirror_cli
from rainbowd.agent.status import AgentNotRunning, fetch_status, render_json, render_status
from rainbowd.lib import log

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
    st.add_argument(
        "--config",
        type=Path,
        help=f"read the socket path from this config (default {DEFAULT_CONFIG} if it exists, "
        "else the config of the one agent running here)",
    )
    st.add_argument("--json", action="store_true", help="machine-readable output")
    mirror_cli.add_parser(sub, DEFAULT_CONFIG)
    args = p.parse_args(argv)
    if args.cmd == "run":
        return _run(args)
    if args.cmd == "mirror-config":
        return mirror_cli.run(args)
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
    from rainbowd.agent.agent import Agent
    from rainbowd.agent.control.coordinator_link import EnrollmentRefused

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
    try:
        path, checked = _find_socket(args)
    except (ConfigError, _Ambiguous) as e:
        print(f"rbd-agent: {e}", file=sys.stderr)
        return 2
    try:
        snapshot = asyncio.run(fetch_status(path))
    except AgentNotRunning as e:
        print(f"rbd-agent: {e}", file=sys.stderr)
        print("  checked: " + "; ".join(checked), file=sys.stderr)
        if args.socket is None and args.config is None:
            print(f"  {PASS_CONFIG}", file=sys.stderr)
        return 1
    print(render_json(snapshot) if args.json else render_status(snapshot))
    return 0


PASS_CONFIG = (
    "if the agent runs with another config, pass it: rbd-agent status --config FILE "
    "(the file given to 'rbd-agent run'), or --socket PATH"
)
#: where running processes are listed (a test points it at a fake tree)
PROC = Path("/proc")


class _Ambiguous(Exception):
    """Several agents run on this host and nothing says which one is meant."""


def _find_socket(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """The status socket to ask, and what was looked at to pick it.

    --socket, else --config, else the default config when it exists, else the
    config of the one agent running here, else the default socket. The list
    says each step, so "not running" can say where it looked: an agent started
    with a config elsewhere (a local cluster, a second instance) is otherwise
    reported as not running.
    """
    if args.socket is not None:
        return args.socket, [f"--socket {args.socket}"]
    if args.config is not None:
        path = _config_socket(args.config)
        return path, [f"status_socket of {args.config}: {path}"]
    checked: list[str] = []
    try:
        path = _config_socket(DEFAULT_CONFIG)
        return path, [f"status_socket of {DEFAULT_CONFIG}: {path}"]
    except ConfigError as e:
        checked.append(str(e))
    running = _running_agent_configs()
    if len(running) > 1:
        listed = ", ".join(f"{c} (pid {pid})" for pid, c in running)
        raise _Ambiguous(
            f"{len(running)} agents run on this host and {DEFAULT_CONFIG} is not usable; "
            f"name one with --config: {listed}"
        )
    if running:
        pid, config = running[0]
        try:
            path = _config_socket(config)
            checked.append(f"status_socket of {config} (the agent running as pid {pid}): {path}")
            return path, checked
        except ConfigError as e:
            checked.append(f"the agent running as pid {pid}: {e}")
    else:
        checked.append("no 'rbd-agent run' process found on this host")
    checked.append(f"the default socket {DEFAULT_SOCKET}")
    return DEFAULT_SOCKET, checked


def _config_socket(config: Path) -> Path:
    """The status socket ``config`` names; ConfigError (saying why) if it cannot be read."""
    try:
        config.stat()
        return load_config(config).status_path
    except FileNotFoundError:
        raise ConfigError(f"no config file {config}") from None
    except PermissionError:
        raise ConfigError(
            f"cannot read {config}: permission denied (run as root or as a member of the "
            "agent's group, or pass --socket)"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read {config}: {e.strerror}") from None


def _running_agent_configs() -> list[tuple[int, Path]]:
    """(pid, config) of every ``rbd-agent run`` on this host, as far as /proc shows them.

    Best effort: a process that ends while it is read, or whose working
    directory this user may not see (for a relative --config), is left out.
    """
    found: dict[Path, int] = {}
    try:
        entries = [e for e in PROC.iterdir() if e.name.isdigit()]
    except OSError:
        return []
    for entry in sorted(entries, key=lambda e: int(e.name)):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv if a]
        if not _is_agent_run(words):
            continue
        config = DEFAULT_CONFIG
        for i, word in enumerate(words):
            if word == "--config" and i + 1 < len(words):
                config = Path(words[i + 1])
            elif word.startswith("--config="):
                config = Path(word.partition("=")[2])
        if not config.is_absolute():
            try:
                config = Path(os.readlink(entry / "cwd")) / config
            except OSError:
                continue
        found.setdefault(config, int(entry.name))
    return [(pid, config) for config, pid in found.items()]


def _is_agent_run(words: list[str]) -> bool:
    """``rbd-agent run ...``, ``python .../rbd-agent run ...`` or ``-m``/``-c`` forms."""
    for i, word in enumerate(words[:3]):
        if Path(word).name == "rbd-agent" or "rainbowd.agent.cli" in word:
            return "run" in words[i + 1 :]
    return False


if __name__ == "__main__":
    sys.exit(main())
