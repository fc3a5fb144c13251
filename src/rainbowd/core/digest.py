"""Content digests in OCI form (``sha256:<64 hex>``).

Everything rbd moves is named by its digest, so parsing is strict: a digest
that is not exactly lowercase sha256 hex is refused before it can become a
file name or a database key.
"""

from __future__ import annotations

import hashlib
import re
from typing import NewType

Digest = NewType("Digest", str)

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class DigestError(ValueError):
    """A string that should be a digest is not one."""


def parse_digest(value: str) -> Digest:
    """Return ``value`` as a Digest, or raise DigestError saying what is wrong."""
    if not isinstance(value, str) or not _DIGEST_RE.match(value):
        raise DigestError(
            f"not a sha256 digest: {value!r} (expected 'sha256:' followed by 64 lowercase hex)"
        )
    return Digest(value)


def is_digest(value: str) -> bool:
    return isinstance(value, str) and bool(_DIGEST_RE.match(value))


def sha256_digest(data: bytes) -> Digest:
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


def hex_part(digest: Digest) -> str:
    """The 64-hex part, safe to use as a file name (the digest was validated)."""
    return digest.split(":", 1)[1]


def short(digest: str) -> str:
    """A short form for logs and tables: the first 12 hex characters."""
    return digest.split(":", 1)[-1][:12]
