"""The image a lab run distributes, from the profile's ``[image]`` table.

* ``payload_mib`` given: the demo image (rainbowd.devcluster.imagebuild.build_demo_image:
  busybox, the payload, a small layer), as every lab run has used.
* only ``layers`` given: an image with one layer per size, each a tar holding
  one file ``layer-<i>.bin`` of seeded incompressible bytes. The file is the
  size minus the tar's own 1.5 KiB (a header and the end-of-archive blocks),
  and tar pads a layer to a multiple of 10 KiB, so each layer is within
  10 KiB of the size asked for. Not runnable (no shell in it): the lab moves
  and verifies images, it does not start containers. The report's ``layers``
  are the real sizes, so ``bench.sim --compare`` simulates the same bytes.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Callable
from pathlib import Path

from rainbowd.devcluster.imagebuild import MTIME, build_demo_image, build_image
from rainbowd.devcluster.profile import ClusterProfile

#: the reference every lab system distributes (rbd ingests it under this name)
REF = "rbd-demo:latest"
#: what a one-file tar adds to the file: its 512-byte header and two 512-byte end blocks
TAR_OVERHEAD = 1536


class _Bytes:
    """``size`` deterministic incompressible bytes for layer ``index``, read piecewise."""

    PIECE = 1 << 20

    def __init__(self, size: int, index: int) -> None:
        self.left, self.index, self.piece, self.buf = size, index, 0, b""

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        while len(self.buf) < n:
            key = f"rbd-lab-layer:{self.index}:{self.piece}".encode()
            self.buf += hashlib.shake_256(key).digest(self.PIECE)
            self.piece += 1
        data, self.buf = self.buf[:n], self.buf[n:]
        self.left -= len(data)
        return data


def _layer(index: int, size: int) -> Callable[[tarfile.TarFile], None]:
    def fill(tf: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(f"layer-{index}.bin")
        info.size = max(0, size - TAR_OVERHEAD)
        info.mtime, info.mode = MTIME, 0o644
        tf.addfile(info, _Bytes(info.size, index))

    return fill


def build_lab_image(profile: ClusterProfile, out: Path) -> Path:
    """Write the profile's image to ``out`` (a docker-archive); returns ``out``."""
    if profile.payload_mib is not None:
        return build_demo_image(out, ref=REF, payload_mib=profile.payload_mib)
    if not profile.layers:
        raise ValueError(f"profile {profile.name} gives neither payload_mib nor layers")
    steps = [
        (_layer(i + 1, size), f"COPY layer-{i + 1}.bin ({size} B) /")
        for i, size in enumerate(profile.layers)
    ]
    return build_image(out, ref=REF, steps=steps, cmd=["/layer-1.bin"])
