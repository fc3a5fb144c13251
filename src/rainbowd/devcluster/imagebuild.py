"""Build a small, real, runnable demo image without Docker or a registry.

Tests and ``rbd demo`` need an image whose bytes are real (a static busybox
that actually runs in a container) and whose size is tunable (a payload of
incompressible bytes, so transfer times mean something). Building it here,
byte for byte, keeps it deterministic: the same arguments give the same
digests on every host, which is what lets two hosts agree they hold "the same"
layer and lets tests assert on layer sharing between two demo images.

Layers:
1. ``/bin/busybox`` (busybox-static) plus applet symlinks (``/bin/sh`` ...);
2. ``/data/payload.bin``: ``payload_mib`` MiB of seeded pseudo-random bytes;
3. ``/etc/rbd-demo.txt`` and ``/usr/local/bin/rbd-demo`` (a shell script).

Two images built with different seeds share layer 1 (and layer 3's content,
on a different base).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from rainbowd.lib.hostplatform import host_architecture

log = structlog.get_logger(__name__)

BUSYBOX = Path("/bin/busybox")
#: every file in the image gets this mtime, so digests do not depend on when we built
MTIME = 1_700_000_000
CREATED = "2023-11-14T22:13:20Z"
APPLETS = ("sh", "cat", "echo", "ls", "wc", "sha256sum", "sleep", "true", "false", "env")
DEMO_CMD = ["/bin/sh", "-c", "echo hello from rbd; wc -c /data/payload.bin"]


class ImageBuildError(RuntimeError):
    """The demo image cannot be built on this host (a missing tool, say)."""


def _info(
    name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, size: int = 0
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _dir(tf: tarfile.TarFile, name: str) -> None:
    tf.addfile(_info(name, tarfile.DIRTYPE, 0o755))


def _file(tf: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    tf.addfile(_info(name, mode=mode, size=len(data)), io.BytesIO(data))


class _Payload:
    """Deterministic incompressible bytes, produced piecewise (never all in memory)."""

    PIECE = 1024 * 1024

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self._pos = 0
        self._buf = b""
        self._piece = 0

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self.size - self._pos
        n = min(n, self.size - self._pos)
        while len(self._buf) < n:
            key = f"rbd-demo:{self.seed}:{self._piece}".encode()
            self._buf += hashlib.shake_256(key).digest(self.PIECE)
            self._piece += 1
        data, self._buf = self._buf[:n], self._buf[n:]
        self._pos += len(data)
        return data


def _write_layer(
    path: Path, fill: Callable[[tarfile.TarFile], None], fmt: int = tarfile.USTAR_FORMAT
) -> tuple[str, int]:
    """Write a layer tar with ``fill(tarfile)``; return (sha256 digest, size)."""
    with open(path, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=fmt) as tf:
            fill(tf)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(1024 * 1024):
            h.update(data)
    return "sha256:" + h.hexdigest(), path.stat().st_size


def build_demo_image(
    out: Path, *, ref: str = "rbd-demo:latest", payload_mib: int = 32, seed: int = 0
) -> Path:
    """Write a runnable docker-archive (legacy ``docker save`` layout) to ``out``.

    Returns ``out``. Raises ImageBuildError when /bin/busybox is missing.
    """
    out = Path(out)
    if not BUSYBOX.is_file():
        raise ImageBuildError(
            f"{BUSYBOX} is missing: the demo image needs a static busybox "
            "(apt-get install busybox-static)"
        )
    if payload_mib < 0:
        raise ValueError(f"payload_mib must be >= 0, not {payload_mib}")
    busybox = BUSYBOX.read_bytes()

    def base(tf: tarfile.TarFile) -> None:
        _dir(tf, "bin")
        _file(tf, "bin/busybox", busybox, 0o755)
        for applet in APPLETS:
            info = _info(f"bin/{applet}", tarfile.SYMTYPE, 0o777)
            info.linkname = "busybox"
            tf.addfile(info)
        for d in ("etc", "tmp", "proc", "sys", "dev"):
            _dir(tf, d)

    def payload(tf: tarfile.TarFile) -> None:
        _dir(tf, "data")
        size = payload_mib * 1024 * 1024
        tf.addfile(_info("data/payload.bin", size=size), _Payload(size, seed))

    text = (
        b"This image was built by rbd (RainbowD) as a demo.\n"
        b"Layer 1: busybox, layer 2: a payload of random bytes, layer 3: this file.\n"
    )
    script = (
        b"#!/bin/sh\n"
        b"echo hello from rbd\n"
        b"cat /etc/rbd-demo.txt\n"
        b"wc -c /data/payload.bin\n"
        b"sha256sum /data/payload.bin\n"
    )

    def extra(tf: tarfile.TarFile) -> None:
        _dir(tf, "etc")
        _file(tf, "etc/rbd-demo.txt", text)
        for d in ("usr", "usr/local", "usr/local/bin"):
            _dir(tf, d)
        _file(tf, "usr/local/bin/rbd-demo", script, 0o755)

    steps = [
        (base, "COPY busybox-static /bin/busybox (+ applet links)"),
        (payload, f"COPY payload ({payload_mib} MiB, seed {seed}) /data/payload.bin"),
        (extra, "COPY rbd-demo.txt /etc/ and rbd-demo /usr/local/bin/"),
    ]
    build_image(
        out,
        ref=ref,
        steps=steps,
        cmd=DEMO_CMD,
        labels={"org.opencontainers.image.title": "rbd demo", "rbd.demo.seed": str(seed)},
    )
    log.info("demo image built", path=str(out), ref=ref, payload_mib=payload_mib)
    return out


Step = tuple[Callable[[tarfile.TarFile], None], str]


def build_image(
    out: Path,
    *,
    ref: str,
    steps: Sequence[Step],
    cmd: list[str],
    labels: dict[str, str] | None = None,
    fmt: int = tarfile.USTAR_FORMAT,
) -> Path:
    """Write a docker-archive whose layers are made by ``steps`` (fill, history line).

    Deterministic: fixed mtimes, sorted config keys. Written to a temp name and
    renamed, so ``out`` is either complete or absent.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".rbd-build-") as tmp_s:
        tmp = Path(tmp_s)
        layers: list[tuple[Path, str, int]] = []
        for i, (fill, _) in enumerate(steps):
            p = tmp / f"layer{i}.tar"
            digest, size = _write_layer(p, fill, fmt)
            layers.append((p, digest, size))
        diff_ids = [d for _, d, _ in layers]
        config = {
            "architecture": host_architecture(),
            "os": "linux",
            "created": CREATED,
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": cmd,
                "WorkingDir": "/",
                "Labels": labels or {},
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": CREATED, "created_by": why} for _, why in steps],
        }
        config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        config_hex = hashlib.sha256(config_bytes).hexdigest()
        layer_names = [f"{d.split(':', 1)[1]}/layer.tar" for d in diff_ids]
        manifest = [{"Config": f"{config_hex}.json", "RepoTags": [ref], "Layers": layer_names}]
        repo, tag = ref.rsplit(":", 1) if ":" in ref.rsplit("/", 1)[-1] else (ref, "latest")
        repositories = {repo: {tag: diff_ids[-1].split(":", 1)[1]}}
        tmp_out = tmp / "image.tar"
        with open(tmp_out, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=fmt) as tf:
                _file(tf, f"{config_hex}.json", config_bytes)
                for (p, _, size), name in zip(layers, layer_names, strict=True):
                    _dir(tf, name.split("/", 1)[0])
                    with open(p, "rb") as f:
                        tf.addfile(_info(name, size=size), f)
                _file(tf, "manifest.json", json.dumps(manifest).encode())
                _file(tf, "repositories", json.dumps(repositories).encode())
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp_out, out)
    return out


def build_rootfs_image(
    root: Path, out: Path, *, ref: str, cmd: list[str], created_by: str = "ADD rootfs /"
) -> Path:
    """A one-layer image of the directory tree ``root`` (a debootstrap, say).

    Contents of dev/, proc/ and sys/ are left out (the engine provides them);
    owners and modes are kept, mtimes fixed, entries sorted, so the same tree
    gives the same digest.
    """
    root = Path(root)
    if not (root / "bin").exists() and not (root / "usr").is_dir():
        raise ImageBuildError(f"{root} does not look like a root file system")

    def fill(tf: tarfile.TarFile) -> None:
        def fixed(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
            parts = info.name.split("/")
            if len(parts) > 1 and parts[0] in ("dev", "proc", "sys"):
                return None
            info.mtime = MTIME
            info.uname = info.gname = ""
            return info

        for entry in sorted(os.listdir(root)):
            tf.add(root / entry, arcname=entry, filter=fixed)

    return build_image(out, ref=ref, steps=[(fill, created_by)], cmd=cmd, fmt=tarfile.PAX_FORMAT)
