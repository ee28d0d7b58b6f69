"""Feature matrices from the cache: several (encoder, patch size) blocks, nucleus shape, neighbourhood context and
the set of nearest neighbours."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.spatial import cKDTree

from regress.components import principal_basis, project
from slidedata.feature_store import FeatureStore, entry_key
from slidedata.patch_size import DEFAULT_PATCH_SIZES, PatchSize, patch_sizes
from slidedata.recipe import PIXEL_RECIPE

MORPHOLOGY_COLUMNS = ("area", "major_axis", "minor_axis", "eccentricity")
DEFAULT_CONTEXT_K = PIXEL_RECIPE.context_k  # neighbours averaged by the +context models unless told otherwise
FEATURE_DTYPE = np.float16
REDUCER_ROWS = 20000  # rows, over all samples, that fit the principal axes of each wide block


@dataclass(frozen=True)
class FeatureSpec:
    """Which cached features a model reads; saved with the model so prediction rebuilds exactly the same matrix."""

    encoder: str = "handcrafted"
    patch_sizes: tuple[PatchSize, ...] = DEFAULT_PATCH_SIZES  # given as 64 / '64' (slide pixels) or '32um' (microns)
    extra_keys: tuple[tuple[str, PatchSize], ...] = ()  # more (encoder, patch size) blocks, e.g. a second encoder's
    morphology: bool = True  # nucleus area and ellipse axes from the mask
    context_k: int = 0  # append the mean features of the k nearest nuclei (0 = none)
    # px: pool all nuclei within this radius (or each of several radii: one block per radius) instead of the k nearest
    context_radius: float | tuple[float, ...] | None = None
    # how neighbours' features are pooled, one block per pool and neighbourhood: 'mean', 'max' (a set of
    # neighbours summarised by permutation-invariant pools)
    context_pool: tuple[str, ...] = ("mean",)
    # z-score every feature within each sample: removes what differs between slides as a whole (stain, scanner,
    # section thickness) and keeps what differs between the nuclei of one slide
    standardize_per_sample: bool = False
    # Blocks wider than this are replaced by their principal components (axes fitted once, on a bounded subsample of
    # rows of every sample: `FeatureReducer`), as HEST-Benchmark does with 256; None keeps every feature. It bounds
    # the fit stage's memory and time whatever the encoder: a 1,536-d encoder at 2 sizes plus context is 1,032
    # columns instead of 6,152.
    block_components: int | None = 256
    # The set of each nucleus' `neighbour_set` nearest other nuclei (0 = none), for a head that learns a function of
    # each neighbour: per neighbour, nearest first, its base features, its offset and distance, and a presence flag
    # (`NEIGHBOUR_GEOMETRY`); only those within `neighbour_radius` ('30um', or whole slide pixels; None: the k nearest
    # at any distance). Its block follows the pooled context blocks (`neighbour_set_block`).
    neighbour_set: int = 0
    neighbour_radius: PatchSize | None = None
    keys: tuple[tuple[str, PatchSize], ...] = field(init=False)

    def __post_init__(self):
        if int(self.context_k) < 0:
            raise ValueError(f"context_k must be 0 (no context) or a positive number of neighbours, got {self.context_k}")
        object.__setattr__(self, "context_radius", _radii(self.context_radius))
        if any(not r > 0 for r in self.context_radius or ()):
            raise ValueError(f"context_radius must be positive numbers of pixels, got {self.context_radius}")
        pools = (self.context_pool,) if isinstance(self.context_pool, str) else tuple(self.context_pool)
        object.__setattr__(self, "context_pool", tuple(dict.fromkeys(pools)))  # a pool named twice is one block
        if not self.context_pool or any(p not in CONTEXT_POOLS for p in self.context_pool):
            raise ValueError(f"context_pool must be one or more of {', '.join(CONTEXT_POOLS)}, got {self.context_pool}")
        if self.block_components is not None and self.block_components < 1:
            raise ValueError(f"block_components must be positive or None, got {self.block_components}")
        if isinstance(self.neighbour_set, bool) or int(self.neighbour_set) != self.neighbour_set \
                or self.neighbour_set < 0:
            raise ValueError(f"neighbour_set must be 0 (none) or a positive number of neighbours, got "
                             f"{self.neighbour_set}")
        object.__setattr__(self, "neighbour_set", int(self.neighbour_set))
        if self.neighbour_radius is not None:
            object.__setattr__(self, "neighbour_radius", PatchSize.parse(self.neighbour_radius))
        object.__setattr__(self, "patch_sizes", patch_sizes(self.patch_sizes))
        object.__setattr__(self, "extra_keys", tuple((e, PatchSize.parse(s)) for e, s in self.extra_keys))
        object.__setattr__(self, "keys", tuple((self.encoder, s) for s in self.patch_sizes) + self.extra_keys)

    @property
    def has_context(self) -> bool:
        return bool(self.context_radius or self.context_k)

    @property
    def n_context_blocks(self) -> int:
        """Context blocks after the base features: one per (neighbourhood, pool)."""
        neighbourhoods = len(self.context_radius) if self.context_radius else int(bool(self.context_k))
        return neighbourhoods * len(self.context_pool)

    def without_context(self) -> "FeatureSpec":
        """The base features alone: no pooled context, no neighbour set."""
        return replace(self.without_neighbour_set(), context_k=0, context_radius=None, context_pool=("mean",))

    def without_neighbour_set(self) -> "FeatureSpec":
        return replace(self, neighbour_set=0, neighbour_radius=None)

    def blocks(self, base_dim: int) -> list[tuple[tuple, int]]:
        """(name, width) of each block of columns of `sample_features`, in order: the base features (the cached
        blocks and the nucleus shape, `base_dim` wide), then one context block per (neighbourhood, pool), then the
        neighbour set (K slots of `base_dim` + `NEIGHBOUR_GEOMETRY` columns). Two specs that differ only in their
        blocks build matrices whose shared blocks are the same columns (`feature_columns`)."""
        neighbourhoods = self.context_radius or ((f"k{self.context_k}",) if self.context_k else ())
        blocks = [(("base",), base_dim)] + [(("context", n, p), base_dim) for n in neighbourhoods
                                            for p in self.context_pool]
        if self.neighbour_set:
            radius = self.neighbour_radius.key if self.neighbour_radius else None
            blocks.append((("neighbours", self.neighbour_set, radius),
                           self.neighbour_set * (base_dim + len(NEIGHBOUR_GEOMETRY))))
        return blocks

    def base_width(self, width: int) -> int:
        """How many of the `width` columns of a matrix built for this spec are the base features (the inverse of
        the sum of `blocks`' widths)."""
        base, rest = divmod(width - self.neighbour_set * len(NEIGHBOUR_GEOMETRY),
                            1 + self.n_context_blocks + self.neighbour_set)
        if rest or base < 0:
            raise ValueError(f"{width} columns are not a feature matrix of this spec")
        return base

    def as_dict(self) -> dict:
        """Plain values (patch sizes written as their keys), for JSON summaries."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "keys"}
        out["patch_sizes"] = [s.key for s in self.patch_sizes]
        out["extra_keys"] = [f"{e}:{s.key}" for e, s in self.extra_keys]
        out["context_radius"] = list(self.context_radius) if self.context_radius else None
        out["context_pool"] = list(self.context_pool)
        out["neighbour_radius"] = self.neighbour_radius.key if self.neighbour_radius else None
        return out


CONTEXT_POOLS = ("mean", "max")
# What follows a neighbour's base features in its slot of the neighbour set: its offset from the nucleus (y, x) and
# distance, in microns where the sample's pixel size is known (else slide pixels), and 1 (0: an empty slot).
NEIGHBOUR_GEOMETRY = ("dy", "dx", "distance", "present")


def _radii(value) -> tuple[float, ...] | None:
    """One radius or several, as a tuple of floats (None: no radius)."""
    if value is None:
        return None
    values = tuple(float(v) for v in (value if isinstance(value, (tuple, list)) else (value,)))
    return values or None


@dataclass
class FeatureReducer:
    """Per cached block wider than `n_components`: its top principal axes (of the standardised features).

    Fitted once per model on a bounded subsample of every sample's rows (whole row chunks spread over each slide, so
    the subsample costs a few chunk reads), then applied on the fly a chunk of rows at a time: no stage ever holds a
    wide block of a whole sample. Unsupervised: the held-out nuclei's features may take part, their expression never.
    """

    n_components: int
    axes: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # 'encoder:size' -> (centre, scale, basis d x k)

    @staticmethod
    def wide_keys(store: FeatureStore, sample_name: str, spec: FeatureSpec) -> list[tuple[str, PatchSize]]:
        limit = spec.block_components
        return [(e, s) for e, s in spec.keys
                if limit is not None and store.open_entry(sample_name, e, s).features.shape[1] > limit]

    @staticmethod
    def subsample(store: FeatureStore, sample_name: str, keys: list[tuple[str, PatchSize]], max_rows: int
                  ) -> dict[str, np.ndarray]:
        """Up to `max_rows` rows of each block of one sample: whole row chunks, evenly spaced over the sample."""
        out = {}
        for encoder, size in keys:
            entry = store.open_entry(sample_name, encoder, size)
            if not entry.is_complete:
                entry.read()  # raises the "not computed yet" error
            wanted = max(1, -(-max_rows // entry.chunk_nuclei))
            units = np.unique(np.linspace(0, entry.n_units - 1, min(wanted, entry.n_units)).round().astype(int))
            out[entry_key(encoder, size)] = np.concatenate(
                [np.asarray(entry.features[entry.unit_rows(u)], dtype=np.float32) for u in units])[:max_rows]
        return out

    @classmethod
    def fit(cls, subsamples: list[dict[str, np.ndarray]], n_components: int, random_state: int = 0
            ) -> "FeatureReducer":
        """From the `subsample`s of every sample."""
        keys = dict.fromkeys(k for part in subsamples for k in part)
        axes = {}
        for key in keys:
            rows = np.concatenate([part[key] for part in subsamples if key in part])
            axes[key] = principal_basis(rows, n_components, random_state=random_state)
        return cls(n_components, axes)

    def width(self, key: str, dim: int) -> int:
        return self.axes[key][2].shape[1] if key in self.axes else dim

    def transform(self, key: str, rows: np.ndarray) -> np.ndarray:
        return project(rows, *self.axes[key]) if key in self.axes else np.asarray(rows, dtype=np.float32)


def scale_sets(store: FeatureStore, sample_name: str, spec: FeatureSpec, reducer: FeatureReducer | None
               ) -> np.ndarray:
    """Per column of `sample_features`, the id of the set of columns standardised together: the components of a
    reduced block share one (see `regress.components.column_scale`); every other column is a set of its own."""
    sets, next_id = [], 0
    for encoder, size in spec.keys:
        key, dim = entry_key(encoder, size), store.open_entry(sample_name, encoder, size).features.shape[1]
        if reducer is not None and key in reducer.axes:
            sets += [next_id] * reducer.width(key, dim)
            next_id += 1
        else:
            sets += list(range(next_id, next_id + dim))
            next_id += dim
    if spec.morphology:
        sets += list(range(next_id, next_id + len(MORPHOLOGY_COLUMNS)))
        next_id += len(MORPHOLOGY_COLUMNS)
    base = np.asarray(sets, dtype=np.int64)
    blocks = [base + i * next_id for i in range(1 + spec.n_context_blocks)]  # context mirrors its block
    start = next_id * (1 + spec.n_context_blocks)
    geometry = np.array([0, 0, 1, 2])  # an offset's two axes share one scale: no direction is stretched
    for _ in range(spec.neighbour_set):  # each slot mirrors the base block, then its geometry
        blocks += [base + start, geometry + start + next_id]
        start += next_id + 3
    return np.concatenate(blocks)


def feature_columns(read: FeatureSpec, built: FeatureSpec, base_dim: int) -> slice | np.ndarray:
    """The columns of a matrix built for `built` that hold the blocks of `read` (a slice where they are one run)."""
    starts, at = {}, 0
    for name, width in built.blocks(base_dim):
        starts[name], at = (at, width), at + width
    missing = [name for name, _ in read.blocks(base_dim) if name not in starts]
    if missing:
        raise ValueError(f"the features hold no block {missing[0]}")
    index = np.concatenate([np.arange(starts[n][0], starts[n][0] + starts[n][1]) for n, _ in read.blocks(base_dim)])
    if len(index) and np.array_equal(index, np.arange(index[0], index[0] + len(index))):
        return slice(int(index[0]), int(index[0]) + len(index))
    return index


def covering(specs: list[FeatureSpec]) -> FeatureSpec:
    """The spec among `specs` whose blocks include every other's: the one matrix from which every model's columns
    are taken (`feature_columns`)."""
    names = [{name for name, _ in spec.blocks(1)} for spec in specs]
    for spec, own in sorted(zip(specs, names), key=lambda pair: -len(pair[1])):
        if all(other <= own for other in names):
            return spec
    raise ValueError("the models read feature blocks that no one feature matrix holds together")


def knn_weights(coords: np.ndarray, k: int) -> sparse.csr_matrix:
    """Row-stochastic (n, n) matrix averaging each nucleus' k nearest other nuclei."""
    n = len(coords)
    k_eff = min(k + 1, n)
    if k_eff < 2:
        return sparse.csr_matrix((n, n))
    idx = cKDTree(coords).query(coords, k=k_eff)[1][:, 1:]  # the nucleus itself is its own nearest neighbour
    weights = np.full(idx.shape, 1.0 / idx.shape[1])
    return sparse.csr_matrix((weights.ravel(), idx.ravel(), np.arange(0, n * (k_eff - 1) + 1, k_eff - 1)),
                             shape=(n, n))


def radius_weights(coords: np.ndarray, radius: float) -> sparse.csr_matrix:
    """Row-stochastic (n, n) matrix averaging the other nuclei within `radius` px (empty rows stay zero)."""
    n = len(coords)
    pairs = cKDTree(coords).query_pairs(radius, output_type="ndarray")
    rows, cols = np.r_[pairs[:, 0], pairs[:, 1]], np.r_[pairs[:, 1], pairs[:, 0]]
    counts = np.bincount(rows, minlength=n)
    return sparse.csr_matrix((1.0 / counts[rows], (rows, cols)), shape=(n, n))


def neighbour_max(weights: sparse.csr_matrix, features: np.ndarray, block: int = 32) -> np.ndarray:
    """Per row, the column-wise maximum of the features of its neighbours (the non-zeros of `weights`' row); 0 for
    a nucleus without neighbours. A block of columns at a time: memory is the output plus neighbours x block."""
    weights = weights.tocsr()
    counts = np.diff(weights.indptr)
    has = counts > 0
    out = np.zeros(features.shape, dtype=features.dtype)
    if not has.any():
        return out
    starts = weights.indptr[:-1][has]
    for start in range(0, features.shape[1], block):
        columns = slice(start, start + block)
        gathered = np.asarray(features[weights.indices, columns], dtype=np.float32)
        out[has, columns] = np.maximum.reduceat(gathered, starts, axis=0)
    return out


def apply_weights(weights: sparse.csr_matrix, features: np.ndarray, block: int = 256) -> np.ndarray:
    """weights @ features, a block of columns at a time: memory stays at the output plus one block."""
    work = np.result_type(features.dtype, np.float32)
    out = np.empty(features.shape, dtype=features.dtype)
    for start in range(0, features.shape[1], block):
        columns = slice(start, start + block)
        out[:, columns] = weights @ features[:, columns].astype(work)
    return out


def neighbourhood_mean(coords: np.ndarray, features: np.ndarray, k: int) -> np.ndarray:
    """Mean features of each nucleus' k nearest other nuclei (KD-tree)."""
    return apply_weights(knn_weights(coords, k), features)


def neighbour_set_block(coords: np.ndarray, features: np.ndarray, k: int, radius: float | None = None,
                        unit: float = 1.0, out: np.ndarray | None = None, rows: int = 4096) -> np.ndarray:
    """(n, k x (d + 4)): for each nucleus, its k nearest other nuclei within `radius` px (None: at any distance),
    nearest first, each as [its d features, dy, dx, distance, 1] with the offset and distance in px x `unit`; the
    slots beyond the neighbours found are zeros. Written into `out` (the columns of a larger matrix) if given.

    A block of `rows` nuclei at a time against one KD-tree: memory is the output plus rows x k indices.
    """
    n, d = features.shape
    width = d + len(NEIGHBOUR_GEOMETRY)
    out = np.zeros((n, k * width), dtype=features.dtype) if out is None else out
    if out.shape != (n, k * width):
        raise ValueError(f"out has shape {out.shape}, expected {(n, k * width)}")
    out[:] = 0
    if n < 2 or k == 0:
        return out
    coords = np.asarray(coords, dtype=np.float64)
    tree = cKDTree(coords)
    bound = np.inf if radius is None else np.nextafter(radius, np.inf)  # within the radius inclusive, as query_pairs
    for start in range(0, n, rows):
        own = np.arange(start, min(start + rows, n))
        _, found = tree.query(coords[own], k=min(k + 1, n), distance_upper_bound=bound)
        found = found.reshape(len(own), -1)
        # the nucleus itself is among its nearest (at distance 0): moved last, the others keep their order
        found = np.take_along_axis(found, np.argsort(found == own[:, None], axis=1, kind="stable"), axis=1)[:, :k]
        for slot in range(found.shape[1]):
            present = found[:, slot] < n  # the tree returns index n for a slot with no neighbour within the bound
            i, j = own[present], found[present, slot]
            offset = (coords[j] - coords[i]) * unit
            columns = slot * width
            out[i, columns: columns + d] = features[j]
            out[i, columns + d: columns + d + 2] = offset
            out[i, columns + d + 2] = np.hypot(offset[:, 0], offset[:, 1])
            out[i, columns + d + 3] = 1
    return out


def standardize_columns(block: np.ndarray, columns: int = 256) -> None:
    """In place: each column minus its mean, over its standard deviation (constant columns become 0)."""
    for start in range(0, block.shape[1], columns):
        part = block[:, start: start + columns].astype(np.float64)
        spread = part.std(0)
        part = (part - part.mean(0)) / np.where(spread > 1e-8, spread, 1.0)
        block[:, start: start + columns] = part


def sample_features(store: FeatureStore, sample_name: str, spec: FeatureSpec,
                    nuclei: pd.DataFrame | None = None, reducer: FeatureReducer | None = None) -> np.ndarray:
    """(n_nuclei, n_features) of one sample in the cache's nucleus order, wide blocks reduced by `reducer`.

    float16, like the cache itself: it is the fit stage's largest object, and the estimators convert one block of
    rows at a time. Context needs every nucleus of the sample, so one sample is the unit of memory.
    """
    nuclei = store.read_nuclei(sample_name) if nuclei is None else nuclei
    entries = {entry_key(e, s): store.open_entry(sample_name, e, s) for e, s in spec.keys}
    widths = {key: reducer.width(key, entry.features.shape[1]) if reducer else entry.features.shape[1]
              for key, entry in entries.items()}
    base_width = sum(widths.values()) + (len(MORPHOLOGY_COLUMNS) if spec.morphology else 0)
    out = np.empty((len(nuclei), sum(width for _, width in spec.blocks(base_width))), dtype=FEATURE_DTYPE)
    offset = 0
    for key, entry in entries.items():
        columns = slice(offset, offset + widths[key])
        if reducer is not None and key in reducer.axes:
            if not entry.is_complete:
                entry.read()  # raises the "not computed yet" error
            for unit in range(entry.n_units):  # a chunk of rows at a time: the wide block is never whole
                rows = entry.unit_rows(unit)
                out[rows, columns] = reducer.transform(key, entry.features[rows])
        else:
            out[:, columns] = entry.read()
        offset += widths[key]
    if spec.morphology:
        out[:, offset: base_width] = np.log1p(nuclei[list(MORPHOLOGY_COLUMNS)].to_numpy(np.float32))
    if spec.standardize_per_sample:
        standardize_columns(out[:, :base_width])
    if spec.has_context:
        coords = nuclei[["y", "x"]].to_numpy(np.float64)
        neighbourhoods = [radius_weights(coords, r) for r in spec.context_radius] if spec.context_radius else \
            [knn_weights(coords, spec.context_k)]
        offset = base_width
        for weights in neighbourhoods:
            for pool in spec.context_pool:
                pooled = apply_weights(weights, out[:, :base_width]) if pool == "mean" else \
                    neighbour_max(weights, out[:, :base_width])
                out[:, offset: offset + base_width] = pooled
                offset += base_width
    if spec.neighbour_set:
        # microns where the sample's pixel size is known, so neighbours mean the same on any scanner
        microns = next(iter(entries.values())).attrs.get("sample_microns_per_pixel")
        radius = spec.neighbour_radius.pixels(microns, sample_name) if spec.neighbour_radius else None
        neighbour_set_block(nuclei[["y", "x"]].to_numpy(np.float64), out[:, :base_width], spec.neighbour_set, radius,
                            unit=microns or 1.0, out=out[:, base_width * (1 + spec.n_context_blocks):])
    return out
