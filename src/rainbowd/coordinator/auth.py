"""Tokens and credentials.

Three secrets exist:

* the **join token** (cluster-wide) lets a new node enroll;
* the **admin token** guards the admin API;
* each node's **credential**, issued once at enrollment. The coordinator keeps
  only its sha256, so a leaked state database does not let anyone act as a node.

Agents authenticate with ``Authorization: Bearer <node_id>:<credential>``; the
admin API with ``Authorization: Bearer <admin token>``. Every comparison is
constant-time (:func:`hmac.compare_digest`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

#: node ids become log fields, DB keys and parts of the auth header: keep them plain
NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def new_token() -> str:
    """A random URL-safe secret (256 bits)."""
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def same_secret(given: str, expected: str) -> bool:
    """Constant-time equality; an empty expected secret never matches."""
    if not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def credential_matches(credential: str, stored_hash: str) -> bool:
    return same_secret(hash_secret(credential), stored_hash)


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def split_node_token(token: str) -> tuple[str, str] | None:
    """``<node_id>:<credential>`` -> (node_id, credential), or None if malformed."""
    node_id, sep, credential = token.rpartition(":")
    if not sep or not NODE_ID_RE.match(node_id) or not credential:
        return None
    return node_id, credential


def node_auth_header(node_id: str, credential: str) -> str:
    return f"Bearer {node_id}:{credential}"


def read_or_create_token(path: Path) -> tuple[str, bool]:
    """Read a token file, or create it (mode 0600) with a new token.

    Returns (token, created). The file holds the token on one line.
    """
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        pass
    else:
        if not token:
            raise ValueError(f"token file {path} is empty; delete it to have a new token made")
        return token, False
    path.parent.mkdir(parents=True, exist_ok=True)
    token = new_token()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, True
