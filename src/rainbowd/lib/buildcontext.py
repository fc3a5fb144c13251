"""Build contexts for ``rbd build``: pack a directory, read its Dockerfile, check FROM.

The paper's "generate and distribute Dockerfiles" function ships a base image
once (the usual distribution) and then only a small context -- a Dockerfile
and a few files -- to every node, which builds on top of the base it already
holds. Three parties look at the same tar: the CLI packs it and refuses early,
the coordinator checks it again when it is uploaded (it must not trust the
CLI), and each agent checks it once more before it hands it to its Docker
engine (it must not trust the coordinator either). So the checks live here,
in the shared core, and every side calls the same code.

The FROM rule is what makes the build cheap and predictable: every stage must
start from the distributed base (or from an earlier stage of the same
Dockerfile), so no node ever pulls an image from the internet during a build.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rainbowd.core.units import human_bytes

#: largest context tar accepted (CLI, coordinator, agent): contexts are meant to be small
MAX_CONTEXT = 64 * 1024 * 1024


class ContextError(ValueError):
    """The context or its Dockerfile is unusable; the message says what and what to do."""


@dataclass(frozen=True)
class PackedContext:
    data: bytes
    digest: str  # sha256:<hex> of ``data``
    files: int


class _Limited(io.BytesIO):
    """A BytesIO refusing to grow past ``limit``: a huge context fails early, not once packed."""

    def __init__(self, limit: int, what: str) -> None:
        super().__init__()
        self.limit = limit
        self.what = what

    def write(self, b: bytes | bytearray | memoryview, /) -> int:  # type: ignore[override]
        if self.tell() + len(b) > self.limit:
            raise ContextError(
                f"build context {self.what} is larger than the {human_bytes(self.limit)} "
                "limit once packed; move large files out of it (the base image should carry "
                "them) and try again"
            )
        return super().write(b)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pack_context(directory: Path, dockerfile: str, limit: int | None = None) -> PackedContext:
    """Tar ``directory`` (sorted, owners and times zeroed) after checking its Dockerfile exists.

    Raises ContextError if the directory or the Dockerfile is missing, the
    Dockerfile lies outside the context, or the tar would exceed ``limit``.
    """
    root = Path(directory)
    if not root.is_dir():
        raise ContextError(f"build context {root} is not a directory")
    inner = dockerfile_path(dockerfile)
    if not (root / inner).is_file():
        raise ContextError(
            f"no Dockerfile {inner} in the build context {root}; write one or name it with -f"
        )
    buf = _Limited(MAX_CONTEXT if limit is None else limit, str(root))
    files = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            info = tar.gettarinfo(str(path), arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            if info.isfile():
                files += 1
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            elif info.isdir() or info.issym():
                tar.addfile(info)
            # sockets, fifos, devices have no place in a build context: left out
    data = buf.getvalue()
    return PackedContext(data=data, digest=digest_of(data), files=files)


def dockerfile_path(name: str) -> str:
    """``name`` as a clean relative path inside the context; ContextError if it escapes it."""
    p = PurePosixPath(name or "Dockerfile")
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ContextError(
            f"Dockerfile {name!r} must be a relative path inside the build context (no '..')"
        )
    return p.as_posix()


def read_dockerfile(context: bytes, dockerfile: str) -> str:
    """The Dockerfile's text from a context tar; ContextError if absent or not a tar."""
    name = dockerfile_path(dockerfile)
    try:
        with tarfile.open(fileobj=io.BytesIO(context), mode="r:") as tar:
            for member in tar:
                if PurePosixPath(member.name).as_posix() == name and member.isfile():
                    f = tar.extractfile(member)
                    assert f is not None
                    return f.read(1024 * 1024).decode("utf-8", errors="replace")
    except tarfile.TarError as e:
        raise ContextError(f"build context is not a readable tar: {e}") from None
    raise ContextError(f"build context has no Dockerfile {name}")


def normalize_ref(ref: str) -> str:
    """``name`` and ``name:latest`` are the same image; anything with a tag or digest is as is."""
    last = ref.rsplit("/", 1)[-1]
    if "@" in last or ":" in last:
        return ref
    return ref + ":latest"
