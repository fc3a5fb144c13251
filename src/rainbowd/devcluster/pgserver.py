"""A throwaway PostgreSQL server: Debian's binaries, a cluster in a temp dir.

For the tests (tests/conftest.py: the coordinator's second state backend) and
the benchmarks (bench/coordinator_load.py ``--state postgresql``).
:class:`PostgresServer` runs ``initdb`` and ``postgres`` as the ``postgres``
user when run as root (PostgreSQL refuses root), as the current user
otherwise, listening on a free loopback port with trust authentication. It is
its starter's child (it dies with it); a fault test may shut it down and
start it again on the same data and port (:meth:`PostgresServer.shut_down`,
:meth:`PostgresServer.start_again`). The tests' server is tuned for speed,
not durability (``fsync=off``; each test gets a fresh database of its own, in
milliseconds); a benchmark's is ``durable``, as a real server would be.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from .localcluster import die_with_parent, free_port

#: the superuser initdb creates; its users connect as it
USER = "rbd"
#: the system user that runs the server when its starter is root
SYSTEM_USER = "postgres"
#: seconds the server may take to accept connections after it starts
START_TIMEOUT_S = 30.0
#: seconds a fast shutdown may take before the server is killed
STOP_TIMEOUT_S = 15.0
#: settings of every server here: loopback only, room for many connections
SERVER_SETTINGS = {"max_connections": "200", "listen_addresses": "127.0.0.1"}
#: and of a server for tests: speed over durability (a crash loses a throwaway cluster)
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries here, or the server would not start (the message says which)."""


def bindir() -> Path:
    """The newest Debian PostgreSQL's bin directory (or the one on PATH)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).resolve().parent
    raise PostgresUnavailable("PostgreSQL is not installed: apt-get install postgresql")


class PostgresServer:
    """One PostgreSQL cluster in a temp dir, for one test session or one benchmark run."""

    def __init__(self, *, durable: bool = False) -> None:
        self.bin = bindir()
        self.settings = dict(SERVER_SETTINGS) if durable else {**SERVER_SETTINGS, **FAST_SETTINGS}
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._admin: psycopg.Connection[Any] | None = None
        self._run_as: dict[str, Any] = {}
        root = os.geteuid() == 0
        # as root, under /tmp itself: the postgres user must reach it, and $TMPDIR may be
        # inside a directory only root can enter
        self.root = Path(tempfile.mkdtemp(prefix="rbd-pg-", dir="/tmp" if root else None))
        if root:
            try:
                who = pwd.getpwnam(SYSTEM_USER)
            except KeyError:
                raise PostgresUnavailable(f"no {SYSTEM_USER} user to run PostgreSQL as") from None
            os.chown(self.root, who.pw_uid, who.pw_gid)
            self._run_as = {"user": who.pw_uid, "group": who.pw_gid, "extra_groups": []}
        self.data = self.root / "data"
        self.log = self.root / "server.log"

    def url(self, database: str = "postgres", user: str = USER) -> str:
        """A libpq URL of ``database`` on this server, connecting as ``user``."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        argv = [str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "-A", "trust"]
        init = subprocess.run(
            [*argv, "--no-sync", "--no-locale", "-E", "UTF8"],
            capture_output=True,
            check=False,
            cwd=self.root,  # a working directory the postgres user may enter
            **self._run_as,
        )
        if init.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {init.stderr.decode()[-2000:]}")
        self.port = free_port()
        self._run_server()

    def _run_server(self) -> None:
        """Start ``postgres`` on :attr:`data` and :attr:`port`; return once it accepts."""
        argv = [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        argv += ["-k", str(self.root)]
        for key, value in self.settings.items():
            argv += ["-c", f"{key}={value}"]
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
                cwd=self.root,
                **self._run_as,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                self._admin = psycopg.connect(self.url(), autocommit=True, connect_timeout=2)
                return
            except psycopg.OperationalError as e:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    tail = self.log.read_text(errors="replace")[-2000:]
                    raise PostgresUnavailable(f"postgres did not start: {e}\n{tail}") from e
                time.sleep(0.05)

    def create_database(self, key: str) -> str:
        """A new empty database named after ``key`` (a test's state dir, a run's size); its URL."""
        name = "t_" + hashlib.sha256(key.encode()).hexdigest()[:24]
        assert self._admin is not None
        # FILE_COPY (PostgreSQL 15+): with fsync off, a third of the default's time
        strategy = " STRATEGY = FILE_COPY" if self._admin.info.server_version >= 150000 else ""
        self._admin.execute(f'CREATE DATABASE "{name}"{strategy}')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop the database of ``url``, closing whatever still uses it."""
        assert self._admin is not None
        name = url.rsplit("/", 1)[1]
        self._admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def shut_down(self) -> None:
        """Stop the server, keeping its data: every client's connection breaks (a fault test).

        :meth:`start_again` brings the same cluster back on the same port.
        """
        if self._admin is not None:
            with contextlib.suppress(psycopg.Error):
                self._admin.close()
            self._admin = None
        if self._proc is not None and self._proc.poll() is None:
            # SIGINT: "fast" shutdown (SIGTERM's "smart" one waits for every client to leave)
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def start_again(self) -> None:
        """After :meth:`shut_down`: the same data directory served again on the same port."""
        if self._proc is not None:
            raise RuntimeError("the server is running: shut_down() first")
        self._run_server()

    def stop(self) -> None:
        """Stop the server for good and delete its cluster."""
        self.shut_down()
        shutil.rmtree(self.root, ignore_errors=True)
