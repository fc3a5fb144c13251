"""One registry session over HTTP: authentication, TLS, and replies read within a limit.

Auth: anonymous first; a 401 with a ``Bearer`` challenge fetches a token from
the realm (HTTP Basic with the credentials file when one is set), a ``Basic``
challenge uses the credentials file directly. Credentials are read from the
file on the origin host and never appear in logs or error messages. Split
from registry.py (issue 15: one concern per file).
"""

from __future__ import annotations

import base64
import json
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from rainbowd.core.messages import RegistrySource

from .registry_names import Reference, RegistryError

#: manifests and token replies are small; a larger reply is refused rather than read whole
MAX_MANIFEST = 4 * 1024 * 1024
#: read size from the HTTP stream
PIECE = 256 * 1024

_CHALLENGE_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


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


def ssl_context(source: RegistrySource, where: str) -> ssl.SSLContext:
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
class RegistryClient:
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
                body = await read_limited(resp, MAX_MANIFEST, self.where, "token reply")
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


async def read_limited(resp: aiohttp.ClientResponse, limit: int, where: str, what: str) -> bytes:
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
