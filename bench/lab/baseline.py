"""What the two baselines (registry pulls, BitTorrent swarm) share in the lab.

The test process lives in the host's network namespace and cannot reach a
service listening on a lab node's bridge address. Readiness checks, tracker
scrapes and aria2's RPC are therefore made by a tiny Python client run *inside*
the node (``ip netns exec``), one request per process, each with its own
timeout; nothing is left running (unlike a port forwarder, which would live
until the lab goes down).

Also here: the timed wait for a set of client processes (one per demander),
whose exit code is the completion signal for the registry baseline and the
failure signal for both.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tarfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from bench.lab.env import LabEnv
from bench.lab.result import SystemResult

#: the lab has no proxy; an inherited http_proxy would send node-local requests astray
NO_PROXY_ENV = {"no_proxy": "*", "NO_PROXY": "*"}

#: argv: url timeout method. Prints the HTTP status on the first line, then the body.
#: Exit 3 when no HTTP answer came (refused, timed out): "not up yet".
_HTTP_CLIENT = r"""
import sys, urllib.error, urllib.request
url, timeout, method = sys.argv[1], float(sys.argv[2]), sys.argv[3]
data = sys.stdin.buffer.read() if method == "POST" else None
headers = {"Content-Type": "application/json"} if data is not None else {}
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(urllib.request.Request(url, data=data, headers=headers), timeout=timeout) as r:
        code, body = r.status, r.read()
except urllib.error.HTTPError as e:
    code, body = e.code, e.read()
except OSError as e:
    sys.stderr.write(f"{url}: {e}\n")
    sys.exit(3)
sys.stdout.buffer.write(f"{code}\n".encode() + body)
"""


class LabSetupError(RuntimeError):
    """An untimed set-up step (a server, a push, a seeder) failed; says which and why."""


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: bytes


async def node_http(
    env: LabEnv, node: str, url: str, *, data: bytes | None = None, timeout: float = 5.0
) -> HttpReply | None:
    """One HTTP request made from inside ``node``; None if no HTTP answer came in ``timeout``."""
    method = "POST" if data is not None else "GET"
    proc = await asyncio.create_subprocess_exec(
        *env.lab.exec_prefix(node),
        sys.executable,
        "-I",
        "-S",
        "-c",
        _HTTP_CLIENT,
        url,
        str(timeout),
        method,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        # the client's own timeout bounds the request; this bounds interpreter start-up too
        out, _ = await asyncio.wait_for(proc.communicate(data or b""), timeout + 10.0)
    except BaseException:  # a timeout or a cancellation: the client must not outlive us
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        return None
    head, _, body = out.partition(b"\n")
    return HttpReply(int(head), body)


async def wait_until_answers(
    env: LabEnv,
    node: str,
    url: str,
    *,
    what: str,
    log_name: str,
    process: subprocess.Popen[bytes] | None,
    ok: Callable[[HttpReply], bool] = lambda _r: True,
    timeout: float = 15.0,
) -> HttpReply:
    """Poll ``url`` from inside ``node`` until ``ok(reply)``; LabSetupError after ``timeout``.

    ``process`` is the server being waited for: if it exits, waiting on is
    pointless and the error carries its exit code and its last log lines.
    """
    deadline = time.monotonic() + timeout
    last: HttpReply | None = None
    while True:
        if process is not None and process.poll() is not None:
            raise LabSetupError(
                f"{what} on {node} exited with {process.returncode} before it answered "
                f"{url}:\n{env.log_tail(log_name)}"
            )
        left = deadline - time.monotonic()
        if left <= 0:
            seen = f"last answer HTTP {last.status}" if last else "no answer"
            raise LabSetupError(
                f"{what} on {node} not ready after {timeout:.0f} s ({seen} from {url}):\n"
                f"{env.log_tail(log_name)}"
            )
        last = await node_http(env, node, url, timeout=min(2.0, max(0.2, left)))
        if last is not None and ok(last):
            return last
        await asyncio.sleep(0.1)


def tool_version(argv: list[str], *, timeout: float = 10.0) -> str:
    """First line of ``argv``'s output (``skopeo --version``...), or why there is none."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    text = (r.stdout or r.stderr).strip()
    return text.splitlines()[0] if text else f"unknown (exit {r.returncode})"


def client_failure(env: LabEnv, node: str, log_name: str, what: str, *, lines: int = 8) -> str:
    """A failure reason naming the node, what happened and the client's last log lines."""
    kept = [ln for ln in env.log_tail(log_name, lines * 4).splitlines() if ln.strip()]
    tail = "\n".join(kept[-lines:])
    return f"{node}: {what}" + (f"; last log lines:\n{tail}" if tail else "; its log is empty")


async def wait_clients(
    env: LabEnv,
    clients: Mapping[str, tuple[subprocess.Popen[bytes], str]],
    *,
    start: float,
    timeout: float,
    check: Callable[[str], float | str | None],
    exit_means_done: bool,
    progress: Callable[[str], str] | None = None,
    poll: float = 0.02,
) -> tuple[dict[str, float], dict[str, str]]:
    """Watch one client process per node until every node is done, failed, or ``timeout``.

    ``clients`` maps node -> (process, log name). ``check(node)`` returns the
    node's completion time (seconds since ``start``, a ``time.monotonic()``)
    once it has one, a failure reason once it cannot get there (a digest that
    did not match), else None. With ``exit_means_done`` a client exiting 0
    is the completion itself (timed here, to ``poll``); otherwise a client
    that exits at all has failed (it was meant to keep seeding). A node still
    going at the timeout is failed with ``progress(node)`` (how far it got) if
    given. Returns (node_seconds, failed).
    """
    seconds: dict[str, float] = {}
    failed: dict[str, str] = {}
    pending = dict(clients)
    deadline = start + timeout
    while pending:
        now = time.monotonic()
        for node, (proc, log_name) in list(pending.items()):
            t = check(node)
            rc = proc.poll()
            if isinstance(t, str):
                failed[node] = client_failure(env, node, log_name, t)
            elif t is not None:
                seconds[node] = t
            elif rc == 0 and exit_means_done:
                seconds[node] = now - start
            elif rc is not None:
                failed[node] = client_failure(env, node, log_name, f"client exited with {rc}")
            elif now >= deadline:
                got = f" ({progress(node)})" if progress else ""
                failed[node] = client_failure(
                    env, node, log_name, f"not complete after the {timeout:g} s timeout{got}"
                )
            else:
                continue
            del pending[node]
        if pending:
            await asyncio.sleep(poll)
    return seconds, failed


async def run_to_end(
    env: LabEnv,
    node: str,
    log_name: str,
    argv: list[str],
    *,
    what: str,
    timeout: float,
    extra_env: Mapping[str, str] | None = None,
) -> None:
    """Run a set-up command inside ``node`` to its end; LabSetupError unless it exits 0.

    It goes through :meth:`LabEnv.spawn` (logged, owned by the lab, stopped
    with everything else), so an interrupted set-up leaves nothing behind.
    """
    proc = env.spawn(node, log_name, argv, env={**NO_PROXY_ENV, **(extra_env or {})})
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() >= deadline:
            raise LabSetupError(
                f"{what} on {node} did not finish in {timeout:.0f} s:\n{env.log_tail(log_name)}"
            )
        await asyncio.sleep(0.05)
    if proc.returncode != 0:
        raise LabSetupError(
            f"{what} on {node} exited with {proc.returncode}:\n{env.log_tail(log_name)}"
        )


def archive_ref(archive: Path, default: str = "rbd-demo:latest") -> str:
    """The first ``RepoTags`` entry of a docker-archive (what the baselines push and pull)."""
    with tarfile.open(archive) as tf:
        f = tf.extractfile("manifest.json")
        if f is None:
            raise LabSetupError(f"{archive}: no manifest.json (not a docker-archive)")
        tags = json.load(f)[0].get("RepoTags") or []
    return str(tags[0]) if tags else default


def first_line(e: BaseException) -> str:
    """The set-up error's first line, for per-node reasons (the whole text goes to the notes)."""
    text = str(e).strip()
    return f"set-up failed: {text.splitlines()[0] if text else type(e).__name__} (see setup_error)"


async def run_baseline(
    name: str,
    env: LabEnv,
    timeout: float,
    body: Callable[[LabEnv, float, SystemResult], Awaitable[None]],
) -> SystemResult:
    """Run a baseline's ``body``; a set-up failure fails every demander with its first line.

    Whatever happens, everything the baseline started in the lab is stopped
    before the result is returned.
    """
    result = SystemResult(name)
    try:
        await body(env, timeout, result)
    except LabSetupError as e:
        result.notes["setup_error"] = str(e)
        for node in env.demanders:
            result.failed.setdefault(node, f"{node}: not started: {first_line(e)}")
    finally:
        env.stop_processes()
    return result
