"""``rbd-coordinator``: run the coordinator, or print one of its tokens.

Usage::

    rbd-coordinator [run] --state-dir DIR [--listen HOST:PORT] [--config FILE] ...
    rbd-coordinator show-token {join,admin,metrics} --state-dir DIR [--config FILE]
    rbd-coordinator backup DEST --state-dir DIR [--config FILE]
    rbd-coordinator restore BACKUP --state-dir DIR [--force]

Tokens live in ``<state-dir>/join-token``, ``<state-dir>/admin-token`` and
``<state-dir>/metrics-token`` (what a Prometheus server presents on
``GET /metrics``) unless ``--join-token-file``/``--admin-token-file``/
``--metrics-token-file`` say otherwise; a missing file is created (mode 0600)
with a fresh random token at start-up.

The state is a SQLite file in the state directory unless ``--state-url`` (or
``state_url`` in the config) names a PostgreSQL database. ``backup`` copies the
SQLite file while the coordinator runs (SQLite's online backup); ``restore``
puts such a copy in place, the coordinator stopped (deploy/INSTALL.md,
"Backup and restore"). A PostgreSQL state is backed up with PostgreSQL's own
tools (pg_dump).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import structlog
from aiohttp import web

from rainbowd.core.chunks import DEFAULT_CHUNK_SIZE
from rainbowd.core.lease import LEASE_S
from rainbowd.core.sched.scheduler import DEFAULT_POLICY, POLICIES
from rainbowd.lib.atomicfile import write_atomic
from rainbowd.lib.log import configure

from . import auth, config
from .core import Coordinator
from .enrollment import Tokens
from .http.app import create_app
from .http.leadership import Leadership, holder_id
from .http.role import Role
from .limits import server_options
from .state import StateError, StateStore, lease, redact
from .state import sqlite as sqlite_state
from .state.backends import open_store
from .state.sql import SqlStore

if TYPE_CHECKING:  # (the driver is loaded only by a coordinator on PostgreSQL)
    from .state.postgres import PostgresStore

log = structlog.get_logger(__name__)

#: the first arguments that name a command; anything else is ``run``'s
COMMANDS = ("run", "show-token", "backup", "restore", "-h", "--help")
#: seconds the requests in flight get to finish when a SQLite coordinator stops, before they
#: are cancelled: as long as a role switch gives them (http/leadership.py). aiohttp's default
#: is 60 s, and an agent's parked long-poll (up to core.MAX_WAIT) held a SIGTERM'd
#: coordinator for its whole wait
SHUTDOWN_GRACE_S = 1.0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML config file (flags override it)")
    p.add_argument("--state-dir", help="directory for the SQLite database and tokens")
    p.add_argument(
        "--state-url",
        help="where the state is kept: postgresql://[USER@]HOST[:PORT]/DBNAME (password in "
        "~/.pgpass or PGPASSWORD), or sqlite:///PATH; default: SQLite in the state directory",
    )
    p.add_argument("--join-token-file", help="default <state-dir>/join-token")
    p.add_argument("--admin-token-file", help="default <state-dir>/admin-token")
    p.add_argument("--metrics-token-file", help="default <state-dir>/metrics-token")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rbd-coordinator", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the coordinator (the default)")
    _common(run)
    run.add_argument("--listen", help=f"HOST:PORT to serve on (default {config.DEFAULT_LISTEN})")
    # every default below is read from the constant the code uses, never written out:
    # a literal here said "slots" long after the default had moved on
    run.add_argument(
        "--heartbeat-interval",
        type=float,
        help=f"seconds (default {config.DEFAULT_HEARTBEAT_INTERVAL:g})",
    )
    run.add_argument(
        "--chunk-size",
        type=int,
        help=f"bytes per chunk for new ingests (default {DEFAULT_CHUNK_SIZE})",
    )
    run.add_argument(
        "--policy",
        help=f"scheduling policy, one of {', '.join(POLICIES)} (default {DEFAULT_POLICY}; "
        "paper = the paper's Algorithm 1)",
    )
    run.add_argument(
        "--node-down-timeout",
        type=float,
        help="seconds a target node may be down before it fails in its jobs "
        f"(default {config.DEFAULT_NODE_DOWN_TIMEOUT:g})",
    )
    run.add_argument(
        "--seeder-fault-limit",
        type=int,
        help="transfers spoiled with bad chunks before a seeder is quarantined "
        f"(default {config.DEFAULT_SEEDER_FAULT_LIMIT})",
    )
    run.add_argument("--log-level", help="debug, info, warning, error")
    run.add_argument("--log-json", action="store_true", default=None, help="JSON log lines")
    run.add_argument("--ready-file", help="write HOST:PORT here once listening (for tests)")
    run.add_argument(
        "--coordinator-url",
        dest="advertise_url",
        help="this coordinator's URL as agents reach it (the leader row names it, standbys "
        "send clients there; default http://LISTEN)",
    )
    show = sub.add_parser("show-token", help="print the join, admin or metrics token")
    show.add_argument("which", choices=["join", "admin", "metrics"])
    _common(show)
    backup = sub.add_parser(
        "backup", help="copy the SQLite state to DEST, online (the coordinator may run)"
    )
    backup.add_argument("dest", type=Path, help="the backup file to write (replaced whole)")
    _common(backup)
    restore = sub.add_parser(
        "restore", help="put a backup in place of the SQLite state (the coordinator stopped)"
    )
    restore.add_argument("backup", type=Path, help="a file written by rbd-coordinator backup")
    restore.add_argument("--force", action="store_true", help="replace an existing state database")
    _common(restore)
    return p


def _settings(args: argparse.Namespace) -> config.CoordinatorConfig:
    file_values = config.load_file(args.config) if args.config else {}
    overrides: dict[str, Any] = {
        "state_dir": args.state_dir,
        "state_url": args.state_url,
        "join_token_file": args.join_token_file,
        "admin_token_file": args.admin_token_file,
        "metrics_token_file": args.metrics_token_file,
    }
    flags = (
        "listen",
        "heartbeat_interval",
        "chunk_size",
        "policy",
        "node_down_timeout",
        "seeder_fault_limit",
        "log_level",
        "log_json",
        "ready_file",
        "advertise_url",
    )
    for key in flags:
        overrides[key] = getattr(args, key, None)
    return config.build(file_values, overrides)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        argv.insert(0, "run")
    args = parser().parse_args(argv)
    try:
        cfg = _settings(args)
    except (config.ConfigError, ValueError) as e:
        print(f"rbd-coordinator: {e}", file=sys.stderr)
        return 2
    if args.command == "show-token":
        path = {
            "join": cfg.join_token_path,
            "admin": cfg.admin_token_path,
            "metrics": cfg.metrics_token_path,
        }[args.which]
        try:
            print(path.read_text().strip())
        except OSError as e:
            print(f"rbd-coordinator: cannot read {path}: {e.strerror}", file=sys.stderr)
            return 1
        return 0
    if args.command in ("backup", "restore"):
        return _backup_or_restore(args, cfg)
    configure(cfg.log_level, cfg.log_json)
    try:
        asyncio.run(serve(cfg))
    except (OSError, ValueError, StateError) as e:
        log.error("coordinator failed to start", error=str(e))
        return 1
    return 0


def _backup_or_restore(args: argparse.Namespace, cfg: config.CoordinatorConfig) -> int:
    """``backup DEST`` or ``restore BACKUP`` of the SQLite state; 1 with a message if refused."""
    db, db_url = cfg.sqlite_path, cfg.state_url or ""
    if db is None:
        print(
            f"rbd-coordinator: {args.command}: the state is in PostgreSQL ({redact(db_url)}); "
            "use pg_dump and pg_restore",
            file=sys.stderr,
        )
        return 2
    try:
        if args.command == "backup":
            pages = sqlite_state.backup(db, args.dest)
            print(f"backed up {db} to {args.dest} ({pages} pages)")
        else:
            sqlite_state.restore(args.backup, db, force=args.force)
            print(f"restored {args.backup} to {db}; start the coordinator")
    except StateError as e:
        print(f"rbd-coordinator: {e}", file=sys.stderr)
        return 1
    return 0


def _token(path: Path, which: str) -> str:
    token, created = auth.read_or_create_token(path)
    if created:
        log.info(f"generated a new {which} token", path=str(path))
    return token


async def serve(cfg: config.CoordinatorConfig) -> None:
    """Run until SIGTERM/SIGINT, then shut the HTTP server down and close the database.

    On SQLite the coordinator leads from the start (one file, one coordinator);
    on PostgreSQL it starts as a standby and leads while it holds the lease
    (coordinator/http/leadership.py).
    """
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    tokens = Tokens(
        join=_token(cfg.join_token_path, "join"),
        admin=_token(cfg.admin_token_path, "admin"),
        metrics=_token(cfg.metrics_token_path, "metrics"),
    )
    store = open_store(cfg.state_url, cfg.state_dir)

    def make_coordinator() -> Coordinator:
        return Coordinator(
            store,
            join_token=tokens.join,
            admin_token=tokens.admin,
            heartbeat_interval=cfg.heartbeat_interval,
            chunk_size=cfg.chunk_size,
            policy=cfg.policy,
            node_down_timeout=cfg.node_down_timeout,
            seeder_fault_limit=cfg.seeder_fault_limit,
            metrics_token=tokens.metrics,
            upstreams=cfg.upstreams,
        )

    def listening(host: str, port: int) -> None:
        log.info(
            "coordinator listening",
            listen=f"{host}:{port}",
            state_dir=str(cfg.state_dir),
            state=store.describe,
            join_token_file=str(cfg.join_token_path),
            admin_token_file=str(cfg.admin_token_path),
            metrics_token_file=str(cfg.metrics_token_path),
        )
        if cfg.ready_file:  # in one step: a watcher that sees the file reads the whole address
            write_atomic(cfg.ready_file, f"{host}:{port}\n".encode(), mode=0o644)

    try:
        if store.backend == "postgresql":
            leadership = Leadership(
                cast("PostgresStore", store),
                make_coordinator,
                tokens,
                host=cfg.host,
                port=cfg.port,
                url=cfg.advertise_url,
                on_listening=listening,
            )
            _on_signals(leadership.stop)
            await leadership.run()
            log.info("shutting down")
        else:
            await _serve_alone(cfg, store, make_coordinator(), listening)
    finally:
        store.close()


def _on_signals(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)


async def _serve_alone(
    cfg: config.CoordinatorConfig,
    store: StateStore,
    coordinator: Coordinator,
    listening: Callable[[str, int], None],
) -> None:
    """The one coordinator of a SQLite file: it always leads (its lease row says where)."""
    # handler_cancellation: a long-poll whose agent vanished (kill -9, crash,
    # cable) is cancelled at once, which is how a dead demander is noticed
    # without waiting for missed heartbeats (see app.assignments)
    # server_options: idle connections and half-sent headers are closed (limits.py)
    role = Role(leading=True)
    runner = web.AppRunner(
        create_app(coordinator, role=role),
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_GRACE_S,
        **server_options(),
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.host, cfg.port)
        await site.start()
        host, port = _bound(site, cfg)
        role.leader_url = cfg.advertise_url or f"http://{host}:{port}"
        if isinstance(store, SqlStore):
            lease.acquire(store, holder_id(), role.leader_url, LEASE_S)  # always wins
        listening(host, port)
        stop = asyncio.Event()
        _on_signals(stop.set)
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()


def _bound(site: web.TCPSite, cfg: config.CoordinatorConfig) -> tuple[str, int]:
    server = site._server  # the asyncio server knows the real port when 0 was asked
    sockets = getattr(server, "sockets", None) or []
    if sockets:
        addr = sockets[0].getsockname()
        return str(addr[0]), int(addr[1])
    return cfg.host, cfg.port


if __name__ == "__main__":
    raise SystemExit(main())
