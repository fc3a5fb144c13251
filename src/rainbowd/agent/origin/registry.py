"""Registry origin: read an image from an OCI/Docker registry (distribution API v2).

An origin agent calls :func:`ingest_registry` to pull one image's config and
layers from a registry into its :class:`~rainbowd.lib.store.LayerStore`; from there
rbd spreads the layers to peers. Everything the registry sends is checked
before it counts: a manifest fetched by digest (and every child manifest of an
index) must hash to that digest, the config blob to the manifest's config
digest, each layer blob to its descriptor digest and size, and each layer's
uncompressed tar to the config's ``rootfs.diff_ids`` entry. Layer blobs pass
unchanged (no recompression): the blob digest the registry names is the digest
rbd moves.

Layers stream from the HTTP response into ``store.ingest`` through a small
bounded queue read by a worker thread (the store is synchronous), so a layer is
never held whole in memory and never written to disk twice; the same thread
inflates gzip layers to count and hash the tar. A bad byte anywhere fails the
call with :class:`RegistryError` (an :class:`~rainbowd.lib.image.ImageError`)
naming the image and the cause, and the layers this call added are removed
again, so a failed ingest leaves the store as it was and ``tmp/`` empty.

Auth: anonymous first; a 401 with a ``Bearer`` challenge fetches a token from
the realm (HTTP Basic with the credentials file when one is set), a ``Basic``
challenge uses the credentials file directly. Credentials are read from the
file on the origin host and never appear in logs or error messages.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import platform as _platform
import queue
import re
import ssl
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog

from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.digest import Digest, is_digest, parse_digest, short
from rainbowd.core.messages import ImageRecord, LayerRef, RegistrySource, UpstreamManifest
from rainbowd.core.upstreammanifest import UpstreamManifestError, check_upstream, doc_of
from rainbowd.lib.hostplatform import host_architecture
from rainbowd.lib.image import ImageError
from rainbowd.lib.store import LayerStore, StoreError

log = structlog.get_logger(__name__)

# -- media types -------------------------------------------------------------
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
MANIFEST_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST)
INDEX_TYPES = (DOCKER_LIST, OCI_INDEX)
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))

CONFIG_TYPES = (
    "application/vnd.docker.container.image.v1+json",
    "application/vnd.oci.image.config.v1+json",
)
LAYER_GZIP = (
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.oci.image.layer.v1.tar+gzip",
)
LAYER_TAR = (
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.oci.image.layer.v1.tar",
)
LAYER_FOREIGN = (
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)

#: manifests and configs are small; a larger reply is refused rather than read whole
MAX_MANIFEST = 4 * 1024 * 1024
MAX_CONFIG = 16 * 1024 * 1024
#: read size from the HTTP stream, and how many pieces may wait for the store thread
PIECE = 256 * 1024
QUEUE_PIECES = 16
#: layers fetched at once (a registry serves blobs in parallel; so does the disk)
PARALLEL_LAYERS = 3

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
_CHALLENGE_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')
#: Docker Hub's name and the host its API really lives on
_DOCKER_HUB = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}
_ARM_VARIANT = {"armv5tel": "v5", "armv6l": "v6", "armv7l": "v7", "armv8l": "v8"}
_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i386": "386"}


class RegistryError(ImageError):
    """Reading an image from a registry failed; the message names the image and the cause."""


# --------------------------------------------------------------------------
# references and platforms
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """A parsed ``host[:port]/repo[:tag|@sha256:hex]``."""

    host: str  # as written (for messages)
    api_host: str  # where the API is (docker.io -> registry-1.docker.io)
    repository: str
    tag: str  # "" when pinned by digest only
    digest: str  # "" when by tag

    @property
    def target(self) -> str:
        """What to ask /manifests/ for: the digest when pinned, else the tag."""
        return self.digest or self.tag

    def __str__(self) -> str:
        out = f"{self.host}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_reference(text: str) -> Reference:
    """Parse a registry reference; no tag and no digest means ``latest``."""
    where = f"registry reference {text!r}"
    if "/" not in text:
        raise RegistryError(f"{where}: expected HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]")
    host, rest = text.split("/", 1)
    if not _HOST_RE.match(host):
        raise RegistryError(f"{where}: {host!r} is not a registry host[:port]")
    digest = ""
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not is_digest(digest):
            raise RegistryError(f"{where}: digest must be sha256:<64 lowercase hex>")
    tag = ""
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            raise RegistryError(f"{where}: {tag!r} is not a valid tag")
    if not _REPO_RE.match(rest):
        raise RegistryError(f"{where}: {rest!r} is not a valid repository name (lowercase)")
    if not tag and not digest:
        tag = "latest"
    api_host = _DOCKER_HUB.get(host.lower(), host)
    if api_host != host and "/" not in rest:
        rest = f"library/{rest}"
    return Reference(host=host, api_host=api_host, repository=rest, tag=tag, digest=digest)


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def _norm_arch(arch: str) -> str:
    return _ARCH_ALIASES.get(arch.lower(), arch.lower())


def parse_platform(text: str) -> Platform:
    """``os/arch[/variant]`` with arch aliases normalized (x86_64 -> amd64)."""
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise RegistryError(f"platform {text!r}: expected os/arch[/variant], e.g. linux/amd64")
    return Platform(parts[0].lower(), _norm_arch(parts[1]), parts[2] if len(parts) == 3 else "")


def host_platform() -> Platform:
    """This host as an OCI platform: linux/<arch>[/<arm variant>]."""
    arch = host_architecture()
    variant = _ARM_VARIANT.get(_platform.machine().lower(), "") if arch == "arm" else ""
    return Platform("linux", arch, variant)


def _platform_matches(wanted: Platform, entry: Mapping[str, Any]) -> bool:
    os_ = str(entry.get("os", "")).lower()
    arch = _norm_arch(str(entry.get("architecture", "")))
    variant = str(entry.get("variant", ""))
    if os_ != wanted.os or arch != wanted.architecture:
        return False
    if not wanted.variant:
        return True
    # arm64 images rarely name "v8"; treat it as the default variant
    if wanted.architecture == "arm64" and wanted.variant == "v8" and not variant:
        return True
    return variant == wanted.variant


# --------------------------------------------------------------------------
# HTTP with auth
# --------------------------------------------------------------------------
def _read_credentials(path: str, where: str) -> tuple[str, str]:
    """``user:password`` from the first line of ``path`` (the content never goes in errors)."""
    try:
        line = Path(path).read_text(encoding="utf-8").splitlines()[0].strip()
    except FileNotFoundError:
        raise RegistryError(f"{where}: credentials file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, IndexError) as e:
        kind = "is empty" if isinstance(e, IndexError) else f"is unreadable ({type(e).__name__})"
        raise RegistryError(f"{where}: credentials file {path} {kind}") from None
    user, sep, password = line.partition(":")
    if not sep or not user:
        raise RegistryError(f"{where}: credentials file {path} must hold one line user:password")
    return user, password


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Scheme and parameters of a WWW-Authenticate header (one challenge)."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
        for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return scheme.lower(), params


def _ssl_context(source: RegistrySource, where: str) -> ssl.SSLContext:
    if source.ca_file:
        if not Path(source.ca_file).is_file():
            raise RegistryError(f"{where}: CA file {source.ca_file} does not exist")
        try:
            return ssl.create_default_context(cafile=source.ca_file)
        except (ssl.SSLError, OSError) as e:
            raise RegistryError(
                f"{where}: CA file {source.ca_file} is not a PEM bundle: {e}"
            ) from None
    return ssl.create_default_context()


@dataclass
class _Client:
    """One registry session: base URL, TLS context, the current Authorization header."""

    source: RegistrySource
    ref: Reference
    session: aiohttp.ClientSession
    where: str
    authorization: str | None = None
    scheme: str = field(init=False)

    def __post_init__(self) -> None:
        self.scheme = "http" if self.source.insecure else "https"

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.ref.api_host}/v2/{self.ref.repository}"

    def _cred_note(self) -> str:
        if self.source.credentials_file:
            return f"with credentials from {self.source.credentials_file}"
        return "anonymously (no credentials file given)"

    async def get(self, path: str, *, accept: str = "") -> aiohttp.ClientResponse:
        """GET ``base + path``, answering one auth challenge; the caller releases the reply."""
        url = self.base + path
        answered = False
        for _ in range(2):
            headers = {"Accept": accept} if accept else {}
            if self.authorization:
                headers["Authorization"] = self.authorization
            resp = await self._send(url, headers)
            if resp.status != 401:
                if resp.status == 403:
                    resp.release()
                    raise RegistryError(
                        f"{self.where}: access denied (403) to repository "
                        f"{self.ref.repository} {self._cred_note()}"
                    )
                return resp
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.release()
            if answered:
                break
            answered = True
            await self._answer(challenge)
        raise RegistryError(
            f"{self.where}: authentication failed (401) for repository {self.ref.repository} "
            f"{self._cred_note()}"
        )

    async def _send(self, url: str, headers: dict[str, str]) -> aiohttp.ClientResponse:
        host = urlsplit(url).netloc
        try:
            return await self.session.get(url, headers=headers)
        except aiohttp.ClientConnectorCertificateError as e:
            raise RegistryError(
                f"{self.where}: TLS certificate of {host} not trusted "
                f"({e.certificate_error}); "
                + (
                    f"CA file {self.source.ca_file} does not vouch for it"
                    if self.source.ca_file
                    else "give the registry's CA with a CA file"
                )
            ) from None
        except aiohttp.ClientSSLError as e:
            raise RegistryError(
                f"{self.where}: TLS handshake with {host} failed ({e}); if the registry "
                "speaks plain HTTP, mark the source insecure"
            ) from None
        except aiohttp.ClientConnectorError as e:
            raise RegistryError(
                f"{self.where}: registry {host} unreachable: {e.os_error}"
            ) from None
        except TimeoutError:
            raise RegistryError(f"{self.where}: registry {host} timed out") from None
        except (aiohttp.ClientError, OSError) as e:
            raise RegistryError(f"{self.where}: registry {host} failed: {e}") from None

    async def _answer(self, challenge: str) -> None:
        scheme, params = _parse_challenge(challenge)
        creds = (
            _read_credentials(self.source.credentials_file, self.where)
            if self.source.credentials_file
            else None
        )
        if scheme == "basic":
            if creds is None:
                raise RegistryError(
                    f"{self.where}: registry requires a login (Basic auth); give a credentials "
                    "file with user:password"
                )
            if self.scheme != "https" and not self.source.insecure:  # pragma: no cover
                raise RegistryError(f"{self.where}: refusing to send a password over plain HTTP")
            self.authorization = "Basic " + _basic(*creds)
            return
        if scheme != "bearer" or "realm" not in params:
            raise RegistryError(
                f"{self.where}: registry asks for unsupported authentication "
                f"{scheme or '(no challenge)'!r}"
            )
        self.authorization = "Bearer " + await self._token(params, creds)

    async def _token(self, params: dict[str, str], creds: tuple[str, str] | None) -> str:
        realm = params["realm"]
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https"):
            raise RegistryError(f"{self.where}: token realm {realm!r} is not an http(s) URL")
        if creds is not None and parts.scheme == "http" and not self.source.insecure:
            raise RegistryError(
                f"{self.where}: token realm {realm} is plain HTTP; refusing to send the "
                f"credentials from {self.source.credentials_file} (mark the source insecure "
                "if this network is trusted)"
            )
        query = {"scope": params.get("scope") or f"repository:{self.ref.repository}:pull"}
        if "service" in params:
            query["service"] = params["service"]
        headers = {"Authorization": "Basic " + _basic(*creds)} if creds else {}
        try:
            async with self.session.get(realm, params=query, headers=headers) as resp:
                if resp.status in (401, 403):
                    raise RegistryError(
                        f"{self.where}: token server {parts.netloc} refused the login "
                        f"({resp.status}) {self._cred_note()}"
                    )
                if resp.status != 200:
                    raise RegistryError(
                        f"{self.where}: token server {parts.netloc} answered {resp.status}"
                    )
                body = await _read_limited(resp, MAX_MANIFEST, self.where, "token reply")
        except aiohttp.ClientConnectorCertificateError as e:
            raise RegistryError(
                f"{self.where}: TLS certificate of token server {parts.netloc} not trusted "
                f"({e.certificate_error})"
            ) from None
        except TimeoutError:
            raise RegistryError(f"{self.where}: token server {parts.netloc} timed out") from None
        except (aiohttp.ClientError, OSError) as e:
            raise RegistryError(
                f"{self.where}: token server {parts.netloc} unreachable: {e}"
            ) from None
        try:
            reply = json.loads(body)
            token = reply.get("token") or reply.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{self.where}: token server {parts.netloc} sent no token")
        return token


def _basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


async def _read_limited(resp: aiohttp.ClientResponse, limit: int, where: str, what: str) -> bytes:
    """Read a small reply whole, refusing one larger than ``limit``."""
    length = resp.content_length
    if length is not None and length > limit:
        raise RegistryError(f"{where}: {what} is {length} bytes, larger than {limit}")
    data = bytearray()
    async for piece in resp.content.iter_chunked(PIECE):
        data += piece
        if len(data) > limit:
            raise RegistryError(f"{where}: {what} is larger than {limit} bytes")
    return bytes(data)


# --------------------------------------------------------------------------
# manifests and config
# --------------------------------------------------------------------------
def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class _Fetched:
    """A manifest (or index) as the registry sent it, checked: media type, parsed, bytes."""

    media: str
    doc: dict[str, Any]
    body: bytes


async def _fetch_manifest(client: _Client, target: str, expected: str, what: str) -> _Fetched:
    """The manifest ``target`` names; its bytes checked against ``expected`` (if set)."""
    where = client.where
    try:
        resp = await client.get(f"/manifests/{target}", accept=ACCEPT)
        async with resp:
            if resp.status == 404:
                if is_digest(target):
                    raise RegistryError(
                        f"{where}: {what} {target} not found in repo {client.ref.repository}"
                    )
                raise RegistryError(
                    f"{where}: tag {target} not found in repo {client.ref.repository}"
                )
            if resp.status != 200:
                raise RegistryError(f"{where}: {what} request answered HTTP {resp.status}")
            body = await _read_limited(resp, MAX_MANIFEST, where, what)
            content_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            header_digest = resp.headers.get("Docker-Content-Digest", "")
    except TimeoutError:
        raise RegistryError(f"{where}: reading the {what} timed out") from None
    except (aiohttp.ClientError, OSError) as e:
        raise RegistryError(f"{where}: reading the {what} failed: {e}") from None
    actual = _sha256(body)
    if expected and actual != expected:
        raise RegistryError(
            f"{where}: {what} digest mismatch: content is {actual}, expected {expected}"
        )
    if header_digest and is_digest(header_digest) and header_digest != actual:
        raise RegistryError(
            f"{where}: {what} digest mismatch: content is {actual}, registry says {header_digest}"
        )
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise RegistryError(f"{where}: {what} is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise RegistryError(f"{where}: {what} is not a JSON object")
    media = str(doc.get("mediaType") or content_type)
    if media in DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
        raise RegistryError(
            f"{where}: {what} is Docker schema 1 ({media}), which is not supported; "
            "push the image again with a current client"
        )
    if media not in MANIFEST_TYPES and media not in INDEX_TYPES:
        raise RegistryError(f"{where}: {what} has unsupported media type {media!r}")
    return _Fetched(media, doc, body)


def _pick_platform(index: dict[str, Any], wanted: Platform, where: str) -> dict[str, Any]:
    entries = index.get("manifests")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise RegistryError(f"{where}: manifest list has no manifests")
    available: list[str] = []
    for entry in entries:
        plat = entry.get("platform")
        if not isinstance(plat, dict):
            continue
        if plat.get("os") == "unknown":  # attestation manifests, not images
            continue
        available.append(
            "/".join(
                str(p) for p in (plat.get("os"), plat.get("architecture"), plat.get("variant")) if p
            )
        )
        if _platform_matches(wanted, plat):
            chosen: dict[str, Any] = entry
            return chosen
    raise RegistryError(
        f"{where}: no image for platform {wanted}; available: "
        + (", ".join(available) or "(none named)")
    )


def _descriptor(d: Any, where: str, what: str) -> tuple[str, int, str]:
    """(digest, size, mediaType) of a descriptor, validated."""
    if not isinstance(d, dict):
        raise RegistryError(f"{where}: {what} descriptor is malformed")
    digest, size, media = d.get("digest"), d.get("size"), d.get("mediaType", "")
    if not isinstance(digest, str) or not is_digest(digest):
        raise RegistryError(f"{where}: {what} has unsupported digest {digest!r} (sha256 only)")
    if not isinstance(size, int) or size < 0:
        raise RegistryError(f"{where}: {what} has a malformed size {size!r}")
    return digest, size, str(media)


async def _fetch_config(client: _Client, digest: str, size: int, media: str) -> str:
    where = client.where
    if media and media not in CONFIG_TYPES:
        raise RegistryError(
            f"{where}: config has unsupported media type {media!r} (not a container image)"
        )
    if size > MAX_CONFIG:
        raise RegistryError(f"{where}: config is {size} bytes, larger than {MAX_CONFIG}")
    resp = await client.get(f"/blobs/{digest}")
    try:
        async with resp:
            if resp.status == 404:
                raise RegistryError(f"{where}: config blob {digest} not found in the registry")
            if resp.status != 200:
                raise RegistryError(f"{where}: config blob answered HTTP {resp.status}")
            body = await _read_limited(resp, MAX_CONFIG, where, "config")
    except TimeoutError:
        raise RegistryError(f"{where}: reading config blob {short(digest)} timed out") from None
    except (aiohttp.ClientError, OSError) as e:
        raise RegistryError(f"{where}: reading config blob {short(digest)} failed: {e}") from None
    actual = _sha256(body)
    if actual != digest or len(body) != size:
        raise RegistryError(
            f"{where}: config blob digest mismatch: content is {actual} ({len(body)} bytes), "
            f"manifest says {digest} ({size} bytes)"
        )
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise RegistryError(f"{where}: config is not UTF-8 JSON") from None


# --------------------------------------------------------------------------
# layers: HTTP stream -> worker thread -> store.ingest
# --------------------------------------------------------------------------
class _Abort(Exception):
    """Put into the queue to make the store thread stop (the producer failed)."""


_EOF = b""


class _LayerReader:
    """The readable ``store.ingest`` consumes, fed piece by piece from the event loop.

    Runs in the store's worker thread: it hashes the blob, inflates gzip layers
    to hash and count the tar, and at end of stream checks size, blob digest and
    diff_id. Raising there (before ``read`` returns EOF) makes ``store.ingest``
    drop its tmp copy, so an unverified layer is never installed.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        credits: asyncio.Semaphore,
        *,
        where: str,
        digest: str,
        size: int,
        diff_id: str,
        gzipped: bool,
    ) -> None:
        self.q: queue.Queue[bytes | BaseException] = queue.Queue()
        self.loop = loop
        self.credits = credits
        self.where = where
        self.digest = digest
        self.size = size
        self.diff_id = diff_id
        self.gzipped = gzipped
        self.blob_hash = hashlib.sha256()
        self.tar_hash = hashlib.sha256()
        self.received = 0
        self.uncompressed = 0
        self.inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None
        self._buf = b""
        self._eof = False

    def _inflate(self, data: bytes) -> None:
        """Feed compressed bytes; handles concatenated gzip members (valid gzip)."""
        while data and self.inflater is not None:
            try:
                out = self.inflater.decompress(data)
            except zlib.error as e:
                raise RegistryError(
                    f"{self.where}: layer {short(self.digest)} is not valid gzip ({e})"
                ) from None
            self.tar_hash.update(out)
            self.uncompressed += len(out)
            if not self.inflater.eof:
                return
            data = self.inflater.unused_data
            if data:
                self.inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def _finish(self) -> None:
        layer = f"layer {short(self.digest)}"
        if self.received != self.size:
            raise RegistryError(
                f"{self.where}: {layer} is truncated: got {self.received} of {self.size} bytes"
            )
        actual = "sha256:" + self.blob_hash.hexdigest()
        if actual != self.digest:
            raise RegistryError(
                f"{self.where}: {layer} blob digest mismatch: content is {actual}, "
                f"manifest says {self.digest}"
            )
        if self.inflater is not None:
            if not self.inflater.eof:
                raise RegistryError(f"{self.where}: {layer} gzip stream is truncated")
            tail = self.inflater.flush()
            self.tar_hash.update(tail)
            self.uncompressed += len(tail)
            tar_digest = "sha256:" + self.tar_hash.hexdigest()
        else:
            tar_digest = actual
            self.uncompressed = self.received
        if tar_digest != self.diff_id:
            raise RegistryError(
                f"{self.where}: {layer} diff_id mismatch: uncompressed content is "
                f"{tar_digest}, config says {self.diff_id}"
            )

    def _release(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.credits.release)
        except RuntimeError:  # loop closed: nobody is waiting any more
            pass

    def read(self, n: int = -1) -> bytes:
        while not self._buf and not self._eof:
            item = self.q.get()
            if isinstance(item, BaseException):
                raise item
            self._release()
            if item is _EOF or not item:
                self._finish()
                self._eof = True
                break
            self.received += len(item)
            if self.received > self.size:
                raise RegistryError(
                    f"{self.where}: layer {short(self.digest)} is longer than the "
                    f"{self.size} bytes the manifest says"
                )
            self.blob_hash.update(item)
            self._inflate(item)
            self._buf = item
        if n < 0 or n >= len(self._buf):
            data, self._buf = self._buf, b""
        else:
            data, self._buf = self._buf[:n], self._buf[n:]
        return data


def _inspect_stored(
    store: LayerStore, digest: Digest, diff_id: str, gzipped: bool, where: str
) -> int:
    """Uncompressed size of a layer already held (re-checking its diff_id), without a download."""
    h = hashlib.sha256()
    total = 0
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None
    with store.open_blob(digest) as f:
        while data := f.read(1024 * 1024):
            while data and inflater is not None:
                try:
                    out = inflater.decompress(data)
                except zlib.error as e:
                    raise RegistryError(
                        f"{where}: layer {short(digest)} held in the store is not gzip ({e})"
                    ) from None
                h.update(out)
                total += len(out)
                if not inflater.eof:
                    break
                data = inflater.unused_data
                if data:
                    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            if inflater is None:
                h.update(data)
                total += len(data)
    if "sha256:" + h.hexdigest() != diff_id:
        raise RegistryError(
            f"{where}: layer {short(digest)} held in the store does not match diff_id {diff_id}"
        )
    return total


async def _ingest_layer(
    client: _Client,
    store: LayerStore,
    *,
    digest: str,
    size: int,
    media: str,
    diff_id: str,
    chunk_size: int,
    added: list[Digest],
) -> tuple[LayerRef, ChunkManifest]:
    where = client.where
    d = parse_digest(digest)
    gzipped = media in LAYER_GZIP
    llog = log.bind(image=str(client.ref), layer=short(digest))
    if not gzipped and digest != diff_id:
        raise RegistryError(
            f"{where}: uncompressed layer {short(digest)} does not match the config's "
            f"diff_id {diff_id}"
        )
    if store.has(d):
        manifest = store.manifest(d)
        if manifest.size != size:
            raise RegistryError(
                f"{where}: layer {short(digest)} is {manifest.size} bytes in the store, "
                f"manifest says {size}"
            )
        usize = await asyncio.to_thread(_inspect_stored, store, d, diff_id, gzipped, where)
        llog.info("layer already held", size=size)
        if manifest.chunk_size != chunk_size:
            llog.info("held layer keeps its chunk size", chunk_size=manifest.chunk_size)
        ref = LayerRef(
            digest=digest, size=size, media_type=media, diff_id=diff_id, uncompressed_size=usize
        )
        return ref, manifest

    loop = asyncio.get_running_loop()
    credits = asyncio.Semaphore(QUEUE_PIECES)
    reader = _LayerReader(
        loop, credits, where=where, digest=digest, size=size, diff_id=diff_id, gzipped=gzipped
    )
    llog.info("layer download", size=size, media_type=media)
    consumer = asyncio.ensure_future(
        asyncio.to_thread(store.ingest, reader, d, chunk_size)  # type: ignore[arg-type]
    )
    # a store thread that stopped early must not leave the producer waiting for credit
    consumer.add_done_callback(lambda _: credits.release())
    try:
        resp = await client.get(f"/blobs/{digest}")
        async with resp:
            if resp.status == 404:
                raise RegistryError(f"{where}: layer blob {digest} not found in the registry")
            if resp.status != 200:
                raise RegistryError(f"{where}: layer blob {short(digest)} answered {resp.status}")
            if resp.content_length is not None and resp.content_length != size:
                raise RegistryError(
                    f"{where}: layer {short(digest)} is truncated or corrupt in the registry: "
                    f"it sends {resp.content_length} bytes, manifest says {size}"
                )
            try:
                async for piece in resp.content.iter_chunked(PIECE):
                    await credits.acquire()
                    if consumer.done():
                        break
                    reader.q.put(piece)
            except TimeoutError:
                raise RegistryError(f"{where}: layer {short(digest)} download timed out") from None
            except (aiohttp.ClientError, OSError) as e:
                raise RegistryError(
                    f"{where}: layer {short(digest)} download broke off (truncated blob): {e}"
                ) from None
        reader.q.put(_EOF)
        manifest = await asyncio.shield(consumer)
    except BaseException as e:
        # stop the store thread and wait for it: its tmp copy must be gone before we return
        reader.q.put(e if isinstance(e, Exception) else _Abort("cancelled"))
        with contextlib.suppress(BaseException):
            await asyncio.shield(consumer)
        if consumer.done() and not consumer.cancelled() and consumer.exception() is None:
            added.append(d)  # installed just as we were cancelled: the rollback must see it
        raise
    added.append(d)
    llog.info(
        "layer stored",
        size=size,
        uncompressed=reader.uncompressed,
        chunks=manifest.count,
    )
    ref = LayerRef(
        digest=digest,
        size=size,
        media_type=media,
        diff_id=diff_id,
        uncompressed_size=reader.uncompressed,
    )
    return ref, manifest


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------
async def ingest_registry(
    source: RegistrySource, store: LayerStore, *, ref: str, chunk_size: int, timeout: float = 60.0
) -> tuple[ImageRecord, list[ChunkManifest]]:
    """Read ``source`` into ``store``; return the image (named ``ref``) and its layer manifests.

    ``timeout`` bounds connecting and each wait for bytes (not the whole
    transfer: a big layer on a slow link may take longer, as long as it moves).
    On failure raises RegistryError and removes the layers this call added.
    """
    reference = parse_reference(source.reference)
    where = f"registry image {reference}"
    wanted = parse_platform(source.platform) if source.platform else host_platform()
    # even an insecure (http) registry may send us to an https token realm: verify that
    ssl_ctx = _ssl_context(source, where)
    added: list[Digest] = []
    client_timeout = aiohttp.ClientTimeout(
        total=None, connect=timeout, sock_connect=timeout, sock_read=timeout
    )
    connector = aiohttp.TCPConnector(ssl=ssl_ctx)
    ilog = log.bind(image=str(reference), ref=ref)
    ilog.info("registry ingest", platform=str(wanted), insecure=source.insecure)
    try:
        async with aiohttp.ClientSession(
            timeout=client_timeout, connector=connector, trust_env=False
        ) as session:
            client = _Client(source=source, ref=reference, session=session, where=where)
            record, manifests = await _ingest(
                client, store, ref, wanted, bool(source.platform), chunk_size, added
            )
    except BaseException as e:
        for d in added:
            store.remove(d)
        if added:
            ilog.warning("ingest rolled back", removed=len(added))
        if isinstance(e, RegistryError):
            raise
        if isinstance(e, StoreError):
            raise RegistryError(f"{where}: {e}") from None
        if isinstance(e, ImageError):
            raise RegistryError(str(e)) from None
        if isinstance(e, TimeoutError):
            raise RegistryError(f"{where}: registry timed out after {timeout} s") from None
        if isinstance(e, aiohttp.ClientError):
            raise RegistryError(f"{where}: {e}") from None
        raise
    ilog.info(
        "image ingested",
        config=short(record.config_digest),
        layers=len(record.layers),
        size=record.size,
        new_layers=len(added),
    )
    return record, manifests


async def _ingest(
    client: _Client,
    store: LayerStore,
    ref: str,
    wanted: Platform,
    explicit_platform: bool,
    chunk_size: int,
    added: list[Digest],
) -> tuple[ImageRecord, list[ChunkManifest]]:
    where = client.where
    top = await _fetch_manifest(client, client.ref.target, client.ref.digest, "manifest")
    fetched, index = top, None
    if top.media in INDEX_TYPES:
        index = top
        entry = _pick_platform(top.doc, wanted, where)
        child, _, _ = _descriptor(entry, where, f"manifest for {wanted}")
        fetched = await _fetch_manifest(client, child, child, f"manifest for {wanted}")
        if fetched.media in INDEX_TYPES:
            raise RegistryError(f"{where}: nested manifest lists are not supported")
        explicit_platform = False  # the index entry already said which platform it is
    doc = fetched.doc

    cfg_digest, cfg_size, cfg_media = _descriptor(doc.get("config"), where, "config")
    config_text = await _fetch_config(client, cfg_digest, cfg_size, cfg_media)
    try:
        config = json.loads(config_text)
        diff_ids = config["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError) as e:
        raise RegistryError(f"{where}: config is not an image config ({e})") from None
    if not isinstance(diff_ids, list) or not all(is_digest(x) for x in diff_ids):
        raise RegistryError(f"{where}: config has malformed rootfs.diff_ids")
    if explicit_platform and isinstance(config, dict):
        have = {"os": config.get("os", ""), "architecture": config.get("architecture", "")}
        if config.get("variant"):
            have["variant"] = config["variant"]
        if not _platform_matches(wanted, have):
            raise RegistryError(
                f"{where}: image is for {'/'.join(str(v) for v in have.values())}, not the "
                f"requested platform {wanted}; available: only that one"
            )

    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise RegistryError(f"{where}: manifest has no layers list")
    if len(raw_layers) != len(diff_ids):
        raise RegistryError(
            f"{where}: manifest lists {len(raw_layers)} layers but the config has "
            f"{len(diff_ids)} diff_ids"
        )
    descs: list[tuple[str, int, str]] = []
    for i, raw in enumerate(raw_layers):
        digest, size, lmedia = _descriptor(raw, where, f"layer {i}")
        if lmedia in LAYER_FOREIGN:
            raise RegistryError(
                f"{where}: layer {i} ({short(digest)}) is a foreign/non-distributable layer "
                f"({lmedia}); such layers are not supported"
            )
        if lmedia not in LAYER_GZIP and lmedia not in LAYER_TAR:
            raise RegistryError(
                f"{where}: layer {i} ({short(digest)}) has unsupported media type {lmedia!r}"
            )
        descs.append((digest, size, lmedia))

    # each distinct blob once, a few at a time; results in manifest order
    unique: dict[str, int] = {}
    for i, (digest, _, _) in enumerate(descs):
        unique.setdefault(digest, i)
    results: dict[str, tuple[LayerRef, ChunkManifest]] = {}
    gate = asyncio.Semaphore(PARALLEL_LAYERS)

    async def one(i: int) -> None:
        digest, size, lmedia = descs[i]
        async with gate:
            results[digest] = await _ingest_layer(
                client,
                store,
                digest=digest,
                size=size,
                media=lmedia,
                diff_id=diff_ids[i],
                chunk_size=chunk_size,
                added=added,
            )

    try:
        async with asyncio.TaskGroup() as tg:
            for i in unique.values():
                tg.create_task(one(i))
    except BaseExceptionGroup as eg:
        # report the first real cause, not the group (the others were cancelled)
        first = eg.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None

    layers: list[LayerRef] = []
    manifests: list[ChunkManifest] = []
    for i, (digest, _, _) in enumerate(descs):
        layer, manifest = results[digest]
        if layer.diff_id != diff_ids[i]:
            raise RegistryError(f"{where}: blob {short(digest)} is listed with two diff_ids")
        layers.append(layer)
        manifests.append(manifest)
    record = ImageRecord(ref=ref, config_digest=cfg_digest, config=config_text, layers=layers)
    record.upstream = _upstream(record, fetched, index, where)
    return record, manifests


def _upstream(
    record: ImageRecord, manifest: _Fetched, index: _Fetched | None, where: str
) -> UpstreamManifest | None:
    """The registry's own manifest (and index) of ``record``, to be served as they are.

    None, logged, when they cannot travel (over MAX_MANIFEST, not UTF-8) or do
    not describe the record: the image is then served under rbd's built
    manifest, which names the same blobs under another digest.
    """
    main = doc_of(manifest.body, manifest.media)
    top = doc_of(index.body, index.media) if index is not None else None
    if main is None or (index is not None and top is None):
        log.warning("upstream manifest not kept", image=where, reason="too large or not UTF-8")
        return None
    kept = UpstreamManifest(manifest=main, index=top)
    try:
        check_upstream(record, kept)
    except UpstreamManifestError as e:
        log.warning("upstream manifest not kept", image=where, reason=str(e))
        return None
    return kept


__all__ = [
    "Platform",
    "Reference",
    "RegistryError",
    "host_platform",
    "ingest_registry",
    "parse_platform",
    "parse_reference",
]
