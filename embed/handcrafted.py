"""Explicit hand-crafted nucleus features: the honest CPU default encoder (no network, no weights).

Computed in torch on the same resized patches as the neural encoders, so the pipeline has one code path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

# The features are this module's code (there are no weights to pin them), so the code is their version: any edit
# here gives cache entries another identity and they are recomputed instead of silently reused.
CODE_VERSION = "handcrafted-" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]

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


def stain_concentrations(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) RGB in [0, 1] -> (B, 3, h, w) haematoxylin, eosin, residual densities (colour deconvolution)."""
    od = -torch.log(rgb.clamp(min=1 / 255))
    unmix = torch.linalg.inv(_STAINS.to(rgb))  # od = conc @ STAINS  ->  conc = od @ inv(STAINS)
    return torch.einsum("bchw,cd->bdhw", od, unmix)


class HandcraftedFeatures(nn.Module):
    """Colour, stain, texture and nucleus-mask statistics of each patch (dim = len(FEATURE_NAMES)).

    Inputs: `images` (B, 3, s, s) RGB in [0, 1]; `masks` (B, 2, s, s): channel 0 = this nucleus, 1 = any nucleus.
    Shape features are in native pixels, so `scale` (native patch size / s) converts from the resized patch.
    """

    dim = len(FEATURE_NAMES)

    def forward(self, images: torch.Tensor, masks: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        b = images.shape[0]
        flat_rgb = images.flatten(2)
        conc = stain_concentrations(images)
        haem, eosin = conc[:, 0], conc[:, 1]
        flat_h = haem.flatten(1)
        quantiles = torch.quantile(flat_h.float(), torch.tensor([0.1, 0.5, 0.9], device=images.device), dim=1).T
        grad_y, grad_x = torch.gradient(haem, dim=(1, 2))
        laplacian = (haem[:, 2:, 1:-1] + haem[:, :-2, 1:-1] + haem[:, 1:-1, 2:] + haem[:, 1:-1, :-2]
                     - 4 * haem[:, 1:-1, 1:-1])

        own = masks[:, 0].flatten(1).float()
        anyn = masks[:, 1].flatten(1).float()
        own_n = own.sum(1).clamp(min=1)
        bg = 1 - anyn
        nucleus_h = (flat_h * own).sum(1) / own_n
        nucleus_h_std = (((flat_h - nucleus_h[:, None]) ** 2 * own).sum(1) / own_n).sqrt()
        background_h = (flat_h * bg).sum(1) / bg.sum(1).clamp(min=1)
        nucleus_rgb = (flat_rgb * own[:, None]).sum(2) / own_n[:, None]

        side = images.shape[-1]
        ys, xs = torch.meshgrid(torch.arange(side, device=images.device, dtype=images.dtype),
                                torch.arange(side, device=images.device, dtype=images.dtype), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        my, mx = (own * ys).sum(1) / own_n, (own * xs).sum(1) / own_n
        cyy = (own * (ys - my[:, None]) ** 2).sum(1) / own_n
        cxx = (own * (xs - mx[:, None]) ** 2).sum(1) / own_n
        cxy = (own * (ys - my[:, None]) * (xs - mx[:, None])).sum(1) / own_n
        spread = (((cyy - cxx) / 2) ** 2 + cxy**2).clamp(min=0).sqrt()
        lam1 = ((cyy + cxx) / 2 + spread).clamp(min=0)
        lam2 = ((cyy + cxx) / 2 - spread).clamp(min=0)
        eccentricity = (1 - lam2 / lam1.clamp(min=1e-6)).clamp(min=0).sqrt()

        features = torch.cat([
            flat_rgb.mean(2), flat_rgb.std(2),
            torch.stack([flat_h.mean(1), flat_h.std(1), eosin.flatten(1).mean(1), eosin.flatten(1).std(1)], 1),
            quantiles.to(images.dtype),
            torch.stack([(grad_y**2 + grad_x**2).sqrt().flatten(1).mean(1), laplacian.abs().flatten(1).mean(1)], 1),
            torch.stack([own.mean(1), anyn.mean(1), nucleus_h, nucleus_h_std, background_h], 1),
            nucleus_rgb,
            torch.stack([own.sum(1) * scale**2, 4 * lam1.sqrt() * scale, 4 * lam2.sqrt() * scale, eccentricity], 1),
        ], dim=1)
        assert features.shape == (b, self.dim)
        return features
