"""The BitTorrent baseline: one torrent per layer, a tracker on the origin, aria2c everywhere.

This is how Docket, VMware's DID and Quay's torrent pulls distribute images:
the layers (not the image) are torrents, the registry host runs the tracker
and the first seeder, and every node that finished keeps seeding. DID cut the
announce interval to 1 s so that new seeders are found quickly; the same is
done here (``--bt-tracker-interval=1``). Peers are found only through the
tracker and peer exchange: DHT and local peer discovery are off, as in a
private cluster.

Untimed set-up, in the origin's directory: each layer tar unpacked from the
archive under its sha256 hex digest, ``mktorrent`` one torrent per layer
(announce = the origin's opentracker), ``opentracker`` started in the
origin's namespace on the origin's address, one ``aria2c`` on the origin
seeding every layer without re-hashing them, and a wait until the tracker
lists the origin as a seeder of every layer (a scrape from inside the origin).
The .torrent files reach the nodes through the shared file system, untimed:
in DID they come from the registry too.

Timed: on every demander, at once, one ``aria2c`` with every layer torrent.
aria2 checks every piece's SHA-1; on each layer's completion its
``--on-bt-download-complete`` hook runs ``sha256sum`` on the file and, only if
it matches the layer digest (the file's name), writes the time. A node's time
is when its last layer matched. Finished nodes keep seeding
(``--seed-ratio=0.0``) until the run ends: like DID, every node becomes a
seeder. At the end (untimed) each aria2c is asked over its JSON-RPC (on the
node's loopback) how much it uploaded, and the tracker how many seeders it
sees per layer, which shows the nodes really swarmed across namespaces.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import secrets
import shutil
import tarfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.lab.baseline import (
    NO_PROXY_ENV,
    HttpReply,
    LabSetupError,
    node_http,
    run_baseline,
    run_to_end,
    tool_version,
    wait_clients,
    wait_until_answers,
)
from bench.lab.env import TRACKER_PORT, LabEnv
from bench.lab.result import SystemResult

ARIA2C = "aria2c"
MKTORRENT = "mktorrent"
OPENTRACKER = "opentracker"

#: per layer: sha256 of the file, then (only if it is the layer's digest) the time
HOOK = r"""#!/bin/sh
# aria2c --on-bt-download-complete hook: $1 GID, $2 number of files, $3 the (only) file.
# The file is named by its sha256 hex digest: it counts only when its bytes match.
f=$3
name=$(basename "$f")
done_dir=$(dirname "$(dirname "$f")")/done
sum=$(sha256sum "$f" | cut -d' ' -f1)
if [ "$sum" = "$name" ]; then
    date +%s.%N > "$done_dir/$name.tmp" && mv "$done_dir/$name.tmp" "$done_dir/$name.ok"
else
    echo "sha256 of the downloaded file is $sum" > "$done_dir/$name.tmp" &&
        mv "$done_dir/$name.tmp" "$done_dir/$name.bad"
fi
"""


@dataclass(frozen=True)
class Layer:
    hex: str  # sha256 hex digest: the file's name, the torrent's name
    size: int
    piece: int  # piece length in bytes
    torrent: Path
    info_hash: bytes = b""


def piece_length(size: int, *, min_piece: int = 256 * 1024, max_pieces: int = 2048) -> int:
    """A power of two >= ``min_piece`` giving at most ``max_pieces`` pieces (cap 16 MiB).

    256 KiB is mktorrent's default and what small layers get; big layers grow
    the piece so the torrent's piece list stays small, as torrent tools do.
    """
    piece = min_piece
    while piece < 16 << 20 and math.ceil(size / piece) > max_pieces:
        piece *= 2
    return piece


@dataclass
class BitTorrentSystem:
    """opentracker + mktorrent + aria2c: a BitTorrent swarm per layer, seeded by the origin."""

    name: str = "bittorrent"
    tracker_port: int = TRACKER_PORT
    peer_port: int = 6881
    rpc_port: int = 6800
    min_piece_kib: int = 256
    #: bound on each untimed set-up step (unpack, mktorrent, tracker, seeder)
    setup_timeout: float = 60.0
    #: how often the watcher looks at the hooks' files (the times come from the hook)
    poll: float = 0.05

    async def run(self, env: LabEnv, *, timeout: float) -> SystemResult:
        """Set up tracker and origin seeder (untimed), then time every demander's aria2c."""
        return await run_baseline(self.name, env, timeout, self._run)

    # -- the run -----------------------------------------------------------
    async def _run(self, env: LabEnv, timeout: float, result: SystemResult) -> None:
        origin = env.origin
        announce = f"http://{env.address(origin)}:{self.tracker_port}/announce"
        odir = env.node_dir(self.name, origin)
        seed_dir, torrent_dir = odir / "data", odir / "torrents"
        for d in (seed_dir, torrent_dir):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
        rpc_secret = secrets.token_hex(16)
        hook = odir / "on-layer-complete.sh"
        hook.write_text(HOOK)
        hook.chmod(0o755)

        # -- untimed: layers, torrents, tracker, the origin's seeder ------------
        layers = []
        for hexd, size in await asyncio.to_thread(unpack_layers, env.image, seed_dir):
            piece = piece_length(size, min_piece=self.min_piece_kib * 1024)
            torrent = torrent_dir / f"{hexd}.torrent"
            await run_to_end(
                env,
                origin,
                f"{self.name}-{origin}-mktorrent-{hexd[:12]}",
                [
                    MKTORRENT,
                    "--no-date",
                    "-a",
                    announce,
                    "-l",
                    str(piece.bit_length() - 1),
                    "-n",
                    hexd,
                    "-o",
                    str(torrent),
                    str(seed_dir / hexd),
                ],
                what="mktorrent",
                timeout=self.setup_timeout,
            )
            layers.append(Layer(hexd, size, piece, torrent, info_hash(torrent.read_bytes())))
        result.notes.update(self._notes(announce, layers))

        # opentracker chroots into -d (and drops to nobody): its whitelist lives there, named
        # relative to it. Debian builds it "private": only whitelisted info hashes are tracked.
        tracker_dir = odir / "tracker"
        tracker_dir.mkdir(exist_ok=True)
        (tracker_dir / "whitelist.txt").write_text(
            "".join(f"{x.info_hash.hex()}\n" for x in layers)
        )
        tracker_log = f"{self.name}-{origin}-opentracker"
        tracker = env.spawn(
            origin,
            tracker_log,
            [
                OPENTRACKER,
                "-i",
                env.address(origin),
                "-p",
                str(self.tracker_port),
                "-P",
                str(self.tracker_port),
                "-d",
                str(tracker_dir),
                "-w",
                "whitelist.txt",
            ],
            cwd=tracker_dir,
            central=True,
        )
        scrape = f"http://{env.address(origin)}:{self.tracker_port}/scrape"
        await wait_until_answers(
            env,
            origin,
            scrape,
            what="opentracker",
            log_name=tracker_log,
            process=tracker,
            timeout=self.setup_timeout,
        )
        seeder_log = f"{self.name}-{origin}-aria2c"
        seeder = env.spawn(
            origin,
            seeder_log,
            [
                *self.aria2c_argv(seed_dir, len(layers), rpc_secret),
                "--check-integrity=false",
                "--bt-seed-unverified=true",
                *(str(x.torrent) for x in layers),
            ],
            env=NO_PROXY_ENV,
        )
        for layer in layers:
            await wait_until_answers(
                env,
                origin,
                f"{scrape}?info_hash={urllib.parse.quote_from_bytes(layer.info_hash)}",
                what=f"the origin's aria2c seeding {layer.hex[:12]}",
                log_name=seeder_log,
                process=seeder,
                ok=has_seeder(layer.info_hash),
                timeout=self.setup_timeout,
            )

        # -- timed: every demander joins the swarms at once ---------------------
        dirs = {}
        for node in env.demanders:
            d = env.node_dir(self.name, node)
            for sub in ("data", "done"):
                shutil.rmtree(d / sub, ignore_errors=True)
                (d / sub).mkdir()
            dirs[node] = d
        argv_tail = [f"--on-bt-download-complete={hook}", *(str(x.torrent) for x in layers)]
        clients = {}
        env.timed_start()
        start, start_wall = time.monotonic(), time.time()
        for node, d in dirs.items():
            log_name = f"{self.name}-{node}"
            argv = [*self.aria2c_argv(d / "data", len(layers), rpc_secret), *argv_tail]
            clients[node] = (env.spawn(node, log_name, argv, env=NO_PROXY_ENV), log_name)

        def check(node: str) -> float | str | None:
            return layers_done(dirs[node] / "done", [x.hex for x in layers], start_wall)

        def progress(node: str) -> str:
            n = sum((dirs[node] / "done" / f"{x.hex}.ok").exists() for x in layers)
            return f"{n} of {len(layers)} layers complete and verified"

        seconds, failed = await wait_clients(
            env,
            clients,
            start=start,
            timeout=timeout,
            check=check,
            exit_means_done=False,
            progress=progress,
            poll=self.poll,
        )
        env.timed_end()
        result.node_seconds.update(seconds)
        result.failed.update(failed)

        # -- untimed: did they swarm? ------------------------------------------
        result.notes["swarm"] = await self._swarm_stats(
            env, layers, scrape, rpc_secret, finished=len(seconds)
        )
        if tracker.poll() is not None:
            result.notes["tracker_exit"] = tracker.returncode

    def aria2c_argv(self, directory: Path, n_layers: int, rpc_secret: str) -> list[str]:
        """aria2c as DID runs it: tracker every 1 s, no DHT/LPD, PEX on, seed forever.

        The RPC (for the upload counts at the end) listens on the node's own
        loopback and wants this run's ``rpc_secret``.
        """
        return [
            ARIA2C,
            f"--dir={directory}",
            f"--max-concurrent-downloads={n_layers}",  # every layer at once
            "--bt-tracker-interval=1",
            "--enable-dht=false",
            "--enable-dht6=false",
            "--bt-enable-lpd=false",
            "--enable-peer-exchange=true",
            "--seed-ratio=0.0",  # keep seeding until the run ends
            "--max-overall-upload-limit=0",
            "--max-overall-download-limit=0",
            "--max-upload-limit=0",
            "--max-download-limit=0",
            "--file-allocation=none",
            f"--listen-port={self.peer_port}",
            "--disable-ipv6=true",
            "--enable-rpc=true",
            f"--rpc-listen-port={self.rpc_port}",
            "--rpc-listen-all=false",
            f"--rpc-secret={rpc_secret}",
            "--summary-interval=0",
            "--console-log-level=notice",
            "--enable-color=false",
        ]

    async def _swarm_stats(
        self, env: LabEnv, layers: list[Layer], scrape: str, rpc_secret: str, finished: int
    ) -> dict[str, Any]:
        """Bytes each aria2c uploaded (its RPC) and the seeders the tracker lists per layer.

        ``finished`` demanders hold every layer: with the origin, that many seeders
        per layer at the tracker show that every node announced from its own address.
        """
        req = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": "rbd",
                "method": "aria2.tellActive",
                "params": [
                    f"token:{rpc_secret}",
                    ["infoHash", "uploadLength", "completedLength", "connections"],
                ],
            }
        ).encode()
        nodes = [env.origin, *env.demanders]
        rpc = f"http://127.0.0.1:{self.rpc_port}/jsonrpc"
        replies = await asyncio.gather(
            *(node_http(env, n, rpc, data=req, timeout=5.0) for n in nodes),
            return_exceptions=True,
        )
        uploaded: dict[str, int] = {}
        for node, reply in zip(nodes, replies, strict=True):
            if isinstance(reply, BaseException) or reply is None or reply.status != 200:
                continue
            try:
                downloads = json.loads(reply.body)["result"]
                uploaded[node] = sum(int(d["uploadLength"]) for d in downloads)
            except (ValueError, KeyError, TypeError):
                continue
        # a node announces "completed" on its next tracker request (<= 1 s after it is done):
        # give the last ones that long before reading the tracker's seeder counts
        seeders: dict[str, int] = {}
        settle = time.monotonic() + 3.0
        while True:
            for layer in layers:
                url = f"{scrape}?info_hash={urllib.parse.quote_from_bytes(layer.info_hash)}"
                r = await node_http(env, env.origin, url, timeout=5.0)
                if r is not None and r.status == 200:
                    seeders[layer.hex[:12]] = scrape_counts(r.body, layer.info_hash)[0]
            if set(seeders.values()) == {finished + 1} or time.monotonic() >= settle:
                break
            await asyncio.sleep(0.25)
        total = sum(uploaded.values())
        image = sum(x.size for x in layers)
        return {
            "uploaded_bytes": uploaded,
            "origin_uploaded_bytes": uploaded.get(env.origin),
            "total_uploaded_bytes": total,
            "demanders_times_image_bytes": image * len(env.demanders),
            "origin_share": (uploaded.get(env.origin, 0) / total) if total else None,
            # opentracker keys a peer by ip:port and every aria2c listens on the same port:
            # N+1 seeders per layer are N+1 distinct bridge addresses
            "tracker_seeders_per_layer": seeders,
            "uploaded_note": "aria2 uploadLength: payload sent, including end-game duplicates",
        }

    def _notes(self, announce: str, layers: list[Layer]) -> dict[str, Any]:
        return {
            "aria2c": tool_version([ARIA2C, "--version"]),
            "mktorrent": tool_version([MKTORRENT, "-h"]),
            "opentracker": "Debian opentracker (no --version; see dpkg -s opentracker)",
            "tracker": f"{announce} (opentracker -i <origin> -p/-P {self.tracker_port})",
            "torrents": {
                x.hex[:12]: {
                    "size": x.size,
                    "piece_bytes": x.piece,
                    "pieces": -(-x.size // x.piece),
                }
                for x in layers
            },
            "aria2c_flags": " ".join(
                self.aria2c_argv(Path("<node_dir>/data"), len(layers), "<per-run>")[1:]
            ),
            "origin_seeder": "--check-integrity=false --bt-seed-unverified=true",
            "demander_hook": "--on-bt-download-complete: sha256sum must equal the layer digest",
            "done": "a node's time = its last layer's hook time (after SHA-1 pieces + sha256)",
        }


# -- helpers (pure, no processes) -----------------------------------------------
def unpack_layers(archive: Path, dest: Path) -> list[tuple[str, int]]:
    """Write each layer of a docker-archive to ``dest/<sha256 hex>``; (hex, size) in order."""
    out = []
    with tarfile.open(archive) as tf:
        mf = tf.extractfile("manifest.json")
        if mf is None:
            raise LabSetupError(f"{archive}: no manifest.json (not a docker-archive)")
        for name in json.load(mf)[0]["Layers"]:
            src = tf.extractfile(name)
            if src is None:
                raise LabSetupError(f"{archive}: layer {name} missing")
            tmp = dest / ".unpacking"
            h, size = hashlib.sha256(), 0
            with open(tmp, "wb") as f:
                while block := src.read(1 << 20):
                    h.update(block)
                    f.write(block)
                    size += len(block)
            tmp.rename(dest / h.hexdigest())
            out.append((h.hexdigest(), size))
    return out


def layers_done(done_dir: Path, hexes: list[str], start_wall: float) -> float | str | None:
    """A node's completion (seconds since ``start_wall``), a failure, or None (not yet)."""
    times = []
    for h in hexes:
        bad = done_dir / f"{h}.bad"
        if bad.exists():
            return f"layer sha256:{h} failed its digest check: {bad.read_text().strip()}"
        try:
            times.append(float((done_dir / f"{h}.ok").read_text()))
        except FileNotFoundError:
            return None
        except ValueError:
            return f"layer sha256:{h}: the hook wrote no time"
    return max(times) - start_wall


def bdecode(data: bytes, i: int = 0) -> tuple[Any, int]:
    """One bencoded value at ``data[i:]``: (value, end index). Enough for torrents and scrapes."""
    c = data[i : i + 1]
    if c == b"i":
        end = data.index(b"e", i)
        return int(data[i + 1 : end]), end + 1
    if c == b"l":
        items, i = [], i + 1
        while data[i : i + 1] != b"e":
            v, i = bdecode(data, i)
            items.append(v)
        return items, i + 1
    if c == b"d":
        d, i = {}, i + 1
        while data[i : i + 1] != b"e":
            k, i = bdecode(data, i)
            d[k], i = bdecode(data, i)
        return d, i + 1
    if c.isdigit():
        colon = data.index(b":", i)
        n = int(data[i:colon])
        return data[colon + 1 : colon + 1 + n], colon + 1 + n
    raise ValueError(f"not bencode at byte {i}: {data[i : i + 10]!r}")


def info_hash(torrent: bytes) -> bytes:
    """SHA-1 of the torrent's bencoded ``info`` dict, exactly as it is in the file."""
    if torrent[:1] != b"d":
        raise ValueError("a torrent is a bencoded dict")
    i = 1
    while torrent[i : i + 1] != b"e":
        key, i = bdecode(torrent, i)
        _, end = bdecode(torrent, i)
        if key == b"info":
            return hashlib.sha1(torrent[i:end]).digest()
        i = end
    raise ValueError("torrent has no info dict")


def has_seeder(ih: bytes) -> Callable[[HttpReply], bool]:
    """A readiness test: the tracker's scrape lists at least one seeder of ``ih``."""
    return lambda reply: scrape_counts(reply.body, ih)[0] >= 1


def scrape_counts(body: bytes, ih: bytes) -> tuple[int, int]:
    """(seeders, leechers) of ``ih`` in a tracker's scrape reply; (0, 0) if it is not listed."""
    try:
        reply, _ = bdecode(body)
        entry = reply[b"files"][ih]
        return int(entry[b"complete"]), int(entry[b"incomplete"])
    except (ValueError, KeyError, TypeError, IndexError):
        return 0, 0
