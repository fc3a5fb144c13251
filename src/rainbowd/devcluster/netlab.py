"""NetLab: several "hosts" on one Linux machine, as network namespaces on a bridge.

Why: loopback cannot be cut, shaped or partitioned per node, so fault and
bandwidth tests need each agent on its own network stack. NetLab gives every
node a namespace with one veth into a bridge; cutting a node off is setting
its bridge port down (a real partition: packets vanish, no RST, no error --
exactly what a pulled cable or a dead switch port looks like to TCP).

Layout (nothing is created in the host's own network namespace)::

    <prefix>-hub   bridge "br0" with <subnet>.1, one port "v<i>" per node
    <prefix>-n<i>  "eth0" with <subnet>.<10+i>, the peer of the hub's "v<i>"

The hub namespace also hosts whatever every node must reach (the
coordinator): it is on the bridge with the first address. The test process
stays in the host namespace; it reaches a TCP service inside the lab through
:meth:`NetLab.forward`, a tiny port forwarder whose listening socket is on the
host's 127.0.0.1 but whose outgoing connections are made from inside the
lab (it binds, then ``setns``-es into the lab). Unix sockets on the shared
file system (the agents' status sockets) work across namespaces as they are.

Names carry a per-run prefix ``rbd<pid>-<seq>`` so parallel runs never
collide; :func:`clean` removes what a crashed run left (``clean_stale`` does
it for every lab whose creating process is gone). Addresses may repeat across
labs: each lab's subnet lives only inside its own namespaces.

Shaping, all inside the node's own namespace as on a real host: ``up_mbit``
is a ``tbf`` on ``eth0`` (egress: its upload); ``down_mbit`` redirects
``eth0``'s ingress to an ``ifb0`` device with a ``mirred`` action and puts a
``tbf`` on ``ifb0``'s egress (its download). Traffic a node sends to itself
never crosses ``eth0`` and is not shaped. ``netem`` is absent from the target
kernel: latency and loss must be injected in user space.

Control traffic (``control_ports``): a real Debian host schedules its queue
with ``fq_codel`` (systemd's default qdisc), so a heartbeat is not stuck
behind bulk flows on a saturated link. This kernel has no flow-fair qdisc
(no fq_codel, fq, sfq or prio), and behind tbf's plain FIFO a full link drops
a small flow's packets until TCP's backoff delays it by seconds: in a paper
profile run, live agents missed three 1 s heartbeats and were marked down.
So under each tbf an ``htb`` puts TCP traffic to or from a control port
(the coordinator's, a tracker's) in a class served first, everything else in
the bulk class. That restores what fq_codel gives a small flow; bulk flows
still share the link first come, first served.

Sparse flows and packet sizes: fq_codel also serves a *sparse* flow's packets
(a SYN, an ACK, a request, a handshake message) before the queued packets of
bulk flows, on every port. The lab emulates that with a packet's size: an IP
packet shorter than :data:`SMALL_PACKET_BYTES` joins the first-served class
too, while a bulk flow's full-size segments queue in the bulk class. And each
node's ``eth0`` hands its qdisc segments of at most :data:`GSO_MAX_BYTES`:
with the default 64 KiB GSO super-packets, one of them holds a 1 Mbit/s link
for half a second, a delay a real host's 1 Gbit/s link spends in half a
millisecond -- the lab scales rates down, and its queueing has to scale with
them. Measured through a saturated 1 Mbit/s upload (session 9; connect and
first byte back, 20 tries): default median 686 ms, p90 2.5 s, max 4.1 s;
16 KiB segments and small packets first: 1 ms, 1 ms, ~1.1 s (one try in
twenty waits for a segment in service); one-frame segments and small packets
first 1 / 1 / 248 ms, but then the host spent 39 % of its CPU in softirq (a
paper-profile BitTorrent run took 61 s against 42 s the session before, with
other work on the host too), so 16 KiB it is. Without
these a system that opens many short connections (rbd's piece transfers) paid
seconds per transfer where no real cluster of the profile's shape would.

Neighbour table: the kernel's ARP cache is one table for all namespaces, and
its limits (``net.ipv4.neigh.default.gc_thresh1..3``, settable only from the
host's namespace; 128/512/1024 by default) cap the entries of every namespace
together. A lab of n nodes where every node talks to every other needs about
(n+1)^2 entries: a 100-node lab with swarm's many seeders per node
overflowed it ("neighbor table overflow!" in dmesg), and connects failed with
EHOSTUNREACH or timed out. :meth:`NetLab.up` raises the limits to fit the lab
(never lowers them, and leaves them raised: another lab may be running).

Needs root and iproute2 (``ip``, ``tc``); :meth:`NetLab.check_prerequisites`
says what is missing.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

#: the name of the hub in :meth:`NetLab.exec_prefix` / :meth:`NetLab.address`
HUB = "hub"

_seq = itertools.count()
#: IP packets shorter than this (bytes) are served first, like a sparse flow under
#: fq_codel (module docstring, "Sparse flows"): everything but a full-size segment,
#: which is 1500 on the lab's 1500-byte MTU; an SSH key exchange message with
#: mlkem768x25519 is ~1,300
SMALL_PACKET_BYTES = 1408
#: the largest segment a node's eth0 hands its qdisc (module docstring, "Sparse
#: flows"): 16 KiB holds a 4 Mbit/s link 33 ms; one frame (1514) cost the host's CPU
#: 39 % in softirq, the default 64 KiB holds a 1 Mbit/s link half a second
GSO_MAX_BYTES = 16384
#: the host's ARP cache limits (module docstring, "Neighbour table")
NEIGH_SYSCTL = Path("/proc/sys/net/ipv4/neigh/default")
#: headroom over (nodes + hub)^2 entries: a node may also hold an entry being resolved
NEIGH_HEADROOM = 2
_LAB_NS = re.compile(r"^rbd(\d+)-\d+-(?:hub|n\d+)$")


class NetLabError(RuntimeError):
    """The lab cannot be built or used; the message says which command failed and why."""


@dataclass(frozen=True)
class Shape:
    """Bandwidth of one node in Mbit/s (0 = unshaped)."""

    up_mbit: float = 0.0
    down_mbit: float = 0.0


@dataclass(frozen=True)
class LabNode:
    name: str
    index: int
    netns: str
    address: str
    hub_if: str  # the node's port on the bridge, inside the hub namespace


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise NetLabError("'ip' not found: apt-get install iproute2") from None
    if check and r.returncode != 0:
        raise NetLabError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r


def list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def clean(prefix: str) -> list[str]:
    """Delete every namespace (and host-side link) whose name starts with ``prefix``.

    For leftovers of a crashed run: deleting a namespace removes its veths and
    its bridge with it. Processes still running inside a deleted namespace are
    *not* killed (only their starter may end them, by PID); the namespace then
    lives on anonymously until they exit. Returns the namespaces removed.

    For one lab pass ``lab.prefix + "-"`` (``rbd1-1`` is also a prefix of
    ``rbd1-12``); a bare ``"rbd"`` would also hit labs of parallel runs --
    :func:`clean_stale` is the safe sweep.
    """
    if not prefix:
        raise ValueError("clean() needs a non-empty prefix")
    removed = []
    for ns in list_netns():
        if ns.startswith(prefix):
            _ip("netns", "del", ns, check=False)
            removed.append(ns)
    for line in _ip("-o", "link", "show").stdout.splitlines():
        parts = line.split(": ")
        if len(parts) > 1:
            name = parts[1].split("@")[0]
            if name.startswith(prefix):
                _ip("link", "del", name, check=False)
    return removed


def clean_stale() -> list[str]:
    """Remove the labs of every process that no longer exists (crashed runs).

    Whatever still runs inside such a lab is killed first (by PID, from
    ``ip netns pids``): its owner is gone, and a namespace with a process in
    it would outlive its deletion. Labs of live processes are left alone.
    """
    removed = []
    for ns in list_netns():
        m = _LAB_NS.match(ns)
        if m and not _alive(int(m.group(1))):
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)
            removed.append(ns)
    return removed


def length_blocks_below(limit: int) -> list[tuple[int, int]]:
    """(value, mask) pairs of 16-bit ``u32`` matches that together select 0 <= x < ``limit``.

    ``u32`` compares masked bits, not ranges, so the range is cut into aligned
    power-of-two blocks: 1408 = 1024 + 256 + 128 gives [0, 1024) as
    ``x & 0xfc00 == 0``, [1024, 1280) as ``x & 0xff00 == 0x0400`` and
    [1280, 1408) as ``x & 0xff80 == 0x0500``.
    """
    if not 0 < limit <= 0x10000:
        raise ValueError(f"limit {limit}: must be in 1 .. 65536")
    blocks: list[tuple[int, int]] = []
    start = 0
    for bit in range(16, -1, -1):
        size = 1 << bit
        if start + size <= limit:
            blocks.append((start, 0xFFFF & ~(size - 1)))
            start += size
    return blocks


def neighbour_limits(nodes: int) -> dict[str, int]:
    """The ARP cache limits a lab of ``nodes`` needs, all talking to all (with the hub).

    gc_thresh2 (over it, stale entries are collected) fits every pair once;
    gc_thresh3 (the hard cap: over it, a new neighbour is refused) NEIGH_HEADROOM times
    that; gc_thresh1 (under it nothing is collected) stays the kernel's.
    """
    pairs = (nodes + 1) ** 2
    return {"gc_thresh2": pairs, "gc_thresh3": NEIGH_HEADROOM * pairs}


def raise_neighbour_limits(nodes: int, sysctl: Path = NEIGH_SYSCTL) -> dict[str, int]:
    """Raise the host's ARP cache limits to fit ``nodes``; never lower them.

    Returns what was changed (name -> new value). A missing or unwritable
    sysctl (no /proc/sys, a kernel without it) is left alone: the lab still
    builds, and a large one may then see "neighbor table overflow!".
    """
    changed: dict[str, int] = {}
    for name, need in neighbour_limits(nodes).items():
        path = sysctl / name
        try:
            if int(path.read_text().split()[0]) < need:
                path.write_text(f"{need}\n")
                changed[name] = need
        except (OSError, ValueError, IndexError):
            continue
    return changed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NetLab:
    """A bridge in a hub namespace and one namespace per node; use as a context manager.

    ``with NetLab(["origin", "n1"], shapes={"n1": Shape(up_mbit=50)}) as lab:``
    builds everything on entry and removes everything on exit, also when the
    body or the build itself raised.
    """

    def __init__(
        self,
        nodes: Sequence[str],
        *,
        subnet: str = "10.77.0",
        prefix: str = "",
        shapes: Mapping[str, Shape] | None = None,
        control_ports: Sequence[int] = (),
    ) -> None:
        if HUB in nodes or len(set(nodes)) != len(nodes):
            raise ValueError(f"node names must be unique and not {HUB!r}: {list(nodes)}")
        if len(nodes) > 200:
            raise ValueError("at most 200 nodes fit the /24")
        self.prefix = prefix or f"rbd{os.getpid()}-{next(_seq)}"
        self.subnet = subnet
        self.hub_netns = f"{self.prefix}-hub"
        self.nodes = {
            name: LabNode(name, i, f"{self.prefix}-n{i}", f"{subnet}.{10 + i}", f"v{i}")
            for i, name in enumerate(nodes)
        }
        self.shapes = dict(shapes or {})
        self.control_ports = tuple(control_ports)
        unknown = set(self.shapes) - set(self.nodes)
        if unknown:
            raise ValueError(f"shapes for unknown nodes: {sorted(unknown)}")
        self._forwarders: list[subprocess.Popen[bytes]] = []
        self._is_up = False

    # -- prerequisites -----------------------------------------------------
    @staticmethod
    def prerequisites_missing() -> str:
        """Why a lab cannot be built here ("" = it can)."""
        if os.geteuid() != 0:
            return "NetLab needs root (network namespaces, veths, bridges)"
        for tool, pkg in (("ip", "iproute2"), ("tc", "iproute2")):
            if shutil.which(tool) is None:
                return f"'{tool}' not found: apt-get install {pkg}"
        return ""

    @classmethod
    def check_prerequisites(cls) -> None:
        reason = cls.prerequisites_missing()
        if reason:
            raise NetLabError(reason)

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> NetLab:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def up(self) -> None:
        """Build the hub, the bridge and every node; on any failure tear down what was built."""
        self.check_prerequisites()
        raise_neighbour_limits(len(self.nodes))
        self._is_up = True
        try:
            hub = self.hub_netns
            _ip("netns", "add", hub)
            _ip("-n", hub, "link", "set", "lo", "up")
            _ip("-n", hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", hub, "addr", "add", f"{self.address(HUB)}/24", "dev", "br0")
            _ip("-n", hub, "link", "set", "br0", "up")
            for node in self.nodes.values():
                self._add_node(node)
        except BaseException:
            self.down()
            raise

    def _add_node(self, node: LabNode) -> None:
        hub, ns = self.hub_netns, node.netns
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        # created inside the hub, the peer moved straight into the node: no
        # interface ever appears in the host's namespace
        _ip("-n", hub, "link", "add", node.hub_if, "type", "veth", "peer", "name", "eth0",
            "netns", ns)  # fmt: skip
        _ip("-n", hub, "link", "set", node.hub_if, "master", "br0")
        _ip("-n", hub, "link", "set", node.hub_if, "up")
        _ip("-n", ns, "addr", "add", f"{node.address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "gso_max_size", str(GSO_MAX_BYTES))
        _ip("-n", ns, "link", "set", "eth0", "up")
        shape = self.shapes.get(node.name)
        if shape is not None:
            if shape.up_mbit:
                self._tbf(ns, "eth0", shape.up_mbit, self.control_ports)
            if shape.down_mbit:
                self._ingress_tbf(ns, "eth0", shape.down_mbit, self.control_ports)

    @staticmethod
    def _tbf(ns: str, dev: str, mbit: float, control_ports: Sequence[int] = ()) -> None:
        rate = f"{int(mbit * 1000)}kbit"
        tc = ["netns", "exec", ns, "tc"]
        _ip(*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf", "rate", rate,
            "burst", "128kb", "latency", "50ms")  # fmt: skip
        if not control_ports:
            return
        # tbf keeps the rate; the htb under it only orders: control first (module docstring)
        _ip(*tc, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "htb",
            "default", "20")  # fmt: skip
        _ip(*tc, "class", "add", "dev", dev, "parent", "10:", "classid", "10:1", "htb",
            "rate", rate, "ceil", rate)  # fmt: skip
        for classid, prio in (("10:10", "0"), ("10:20", "1")):
            _ip(*tc, "class", "add", "dev", dev, "parent", "10:1", "classid", classid, "htb",
                "rate", rate, "ceil", rate, "prio", prio)  # fmt: skip
        for port in control_ports:
            for end in ("sport", "dport"):
                _ip(*tc, "filter", "add", "dev", dev, "parent", "10:", "protocol", "ip",
                    "prio", "1", "u32", "match", "ip", end, str(port), "0xffff",
                    "flowid", "10:10")  # fmt: skip
        for value, mask in length_blocks_below(SMALL_PACKET_BYTES):
            # the IP header's total length, at offset 2 (module docstring, "Sparse flows")
            _ip(*tc, "filter", "add", "dev", dev, "parent", "10:", "protocol", "ip",
                "prio", "2", "u32", "match", "u16", f"0x{value:04x}", f"0x{mask:04x}",
                "at", "2", "flowid", "10:10")  # fmt: skip

    @classmethod
    def _ingress_tbf(
        cls, ns: str, dev: str, mbit: float, control_ports: Sequence[int] = ()
    ) -> None:
        """Shape what ``dev`` receives: redirect its ingress to ``ifb0`` and shape that."""
        _ip("-n", ns, "link", "add", "ifb0", "type", "ifb")
        _ip("-n", ns, "link", "set", "ifb0", "up")
        tc = ["netns", "exec", ns, "tc"]
        _ip(*tc, "qdisc", "add", "dev", dev, "handle", "ffff:", "ingress")
        _ip(*tc, "filter", "add", "dev", dev, "parent", "ffff:", "protocol", "all",
            "u32", "match", "u32", "0", "0",
            "action", "mirred", "egress", "redirect", "dev", "ifb0")  # fmt: skip
        cls._tbf(ns, "ifb0", mbit, control_ports)

    def down(self) -> None:
        """Stop the forwarders (by PID) and delete every namespace of this lab; idempotent.

        Deleting the namespaces removes the veths and the bridge with them.
        Processes the caller started inside the lab must be stopped by the
        caller first (a namespace outlives its name while a process is in it).
        """
        for p in self._forwarders:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self._forwarders.clear()
        if self._is_up:
            self._is_up = False
            existing = set(list_netns())
            for ns in [n.netns for n in self.nodes.values()] + [self.hub_netns]:
                if ns in existing:
                    _ip("netns", "del", ns, check=False)
            left = [ns for ns in list_netns() if ns.startswith(self.prefix + "-")]
            if left:
                raise NetLabError(f"namespaces left after teardown: {left}")

    # -- using the lab -----------------------------------------------------
    def netns(self, node: str) -> str:
        return self.hub_netns if node == HUB else self._node(node).netns

    def address(self, node: str) -> str:
        """The node's IPv4 address on the bridge (the hub has ``<subnet>.1``)."""
        return f"{self.subnet}.1" if node == HUB else self._node(node).address

    def exec_prefix(self, node: str) -> list[str]:
        """Put this in front of a command to run it inside ``node``'s namespace.

        ``ip netns exec`` execs the command (no extra process), so the PID of
        the started process is the command's own and signals reach it.
        """
        return ["ip", "netns", "exec", self.netns(node)]

    def run(self, node: str, argv: Iterable[str], *, timeout: float = 30.0) -> str:
        """Run a short command inside ``node``; its stdout, or NetLabError with its stderr."""
        cmd = [*self.exec_prefix(node), *argv]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise NetLabError(f"{' '.join(cmd)}: {r.stderr.strip() or r.returncode}")
        return r.stdout

    def link_down(self, node: str) -> None:
        """Cut ``node`` off: its bridge port goes down, its packets are silently lost."""
        _ip("-n", self.hub_netns, "link", "set", self._node(node).hub_if, "down")

    def link_up(self, node: str) -> None:
        """Reconnect ``node`` (addresses, routes and shaping are kept while it is down)."""
        _ip("-n", self.hub_netns, "link", "set", self._node(node).hub_if, "up")

    def forward(self, node: str, port: int, host: str = "", *, timeout: float = 10.0) -> int:
        """Make ``host:port`` as seen from inside ``node`` reachable at 127.0.0.1:<returned port>.

        ``host`` defaults to the node's own address. The forwarder process binds
        on the host's loopback, then moves into the namespace, so the test
        process needs no route into the lab and the host's network is not
        touched. It is stopped by :meth:`down` (and dies with its parent).
        """
        target = host or self.address(node)
        p = subprocess.Popen(
            [sys.executable, "-c", _FORWARDER, self.netns(node), target, str(port)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._forwarders.append(p)
        assert p.stdout is not None
        line = _readline(p, timeout)
        if not line.strip().isdigit():
            raise NetLabError(f"forwarder into {node} did not start (exit {p.poll()}): {line!r}")
        return int(line)

    def _node(self, node: str) -> LabNode:
        try:
            return self.nodes[node]
        except KeyError:
            raise NetLabError(f"no node {node!r} in this lab: {sorted(self.nodes)}") from None


def _readline(p: subprocess.Popen[bytes], timeout: float) -> str:
    """The first line ``p`` prints, or "" if it prints none in ``timeout`` seconds."""
    import selectors

    assert p.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(p.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return p.stdout.readline().decode(errors="replace")


#: argv: netns target_host target_port. Prints its loopback port, then serves.
_FORWARDER = r"""
import asyncio, ctypes, os, signal, socket, sys
ns, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: die with the process that started us
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(128)
fd = os.open("/run/netns/" + ns, os.O_RDONLY)
if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET; the listener stays on the host
    sys.exit("setns: " + os.strerror(ctypes.get_errno()))
os.close(fd)

async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except OSError:
        pass
    finally:
        w.close()

async def handle(r, w):
    try:
        r2, w2 = await asyncio.open_connection(host, port)
    except OSError:
        w.close()
        return
    await asyncio.gather(pipe(r, w2), pipe(r2, w))

async def main():
    server = await asyncio.start_server(handle, sock=listener)
    print(listener.getsockname()[1], flush=True)
    await server.serve_forever()

signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
asyncio.run(main())
"""
