"""The OCI distribution API's read side, sans I/O: request paths, errors, byte ranges.

The agent's registry front door (``rainbowd.agent.mirror``) answers ``docker
pull`` and containerd through these rules; keeping them here, pure, lets the
tests walk every case of the grammar without a server.

* Paths: ``/v2/`` (the version check), ``/v2/<name>/manifests/<reference>``
  and ``/v2/<name>/blobs/<digest>``. ``<name>`` follows the distribution
  spec's grammar (lowercase path components separated by ``/``); a
  ``<reference>`` is a tag or a digest. Digests are sha256 only, as everywhere
  in rbd (``rainbowd.core.digest``): another algorithm is refused as invalid
  rather than looked up.
* Errors: the spec's JSON body ``{"errors": [{"code", "message", "detail"}]}``
  with the status its code goes with. The codes a miss gets (404
  ``MANIFEST_UNKNOWN`` / ``BLOB_UNKNOWN``) are what makes the clients fall back
  to the upstream themselves: containerd tries the next host of its
  ``hosts.toml`` and then the ``server``, and Docker's puller moves on from a
  mirror endpoint on any registry error code (moby's ``continueOnError``
  returns true for an ``errcode.Error`` from a mirror).
* Ranges: one ``Range: bytes=...`` range, as RFC 9110 puts it; a header this
  server does not take (several ranges, another unit, bad syntax) is ignored
  and the whole blob sent, which the RFC allows; a range wholly past the end
  is 416.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final, Literal

from rainbowd.core.digest import Digest, is_digest

#: the header every /v2/ answer carries, as the spec and Docker expect
API_VERSION_HEADER: Final = "Docker-Distribution-API-Version"
API_VERSION: Final = "registry/2.0"

#: a repository name's grammar (distribution spec, "Pulling manifests"): path
#: components of lowercase alphanumerics joined by '.', '_', '__' or dashes
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE: Final = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
#: a tag's grammar (distribution spec)
TAG_RE: Final = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
#: longest name taken: many clients cap host + '/' + name at 255 characters,
#: so a longer name can only be a mistake or a probe
MAX_NAME_LENGTH: Final = 255
#: anything shaped like a digest (algorithm:encoded), to tell a digest of another
#: algorithm (DIGEST_INVALID) from a tag (TAG_RE)
_DIGEST_SHAPE = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")

ErrorCode = Literal[
    "BLOB_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "TAG_INVALID",
    "UNSUPPORTED",
    "RANGE_INVALID",
]

#: the status each code is answered with (the spec's table; RANGE_INVALID is
#: the 416 of a blob range past the end)
STATUS: Final[dict[ErrorCode, int]] = {
    "BLOB_UNKNOWN": 404,
    "DIGEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "NAME_UNKNOWN": 404,
    "TAG_INVALID": 400,
    "UNSUPPORTED": 405,
    "RANGE_INVALID": 416,
}


class ApiError(Exception):
    """A request the front door answers with an error body; ``status`` goes with ``code``."""

    def __init__(self, code: ErrorCode, message: str, detail: object = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.detail = detail

    @property
    def status(self) -> int:
        return STATUS[self.code]

    def body(self) -> bytes:
        return error_body(self.code, self.message, self.detail)


def error_body(code: ErrorCode, message: str, detail: object = None) -> bytes:
    """The spec's error document: one error, ``detail`` only when there is one."""
    err: dict[str, object] = {"code": code, "message": message}
    if detail is not None:
        err["detail"] = detail
    return json.dumps({"errors": [err]}, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class BaseRequest:
    """``/v2/``: the client asks whether this is a registry speaking the v2 API."""


@dataclass(frozen=True, slots=True)
class ManifestRequest:
    """``/v2/<name>/manifests/<reference>``; exactly one of ``digest`` and ``tag`` is set."""

    name: str
    digest: Digest | None
    tag: str | None


@dataclass(frozen=True, slots=True)
class BlobRequest:
    """``/v2/<name>/blobs/<digest>``."""

    name: str
    digest: Digest


Request = BaseRequest | ManifestRequest | BlobRequest


def parse_path(path: str) -> Request:
    """What the request path asks for; ApiError with the spec's code when it is not valid.

    ``path`` is the decoded path (no query). A path that is no route of the
    read API at all (an upload, the catalog, the tag list) is ``UNSUPPORTED``:
    this server only serves.
    """
    if path in ("/v2", "/v2/"):
        return BaseRequest()
    if not path.startswith("/v2/"):
        raise ApiError("UNSUPPORTED", f"{path}: not a path of the registry API")
    rest = path[len("/v2/") :]
    # the last marker wins: a name may itself hold a component called "blobs" or "manifests"
    kind = max(("manifests", "blobs"), key=lambda k: rest.rfind(f"/{k}/"))
    name, sep, ref = rest.rpartition(f"/{kind}/")
    if not sep:
        raise ApiError("UNSUPPORTED", f"{path}: this mirror serves only manifests and blobs")
    check_name(name)
    if kind == "blobs":
        return BlobRequest(name=name, digest=check_digest(ref))
    if _DIGEST_SHAPE.match(ref):
        return ManifestRequest(name=name, digest=check_digest(ref), tag=None)
    if not TAG_RE.match(ref):
        raise ApiError("TAG_INVALID", f"{ref!r} is neither a tag nor a digest", {"tag": ref})
    return ManifestRequest(name=name, digest=None, tag=ref)


def check_name(name: str) -> str:
    """``name`` if it is a valid repository name, else ApiError NAME_INVALID."""
    if not name or len(name) > MAX_NAME_LENGTH or not NAME_RE.match(name):
        raise ApiError(
            "NAME_INVALID",
            f"invalid repository name {name[:MAX_NAME_LENGTH]!r}: lowercase letters, digits "
            f"and separators (. _ __ -) in components joined by '/', at most "
            f"{MAX_NAME_LENGTH} characters",
            {"name": name[:MAX_NAME_LENGTH]},
        )
    return name


def check_digest(value: str) -> Digest:
    """``value`` as a Digest if it is ``sha256:`` and 64 lowercase hex, else DIGEST_INVALID."""
    if not is_digest(value):
        raise ApiError(
            "DIGEST_INVALID",
            f"invalid digest {value[:100]!r}: this mirror takes sha256:<64 lowercase hex> only",
            {"digest": value[:100]},
        )
    return Digest(value)


# --------------------------------------------------------------------------
# byte ranges
# --------------------------------------------------------------------------
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes ``start`` to ``end`` inclusive of a ``size``-byte blob (as Content-Range counts)."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one range ``header`` asks of a ``size``-byte blob; None: send the whole blob.

    None for no header, and for one this server does not take (several
    ranges, another unit, bad syntax), which RFC 9110 lets a server ignore.
    ApiError RANGE_INVALID (416) for a range that asks for no byte of the blob:
    a first byte at or past the end, or a suffix of 0 bytes.
    """
    if header is None:
        return None
    m = _RANGE_RE.match(header.strip().replace(" ", ""))
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:  # a suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise _unsatisfiable(header, size)
        return ByteRange(max(0, size - n), size - 1, size)
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None  # syntactically invalid: ignored, like any range this server does not take
    if start >= size:
        raise _unsatisfiable(header, size)
    return ByteRange(start, min(end, size - 1), size)


def _unsatisfiable(header: str, size: int) -> ApiError:
    return ApiError(
        "RANGE_INVALID",
        f"range {header[:100]!r} asks for no byte of a {size}-byte blob",
        {"size": size},
    )


def chunk_slices(chunk_size: int, start: int, end: int) -> list[tuple[int, int, int]]:
    """(chunk index, first, stop) of each chunk holding bytes ``start``..``end`` (inclusive).

    ``first``/``stop`` slice the chunk's bytes: what a range answer sends of
    it. Serving reads whole chunks (the unit a chunk check covers) and cuts
    them, so a byte sent from the middle of a chunk was still checked.
    """
    if chunk_size <= 0 or start < 0 or end < start:
        raise ValueError(f"no chunks for bytes {start}-{end} in chunks of {chunk_size}")
    out = []
    for index in range(start // chunk_size, end // chunk_size + 1):
        base = index * chunk_size
        out.append((index, max(start, base) - base, min(end + 1, base + chunk_size) - base))
    return out
