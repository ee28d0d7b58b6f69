"""The chunk files of a zarr array on disk (zarr v2 or v3): which ones the chunk grid calls for, which ones exist,
and a digest of their bytes.

Reading through zarr hides both kinds of damage a copied slide can have: a chunk file that is absent reads as the
fill value (a black tile), and a truncated one fails deep inside the codec with no file name. Looking at the files
themselves lets the data layer name the sample, the element and the chunk.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Read whole files in blocks of this size when hashing (bounded memory for any chunk size).
_HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class ChunkFiles:
    """One zarr array folder: its shape, the shape of one chunk *file* (a shard when sharded) and its key scheme."""

    folder: Path
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    prefix: str  # "c/" for zarr v3's default key encoding, "" for v2 keys
    separator: str  # "/" or "."

    @classmethod
    def find(cls, element_folder: Path) -> "ChunkFiles | None":
        """The full-resolution array of an element: the folder itself, or the first dataset of an OME-NGFF
        multiscale group. None where the layout is not one of those (the checks are then skipped)."""
        meta = _metadata(element_folder)
        if meta is None:
            return None
        if meta.get("node_type") == "array" or (element_folder / ".zarray").exists():
            return cls._from_array(element_folder)
        attrs = meta.get("attributes", meta)
        multiscales = attrs.get("ome", attrs).get("multiscales") or attrs.get("multiscales")
        try:
            return cls._from_array(element_folder / multiscales[0]["datasets"][0]["path"])
        except (TypeError, KeyError, IndexError):
            return None

    @classmethod
    def _from_array(cls, folder: Path) -> "ChunkFiles | None":
        if (folder / "zarr.json").exists():
            meta = json.loads((folder / "zarr.json").read_text())
            if meta.get("chunk_grid", {}).get("name") != "regular":
                return None
            encoding = meta.get("chunk_key_encoding", {"name": "default"})
            separator = encoding.get("configuration", {}).get("separator")
            default = encoding.get("name", "default") == "default"
            return cls(folder, tuple(meta["shape"]), tuple(meta["chunk_grid"]["configuration"]["chunk_shape"]),
                       "c/" if default else "", separator or ("/" if default else "."))
        if (folder / ".zarray").exists():
            meta = json.loads((folder / ".zarray").read_text())
            return cls(folder, tuple(meta["shape"]), tuple(meta["chunks"]), "", meta.get("dimension_separator") or ".")
        return None

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunks))

    def key(self, index: tuple[int, ...]) -> str:
        return self.prefix + self.separator.join(str(int(i)) for i in index) if index else self.prefix + "0"

    def region(self, index: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, self.chunks, self.shape))

    def missing(self) -> list[tuple[int, ...]]:
        """Chunk indices of the grid that have no file (zarr reads them as the fill value)."""
        present = {p.relative_to(self.folder).as_posix() for p in self._chunk_paths()}
        return [index for index in np.ndindex(*self.grid) if self.key(index) not in present]

    def files(self) -> list[Path]:
        """Every file of the array (metadata and chunks), in a fixed order."""
        return sorted((p for p in self.folder.rglob("*") if p.is_file()), key=lambda p: p.as_posix())

    def _chunk_paths(self):
        root = self.folder / self.prefix.rstrip("/") if self.prefix else self.folder
        if not root.is_dir():
            return []
        return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith((".z", "zarr.json"))]


def describe_chunk(files: ChunkFiles, index: tuple[int, ...]) -> str:
    """'chunk c/0/1/0 (rows 256:512, columns 0:256)' for the last two (y, x) dimensions."""
    region = files.region(index)
    where = f"rows {region[-2].start}:{region[-2].stop}, columns {region[-1].start}:{region[-1].stop}"
    return f"chunk {files.key(index)} ({where})"


def digest_files(arrays: list[ChunkFiles]) -> str:
    """sha256 over the relative path, size and bytes of every file of the arrays: changes whenever any pixel,
    chunk or piece of metadata changes, and costs one sequential read of the (compressed) files."""
    digest = hashlib.sha256()
    for files in arrays:
        for path in files.files():
            digest.update(f"{path.relative_to(files.folder.parent).as_posix()}\0{path.stat().st_size}\0".encode())
            with open(path, "rb") as handle:
                while block := handle.read(_HASH_BLOCK):
                    digest.update(block)
    return digest.hexdigest()


def _metadata(folder: Path) -> dict | None:
    for name in ("zarr.json", ".zattrs", ".zgroup"):
        if (folder / name).exists():
            return json.loads((folder / name).read_text())
    return None
