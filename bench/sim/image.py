"""The layers the simulator distributes: the profile's, the lab's demo image's, or sizes given.

A profile's ``[image] layers`` are used as they are (named layer-1, layer-2, ...).
Otherwise the lab distributes ``rainbowd.devcluster.imagebuild.build_demo_image(payload_mib=...)``
(busybox, the payload, a small file layer). Its exact layer sizes come from
building it -- under a second, in a temporary directory -- rather than from a
formula that would drift when the image builder changes.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from pathlib import Path

from rainbowd.devcluster.imagebuild import build_demo_image
from rainbowd.devcluster.profile import ClusterProfile


def profile_layers(profile: ClusterProfile) -> list[tuple[str, int]]:
    """The profile's own ``layers`` if it gives them, else the demo image of its payload."""
    if profile.layers:
        return [(f"layer-{i + 1}", s) for i, s in enumerate(profile.layers)]
    if profile.payload_mib is None:  # parse_profile never makes one; a hand-made one might
        raise ValueError(f"profile {profile.name} gives neither layers nor payload_mib")
    return demo_layers(profile.payload_mib)


def demo_layers(payload_mib: int) -> list[tuple[str, int]]:
    """(digest, size) of every layer of the demo image, in image order."""
    with tempfile.TemporaryDirectory(prefix="rbd-sim-") as tmp:
        archive = build_demo_image(Path(tmp) / "demo.tar", payload_mib=payload_mib)
        with tarfile.open(archive) as tf:
            f = tf.extractfile("manifest.json")
            if f is None:
                raise ValueError(f"{archive}: manifest.json is not a file")
            manifest = json.loads(f.read())
            paths: list[str] = manifest[0]["Layers"]
            # legacy docker-save layout: <hex digest>/layer.tar
            return [("sha256:" + p.split("/")[0], tf.getmember(p).size) for p in paths]


def given_layers(spec: str) -> list[tuple[str, int]]:
    """Layers from ``"1996800,8396800,10240"`` (bytes, image order), named layer-1, -2, ..."""
    try:
        sizes = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers wants comma-separated byte counts, got {spec!r}") from None
    if not sizes or any(s < 0 for s in sizes):
        raise ValueError(f"--layers wants at least one size, none negative, got {spec!r}")
    return [(f"layer-{i + 1}", s) for i, s in enumerate(sizes)]
