"""Maps of the predicted expression of each sample's held-out nuclei: what a scientist looks at before the numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from regress.plots import he_thumbnail, map_window, most_variable_predicted, plot_maps
from slidedata.feature_store import FeatureStore
from slidedata.publish import publishing
from slidedata.sample import Sample
from submission.predict import SamplePredictions


def write_prediction_maps(predictions: list[SamplePredictions], samples: list[Sample], store: FeatureStore,
                          folder: str | Path, n_genes: int = 4) -> list[Path]:
    """`<folder>/<sample>.png` per sample with held-out nuclei: the `n_genes` genes whose predictions vary most over
    its tissue (within one map window), each on its own colour scale, the H&E beside."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for sample, predicted in zip(samples, predictions):
        if not len(predicted.cell_ids):
            continue
        nuclei = store.read_nuclei(sample.name).set_index("cell_id")
        coords = nuclei.loc[predicted.cell_ids, ["y", "x"]].to_numpy(np.float64)
        inside = map_window(coords)
        coords, values = coords[inside], predicted.values[inside]
        with publishing(folder / f"{sample.name}.png") as tmp:
            plot_maps(coords, values, predicted.genes, most_variable_predicted(values, n_genes), tmp,
                      f"{sample.name}: predicted expression of held-out nuclei (the {n_genes} most varying genes)",
                      he=he_thumbnail(sample, coords))
        written.append(folder / f"{sample.name}.png")
    return written
