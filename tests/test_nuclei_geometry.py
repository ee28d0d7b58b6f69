"""One ellipse definition behind the nuclei table and the handcrafted encoder, checked against skimage's regionprops
(the reference: pixels as points at their centres, no +1/12 px^2 for their extent)."""

import dask.array as da
import numpy as np
import pytest
import torch
from skimage.draw import ellipse
from skimage.measure import regionprops

from embed.encoders import load_encoder
from embed.handcrafted import FEATURE_NAMES
from slidedata import nuclei_from_mask

SIDE = 64  # the handcrafted encoder's input size: the patch is not resized, shape features are in its pixels


def _shape(name: str) -> np.ndarray:
    """A (SIDE, SIDE) mask of one region, clear of the border."""
    mask = np.zeros((SIDE, SIDE), bool)
    ellipses = {"disc": (7, 7, 0.0), "ellipse": (12, 5, 0.4), "thin ellipse": (20, 3, -1.1)}
    if name in ellipses:
        ry, rx, rotation = ellipses[name]
        mask[ellipse(31, 33, ry, rx, shape=mask.shape, rotation=rotation)] = True
    elif name == "bar":
        mask[20:24, 10:40] = True
    elif name == "line":  # one pixel wide: regionprops' minor axis is 0 (it would be 4 / sqrt(12) with +1/12)
        mask[30, 12:40] = True
    elif name == "L":
        mask[15:45, 20:26] = True
        mask[39:45, 20:48] = True
    elif name == "pixel":  # a point: both axes and the eccentricity are 0
        mask[33, 17] = True
    return mask


SHAPES = ("disc", "ellipse", "thin ellipse", "bar", "line", "L", "pixel")


def _regionprops(mask: np.ndarray) -> tuple[float, float, float]:
    region = regionprops(mask.astype(np.uint8))[0]
    return region.axis_major_length, region.axis_minor_length, region.eccentricity


@pytest.mark.parametrize("name", SHAPES)
def test_nuclei_table_axes_are_regionprops_axes(name):
    mask = _shape(name)
    row = nuclei_from_mask(da.from_array(mask.astype(np.uint32) * 9, chunks=(16, 16))).iloc[0]  # across chunks
    # float64 sums; a disc's eccentricity is the square root of a round-off-sized difference, hence 1e-6
    assert (row["major_axis"], row["minor_axis"], row["eccentricity"]) == pytest.approx(_regionprops(mask), abs=1e-6)


def test_handcrafted_shape_features_are_regionprops_axes():
    masks = np.stack([_shape(name) for name in SHAPES])
    own_and_any = torch.from_numpy(np.stack([masks, masks], axis=1))
    images = torch.full((len(SHAPES), 3, SIDE, SIDE), 200, dtype=torch.uint8)
    features = load_encoder("handcrafted")(images, own_and_any).numpy()
    columns = [FEATURE_NAMES.index(f"nucleus_{name}") for name in ("major_axis", "minor_axis", "eccentricity")]
    for name, mask, row in zip(SHAPES, masks, features[:, columns]):
        # float32 moments about the patch centre: round-off far below 1e-4 px
        assert tuple(row) == pytest.approx(_regionprops(mask), abs=1e-4), name
