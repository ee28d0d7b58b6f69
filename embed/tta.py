"""Test-time augmentation: features averaged over the 8 dihedral views of every crop (4 rotations x optional flip).

Tissue has no preferred orientation, but a CNN's features do; the mean over the dihedral group is the same for a crop
and for any rotation by quarter turns or flip of it. The views are taken of the crops as cut (and of their masks),
before the encoder's resampling, so this holds whatever the encoder does with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DihedralView:
    """An optional mirror (left-right) followed by `quarter_turns` counter-clockwise quarter turns (torch.rot90)."""

    quarter_turns: int
    flip: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(..., S, S) -> the same view of every image; the identity returns `x` itself (no copy without TTA)."""
        if self.flip:
            x = x.flip(-1)
        return torch.rot90(x, self.quarter_turns, dims=(-2, -1)) if self.quarter_turns else x


DIHEDRAL: tuple[DihedralView, ...] = tuple(DihedralView(k, flip) for flip in (False, True) for k in range(4))
IDENTITY: tuple[DihedralView, ...] = DIHEDRAL[:1]


def views(tta: bool) -> tuple[DihedralView, ...]:
    """The views a crop is encoded in: all 8 with test-time augmentation, else the crop itself."""
    return DIHEDRAL if tta else IDENTITY


def mean_over_views(model, batch: torch.Tensor, mask: torch.Tensor | None, crop_views: tuple[DihedralView, ...],
                    input_size: int | None = None, crop: int | None = None,
                    channels_last: bool = False) -> torch.Tensor:
    """The mean of `model`'s float32 features over the views of the batch (and of its masks).

    One view at a time, not one batch of 8x the size: the memory of a batch stays what --batch-size says.
    The sum is kept in float32 even under bf16 autocast.
    """
    total = None
    for view in crop_views:
        x = view(batch)
        if channels_last:  # a rotated copy is laid out contiguously again
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x, None if mask is None else view(mask), input_size, crop).float()
        total = out if total is None else total + out
    return total if len(crop_views) == 1 else total / len(crop_views)
