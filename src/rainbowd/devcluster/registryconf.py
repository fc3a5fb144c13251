"""Running Debian's ``docker-registry`` (CNCF distribution) and pushing into it with skopeo.

Why a module of its own: the tests' registry fixtures (tests/support/registry_fixtures.py)
and the lab's registry-only baseline (bench/lab/registry_system.py) start the very
same registry, one on loopback, one inside a lab node's network namespace. Both
take the config file and the push command from here, so a fix to either (a key
the next distribution release needs, a skopeo flag) reaches both. Starting,
waiting and stopping stay with each caller: how a process is spawned (directly,
or inside a namespace through the lab's process owner) is theirs to decide.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

REGISTRY_BIN = "docker-registry"
SKOPEO_BIN = "skopeo"
#: the registry reads this to decide where traces go; "none" keeps it from dialling out
REGISTRY_ENV = {"OTEL_TRACES_EXPORTER": "none"}


@dataclass(frozen=True)
class RegistryTokenAuth:
    """The ``auth: token:`` section: who issues bearer tokens and what signs them."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


def registry_config(
    *,
    storage: Path,
    addr: str,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    token: RegistryTokenAuth | None = None,
    allow_foreign_urls: bool = False,
    log_level: str = "info",
) -> str:
    """The config.yml for ``docker-registry serve``: filesystem storage under ``storage``.

    ``addr`` is ``host:port`` to listen on. Plain HTTP unless both TLS files are
    given. The access log is off (it is one line per request, which buries errors).
    Foreign (non-distributable) layers carry URLs the registry refuses unless
    ``allow_foreign_urls``: a PUT of such a manifest fails with 500 otherwise.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("registry TLS needs both tls_cert and tls_key")
    lines = [
        "version: 0.1",
        "log:",
        f"  level: {log_level}",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {storage}",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: {addr}",
        f"  secret: {secrets.token_hex(16)}",
    ]
    if tls_cert is not None and tls_key is not None:
        lines += ["  tls:", f"    certificate: {tls_cert}", f"    key: {tls_key}"]
    if token is not None:
        lines += [
            "auth:",
            "  token:",
            f"    realm: {token.realm}",
            f"    service: {token.service}",
            f"    issuer: {token.issuer}",
            f"    rootcertbundle: {token.rootcertbundle}",
        ]
    if allow_foreign_urls:
        lines += [
            "validation:",
            "  manifests:",
            "    urls:",
            "      allow:",
            "        - ^https?://",
        ]
    return "\n".join(lines) + "\n"


def skopeo_push_argv(
    archive: Path, dest: str, *, oci: bool = False, extra: tuple[str, ...] = ()
) -> list[str]:
    """``skopeo copy docker-archive:<archive> docker://<dest>`` to a plain-HTTP registry.

    ``oci`` stores an OCI manifest instead of Docker schema 2. skopeo gzips the
    archive's uncompressed layers on the way unless ``extra`` holds
    ``--preserve-digests`` (then the blobs are the archive's bytes, digests kept).
    """
    return [
        SKOPEO_BIN,
        "--insecure-policy",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        *(["--format", "oci"] if oci else []),
        *extra,
        f"docker-archive:{archive}",
        f"docker://{dest}",
    ]
