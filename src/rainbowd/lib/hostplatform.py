"""The host's platform in Docker/OCI naming: what an image index entry is matched against.

Shared by the origins that pick a platform from an index (agent/origin/registry_names.py,
ocilayout.py) and by the demo image builder, so all three name the host alike.
"""

from __future__ import annotations

import platform

#: ``platform.machine()`` values to the OCI ``architecture`` names (image-spec, config.md)
ARCHITECTURES = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "i686": "386",
    "i386": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


def host_architecture() -> str:
    """The host CPU in Docker/OCI naming (amd64, arm64, ...); unknown names pass through."""
    machine = platform.machine().lower()
    return ARCHITECTURES.get(machine, machine)
