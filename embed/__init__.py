"""Embed stage: nucleus-centred H&E patches -> frozen encoder -> zarr feature cache."""

from embed.encoders import EncoderLoadError, PatchEncoder, load_encoder
from embed.pipeline import (DEFAULT_PATCH_SIZES, EmbedReport, EmbedSettings, embed_dataset, embed_recipe,
                            embed_sample)
from embed.registry import ENCODERS, EncoderSpec, get_spec

__all__ = [
    "DEFAULT_PATCH_SIZES", "ENCODERS", "EmbedReport", "EmbedSettings", "EncoderLoadError", "EncoderSpec",
    "PatchEncoder", "embed_dataset", "embed_recipe", "embed_sample", "get_spec", "load_encoder",
]
