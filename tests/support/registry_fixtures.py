"""Run real registries for tests: Debian's ``docker-registry`` (CNCF distribution).

:class:`RegistryProcess` writes a config.yml (filesystem storage, loopback
address, optional TLS, optional bearer-token auth), starts
``docker-registry serve``, waits until ``/v2/`` answers and stops it by PID.
Several registries may share one storage directory, which is how the tests
serve the same pushed images over plain HTTP, over TLS and behind token auth
without pushing three times.

:class:`TokenServer` is a minimal token service (the distribution "token"
auth spec): it checks HTTP Basic credentials and issues an RS256 JWT with the
``access`` claim, signed by a key whose self-signed certificate is the
registry's ``rootcertbundle`` and travels in the JWT's ``x5c`` header. It is
written by hand with ``cryptography`` (no JWT dependency) and runs in a thread
with the stdlib HTTP server so session fixtures do not depend on an event loop.

Certificates come from :func:`make_tls`: a throwaway CA and a server cert for
127.0.0.1/localhost signed by it.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from rainbowd.devcluster.registryconf import (
    REGISTRY_BIN,
    REGISTRY_ENV,
    SKOPEO_BIN,
    RegistryTokenAuth,
    registry_config,
    skopeo_push_argv,
)
from waiting import WaitedTooLong, wait_until_sync


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------
# certificates
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # PEM of the CA that signed ``cert``
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(key: rsa.RSAPrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _self_signed(key: rsa.RSAPrivateKey, cn: str, *, ca: bool) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
    )
    if ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        ).add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    return builder.sign(key, hashes.SHA256())


def make_tls(directory: Path) -> TlsFiles:
    """A CA and a server certificate for 127.0.0.1 and localhost, as PEM files."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_cert = _self_signed(ca_key, "rbd test CA", ca=True)
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(
        ca=directory / "ca.pem", cert=directory / "server.pem", key=directory / "server.key"
    )
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, files.key)
    return files


# --------------------------------------------------------------------------
# token server
# --------------------------------------------------------------------------
def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenServer:
    """Distribution token auth service on 127.0.0.1: Basic login in, RS256 JWT out."""

    def __init__(
        self, directory: Path, *, user: str, password: str, service: str = "rbd-test-registry"
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.user = user
        self.password = password
        self.service = service
        self.issuer = "rbd-test-token-issuer"
        self.key = _key()
        self.cert = _self_signed(self.key, "rbd test token signer", ca=False)
        self.rootcertbundle = directory / "token-signer.pem"
        self.rootcertbundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.requests: list[dict[str, Any]] = []  # what clients asked for, for assertions
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def issue(self, subject: str, access: list[dict[str, Any]]) -> str:
        now = int(time.time())
        header = {
            "typ": "JWT",
            "alg": "RS256",
            "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 30,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(sig)

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        query = parse_qs(parts.query)
        auth = handler.headers.get("Authorization", "")
        record: dict[str, Any] = {"query": query, "basic": auth.startswith("Basic ")}
        self.requests.append(record)
        if parts.path != "/token":
            handler.send_response(404)
            handler.end_headers()
            return
        user = ""
        if auth.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                user, password = "", ""
            if user != self.user or password != self.password:
                handler.send_response(401)
                handler.send_header("Content-Type", "application/json")
                handler.end_headers()
                handler.wfile.write(b'{"errors":[{"code":"UNAUTHORIZED"}]}')
                return
        elif query.get("scope"):
            # anonymous clients get nothing: the repository is private
            handler.send_response(401)
            handler.end_headers()
            return
        access = []
        for scope in query.get("scope", []):
            for one in scope.split(" "):
                kind, _, rest = one.partition(":")
                name, _, actions = rest.rpartition(":")
                if kind == "repository" and name:
                    access.append(
                        {"type": "repository", "name": name, "actions": actions.split(",")}
                    )
        body = json.dumps({"token": self.issue(user, access), "expires_in": 300}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def start(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# --------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------
class RegistryError(RuntimeError):
    pass


class RegistryProcess:
    """One ``docker-registry serve`` on 127.0.0.1:<free port>, stopped by PID."""

    def __init__(
        self,
        workdir: Path,
        *,
        storage: Path | None = None,
        tls: TlsFiles | None = None,
        token: TokenServer | None = None,
        allow_foreign_urls: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage = Path(storage) if storage else self.workdir / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.token = token
        # foreign (non-distributable) layers need their URLs allowed, or PUT fails with 500
        self.allow_foreign_urls = allow_foreign_urls
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "registry.log"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @staticmethod
    def available() -> str:
        """'' when the registry and skopeo binaries exist, else what is missing."""
        missing = [b for b in (REGISTRY_BIN, SKOPEO_BIN) if shutil.which(b) is None]
        if missing:
            return f"{', '.join(missing)} not installed: apt-get install docker-registry skopeo"
        return ""

    def config_text(self) -> str:
        token = (
            RegistryTokenAuth(
                realm=self.token.realm,
                service=self.token.service,
                issuer=self.token.issuer,
                rootcertbundle=self.token.rootcertbundle,
            )
            if self.token
            else None
        )
        return registry_config(
            storage=self.storage,
            addr=self.host,
            tls_cert=self.tls.cert if self.tls else None,
            tls_key=self.tls.key if self.tls else None,
            token=token,
            allow_foreign_urls=self.allow_foreign_urls,
        )

    def start(self, timeout: float = 15.0) -> RegistryProcess:
        config = self.workdir / "config.yml"
        config.write_text(self.config_text())
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [REGISTRY_BIN, "serve", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **REGISTRY_ENV},
            )
        finally:
            log.close()
        ctx = ssl.create_default_context(cafile=str(self.tls.ca)) if self.tls else None

        def answers() -> bool:
            proc = self.proc
            if proc is not None and proc.poll() is not None:
                raise RegistryError(f"registry exited with {proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=2, context=ctx):
                    return True
            except urllib.error.HTTPError:
                return True  # 401 from an auth-protected registry: it is up
            except (urllib.error.URLError, OSError):
                return False

        try:
            wait_until_sync(answers, timeout=timeout, what=f"the registry on {self.host}")
        except WaitedTooLong:
            self.stop()
            raise RegistryError(
                f"registry on {self.host} did not answer /v2/: {self.log_tail()}"
            ) from None
        return self

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def blob_data_path(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (to corrupt it in tests)."""
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    # -- plain-HTTP pushes of hand-made blobs and manifests --------------------
    def push_blob(self, repo: str, data: bytes) -> str:
        """Monolithic upload of ``data`` (plain HTTP, no auth); returns its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        req = urllib.request.Request(f"{self.url}/v2/{repo}/blobs/uploads/", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            location = resp.headers["Location"]
        if location.startswith("/"):
            location = self.url + location
        sep = "&" if "?" in location else "?"
        put = urllib.request.Request(
            f"{location}{sep}digest={digest}",
            data=data,
            method="PUT",
            headers={"Content-Type": "application/octet-stream"},
        )
        with urllib.request.urlopen(put, timeout=10):
            pass
        return digest

    def put_manifest(self, repo: str, reference: str, body: bytes, media_type: str) -> str:
        """PUT a manifest (or index) under a tag; returns its digest."""
        req = urllib.request.Request(
            f"{self.url}/v2/{repo}/manifests/{reference}",
            data=body,
            method="PUT",
            headers={"Content-Type": media_type},
        )
        with urllib.request.urlopen(req, timeout=10):
            pass
        return "sha256:" + hashlib.sha256(body).hexdigest()

    def get_manifest(self, repo: str, reference: str, accept: str) -> tuple[bytes, str]:
        """(body, media type) of a manifest, as the registry stores it."""
        req = urllib.request.Request(
            f"{self.url}/v2/{repo}/manifests/{reference}", headers={"Accept": accept}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.read(), resp.headers.get("Content-Type", "")


def skopeo_push(
    archive: Path, dest: str, *, oci: bool = False, extra: tuple[str, ...] = ()
) -> None:
    """``skopeo copy docker-archive:<archive> docker://<dest>`` to a plain-HTTP registry."""
    cmd = skopeo_push_argv(archive, dest, oci=oci, extra=extra)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RegistryError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
