"""Small helpers shared by the image-format unit tests (no fixtures here)."""

from __future__ import annotations

import hashlib
import io
import tarfile

from rainbowd.lib.store import LayerStore


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def store_snapshot(store: LayerStore) -> tuple[list[str], list[str], list[str]]:
    """Everything on disk in the store: blobs, partials, tmp."""
    return (
        sorted(p.name for p in store.blob_dir.iterdir()),
        sorted(p.name for p in store.partial_dir.iterdir()),
        sorted(p.name for p in store.tmp_dir.iterdir()),
    )


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def layer_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            add(tf, name, data)
    return buf.getvalue()
