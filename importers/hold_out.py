"""Hold tissue out of an import, as the challenge does: held-out nuclei stay in the mask and in `cell_id-group`
(group 'validation' or 'test') but leave `anucleus`; their measurements go to a truth folder (`slidedata.truth`) that
`python -m submission.score` reads.

Two ways, combinable:

* whole sections (`sections`): every cell 'test', the sample has no expression at all (like a challenge test
  slide); its region is the section;
* spatial blocks (`block_fraction`): each other section's spots fall in a square grid of `block_um`; whole blocks,
  in a seeded order, are held out until about `block_fraction` of the section's spots are, alternately 'test' and
  'validation'; each block is a region.

Spots, not cells, are assigned: in nuclei mode every nucleus of a spot carries that spot's counts, so splitting a
spot's nuclei between train and held-out would show the model the held-out answer.
"""

from __future__ import annotations

import argparse
import zlib
from dataclasses import dataclass

import numpy as np

from slidedata.errors import DataError

TRAIN = "train"
HELD_OUT_ORDER = ("test", "validation")  # the first held-out block is 'test', then they alternate
DEFAULT_BLOCK_UM = 1000.0  # five legacy ST spots (200 um pitch) or ten Visium spots (100 um) across


@dataclass(frozen=True)
class HoldOut:
    sections: tuple[str, ...] = ()
    block_fraction: float = 0.0
    block_um: float = DEFAULT_BLOCK_UM
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.block_fraction < 1:
            raise ValueError(f"the held-out block fraction must be in [0, 1), got {self.block_fraction}")
        if not self.block_um > 0:
            raise ValueError(f"the block size must be positive, got {self.block_um} um")

    @property
    def active(self) -> bool:
        return bool(self.sections) or self.block_fraction > 0


def add_block_arguments(parser: argparse.ArgumentParser, what: str = "each section's spots"
                        ) -> argparse._ArgumentGroup:
    """The options of holding spatial blocks out, one definition for every importer (read back with
    `hold_out_blocks`); returns their argument group, for an importer's own hold-out options."""
    from slidedata.cli import non_negative_int, positive_float

    held = parser.add_argument_group(
        "holding tissue out", "held-out cells stay in the mask (group validation or test) but not in anucleus, "
        "as in the challenge; their expression goes to <out>/truth/<section>.h5ad for he2expr score")
    held.add_argument("--hold-out-blocks", type=_fraction, default=0.0, metavar="FRACTION",
                      help=f"hold out about this fraction of {what}, in whole square blocks chosen in a seeded "
                           "order, alternately test and validation")
    held.add_argument("--hold-out-block-um", type=positive_float, default=DEFAULT_BLOCK_UM,
                      help="edge of those blocks, um")
    held.add_argument("--hold-out-seed", type=non_negative_int, default=0, help="seed of the block order")
    return held


def hold_out_blocks(args: argparse.Namespace, sections: tuple[str, ...] = ()) -> HoldOut:
    """The HoldOut the options of `add_block_arguments` ask for (and whole `sections`)."""
    return HoldOut(tuple(sections), args.hold_out_blocks, args.hold_out_block_um, args.hold_out_seed)


def _fraction(text: str) -> float:
    """argparse `type=` for a fraction in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got '{text}'") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 (exclusive), got {text}")
    return value


@dataclass
class SpotAssignment:
    """Per spot of a section: its group and, for held-out spots, its region ('' for training spots)."""

    group: np.ndarray  # (n,) object: 'train' | 'validation' | 'test'
    region: np.ndarray  # (n,) object

    @property
    def held_out(self) -> np.ndarray:
        return self.group != TRAIN


def assign_spots(name: str, centres_um: np.ndarray, hold_out: HoldOut | None, where: str = "") -> SpotAssignment:
    """Group and region of each spot of section `name` (spot centres (y, x) in um). Deterministic: the same
    section, spots and settings give the same blocks whatever the other sections are."""
    n = len(centres_um)
    group = np.full(n, TRAIN, dtype=object)
    region = np.full(n, "", dtype=object)
    if hold_out is None or not hold_out.active:
        return SpotAssignment(group, region)
    if name in hold_out.sections:
        group[:] = HELD_OUT_ORDER[0]
        region[:] = name
        return SpotAssignment(group, region)
    if hold_out.block_fraction == 0 or n == 0:
        return SpotAssignment(group, region)
    # Rounded before the floor: spots on a regular pitch sit on block edges, where float noise would split rows.
    cells = np.floor(np.round((centres_um - centres_um.min(axis=0)) / hold_out.block_um, 6)).astype(np.int64)
    blocks, block_of_spot, sizes = np.unique(cells, axis=0, return_inverse=True, return_counts=True)
    block_of_spot = block_of_spot.ravel()
    if len(blocks) < 2:
        raise DataError(where or name, "spots", f"all {n} spots of section {name} fall in one {hold_out.block_um:g} "
                                                "um block, so blocks cannot hold part of it out: give a smaller "
                                                "block size (--hold-out-block-um)")
    # Seeded by the section's name too, so sections with the same grid do not all lose the same corner.
    rng = np.random.default_rng([hold_out.seed, zlib.crc32(name.encode())])
    target, taken, chosen = hold_out.block_fraction * n, 0, []
    for block in rng.permutation(len(blocks)):
        if len(chosen) == len(blocks) - 1:  # keep at least one block to train on
            break
        if not chosen or taken + sizes[block] <= target:
            chosen.append(block)
            taken += sizes[block]
    for k, block in enumerate(chosen):
        spots = block_of_spot == block
        group[spots] = HELD_OUT_ORDER[k % len(HELD_OUT_ORDER)]
        by, bx = blocks[block]
        region[spots] = f"{name}:block_{by}_{bx}"
    return SpotAssignment(group, region)
