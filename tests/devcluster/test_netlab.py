"""NetLab builds real namespaces: reachability, partition, and that nothing is left behind.

Needs root and iproute2; without them the tests skip (and fail under CI=true).
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from rainbowd.devcluster.netlab import (
    GSO_MAX_BYTES,
    HUB,
    SMALL_PACKET_BYTES,
    NetLab,
    NetLabError,
    Shape,
    clean,
    clean_stale,
    length_blocks_below,
    list_netns,
)
from testdeps import missing_dependency
from waiting import wait_until_sync

#: an asyncio echo server: prints "ready" once listening, echoes one line per connection
ECHO_SERVER = r"""
import asyncio, sys
async def echo(r, w):
    w.write(await r.readline()); await w.drain(); w.close()
async def main():
    s = await asyncio.start_server(echo, sys.argv[1], int(sys.argv[2]))
    print("ready", flush=True)
    await s.serve_forever()
asyncio.run(main())
"""

#: connect, send one line, print the echo; exit 1 on timeout or refusal
ECHO_CLIENT = r"""
import asyncio, sys
async def main():
    r, w = await asyncio.open_connection(sys.argv[1], int(sys.argv[2]))
    w.write(b"ping\n"); await w.drain()
    print((await r.readline()).decode().strip())
try:
    asyncio.run(asyncio.wait_for(main(), float(sys.argv[3])))
except (OSError, asyncio.TimeoutError) as e:
    sys.exit(f"no echo: {e!r}")
"""

PORT = 9009


@pytest.fixture(autouse=True)
def _needs_lab() -> None:
    reason = NetLab.prerequisites_missing()
    if reason:
        missing_dependency(reason)


@pytest.fixture
def lab() -> Iterator[NetLab]:
    with NetLab(["a", "b"], shapes={"a": Shape(up_mbit=50, down_mbit=20)}) as lab:
        yield lab
    assert not [ns for ns in list_netns() if ns.startswith(lab.prefix)]


def _echo(
    lab: NetLab, node: str, host: str, timeout: float = 2.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*lab.exec_prefix(node), sys.executable, "-c", ECHO_CLIENT, host, str(PORT), str(timeout)],
        capture_output=True,
        text=True,
        timeout=timeout + 10,
    )


@pytest.fixture
def echo_in_b(lab: NetLab) -> Iterator[str]:
    """An echo server in b, on b's address; stopped by PID afterwards."""
    addr = lab.address("b")
    server = subprocess.Popen(
        [*lab.exec_prefix("b"), sys.executable, "-c", ECHO_SERVER, addr, str(PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        yield addr
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_up_and_down_leave_nothing_behind() -> None:
    links_before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    lab = NetLab(["a", "b", "c"])
    lab.up()
    mine = {ns for ns in list_netns() if ns.startswith(lab.prefix)}
    assert mine == {lab.hub_netns} | {lab.netns(n) for n in "abc"}
    # nothing in the host namespace: every interface lives inside the lab
    links_during = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert len(links_during.splitlines()) == len(links_before.splitlines())
    lab.down()
    lab.down()  # idempotent
    assert not [ns for ns in list_netns() if ns.startswith(lab.prefix)]


def test_a_failed_build_tears_down_what_it_built() -> None:
    lab = NetLab(["a", "b"])
    lab.nodes["b"] = dataclasses.replace(lab.nodes["b"], netns=lab.nodes["a"].netns)
    with pytest.raises(NetLabError):
        lab.up()  # b's namespace name collides with a's
    assert not [ns for ns in list_netns() if ns.startswith(lab.prefix)]


def test_nodes_reach_each_other_over_tcp_until_the_link_is_cut(lab: NetLab, echo_in_b: str) -> None:
    r = _echo(lab, "a", echo_in_b)
    assert r.stdout.strip() == "ping", r.stderr
    assert _echo(lab, HUB, echo_in_b).stdout.strip() == "ping"

    lab.link_down("b")
    r = _echo(lab, "a", echo_in_b, timeout=1.5)
    assert r.returncode != 0 and "no echo" in r.stderr

    lab.link_up("b")
    r = _echo(lab, "a", echo_in_b, timeout=5)
    assert r.stdout.strip() == "ping", r.stderr


def test_forward_reaches_a_service_inside_the_lab_from_the_host(
    lab: NetLab, echo_in_b: str
) -> None:
    port = lab.forward("b", PORT)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"hello\n")
        assert s.makefile().readline().strip() == "hello"


def test_shaping_is_installed_on_both_directions(lab: NetLab) -> None:
    assert "rate 50Mbit" in lab.run("a", ["tc", "qdisc", "show", "dev", "eth0"])
    # download: eth0's ingress is redirected to ifb0, whose egress is shaped
    assert "ingress" in lab.run("a", ["tc", "qdisc", "show", "dev", "eth0"])
    assert "ifb0" in lab.run("a", ["tc", "filter", "show", "dev", "eth0", "parent", "ffff:"])
    assert "rate 20Mbit" in lab.run("a", ["tc", "qdisc", "show", "dev", "ifb0"])
    assert "ifb0" not in lab.run("b", ["ip", "-o", "link"])  # b is unshaped


#: argv: role (recv|send) host port nbytes. recv prints seconds from first to last byte.
THROUGHPUT = r"""
import socket, sys, time
role, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if role == "recv":
    srv = socket.create_server((host, port))
    print("ready", flush=True)
    c, _ = srv.accept()
    got, first = 0, None
    while got < n:
        data = c.recv(1 << 16)
        if not data:
            break
        first = first or time.monotonic()
        got += len(data)
    print(got, time.monotonic() - first, flush=True)
else:
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"x" * n)
"""


def _measured_mbit(lab: NetLab, sender: str, receiver: str, nbytes: int) -> float:
    addr = lab.address(receiver)
    argv = [sys.executable, "-c", THROUGHPUT]
    recv = subprocess.Popen(
        [*lab.exec_prefix(receiver), *argv, "recv", addr, str(PORT), str(nbytes)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert recv.stdout is not None
        assert recv.stdout.readline().strip() == "ready"
        subprocess.run(
            [*lab.exec_prefix(sender), *argv, "send", addr, str(PORT), str(nbytes)],
            check=True,
            timeout=30,
        )
        got, seconds = recv.stdout.readline().split()
    finally:
        recv.kill()
        recv.wait(timeout=10)
    assert int(got) == nbytes
    return nbytes * 8 / float(seconds) / 1e6


def test_shaped_links_carry_no_more_than_their_rate(lab: NetLab) -> None:
    """a: upload 50, download 20 Mbit/s; the bytes really are held to that (tbf burst aside)."""
    n = 1_500_000
    assert _measured_mbit(lab, "b", "a", n) < 20 * 1.15  # a's download (ifb)
    assert _measured_mbit(lab, "a", "b", n) < 50 * 1.15  # a's upload
    # and an unshaped pair is not held back: the limits above are the shaping, not the lab
    with NetLab(["c", "d"]) as free:
        assert _measured_mbit(free, "c", "d", 20_000_000) > 200


def test_clean_removes_leftovers_of_a_crashed_run() -> None:
    lab = NetLab(["a", "b"])
    lab.up()  # and never down(): as if the run had crashed
    removed = clean(lab.prefix + "-")
    assert set(removed) == {lab.hub_netns, lab.netns("a"), lab.netns("b")}
    assert not [ns for ns in list_netns() if ns.startswith(lab.prefix)]
    with pytest.raises(ValueError):
        clean("")


def test_unknown_nodes_and_reserved_names_are_refused(lab: NetLab) -> None:
    with pytest.raises(NetLabError, match="no node 'zz'"):
        lab.link_down("zz")
    with pytest.raises(ValueError):
        NetLab(["hub"])
    with pytest.raises(ValueError):
        NetLab(["a"], shapes={"b": Shape(up_mbit=1)})


def netns_pids(ns: str) -> list[str]:
    return subprocess.run(
        ["ip", "netns", "pids", ns], capture_output=True, text=True, check=False
    ).stdout.split()


def test_clean_stale_removes_labs_of_dead_processes_only(lab: NetLab) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = NetLab(["a"], prefix=f"rbd{dead.pid}-0")
    orphan.up()
    left_running = subprocess.Popen([*orphan.exec_prefix("a"), "sleep", "120"])
    try:
        # `ip netns exec` enters the namespace before it execs: until then clean_stale
        # cannot see the process there (a loaded host lost this race once)
        wait_until_sync(
            lambda: str(left_running.pid) in netns_pids(orphan.netns("a")),
            timeout=10,
            what="the orphan's process to enter its namespace",
        )
        removed = clean_stale()
        assert set(removed) == {orphan.hub_netns, orphan.netns("a")}
        # what the dead run left running in its lab is killed, not orphaned
        assert left_running.wait(timeout=10) == -9
        # the live lab (this process) is untouched
        assert {lab.hub_netns, lab.netns("a"), lab.netns("b")} <= set(list_netns())
    finally:
        left_running.kill()
        left_running.wait()
        orphan.down()


#: argv: host port count. Echo ``count`` times over fresh connections; print each RTT (s).
RTTS = r"""
import socket, sys, time
host, port, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for _ in range(count):
    t = time.monotonic()
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"p" * size + b"\n")
        s.makefile().readline()
    print(time.monotonic() - t, flush=True)
    time.sleep(0.05)
"""


def test_length_blocks_cover_exactly_the_range_below_the_limit() -> None:
    for limit in (1, 2, 1024, SMALL_PACKET_BYTES, 1500, 65535, 65536):
        blocks = length_blocks_below(limit)
        chosen = [x for x in range(0x10000) if any(x & m == v for v, m in blocks)]
        assert chosen == list(range(limit)), limit
    with pytest.raises(ValueError, match=r"1 \.\. 65536"):
        length_blocks_below(0)


def test_nodes_send_one_frame_segments() -> None:
    with NetLab(["a"], shapes={"a": Shape(up_mbit=4, down_mbit=4)}) as lab:
        assert f"gso_max_size {GSO_MAX_BYTES} " in lab.run(
            "a", ["ip", "-d", "link", "show", "eth0"]
        )


def test_control_ports_and_small_packets_are_served_first_on_a_saturated_link() -> None:
    """What fq_codel gives a small or sparse flow on a real host (netlab, "Control
    traffic", "Sparse flows"): a round trip of small packets, on any port, and a control
    port's round trip of any size do not queue behind a bulk flow filling the link; a
    reply of full-size segments to another port does."""
    control, other, bulk = PORT, PORT + 1, PORT + 2
    shapes = {"a": Shape(up_mbit=4, down_mbit=4)}
    with NetLab(["a", "b"], shapes=shapes, control_ports=(control,)) as lab:
        addr_a, addr_b = lab.address("a"), lab.address("b")
        procs = [
            subprocess.Popen(
                [*lab.exec_prefix("b"), sys.executable, "-c", ECHO_SERVER, addr_b, str(p)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for p in (control, other)
        ]
        argv = [sys.executable, "-c", THROUGHPUT]
        n = 4_000_000  # 8 s at 4 Mbit/s: a's download is full while the RTTs are taken
        recv = subprocess.Popen(
            [*lab.exec_prefix("a"), *argv, "recv", addr_a, str(bulk), str(n)],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(recv)
        try:
            for p in procs:
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            send = subprocess.Popen(
                [*lab.exec_prefix("b"), *argv, "send", addr_a, str(bulk), str(n)]
            )
            procs.append(send)

            def rtts(port: int, size: int) -> list[float]:
                argv = [sys.executable, "-c", RTTS, addr_b, str(port), "8", str(size)]
                out = subprocess.run(
                    [*lab.exec_prefix("a"), *argv],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=True,
                ).stdout
                return sorted(float(x) for x in out.split())

            time.sleep(1.0)  # the bulk flow fills the queue
            big = 6000  # the echo comes back as full-size segments
            slow, fast = rtts(other, big), rtts(control, big)
            small = rtts(other, 4)
            assert send.poll() is None, "the bulk flow ended before the measurement"
        finally:
            for p in procs:
                p.kill()
                p.wait(timeout=10)
    # measured (session 9): a 6,000-byte echo to another port shares the bulk class with
    # the flow filling the link (~49 ms, median); to a control port it goes first (~20 ms,
    # its own time on a 4 Mbit/s link); a 4-byte echo goes first on any port (~1 ms).
    # (Before one-frame segments and the small-packet class, a round trip behind the bulk
    # flow took 330 ms, up to 0.9 s.)
    med_slow, med_fast, med_small = (x[len(x) // 2] for x in (slow, fast, small))
    assert med_fast < med_slow / 1.5, (fast, slow)
    assert med_small < med_slow / 5, (small, slow)
