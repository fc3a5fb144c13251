"""Reading one chunk of a layer this node holds whole, or holds in part and is receiving.

Why one function for two servers: the ChunkServer (peers, cut-through relay)
and the registry front door (local clients, a blob streamed as it lands) both
hand out chunks of layers that may still be partials. A byte may leave this
node only after its chunk passed its check, and a partial may be installed
(its ``.part`` file renamed into the blob) between finding a chunk and reading
it. Both rules live here once, so the two servers cannot drift apart:

1. A layer held complete is read from its blob
   (:meth:`~rainbowd.lib.store.LayerStore.read_blob_chunk`).
2. Otherwise a chunk whose bit is set in a partial (the one a running pull
   shares, asked in memory; or one no pull has open, from its persisted
   bitmap) is read from that partial
   (:meth:`~rainbowd.lib.store.LayerStore.read_partial_chunk`).
3. Otherwise the caller's ``wait`` says where the chunk will be once it
   lands (the ChunkServer bounds it by ``relay_wait_s``, the front door by
   its stall rule; both wait on the :class:`~.relay.RelayBoard`), or None:
   the layer was installed meanwhile, read the blob.
4. A partial renamed into place between 2/3 and the read
   (FileNotFoundError) is read from the blob.

Every read is checked against the layer's chunk manifest when ``verify``
(``verify_served``), on the loop when the chunk is small, else in a worker
thread (chunk_io.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from rainbowd.core.chunks import ChunkManifest
from rainbowd.core.digest import Digest
from rainbowd.lib.store import LayerStore

from .chunk_io import chunk_work

#: where a chunk of a partial is: the layer's chunk manifest and the partial's data file
Where = tuple[ChunkManifest, Path]
#: (layer, index) -> where the chunk is once it landed; None: the layer is complete now
WaitChunk = Callable[[Digest, int], Awaitable[Where | None]]


async def read_chunk(
    store: LayerStore,
    layer: Digest,
    index: int,
    *,
    node: str,
    verify: bool,
    inline_max: int,
    wait: WaitChunk | None = None,
) -> tuple[bytes, bool]:
    """(chunk ``index`` of ``layer``, checked; whether it came from a partial).

    Raises what the store's reads raise (LayerMissing: not held and no
    ``wait``, or nothing to wait for; CorruptBlob; StoreError; IndexError)
    and what ``wait`` raises. ``store.has`` is two ``stat`` calls and runs
    inline.
    """
    if not store.has(layer):
        where = await partial_chunk(store, layer, index)
        if where is None and wait is not None:
            where = await wait(layer, index)
        if where is not None:
            manifest, path = where
            try:
                data = await chunk_work(
                    manifest.chunk_size,
                    inline_max,
                    store.read_partial_chunk,
                    layer,
                    index,
                    manifest,
                    path,
                    node=node,
                    verify=verify,
                )
            except FileNotFoundError:
                pass  # installed meanwhile (the .part was renamed into place): the blob
            else:
                return data, True
    read = store.read_blob_chunk
    known = store.cached_manifest(layer)
    if known is None:  # the manifest is read from disk the first time: not on the loop
        data = await asyncio.to_thread(read, layer, index, node=node, verify=verify)
    else:
        data = await chunk_work(
            known.chunk_size, inline_max, read, layer, index, node=node, verify=verify
        )
    return data, False


async def partial_chunk(store: LayerStore, layer: Digest, index: int) -> Where | None:
    """Where chunk ``index`` of a partial of ``layer`` is, if its bit is set (else None).

    The partial a running pull shares is asked in memory; a partial no pull
    has open is read from its persisted bitmap (in a thread: file reads).
    Raises IndexError for a chunk the layer does not have.
    """
    p = store.shared_partial(layer)
    if p is None:
        return await asyncio.to_thread(store.stored_partial_chunk, layer, index)
    if not 0 <= index < p.manifest.count:
        raise IndexError(f"layer {layer} has chunks 0..{p.manifest.count - 1}, not {index}")
    return (p.manifest, p.data_path) if p.has_chunk(index) else None
