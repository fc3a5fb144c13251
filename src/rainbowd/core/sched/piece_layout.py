"""How a layer is cut into pieces: :class:`Piece`, and the cuts themselves, pure arithmetic.

Why a module of its own: the piece scheduler (pieces.py) decides *when* a
layer is cut and re-cut, and piece growth (piece_growth.py) *which* pieces
merge; both speak of the same pieces, and neither should import the other
for them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .policies.state import PIECE_MARK


@dataclass(frozen=True)
class Piece:
    """Chunks ``[first, end)`` of ``layer``: ``size`` bytes, scheduled under ``key``."""

    layer: str
    key: str
    first: int
    end: int
    size: int


def piece_chunks(piece_bytes: int, chunk_size: int, size: int = 0, layer_pieces: int = 0) -> int:
    """Chunks per piece of a ``size``-byte layer (0: no split).

    At least ``piece_bytes`` worth of chunks (at least one); with ``layer_pieces``,
    enough chunks that the layer has no more than that many pieces.
    """
    if piece_bytes <= 0 or chunk_size <= 0:
        return 0
    per = max(1, piece_bytes // chunk_size)
    if layer_pieces > 0 and size > 0:
        chunks = -(-size // chunk_size)
        per = max(per, -(-chunks // layer_pieces))
    return per


def split_layer(layer: str, size: int, chunk_size: int, per_piece: int) -> list[Piece]:
    """``layer`` as pieces of ``per_piece`` chunks; one piece (keyed by the layer) if it fits."""
    chunks = max(1, -(-size // chunk_size)) if chunk_size > 0 else 1
    if per_piece <= 0 or chunks <= per_piece:
        return [Piece(layer, layer, 0, 0, size)]
    pieces = []
    for first in range(0, chunks, per_piece):
        end = min(chunks, first + per_piece)
        nbytes = min(size, end * chunk_size) - first * chunk_size
        pieces.append(Piece(layer, f"{layer}{PIECE_MARK}{first}", first, end, nbytes))
    return pieces
