"""The agent's SSH keys: its server host key and its client key.

Both are ed25519 and live as OpenSSH private key files, mode 0600, under the
agent's state directory. They are created on first start and then never
change, because the coordinator's trust list pins their public halves: a new
key would be refused by every peer (client key) or be seen as a spoofed host
(host key) until the node re-registers.

Public keys travel as single OpenSSH lines (``ssh-ed25519 AAAA… comment``) in
:class:`rainbowd.core.messages.PeerInfo`; the parsers here are strict so that a
malformed line from the coordinator is an error, not a silently empty trust.
"""

from __future__ import annotations

import os
from pathlib import Path

import asyncssh
import structlog

log = structlog.get_logger(__name__)

KEY_ALG = "ssh-ed25519"


class KeyFormatError(ValueError):
    """A public key line or key file could not be parsed."""


def load_or_create_key(path: Path, comment: str | None = None) -> asyncssh.SSHKey:
    """Read the private key at ``path``, or create an ed25519 key there (mode 0600).

    The file is created with O_EXCL at mode 0600 from the start, so the
    private key is never readable by others even for an instant, and two
    processes racing to create it cannot both win.
    """
    path = Path(path)
    if path.exists():
        try:
            key = asyncssh.read_private_key(path)
        except (asyncssh.KeyImportError, OSError, ValueError) as e:
            raise KeyFormatError(f"cannot read SSH private key {path}: {e}") from None
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("ssh_key_mode_fixed", path=str(path), mode=oct(mode))
            os.chmod(path, 0o600)
        return key
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = asyncssh.generate_private_key(KEY_ALG, comment=comment or path.stem)
    data = key.export_private_key("openssh")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process created the key meanwhile
        except FileExistsError:
            return load_or_create_key(path, comment)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("ssh_key_created", path=str(path), fingerprint=fingerprint(key))
    return key


def public_line(key: asyncssh.SSHKey) -> str:
    """The OpenSSH single-line public key, e.g. ``ssh-ed25519 AAAA… comment``."""
    return key.export_public_key("openssh").decode("ascii").strip()


def parse_public_line(line: str) -> asyncssh.SSHKey:
    """Parse one OpenSSH public key line; raise KeyFormatError if it is not exactly one key."""
    text = line.strip()
    if not text or "\n" in text:
        raise KeyFormatError(f"expected one OpenSSH public key line, got {line[:80]!r}")
    try:
        return asyncssh.import_public_key(text)
    except (asyncssh.KeyImportError, ValueError) as e:
        raise KeyFormatError(f"not an OpenSSH public key ({e}): {line[:80]!r}") from None


def key_blob(key_or_line: asyncssh.SSHKey | str) -> bytes:
    """The wire encoding of a public key: what two keys are compared by (comment ignored)."""
    key = parse_public_line(key_or_line) if isinstance(key_or_line, str) else key_or_line
    return bytes(key.public_data)


def fingerprint(key_or_line: asyncssh.SSHKey | str) -> str:
    """``SHA256:…`` fingerprint, as ``ssh-keygen -l`` prints it (for logs and events)."""
    key = parse_public_line(key_or_line) if isinstance(key_or_line, str) else key_or_line
    return str(key.get_fingerprint("sha256"))


def same_key(a: asyncssh.SSHKey | str, b: asyncssh.SSHKey | str) -> bool:
    """True when ``a`` and ``b`` are the same public key, whatever their comments."""
    return key_blob(a) == key_blob(b)
