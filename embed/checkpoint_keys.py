"""Translate checkpoints written by other implementations of a network to timm's key names.

Pure functions state dict -> state dict, named by the registry (`EncoderSpec.state_dict_map`), so a checkpoint made
for another implementation goes through the same strict loader, with the same checks, as every other encoder.
"""

from __future__ import annotations

import torch

# lukemelas' EfficientNet-PyTorch layout (also efficientnet-lite-pytorch's) -> timm's EfficientNet.
_STEM_AND_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                  "_fc": "classifier"}
# One block class there; two in timm: InvertedResidual (with an expansion conv) and DepthwiseSeparableConv (without).
_EXPANDED_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                   "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def efficientnet_pytorch_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`_blocks.<i>.<layer>` (one flat list of blocks) -> `blocks.<stage>.<j>.<layer>` (a list per stage).

    The flat list is cut into stages where a block's output width changes: every EfficientNet stage has its own
    width. Layers this map does not know keep their name, so the strict load reports them instead of dropping them.
    """
    stage_and_index = _stage_and_index(state)
    mapped = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            block, layer = int(parts[1]), parts[2]
            table = _EXPANDED_BLOCK if f"_blocks.{block}._expand_conv.weight" in state else _DEPTHWISE_BLOCK
            stage, index = stage_and_index[block]
            parts = ["blocks", str(stage), str(index), table.get(layer, layer), *parts[3:]]
        else:
            parts = [_STEM_AND_HEAD.get(parts[0], parts[0]), *parts[1:]]
        mapped[".".join(parts)] = value
    return mapped


def _stage_and_index(state: dict[str, torch.Tensor]) -> dict[int, tuple[int, int]]:
    blocks = sorted({int(key.split(".")[1]) for key in state if key.startswith("_blocks.")})
    positions, stage, index, width = {}, -1, 0, None
    for block in blocks:
        out = state[f"_blocks.{block}._project_conv.weight"].shape[0]
        stage, index, width = (stage, index + 1, width) if out == width else (stage + 1, 0, out)
        positions[block] = (stage, index)
    return positions
