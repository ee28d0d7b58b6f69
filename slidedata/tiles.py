"""The tiles a slide is read by: the edge they have, and which tile a nucleus belongs to.

A tile (plus a margin) is what one reader holds in memory at a time, so its edge is capped: a slide stored as one
20,000 px chunk must not be read whole. Within the cap the edge follows the storage chunks, so that a tile read
decodes few chunks and each chunk mostly once.
"""

from __future__ import annotations

import numpy as np

# THE default cap on a tile's edge, in slide pixels (a 2048 px tile and its margin are ~16 MB of RGB).
DEFAULT_MAX_TILE = 2048


def tile_edge(chunk: int, max_tile: int = DEFAULT_MAX_TILE) -> int:
    """Edge of the tiles of a slide stored in `chunk`-px chunks, at most `max_tile`.

    Small chunks: the largest multiple of the chunk within the cap (a tile is whole chunks). Big chunks: the largest
    divisor of the chunk in [max_tile / 2, max_tile] (tiles never straddle a chunk border), else the cap itself.
    """
    if chunk < 1 or max_tile < 1:
        raise ValueError(f"tile edge: chunk ({chunk}) and cap ({max_tile}) must be positive")
    if chunk <= max_tile:
        return chunk * (max_tile // chunk)
    for edge in range(max_tile, (max_tile + 1) // 2 - 1, -1):
        if chunk % edge == 0:
            return edge
    return max_tile


def tile_index(coordinate: np.ndarray, tile: int) -> np.ndarray:
    """The tile of each (y or x) slide coordinate: the one rule behind the tile order of the nuclei and the reads."""
    return (np.asarray(coordinate) // tile).astype(np.int64)
