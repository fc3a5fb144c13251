"""Transfer benchmark: rbd's SSH data plane against a raw asyncssh channel.

Run: ``.venv/bin/python bench/transfer_bench.py [--size-mib 256] [--runs 5]``

One random layer is ingested into a seeder store. A *server process* (this
script with ``--serve``) runs, on its own event loop and CPU, both

* the real :class:`ChunkServer` on that store, and
* a raw asyncssh server that, on a session channel, writes the same blob's
  bytes (read in 4 MiB blocks in a worker thread, ``await drain()`` after
  each), then closes: the simplest possible SSH bulk transfer.

The client (this process) then alternates, per run:

* **rbd**: a :class:`LayerPuller` with a fresh store pulls the layer: chunked
  requests, per-chunk sha256 check against the manifest, pwrite to a partial
  file, bitmap flushes, the final full-digest check and atomic install.
* **raw**: a low-level asyncssh client session receives the same bytes and
  discards them (no hashing, no disk): the transport ceiling.

Both use one already-open, authenticated connection (the handshake is not
timed), the same cipher list, no compression, and the same channel window
and packet size. ``rbd/raw`` is therefore the cost of verification, disk
writes and the protocol, on top of SSH. Results: a table on stdout and
``bench/out/transfer.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncssh

from rainbowd.agent.dataplane.keys import load_or_create_key, parse_public_line, public_line
from rainbowd.agent.dataplane.puller import LayerPuller
from rainbowd.agent.dataplane.ssh_server import (
    CHANNEL_MAX_PKTSIZE,
    CHANNEL_WINDOW,
    COMPRESSION_ALGS,
    ENCRYPTION_ALGS,
    ChunkServer,
)
from rainbowd.core.chunks import DEFAULT_CHUNK_SIZE, ChunkManifest
from rainbowd.core.digest import Digest
from rainbowd.core.messages import PeerInfo, TransferAssignment, TrustList
from rainbowd.lib.log import configure
from rainbowd.lib.store import LayerStore

AES = "aes128-gcm@openssh.com"
CHACHA = "chacha20-poly1305@openssh.com"
RAW_SUBSYSTEM = "raw-blob"
OUT = Path(__file__).resolve().parent / "out" / "transfer.json"


# --------------------------------------------------------------------------
# server process
# --------------------------------------------------------------------------
class _RawServer(asyncssh.SSHServer):
    def __init__(self, blob: Path) -> None:
        self.blob = blob

    def begin_auth(self, username: str) -> bool:
        return True

    def session_requested(self) -> Any:
        return self.handle

    async def handle(
        self,
        stdin: asyncssh.SSHReader[bytes],
        stdout: asyncssh.SSHWriter[bytes],
        stderr: asyncssh.SSHWriter[bytes],
    ) -> None:
        fd = os.open(self.blob, os.O_RDONLY)
        try:
            off = 0
            while True:
                data = await asyncio.to_thread(os.pread, fd, DEFAULT_CHUNK_SIZE, off)
                if not data:
                    break
                off += len(data)
                stdout.write(data)
                await stdout.drain()
        finally:
            os.close(fd)
        stdout.channel.close()


async def serve(work: Path, digest: str) -> None:
    store = LayerStore(work / "seed")
    host_key = load_or_create_key(work / "seed_host")
    client_pub = public_line(load_or_create_key(work / "dem_client"))
    server = ChunkServer(store, host_key, node_id="seed")
    server.update_trust(
        TrustList(
            version=1,
            peers=[
                PeerInfo(
                    node_id="dem",
                    address="127.0.0.1",
                    ssh_port=0,
                    host_key="",
                    client_key=client_pub,
                )
            ],
        )
    )
    rbd_port = await server.start("127.0.0.1", 0)
    raw = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_factory=lambda: _RawServer(store.path(Digest(digest))),
        server_host_keys=[host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(client_pub + "\n"),
        encryption_algs=ENCRYPTION_ALGS,
        compression_algs=COMPRESSION_ALGS,
        gss_host=None,
        window=CHANNEL_WINDOW,
        max_pktsize=CHANNEL_MAX_PKTSIZE,
        encoding=None,
    )
    print(json.dumps({"rbd": rbd_port, "raw": raw.get_port()}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # parent closes stdin to stop us
    raw.close()
    await server.close()


# --------------------------------------------------------------------------
# client side
# --------------------------------------------------------------------------
class _Discard(asyncssh.SSHClientSession[bytes]):
    """raw: count the bytes and drop them (the SSH transport ceiling)."""

    def __init__(self) -> None:
        self.n = 0

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.n += len(data)

    async def finish(self) -> None:
        return None


class _Sink(_Discard):
    """raw+disk: sha256 the stream and pwrite it to a file in 4 MiB blocks, in one
    worker thread (in order), fdatasync at the end: the least any receiver that
    stores and checks what it gets must do, without rbd's chunk protocol,
    per-chunk checks, bitmap or final re-read."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o640)
        self.hash = hashlib.sha256()
        self.parts: list[bytes] = []
        self.buffered = 0
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.last: concurrent.futures.Future[None] | None = None
        self.off = 0

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.n += len(data)
        self.parts.append(data)
        self.buffered += len(data)
        if self.buffered >= DEFAULT_CHUNK_SIZE:
            self._submit()

    def _submit(self) -> None:
        block = b"".join(self.parts)
        self.parts, self.buffered = [], 0
        off, self.off = self.off, self.off + len(block)
        self.last = self.pool.submit(self._store, block, off)

    def _store(self, block: bytes, off: int) -> None:
        self.hash.update(block)
        os.pwrite(self.fd, block, off)

    async def finish(self) -> None:
        if self.parts:
            self._submit()
        if self.last is not None:
            await asyncio.wrap_future(self.last)
        await asyncio.to_thread(os.fdatasync, self.fd)
        os.close(self.fd)
        self.pool.shutdown()


async def raw_run(
    port: int, work: Path, cipher: str, size: int, host_pub: asyncssh.SSHKey, sink: bool
) -> tuple[float, str]:
    async with asyncssh.connect(
        "127.0.0.1",
        port,
        config=[],
        known_hosts=([host_pub], [], []),
        client_keys=[load_or_create_key(work / "dem_client")],
        agent_path=None,
        encryption_algs=[cipher],
        compression_algs=COMPRESSION_ALGS,
        gss_auth=False,
        gss_kex=False,
    ) as conn:
        t0 = time.perf_counter()
        target = work / "raw-sink"
        chan, session = await conn.create_session(
            (lambda: _Sink(target)) if sink else _Discard,
            subsystem=RAW_SUBSYSTEM,
            encoding=None,
            window=CHANNEL_WINDOW,
            max_pktsize=CHANNEL_MAX_PKTSIZE,
        )
        await chan.wait_closed()
        assert isinstance(session, _Discard)
        await session.finish()
        dt = time.perf_counter() - t0
        target.unlink(missing_ok=True)
        assert session.n == size, session.n
        return dt, str(conn.get_extra_info("send_cipher"))


async def rbd_run(
    port: int, work: Path, cipher: str, manifest: ChunkManifest, host_line: str, window: int
) -> tuple[float, str]:
    run_dir = work / "dem-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    store = LayerStore(run_dir)
    puller = LayerPuller(
        store,
        load_or_create_key(work / "dem_client"),
        node_id="dem",
        window=window,
        encryption_algs=[cipher],
    )
    seeder = PeerInfo(
        node_id="seed", address="127.0.0.1", ssh_port=port, host_key=host_line, client_key=""
    )
    try:
        conn = await puller.connections.connection(
            seeder
        )  # handshake outside the timing, as for raw
        a = TransferAssignment(
            transfer_id="bench", job_id="bench", layer=manifest, seeder=seeder, reason="bench"
        )
        t0 = time.perf_counter()
        res = await puller.pull(a)
        dt = time.perf_counter() - t0
        assert res.bytes_moved == manifest.size and store.has(Digest(manifest.digest))
        return dt, str(conn.get_extra_info("send_cipher"))
    finally:
        await puller.close()
        shutil.rmtree(run_dir, ignore_errors=True)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="rbd-xfer-", dir=args.workdir))
    try:
        size = args.size_mib * 1024 * 1024
        seed = LayerStore(work / "seed")
        data = os.urandom(size)
        manifest = seed.ingest(io.BytesIO(data), Digest(_sha(data)), chunk_size=args.chunk_size)
        del data
        host_key = load_or_create_key(work / "seed_host")
        load_or_create_key(work / "dem_client")
        host_line = public_line(host_key)
        host_pub = parse_public_line(host_line)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--serve",
            str(work),
            manifest.digest,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdin is not None
        ports = json.loads(await proc.stdout.readline())
        ciphers = [AES] + ([CHACHA] if not args.no_chacha else [])
        modes = [(k, c) for c in ciphers for k in ("rbd", "raw", "raw+disk")]
        times: dict[str, list[float]] = {f"{k}/{c}": [] for k, c in modes}
        cpus: dict[str, list[float]] = {k: [] for k in times}
        server_cpus: dict[str, list[float]] = {k: [] for k in times}
        negotiated: dict[str, str] = {}
        try:
            for run in range(args.runs + 1):  # run 0 warms page cache and code paths
                for kind, cipher in modes:
                    c0, s0 = time.process_time(), _proc_cpu(proc.pid)
                    if kind == "rbd":
                        dt, neg = await rbd_run(
                            ports["rbd"], work, cipher, manifest, host_line, args.window
                        )
                    else:
                        dt, neg = await raw_run(
                            ports["raw"], work, cipher, size, host_pub, kind == "raw+disk"
                        )
                    cpu, server_cpu = time.process_time() - c0, _proc_cpu(proc.pid) - s0
                    key = f"{kind}/{cipher}"
                    negotiated[key] = neg
                    if run > 0:
                        times[key].append(dt)
                        cpus[key].append(cpu)
                        server_cpus[key].append(server_cpu)
                    print(
                        f"  run {run}{' (warm-up)' if run == 0 else ''} {key:40s} "
                        f"{size / dt / 1e6:8.1f} MB/s",
                        file=sys.stderr,
                    )
        finally:
            proc.stdin.close()
            await proc.wait()
        result: dict[str, Any] = {
            "size_bytes": size,
            "chunk_size": args.chunk_size,
            "window": args.window,
            "runs": args.runs,
            "channel_window": CHANNEL_WINDOW,
            "max_pktsize": CHANNEL_MAX_PKTSIZE,
            "cpus": os.cpu_count(),
            "modes": {},
        }
        for key, ts in times.items():
            med = statistics.median(ts)
            result["modes"][key] = {
                "median_s": med,
                "median_MBps": size / med / 1e6,
                "all_MBps": [size / t / 1e6 for t in ts],
                "cipher": negotiated[key],
                # CPU seconds the client process (all threads) spent per GiB moved:
                # robust to other load on the machine, unlike wall-clock throughput
                "client_cpu_s_per_GiB": statistics.median(cpus[key]) * 2**30 / size,
                # the same for the server process (ChunkServer, or the raw sender)
                "server_cpu_s_per_GiB": statistics.median(server_cpus[key]) * 2**30 / size,
            }
        for c in ciphers:
            m = result["modes"]
            for base in ("raw", "raw+disk"):
                result[f"ratio_rbd_{base}/{c}"] = (
                    m[f"rbd/{c}"]["median_MBps"] / m[f"{base}/{c}"]["median_MBps"]
                )
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def print_table(r: dict[str, Any]) -> None:
    print(
        f"\nlayer {r['size_bytes'] // 2**20} MiB, chunks {r['chunk_size'] // 2**20} MiB, "
        f"window {r['window']}, median of {r['runs']} runs, {r['cpus']} CPUs, loopback"
    )
    print(
        f"{'mode':9s} {'cipher (negotiated)':32s} {'median MB/s':>12s} {'min..max':>16s}"
        f" {'client CPU s/GiB':>17s} {'server CPU s/GiB':>17s}"
    )
    for key, m in r["modes"].items():
        kind = key.split("/", 1)[0]
        lo, hi = min(m["all_MBps"]), max(m["all_MBps"])
        print(
            f"{kind:9s} {m['cipher']:32s} {m['median_MBps']:12.1f} {lo:7.1f}..{hi:<8.1f}"
            f" {m['client_cpu_s_per_GiB']:17.2f} {m['server_cpu_s_per_GiB']:17.2f}"
        )
    for k, v in r.items():
        if k.startswith("ratio_"):
            print(f"{k}: {v:.2f}" + ("  (goal >= 0.80)" if "raw/" in k else ""))


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "--serve":
        configure("warning", json=False)
        asyncio.run(serve(Path(sys.argv[2]), sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    ap.add_argument("--window", type=int, default=4, help="LayerPuller window (chunks)")
    ap.add_argument("--no-chacha", action="store_true", help="skip the chacha20 runs")
    ap.add_argument("--workdir", default=None, help="where stores go (default: $TMPDIR)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    configure("warning", json=False)
    result = asyncio.run(bench(args))
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
