"""The synthetic tissue behind the demo data: a global scene of nuclei, rendered window by window.

Everything per nucleus (site, type, size, orientation, darkness) and the zone fields (at low resolution) are computed
once for the whole slide; the image and mask rasters are produced for any window on request. A window's pixels do
not depend on which windows are rendered or in which order, so a slide of the challenge's size (20,000 x 22,000 px,
~200,000 nuclei) is written tile by tile in bounded memory, and a tiled render equals a render in one piece:

* nuclei are drawn in one global order, a pixel belonging to the first nucleus that covers it, so a nucleus crossing
  a tile border is owned the same way on both sides;
* pixel noise comes from fixed 256 px blocks seeded by (seed, stream, block), never from a per-tile generator;
* filters (texture, fibres, optical blur) run on the window plus a margin wider than their kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Ruifrok & Johnston optical-density vectors of haematoxylin and eosin (RGB).
HEMATOXYLIN = np.array([0.65, 0.70, 0.29], dtype=np.float32)
EOSIN = np.array([0.07, 0.99, 0.11], dtype=np.float32)


@dataclass(frozen=True)
class CellType:
    name: str
    radius: float  # px at the demo's site spacing, mean of the two semi-axes
    elongation: float  # major / minor semi-axis
    darkness: float  # haematoxylin density
    granularity: float  # 0 = smooth chromatin, 1 = coarse clumps
    vesicular: float  # pale centre (open chromatin)


CELL_TYPES = (
    CellType("epithelial", 8.0, 1.7, 0.55, 0.3, 0.5),
    CellType("fibroblast", 6.0, 3.0, 0.80, 0.2, 0.0),
    CellType("lymphocyte", 4.5, 1.05, 1.10, 0.1, 0.0),
    CellType("plasma", 5.5, 1.25, 0.85, 0.9, 0.2),
    CellType("macrophage", 9.0, 1.3, 0.40, 0.5, 0.3),
)
LYMPHOCYTE = 2
# Probability of each cell type in each zone: epithelium, lamina propria, lymphoid aggregate.
ZONE_TYPE_P = np.array([
    [0.85, 0.03, 0.08, 0.02, 0.02],
    [0.05, 0.35, 0.25, 0.20, 0.15],
    [0.02, 0.05, 0.85, 0.05, 0.03],
])
ZONE_DENSITY = np.array([0.75, 0.45, 0.95])  # acceptance of a jittered-grid site
GRID_SPACING = 17.0  # px between candidate sites at nucleus scale 1 (the demo's geometry)
MEAN_ACCEPT = 0.6 * 0.85  # mean site acceptance times tissue fraction, measured on generated samples
NOISE_BLOCK = 256  # px: the fixed grid of seeded noise blocks
# Noise streams: one independent field each.
_FINE, _COARSE, _FIBRES, _PIXEL = 1, 2, 3, 4
_BLUR = 0.7  # px, the optics: not scaled with the nuclei


@dataclass(frozen=True)
class Field:
    """A smooth zero-mean unit-variance Gaussian random field kept at low resolution (`step` px per cell)."""

    small: np.ndarray
    step: float

    @classmethod
    def random(cls, rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> "Field":
        step = max(int(sigma // 4), 1)
        small = rng.standard_normal((shape[0] // step + 2, shape[1] // step + 2)).astype(np.float32)
        small = ndimage.gaussian_filter(small, sigma / step)
        return cls((small - small.mean()) / (small.std() + 1e-8), float(step))

    def at(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Values at pixel coordinates (broadcast together): bilinear, so any window agrees with the whole."""
        ys, xs = np.broadcast_arrays(np.asarray(ys, np.float64), np.asarray(xs, np.float64))
        return ndimage.map_coordinates(self.small, [ys / self.step, xs / self.step], order=1, mode="nearest")

    def window(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self.at(np.arange(y0, y1)[:, None], np.arange(x0, x1)[None, :])


@dataclass
class Scene:
    """One slide's nuclei (in drawing order) and zone fields; rasters come from `render_mask` / `render_image`."""

    shape: tuple[int, int]
    seed: int
    scale: float  # nucleus size and texture scale relative to the demo's geometry
    tissue: Field
    epithelium: Field
    aggregate: Field
    cell_ids: np.ndarray  # uint32, increasing in drawing order
    y: np.ndarray
    x: np.ndarray
    types: np.ndarray
    zone: np.ndarray
    a: np.ndarray  # semi-axes (px) and orientation
    b: np.ndarray
    theta: np.ndarray
    darkness: np.ndarray
    extent: int  # the largest nucleus half-box (px): a nucleus never reaches further from its site pixel

    def __post_init__(self):
        self._by_y = np.argsort(self.y.astype(np.int64), kind="stable")
        self._sorted_y = self.y.astype(np.int64)[self._by_y]

    def __len__(self) -> int:
        return len(self.cell_ids)

    def zones(self, y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray]:
        """(tissue, zone) of every pixel of a window: zone 0 epithelium, 1 lamina propria, 2 lymphoid aggregate."""
        tissue = self.tissue.window(y0, y1, x0, x1) > -1.1  # a few lumina / gaps
        epithelium = self.epithelium.window(y0, y1, x0, x1) > 0.5
        aggregate = self.aggregate.window(y0, y1, x0, x1) > 1.0
        return tissue, np.where(aggregate, 2, np.where(epithelium, 0, 1))

    def nuclei_in(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Indices (in drawing order) of the nuclei whose box can reach the window."""
        lo = np.searchsorted(self._sorted_y, y0 - self.extent, side="left")
        hi = np.searchsorted(self._sorted_y, y1 + self.extent, side="right")
        candidates = self._by_y[lo:hi]
        xs = self.x[candidates].astype(np.int64)
        return np.sort(candidates[(xs >= x0 - self.extent) & (xs < x1 + self.extent)])


def demo_shape(n_nuclei: int) -> tuple[int, int]:
    """The demo's slide shape for about `n_nuclei` nuclei at its own site spacing."""
    side = int(np.sqrt(n_nuclei / MEAN_ACCEPT) * GRID_SPACING) + 64
    return side, int(side * 1.1)


def make_scene(shape: tuple[int, int], n_nuclei: int, seed: int) -> Scene:
    """About `n_nuclei` nuclei on a `shape` slide. The site spacing follows from the two, and nuclei, textures and
    fibres scale with it, so a sparser slide is the demo's tissue seen at a finer pixel size."""
    rng = np.random.default_rng(seed)
    height, width = shape
    spacing = float(np.sqrt(height * width * MEAN_ACCEPT / max(n_nuclei, 1)))
    scale = spacing / GRID_SPACING
    side = min(shape)
    tissue = Field.random(rng, shape, side / 6)
    epithelium = Field.random(rng, shape, side / 10)
    aggregate = Field.random(rng, shape, side / 12)

    # Candidate sites on a jittered grid; accepted by zone density, so aggregates are crowded.
    gy, gx = np.mgrid[spacing / 2: height - 8: spacing, spacing / 2: width - 8: spacing]
    ys = gy.ravel() + rng.uniform(-0.3, 0.3, gy.size) * spacing
    xs = gx.ravel() + rng.uniform(-0.3, 0.3, gx.size) * spacing
    iy, ix = ys.astype(np.int64), xs.astype(np.int64)
    zone = np.where(aggregate.at(iy, ix) > 1.0, 2, np.where(epithelium.at(iy, ix) > 0.5, 0, 1))
    keep = (tissue.at(iy, ix) > -1.1) & (rng.random(len(ys)) < ZONE_DENSITY[zone])
    ys, xs, zone = ys[keep], xs[keep], zone[keep]
    cumulative = np.cumsum(ZONE_TYPE_P, axis=1)[zone]
    types = np.minimum((rng.random(len(ys))[:, None] > cumulative).sum(axis=1), len(CELL_TYPES) - 1)

    radius = np.array([t.radius for t in CELL_TYPES])[types] * scale * rng.uniform(0.8, 1.2, len(ys))
    elongation = np.sqrt(np.array([t.elongation for t in CELL_TYPES])[types])
    a, b = radius * elongation, radius / elongation
    theta = rng.uniform(0, np.pi, len(ys))
    darkness = np.array([t.darkness for t in CELL_TYPES])[types] * rng.uniform(0.85, 1.15, len(ys))
    extent = int(np.ceil(a.max(initial=1.0))) + 1
    # Whole nuclei only: a site too close to the border is dropped, not cut.
    inside = ((ys.astype(np.int64) >= extent) & (ys.astype(np.int64) < height - extent)
              & (xs.astype(np.int64) >= extent) & (xs.astype(np.int64) < width - extent))
    # Non-contiguous ids far above the count, as in the challenge masks; increasing in drawing order.
    n = int(inside.sum())
    cell_ids = np.sort(rng.choice(np.arange(1, 20 * n + 2), size=n, replace=False)).astype(np.uint32)
    return Scene(shape=(int(height), int(width)), seed=int(seed), scale=scale, tissue=tissue, epithelium=epithelium,
                 aggregate=aggregate, cell_ids=cell_ids, y=ys[inside], x=xs[inside], types=types[inside],
                 zone=zone[inside], a=a[inside], b=b[inside], theta=theta[inside], darkness=darkness[inside],
                 extent=extent)


def block_noise(seed: int, stream: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Standard normal float32 noise of a window, the same values whatever window asks for a pixel."""
    out = np.empty((y1 - y0, x1 - x0), dtype=np.float32)
    for by in range(y0 // NOISE_BLOCK, (y1 - 1) // NOISE_BLOCK + 1):
        for bx in range(x0 // NOISE_BLOCK, (x1 - 1) // NOISE_BLOCK + 1):
            block = np.random.default_rng([seed, stream, by, bx]).standard_normal(
                (NOISE_BLOCK, NOISE_BLOCK), dtype=np.float32)
            ys = slice(max(y0, by * NOISE_BLOCK), min(y1, (by + 1) * NOISE_BLOCK))
            xs = slice(max(x0, bx * NOISE_BLOCK), min(x1, (bx + 1) * NOISE_BLOCK))
            out[ys.start - y0: ys.stop - y0, xs.start - x0: xs.stop - x0] = \
                block[ys.start - by * NOISE_BLOCK: ys.stop - by * NOISE_BLOCK,
                      xs.start - bx * NOISE_BLOCK: xs.stop - bx * NOISE_BLOCK]
    return out


def _smoothed_noise(scene: Scene, stream: int, sigma: tuple[float, float], window: tuple[int, int, int, int]
                    ) -> np.ndarray:
    """Unit-variance smoothed noise over `window`, filtered on a margin wider than the kernel (reflected only at
    the slide border, as a render in one piece would), so tiles agree with the whole."""
    y0, y1, x0, x1 = window
    my, mx = (int(4.0 * s + 0.5) + 1 for s in sigma)  # gaussian_filter's kernel radius (truncate=4) + 1
    h, w = scene.shape
    wy0, wy1, wx0, wx1 = max(y0 - my, 0), min(y1 + my, h), max(x0 - mx, 0), min(x1 + mx, w)
    field = ndimage.gaussian_filter(block_noise(scene.seed, stream, wy0, wy1, wx0, wx1), sigma)
    # The variance of white noise smoothed by a unit-mass Gaussian is 1 / (4 pi sy sx).
    field *= np.float32(np.sqrt(4 * np.pi * sigma[0] * sigma[1]))
    return field[y0 - wy0: y1 - wy0, x0 - wx0: x1 - wx0]


def _draw(scene: Scene, window: tuple[int, int, int, int], with_density: bool
          ) -> tuple[np.ndarray, np.ndarray | None]:
    """Mask (and haematoxylin density inside nuclei) of a window: nuclei drawn in the global order, first wins."""
    y0, y1, x0, x1 = window
    mask = np.zeros((y1 - y0, x1 - x0), dtype=np.uint32)
    haem = None
    if with_density:
        s = scene.scale
        fine = _smoothed_noise(scene, _FINE, (0.8 * s, 0.8 * s), window)
        coarse = _smoothed_noise(scene, _COARSE, (2.0 * s, 2.0 * s), window)
        haem = np.zeros(mask.shape, dtype=np.float32)
    for i in scene.nuclei_in(y0, y1, x0, x1):
        cy, cx = scene.y[i], scene.x[i]
        ext = int(np.ceil(scene.a[i])) + 1
        by0, by1 = max(int(cy) - ext, y0), min(int(cy) + ext + 1, y1)
        bx0, bx1 = max(int(cx) - ext, x0), min(int(cx) + ext + 1, x1)
        if by0 >= by1 or bx0 >= bx1:
            continue
        dy = np.arange(by0, by1)[:, None] - cy
        dx = np.arange(bx0, bx1)[None, :] - cx
        cos, sin = np.cos(scene.theta[i]), np.sin(scene.theta[i])
        u = (dx * cos + dy * sin) / scene.a[i]
        v = (-dx * sin + dy * cos) / scene.b[i]
        rho = u * u + v * v
        box = (slice(by0 - y0, by1 - y0), slice(bx0 - x0, bx1 - x0))
        inside = (rho <= 1) & (mask[box] == 0)
        if not inside.any():
            continue
        mask[box][inside] = scene.cell_ids[i]
        if haem is not None:
            ct = CELL_TYPES[scene.types[i]]
            texture = 1 + 0.35 * ((1 - ct.granularity) * fine[box] + ct.granularity * coarse[box])
            density = scene.darkness[i] * texture * (1 - ct.vesicular * np.exp(-2.5 * rho))
            haem[box][inside] = density[inside]
    return mask, haem


def render_mask(scene: Scene, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """(h, w) uint32 cell ids of the window [y0, y1) x [x0, x1)."""
    return _draw(scene, (y0, y1, x0, x1), with_density=False)[0]


def render_image(scene: Scene, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """(3, h, w) uint8 H&E-like image of the window."""
    h, w = scene.shape
    margin = int(4.0 * _BLUR + 0.5) + 1  # the blur's kernel radius: od is needed that far around the window
    window = (max(y0 - margin, 0), min(y1 + margin, h), max(x0 - margin, 0), min(x1 + margin, w))
    mask, haem = _draw(scene, window, with_density=True)
    tissue, zone = scene.zones(*window)
    s = scene.scale
    # Unit-variance fibres scaled to the demo's original amplitude (white noise smoothed by sigma (1, 6)).
    fibres = _smoothed_noise(scene, _FIBRES, (1.0 * s, 6.0 * s), window) / np.float32(np.sqrt(4 * np.pi * 6.0))
    eosin = np.where(tissue, 0.35 + 0.25 * np.tanh(2 * fibres) + 0.1 * (zone == 0), 0.03).astype(np.float32)
    eosin = np.where(mask > 0, np.float32(0.15), eosin)
    haem = np.where(tissue & (mask == 0), np.float32(0.05), haem)
    od = haem[None] * HEMATOXYLIN[:, None, None] + eosin[None] * EOSIN[:, None, None]
    od = ndimage.gaussian_filter(od, sigma=(0, _BLUR, _BLUR), mode="reflect")
    crop = (slice(y0 - window[0], y1 - window[0]), slice(x0 - window[2], x1 - window[2]))
    rgb = 255 * np.exp(-od[:, crop[0], crop[1]])
    for channel in range(3):
        rgb[channel] += 3 * block_noise(scene.seed, _PIXEL * 10 + channel, y0, y1, x0, x1)
    return np.clip(rgb, 0, 255).astype(np.uint8)
