"""Explicit hand-crafted nucleus features: the honest CPU default encoder (no network, no weights).

Computed in torch on the same resized patches as the neural encoders, so the pipeline has one code path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slidedata import nuclei as geometry
from slidedata.nuclei import ellipse_from_moments

# The features are this module's code and the nucleus geometry it shares with the nuclei table (there are no weights
# to pin them), so that code is their version: any edit of either file gives cache entries another identity and
# they are recomputed instead of silently reused.
CODE_VERSION = "handcrafted-" + hashlib.sha256(
    Path(__file__).read_bytes() + Path(geometry.__file__).read_bytes()).hexdigest()[:16]

# Ruifrok & Johnston stain vectors (optical density of R, G, B), completed by their cross product.
_H = torch.tensor([0.65, 0.70, 0.29])
_E = torch.tensor([0.07, 0.99, 0.11])
_STAINS = torch.stack([_H / _H.norm(), _E / _E.norm(), torch.linalg.cross(_H, _E) / torch.linalg.cross(_H, _E).norm()])

FEATURE_NAMES = (
    "r_mean", "g_mean", "b_mean", "r_std", "g_std", "b_std",
    "haem_mean", "haem_std", "eosin_mean", "eosin_std", "haem_q10", "haem_q50", "haem_q90",
    "haem_gradient", "haem_laplacian",
    "nucleus_fraction", "any_nucleus_fraction", "nucleus_haem_mean", "nucleus_haem_std", "background_haem_mean",
    "nucleus_r", "nucleus_g", "nucleus_b",
    "nucleus_area", "nucleus_major_axis", "nucleus_minor_axis", "nucleus_eccentricity",
)


_BLOCK = 64  # patches per pass over the pixels

# Quantiles of the haematoxylin density, interpolated linearly between order statistics like torch.quantile.
_QUANTILES = (0.1, 0.5, 0.9)


class HandcraftedFeatures(nn.Module):
    """Colour, stain, texture and nucleus-mask statistics of each patch (dim = len(FEATURE_NAMES)).

    Inputs: `images` (B, 3, s, s) RGB in [0, 1]; `masks` (B, 2, s, s): channel 0 = this nucleus, 1 = any nucleus.
    Shape features are in native pixels, so `scale` (native patch size / s) converts from the resized patch.
    Written for the CPU: blocks of patches that stay in cache, few passes over the pixels, one sort for the quantiles.
    """

    dim = len(FEATURE_NAMES)

    def forward(self, images: torch.Tensor, masks: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        if images.shape[0] > _BLOCK:  # blocks whose temporaries stay in the CPU's cache: ~2x faster than one pass
            return torch.cat([self.forward(images[i: i + _BLOCK], masks[i: i + _BLOCK], scale)
                              for i in range(0, images.shape[0], _BLOCK)])
        b, _, side, _ = images.shape
        n = side * side
        flat_rgb = images.reshape(b, 3, n)
        od = torch.log(flat_rgb.clamp(min=1 / 255)).neg_()
        unmix = torch.linalg.inv(_STAINS.to(images))  # od = conc @ STAINS  ->  conc = od @ inv(STAINS)
        stains = torch.matmul(unmix[:, :2].T, od)  # (B, 2, n): haematoxylin, eosin
        flat_h = stains[:, 0]
        rgb_mean, rgb_std = _mean_std(flat_rgb)
        stain_mean, stain_std = _mean_std(stains)

        position = torch.tensor(_QUANTILES, dtype=torch.float64) * (n - 1)
        low = position.floor().long()
        ordered = _sorted(flat_h)
        weight = (position - low).to(images.dtype)
        quantiles = torch.lerp(ordered[:, low], ordered[:, (low + 1).clamp(max=n - 1)], weight)

        haem = flat_h.view(b, side, side)
        grad_y, grad_x = torch.gradient(haem, dim=(1, 2))
        gradient = torch.hypot(grad_y, grad_x).mean((1, 2))
        laplacian = (haem[:, 2:, 1:-1] + haem[:, :-2, 1:-1] + haem[:, 1:-1, 2:] + haem[:, 1:-1, :-2]
                     - 4 * haem[:, 1:-1, 1:-1]).abs().mean((1, 2))

        own = masks[:, 0].reshape(b, n).to(images.dtype)
        anyn = masks[:, 1].reshape(b, n).to(images.dtype)
        own_area, any_n = own.sum(1), anyn.sum(1)
        own_n = own_area.clamp(min=1)
        # Sums over this nucleus of R, G, B, H, and over any nucleus of H.
        nucleus_rgb = (flat_rgb * own[:, None]).sum(2) / own_n[:, None]
        nucleus_h = (flat_h * own).sum(1) / own_n
        # Two passes (not E[h^2] - E[h]^2): a uniform nucleus must give 0, not float32 round-off.
        centred = (flat_h - nucleus_h[:, None]) * own
        nucleus_h_std = ((centred * centred).sum(1) / own_n).sqrt()
        any_h = (flat_h * anyn).sum(1)
        background_h = (stain_mean[:, 0] * n - any_h) / (n - any_n).clamp(min=1)

        # Second moments of the nucleus mask, about the patch centre (small coordinates, little round-off).
        coords = (torch.arange(side, dtype=images.dtype, device=images.device) - (side - 1) / 2)
        ys, xs = coords.repeat_interleave(side), coords.repeat(side)
        moments = own @ torch.stack([ys, xs, ys * ys, xs * xs, ys * xs], 1) / own_n[:, None]
        my, mx = moments[:, 0], moments[:, 1]
        major, minor, eccentricity = ellipse_from_moments(moments[:, 2] - my * my, moments[:, 3] - mx * mx,
                                                          moments[:, 4] - my * mx)

        features = torch.cat([
            rgb_mean, rgb_std,
            torch.stack([stain_mean[:, 0], stain_std[:, 0], stain_mean[:, 1], stain_std[:, 1]], 1),
            quantiles,
            torch.stack([gradient, laplacian], 1),
            torch.stack([own_area / n, any_n / n, nucleus_h, nucleus_h_std, background_h], 1),
            nucleus_rgb,
            torch.stack([own_area * scale**2, major * scale, minor * scale, eccentricity], 1),
        ], dim=1)
        assert features.shape == (b, self.dim)
        return features


def _mean_std(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased, as torch.std) standard deviation over the last axis, in two passes: the same numbers as
    torch.std_mean, which is several times slower on a CPU."""
    mean = values.mean(-1)
    centred = values - mean[..., None]
    return mean, ((centred * centred).sum(-1) / (values.shape[-1] - 1)).sqrt()


def _sorted(values: torch.Tensor) -> torch.Tensor:
    """Each row sorted ascending. On a CPU numpy's vectorised sort is ~5x faster than torch.sort."""
    if values.device.type != "cpu":
        return torch.sort(values, dim=-1).values
    return torch.from_numpy(np.sort(values.numpy(), axis=-1))
