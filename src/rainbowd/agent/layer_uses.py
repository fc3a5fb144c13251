"""LayerUses: when each layer in the store was last used, kept durably beside it.

Eviction is least-recently-used, so it needs use times that survive a
restart. File access times cannot be trusted for that (``noatime`` and
``relatime`` mounts, the default almost everywhere, do not update them on
every read), so the agent keeps its own record: ``<store>/layer-uses.msgpack``,
a small map of digest -> last use (wall clock, seconds), rewritten atomically
(temp file, fsync, rename) so a crash leaves the old or the new record, never
a torn one. It also keeps the last evictions (digest, bytes, when), so
``rbd-agent status`` can account for a layer that is gone even after a
restart.

"Use" is: added to the store (pulled or ingested), served to a peer, loaded
into Docker, or pinned by the coordinator (a job needs it here). A layer with
no record (held before this file existed) falls back to its blob's mtime,
which is when it was installed: blobs are never written after the rename.
Mutations happen in memory on the event loop; :meth:`flush` writes them out
(the hygiene loop calls it, and the agent at shutdown), so serving a chunk
costs a dict update, not a disk write.
"""

from __future__ import annotations

from pathlib import Path

import msgpack
import msgspec
import structlog

from rainbowd.lib.atomicfile import write_atomic

log = structlog.get_logger(__name__)

#: evictions remembered for status (newest last)
EVICTED_MEMORY = 200


class Eviction(msgspec.Struct, kw_only=True):
    digest: str
    size: int
    at: float


class _Record(msgspec.Struct, kw_only=True):
    uses: dict[str, float] = {}
    evicted: list[Eviction] = []


class LayerUses:
    FILE = "layer-uses.msgpack"

    def __init__(self, store_root: Path) -> None:
        self.path = Path(store_root) / self.FILE
        self._uses: dict[str, float] = {}
        self.evicted: list[Eviction] = []
        self._dirty = False
        self._load()

    def _load(self) -> None:
        try:
            raw = msgpack.unpackb(self.path.read_bytes(), raw=False)
            rec = msgspec.convert(raw, _Record)
        except FileNotFoundError:
            return
        except (ValueError, msgspec.ValidationError, msgpack.ExtraData) as e:
            # a damaged record only costs LRU precision: start from blob mtimes
            log.warning(
                "layer use record unreadable; starting afresh", path=str(self.path), error=str(e)
            )
            return
        self._uses = dict(rec.uses)
        self.evicted = list(rec.evicted)

    def touch(self, digest: str, now: float, resolution: float = 1.0) -> None:
        """Record a use at ``now``; one within ``resolution`` seconds of the last is ignored.

        The resolution keeps a layer served chunk after chunk (or pinned on
        every heartbeat) from dirtying the record all the time; LRU order
        does not need sub-second precision.
        """
        if now - self._uses.get(digest, 0.0) >= resolution:
            self._uses[digest] = now
            self._dirty = True

    def last_used(self, digest: str, blob: Path) -> float:
        """The recorded use, else the blob's mtime (its install time), else 0."""
        t = self._uses.get(digest)
        if t is not None:
            return t
        try:
            return blob.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def evicted_now(self, digest: str, size: int, now: float) -> None:
        self._uses.pop(digest, None)
        self.evicted.append(Eviction(digest=digest, size=size, at=now))
        del self.evicted[:-EVICTED_MEMORY]
        self._dirty = True

    def retain(self, held: set[str]) -> None:
        """Forget use times of layers no longer in the store."""
        gone = [d for d in self._uses if d not in held]
        for d in gone:
            del self._uses[d]
        self._dirty = self._dirty or bool(gone)

    def snapshot(self) -> bytes | None:
        """The record to write if it changed since the last snapshot, else None.

        Taken on the event loop (where the record is mutated); :meth:`write`
        then does the blocking part in a worker thread.
        """
        if not self._dirty:
            return None
        self._dirty = False
        data: bytes = msgpack.packb(
            msgspec.to_builtins(_Record(uses=dict(self._uses), evicted=list(self.evicted)))
        )
        return data

    def flush(self) -> None:
        """Write the record now if it changed (blocking)."""
        data = self.snapshot()
        if data is not None:
            self.write(data)

    def write(self, data: bytes) -> None:
        """Replace the record with ``data`` atomically (temp file, fsync, rename)."""
        try:
            write_atomic(self.path, data)
        except BaseException:
            self._dirty = True
            raise
