"""Image rows and their upstream manifests (schema 5), for both backends' SqlStore.

An image is one row of ``images`` (the JSON of its StoredImage). Its
upstream manifest and index (``record.upstream``, issue 17) are rows of
``image_manifests``, one per document, the text verbatim: the image row keeps
the documents' digests and media types with empty text, so it stays small and
a manifest is never escaped inside another JSON document. Loading fills the
text back in after checking that it hashes to its digest; a row that does not
is set aside and costs the image only its upstream manifest (it is then
served under rbd's built one), never the image.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar

import msgspec
import structlog

from rainbowd.core.digest import sha256_digest
from rainbowd.core.messages import ManifestDoc, UpstreamManifest

from . import StoredImage

log = structlog.get_logger(__name__)

T = TypeVar("T")


class SqlStore(Protocol):
    """What of state/sql.py's SqlStore these functions use (it imports this module)."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any: ...
    def transaction(self) -> AbstractContextManager[None]: ...
    def _valid_rows(
        self, table: str, column: str, rows: Iterable[tuple[Any, str]], kind: type[T]
    ) -> list[T]: ...
    def _set_aside(
        self, table: str, where: str, keys: tuple[Any, ...], body: Any, error: str
    ) -> None: ...


def save_image(store: SqlStore, image: StoredImage) -> None:
    """The image row and its manifest rows, in one transaction (joining an open one)."""
    docs = _upstream_docs(image)
    with store.transaction():
        store.execute(
            "INSERT INTO images(ref, body) VALUES (?, ?) "
            "ON CONFLICT(ref) DO UPDATE SET body = excluded.body",
            (image.ref, msgspec.json.encode(_without_text(image)).decode()),
        )
        have = {
            str(row[0])
            for row in store.execute(
                "SELECT digest FROM image_manifests WHERE ref = ?", (image.ref,)
            ).fetchall()
        }
        for digest in sorted(have - {d.digest for d in docs}):
            store.execute(
                "DELETE FROM image_manifests WHERE ref = ? AND digest = ?", (image.ref, digest)
            )
        for d in docs:
            if d.digest not in have:
                store.execute(
                    "INSERT INTO image_manifests(ref, digest, media_type, body) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (image.ref, d.digest, d.media_type, d.text),
                )


def delete_image(store: SqlStore, ref: str) -> None:
    with store.transaction():
        store.execute("DELETE FROM images WHERE ref = ?", (ref,))
        store.execute("DELETE FROM image_manifests WHERE ref = ?", (ref,))


def load_images(store: SqlStore) -> list[StoredImage]:
    """Every image, its upstream manifests filled in from their rows (each checked)."""
    rows = store.execute("SELECT ref, body FROM images ORDER BY ref").fetchall()
    images = store._valid_rows("images", "ref", rows, StoredImage)
    texts: dict[tuple[str, str], tuple[str, str]] = {}
    for ref, digest, media_type, body in store.execute(
        "SELECT ref, digest, media_type, body FROM image_manifests"
    ).fetchall():
        key = (str(ref), str(digest))
        if isinstance(body, str) and sha256_digest(body.encode()) == digest:
            texts[key] = (str(media_type), body)
        else:
            error = "body does not hash to its digest"
            store._set_aside("image_manifests", "ref = ? AND digest = ?", key, body, error)
    for image in images:
        _fill(image, texts)
    return images


def _fill(image: StoredImage, texts: dict[tuple[str, str], tuple[str, str]]) -> None:
    record = image.record
    if record is None or record.upstream is None:
        return
    filled: list[ManifestDoc] = []
    for doc in _docs_of(record.upstream):
        found = texts.get((image.ref, doc.digest))
        if found is None or found[0] != doc.media_type:
            log.error(
                "upstream manifest of an image is not stored intact; the image is "
                "served under rbd's built manifest",
                image=image.ref,
                manifest=doc.digest,
            )
            record.upstream = None
            return
        filled.append(msgspec.structs.replace(doc, text=found[1]))
    record.upstream = UpstreamManifest(
        manifest=filled[0], index=filled[1] if len(filled) > 1 else None
    )


def _docs_of(upstream: UpstreamManifest) -> list[ManifestDoc]:
    """The documents of ``upstream``: the manifest first, then the index if any."""
    return [upstream.manifest] + ([upstream.index] if upstream.index is not None else [])


def _upstream_docs(image: StoredImage) -> list[ManifestDoc]:
    if image.record is None or image.record.upstream is None:
        return []
    return _docs_of(image.record.upstream)


def _without_text(image: StoredImage) -> StoredImage:
    """``image`` as its row stores it: upstream documents without their text (own rows)."""
    record = image.record
    if record is None or record.upstream is None:
        return image
    up = record.upstream
    bare = UpstreamManifest(
        manifest=msgspec.structs.replace(up.manifest, text=""),
        index=None if up.index is None else msgspec.structs.replace(up.index, text=""),
    )
    return msgspec.structs.replace(image, record=msgspec.structs.replace(record, upstream=bare))
