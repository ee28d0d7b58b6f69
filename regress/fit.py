"""The fit stage: evaluate baselines and models on held-out tissue, save the chosen one refitted on everything.

`fit_and_evaluate` (the CLI, `make fit`, the challenge's `train`) reads the feature cache through a `CacheSource`
and runs the one evaluation engine (`regress.engine`); notebooks and benchmarks call the engine directly, with any
source.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pandas as pd

from regress.engine import HeldOutPredictions, select_and_fit
from regress.model_dir import ModelDir
from regress.plots import he_thumbnail, informative_genes, map_window, plot_maps, plot_scores
from regress.predictor import ExpressionPredictor
from regress.settings import FitSettings
from regress.source import CacheSource
from regress.tasks import check_scheduler
from slidedata.feature_store import FeatureStore
from slidedata.publish import check_writable
from slidedata.sample import Elements, open_sample

log = logging.getLogger(__name__)


def fit_and_evaluate(data: str | Path, cache: str | Path, model_dir: str | Path,
                     settings: FitSettings | None = None, progress: bool = True, elements: Elements | None = None
                     ) -> tuple[pd.DataFrame, ExpressionPredictor]:
    """Evaluate, save the score table and its figures (`settings.figures`), refit the chosen model on every measured
    nucleus, save it.

    One sample in memory at a time, on this machine or a Dask cluster (`settings.scheduler`). A model directory
    that cannot be written and a scheduler that does not answer are refused before any work.
    """
    settings = settings or FitSettings()
    out = ModelDir(check_writable(model_dir))
    check_scheduler(settings.scheduler)
    source = CacheSource.open(data, cache, settings.gathered_features, scheduler=settings.scheduler,
                              progress=progress, elements=elements)
    replaced = out.replaced_model(data, source.genes)
    if replaced:  # said before the fit, not after: the user can still stop it (the default folder is shared)
        log.warning("warning: %s", replaced)
    maps = MapSink()
    selection = select_and_fit(source, settings, progress, sink=maps if settings.figures else None)
    evaluation, best = selection.evaluation, selection.best
    scores = evaluation.scores
    out.save_scores(scores, pd.DataFrame(evaluation.gene_scores, index=source.genes).rename_axis("gene"))
    if settings.figures:
        out.save_plot(lambda path: plot_scores(scores, evaluation.gene_scores, best, path,
                                               f"held-out: {evaluation.protocol}", evaluation.split_scores))
    predictor = ExpressionPredictor(
        model_name=best, feature_spec=settings.model_features(best), estimator=selection.estimator,
        genes=source.genes, embed_settings=embed_settings(FeatureStore(cache, create=False), source),
        scores={"protocol": evaluation.protocol, "verdict": selection.verdict,
                **scores.set_index("model").loc[best].to_dict()},
        feature_settings=source.feature_settings, reducer=source.reducer, data=str(Path(data).resolve()),
    )
    out.save_predictor(predictor)  # before the maps: a figure that fails must not lose the fitted model
    if not settings.figures:
        out.discard_figures()
    elif best in maps.kept:
        held = maps.kept[best]
        sample = open_sample(next(s.path for s in source.samples if s.name == held.sample), elements=elements)
        out.save_maps(lambda path: plot_maps(
            held.coords, held.predictions, source.genes, informative_genes(held.truth, held.predictions), path,
            f"{held.sample}, held out ({evaluation.protocol}): {best}, best and worst predicted genes",
            truth=held.truth, he=he_thumbnail(sample, held.coords)))
    else:
        out.discard_maps()
    return scores.assign(protocol=evaluation.protocol), predictor


class MapSink:
    """Keeps, of every model, the held-out predictions of one sample (the first scored) inside a map window: what
    the maps draw, at a bounded cost whatever the data's size."""

    def __init__(self) -> None:
        self.first: tuple[int, str] | None = None
        self.kept: dict[str, HeldOutPredictions] = {}

    def __call__(self, held: HeldOutPredictions) -> None:
        self.first = self.first or (held.split, held.sample)
        if (held.split, held.sample) != self.first or not len(held.cell_id):
            return
        inside = map_window(held.coords)
        self.kept[held.model] = replace(held, cell_id=held.cell_id[inside], coords=held.coords[inside],
                                        truth=held.truth[inside], predictions=held.predictions[inside])


def embed_settings(store: FeatureStore, source: CacheSource) -> dict:
    """How the features were made, so new samples (the challenge's infer) are embedded the same way.

    The pixel size is kept only where every training sample had the same one: a sample that stores none is then
    assumed to come from the same scanner; otherwise it must store or be given its own.
    """
    spec = source.spec
    encoder, size = spec.keys[0]
    attrs = [store.open_entry(s.name, encoder, size).attrs for s in source.samples]
    pixel_sizes = {a.get("sample_microns_per_pixel") for a in attrs}
    first = attrs[0]
    # The patch sizes are the model's feature spec's: not repeated here.
    return {"encoder": spec.encoder, "pad_mode": first.get("pad_mode"),
            "microns_per_pixel": pixel_sizes.pop() if len(pixel_sizes) == 1 else None,
            "stain_normalization": first.get("stain_normalization"), "weights_sha256": first.get("weights_sha256"),
            "chunk_nuclei": first.get("chunk_nuclei")}
