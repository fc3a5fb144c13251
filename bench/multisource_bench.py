"""Multi-source benchmark: one layer pulled from one seeder, or half from each of two at once.

Run: ``.venv/bin/python bench/multisource_bench.py [--size-mib 64] [--runs 3] [--cap-mbps 0]``

One random layer is ingested once; two *seeder processes* (this script with
``--serve``) each run the real :class:`ChunkServer` on a copy of it (each on
its own event loop and CPU), optionally with an upload cap (``--cap-mbps``,
per seeder: an upload-bound seeder, issue 13's case). The client (this
process) then alternates, per run, with a fresh demander store each time:

* **one**: a :class:`LayerPuller` pulls the whole layer from seeder A;
* **two**: the same puller runs two range pulls at once, chunks
  [0, n/2) from A and [n/2, n) from B, into one shared partial; the layer
  is committed (whole digest, install) once, by whichever finishes last.

Reported: wall seconds (median of ``--runs``), bytes each seeder served,
and the speed-up. Results: a table on stdout and ``bench/out/multisource.json``.
Loopback with no cap measures the demander's CPU (decrypt, hash, write);
with a cap below that, the gain from a second upload.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rainbowd.agent.dataplane.keys import load_or_create_key, public_line
from rainbowd.agent.dataplane.puller import LayerPuller
from rainbowd.agent.dataplane.ssh_server import ChunkServer
from rainbowd.core.chunks import DEFAULT_CHUNK_SIZE, ChunkManifest
from rainbowd.core.digest import Digest
from rainbowd.core.messages import PeerInfo, TransferAssignment, TrustList
from rainbowd.lib.log import configure
from rainbowd.lib.store import LayerStore

OUT = Path(__file__).resolve().parent / "out" / "multisource.json"


async def serve(work: Path, name: str, cap_bps: float) -> None:
    """A seeder process: serve ``work/name``'s store until stdin closes."""
    store = LayerStore(work / name)
    host_key = load_or_create_key(work / f"{name}_host")
    client_pub = public_line(load_or_create_key(work / "dem_client"))
    server = ChunkServer(store, host_key, node_id=name, max_upload_bps=cap_bps)
    dem = PeerInfo(
        node_id="dem", address="127.0.0.1", ssh_port=0, host_key="", client_key=client_pub
    )
    server.update_trust(TrustList(version=1, peers=[dem]))
    port = await server.start("127.0.0.1", 0)
    print(json.dumps({"port": port, "host_key": public_line(host_key)}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.close()


def assignment(
    tid: str, m: ChunkManifest, seeder: PeerInfo, first: int = 0, end: int = 0
) -> TransferAssignment:
    return TransferAssignment(
        transfer_id=tid,
        job_id="bench",
        layer=m,
        seeder=seeder,
        reason="bench",
        first_chunk=first,
        end_chunk=end,
    )


async def one_run(
    work: Path, m: ChunkManifest, seeders: list[PeerInfo], mode: str, run: int
) -> dict[str, float]:
    store = LayerStore(work / f"dem-{mode}-{run}")
    puller = LayerPuller(store, load_or_create_key(work / "dem_client"), node_id="dem")
    try:
        half = m.count // 2
        t0 = time.perf_counter()
        if mode == "one":
            r = await puller.pull(assignment("t", m, seeders[0]))
            moved = {"a": r.bytes_moved, "b": 0}
        else:
            ra, rb = await asyncio.gather(
                puller.pull(assignment("ta", m, seeders[0], 0, half)),
                puller.pull(assignment("tb", m, seeders[1], half, m.count)),
            )
            moved = {"a": ra.bytes_moved, "b": rb.bytes_moved}
        seconds = time.perf_counter() - t0
        assert store.has(Digest(m.digest)), "layer not installed"
    finally:
        await puller.close()
        shutil.rmtree(store.root, ignore_errors=True)
    return {"seconds": seconds, "bytes_a": moved["a"], "bytes_b": moved["b"]}


def start_seeders(
    work: Path, size_mib: int, cap_mbps: float
) -> tuple[ChunkManifest, list[PeerInfo], list[subprocess.Popen[str]]]:
    """Ingest one random layer into two seeder stores and start a seeder process on each."""
    data = os.urandom(size_mib * 1024 * 1024)
    digest = Digest("sha256:" + hashlib.sha256(data).hexdigest())
    m = LayerStore(work / "a").ingest(io.BytesIO(data), digest, DEFAULT_CHUNK_SIZE)
    LayerStore(work / "b").ingest(io.BytesIO(data), digest, DEFAULT_CHUNK_SIZE)
    del data
    load_or_create_key(work / "dem_client")
    seeders, procs = [], []
    for name in ("a", "b"):
        cmd = [sys.executable, __file__, "--serve", str(work), name, str(cap_mbps)]
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout is not None
        hello = json.loads(p.stdout.readline())
        seeders.append(
            PeerInfo(
                node_id=name,
                address="127.0.0.1",
                ssh_port=hello["port"],
                host_key=hello["host_key"],
                client_key="",
            )
        )
    return m, seeders, procs


async def client(
    args: argparse.Namespace, work: Path, m: ChunkManifest, seeders: list[PeerInfo]
) -> None:
    results: dict[str, list[dict[str, float]]] = {"one": [], "two": []}
    for run in range(args.runs):
        for mode in ("one", "two"):
            results[mode].append(await one_run(work, m, seeders, mode, run))
    summary = {
        mode: {
            "seconds_median": statistics.median(r["seconds"] for r in rs),
            "seconds": [round(r["seconds"], 3) for r in rs],
            "bytes_a": rs[0]["bytes_a"],
            "bytes_b": rs[0]["bytes_b"],
        }
        for mode, rs in results.items()
    }
    out = {
        "size_bytes": m.size,
        "chunks": m.count,
        "cap_mbps_per_seeder": args.cap_mbps,
        "runs": args.runs,
        **summary,
        "speedup": summary["one"]["seconds_median"] / summary["two"]["seconds_median"],
    }
    print(
        f"layer {m.size / 2**20:.0f} MiB, {m.count} chunks, cap per seeder "
        f"{args.cap_mbps or 'none'} Mbit/s, {args.runs} runs"
    )
    for mode in ("one", "two"):
        s = summary[mode]
        print(
            f"  {mode} seeder(s): {s['seconds_median']:.2f} s median "
            f"({s['seconds']}), bytes A {s['bytes_a']:,} B {s['bytes_b']:,}"
        )
    print(f"  speed-up two/one: {out['speedup']:.2f} x")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    key = f"{args.size_mib}MiB-cap{args.cap_mbps:g}"
    existing = json.loads(OUT.read_text()) if OUT.exists() else {}
    existing[key] = out
    OUT.write_text(json.dumps(existing, indent=2) + "\n")


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "--serve":
        configure("warning")
        asyncio.run(serve(Path(sys.argv[2]), sys.argv[3], float(sys.argv[4]) * 1e6 / 8))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cap-mbps", type=float, default=0.0, help="upload cap per seeder")
    args = ap.parse_args()
    configure("warning")
    work = Path(tempfile.mkdtemp(prefix="rbd-multisource-"))
    procs: list[subprocess.Popen[str]] = []
    try:
        m, seeders, procs = start_seeders(work, args.size_mib, args.cap_mbps)
        asyncio.run(client(args, work, m, seeders))
    finally:
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
        for p in procs:
            p.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
