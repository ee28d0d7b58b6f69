"""The challenge's code interface (Crunch 1): `train` once, then `infer` once per sample.

The runner matches arguments by name and passes None for names it does not know, so every extra argument here is
optional. The runner's machine has no internet: `train` copies the encoder's weights into the model directory and
`infer` loads them from there. Both call the same library code as `make embed`, `make fit` and `make submit`.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import pandas as pd

from embed.encoders import load_encoder, resolve_weights_file
from embed.pipeline import EmbedSettings, embed_recipe, embed_sample
from embed.registry import get_spec
from regress.fit import fit_and_evaluate
from regress.model_dir import ModelDir
from regress.predictor import ExpressionPredictor
from regress.settings import FitSettings, default_features
from slidedata.feature_store import FeatureStore, entry_key
from slidedata.patch_size import DEFAULT_PATCH_SIZES, PatchSize
from slidedata.publish import check_writable
from slidedata.recipe import DEFAULT_FEATURES
from slidedata.sample import HELD_OUT_GROUPS, Elements, open_sample, open_samples
from submission.predict import SamplePredictions, check_gene_panel, predict_held_out
from submission.writer import long_blocks


def train(data_directory_path: str, model_directory_path: str, encoder: str | None = None,
          weights: str | None = None, cache_directory_path: str | None = None,
          models: tuple[str, ...] | None = None, microns_per_pixel: float | None = None,
          force_microns_per_pixel: bool = False, patch_sizes: tuple | None = None,
          elements: Elements | None = None, figures: bool = True) -> None:
    """Embed every sample, evaluate, and save the best regressor (and the encoder's weights) in the model folder.

    Without `encoder` and `patch_sizes`, the default features of `make embed` and `make fit` (slidedata.recipe): the
    micron recipe where every sample's pixel size is known (the challenge's samples store it), else the handcrafted
    features at DEFAULT_PATCH_SIZES. Naming either opts out: that encoder (default handcrafted) at those sizes
    (default DEFAULT_PATCH_SIZES); `infer` embeds new samples at the same ones. `microns_per_pixel` serves samples
    that store no pixel size; one that disagrees with a stored size is refused unless `force_microns_per_pixel`.
    `elements`: where the samples' parts are, where not laid out as the challenge's (`slidedata.sample.Elements`).
    `figures`: draw the fit's scores.png and maps.png (`FitSettings.figures`; the runner reads neither)."""
    model_dir = ModelDir(check_writable(model_directory_path))  # before any work, as the stages check
    if cache_directory_path:
        check_writable(cache_directory_path)
    model_dir.path.mkdir(parents=True, exist_ok=True)
    sample_options = {"microns_per_pixel": microns_per_pixel, "force_microns_per_pixel": force_microns_per_pixel,
                      "elements": elements}
    with _cache(cache_directory_path) as cache:
        if encoder is None and patch_sizes is None:
            # each block's weights come with its pip package, which the runner installs: nothing to copy
            recipe, recipe_microns = DEFAULT_FEATURES.for_data(data_directory_path, **sample_options)
            embed_recipe(data_directory_path, cache, recipe, **sample_options)
            features = default_features(recipe, recipe_microns)
        else:
            features = _embed_one_encoder(data_directory_path, cache, model_dir, encoder or "handcrafted", weights,
                                          patch_sizes or DEFAULT_PATCH_SIZES, sample_options)
        fit_settings = FitSettings(features=features, figures=figures,
                                   **({"models": tuple(models)} if models else {}))
        fit_and_evaluate(data_directory_path, cache, model_dir.path, fit_settings, elements=elements)


def _embed_one_encoder(data_directory_path: str, cache: Path, model_dir: ModelDir, encoder: str,
                       weights: str | None, patch_sizes: tuple, sample_options: dict):
    """Embed every sample with `encoder` at `patch_sizes`, its weights copied into the model folder first; the
    features the fit then reads."""
    spec = get_spec(encoder)
    if spec.library != "handcrafted":
        model_dir.copy_encoder_weights(resolve_weights_file(spec, weights))
    module = load_encoder(spec, weights=_bundled_weights(model_dir, spec.library))
    store = FeatureStore(cache)
    settings = EmbedSettings(patch_sizes=patch_sizes)
    for sample in open_samples(data_directory_path, **sample_options):
        embed_sample(sample, store, module, settings, progress=True)
    return replace(default_features(), encoder=encoder, patch_sizes=settings.patch_sizes)


def infer(data_file_path: str, model_directory_path: str, cache_directory_path: str | None = None,
          elements: Elements | None = None) -> pd.DataFrame:
    """Predictions for the held-out nuclei of one sample: columns cell_id, gene, prediction (the runner adds sample);
    cell_id as the sample gives it (strings stay strings)."""
    model_dir = ModelDir(model_directory_path)
    predictor = model_dir.load_predictor()
    recorded = predictor.embed_settings
    # The pixel size the model was trained with serves samples that store none (sizes in microns need it).
    sample = open_sample(data_file_path, elements=elements)
    check_gene_panel(predictor.genes, sample)  # before any embedding
    if not sample.groups.isin(HELD_OUT_GROUPS).any():  # nothing to predict, so nothing to embed
        return _long_frame(predict_held_out(predictor, None, sample))
    if sample.microns_per_pixel is None:
        sample.microns_per_pixel = recorded.get("microns_per_pixel")
    with _cache(cache_directory_path) as cache:
        store = FeatureStore(cache)
        for encoder, settings in _embedding_plan(predictor).items():  # every block the model reads
            spec = get_spec(encoder)
            weights = _bundled_weights(model_dir, spec.library) if encoder == recorded["encoder"] else None
            embed_sample(sample, store, load_encoder(spec, weights=weights), settings, progress=False)
        predictions = predict_held_out(predictor, store, sample)
    return _long_frame(predictions)


def _long_frame(predictions: SamplePredictions) -> pd.DataFrame:
    """cell_id, gene, prediction: empty, with the same dtypes, where the sample has no held-out nucleus."""
    return pd.concat(list(long_blocks(predictions)), ignore_index=True).drop(columns="sample")


def _embedding_plan(predictor: ExpressionPredictor) -> dict[str, EmbedSettings]:
    """Per encoder the model reads (its main one and any extra feature blocks), the settings it was embedded with."""
    recorded = predictor.embed_settings
    sizes: dict[str, list[PatchSize]] = {}
    for encoder, size in predictor.feature_spec.keys:
        sizes.setdefault(encoder, []).append(size)
    plan = {}
    for encoder, keys in sizes.items():
        # One recorded input size for all of an encoder's blocks (its own, or --input-size) is reused as it was;
        # several (a scale-aware encoder at several sizes in microns) follow from the sizes again.
        inputs = {predictor.feature_settings.get(entry_key(encoder, k), {}).get("input_size") for k in keys}
        fixed = inputs.pop() if len(inputs) == 1 else None
        plan[encoder] = EmbedSettings(
            patch_sizes=tuple(keys), pad_mode=recorded.get("pad_mode") or "symmetric",
            chunk_nuclei=int(recorded.get("chunk_nuclei") or 1024), input_size=fixed,
            stain_normalization=None if recorded.get("stain_normalization") in (None, "none")
            else recorded["stain_normalization"])
    return plan


def _bundled_weights(model_dir: ModelDir, library: str) -> Path | None:
    return model_dir.encoder_weights() if library != "handcrafted" else None


class _cache:
    """The given cache folder, or a temporary one removed afterwards."""

    def __init__(self, path: str | None):
        self.path, self._tmp = path, None

    def __enter__(self) -> Path:
        if self.path:
            return Path(self.path)
        self._tmp = tempfile.TemporaryDirectory(prefix="he2expr-cache-")
        return Path(self._tmp.name) / "features.zarr"

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
