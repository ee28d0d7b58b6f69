"""The model directory: the one place that knows its file names, and writes each file whole (`slidedata.publish`).

    predictor.joblib    the fitted ExpressionPredictor, with its format version (what `infer` and the submit stage load;
                        older formats through `regress.model_format`)
    predictor.json      a readable summary of it, written after it
    scores.csv          one row per evaluated model (regress.engine.SCORE_COLUMNS)
    gene_pearson.csv    per-gene Pearson of every evaluated model (rows: genes, index 'gene')
    scores.png          the scores drawn
    maps.png            measured and predicted expression of a few genes on held-out tissue, the H&E beside
    encoder/            the encoder's weights, copied by the challenge's `train` for its offline `infer`

Each file is replaced in one step: a reader (or a run killed while writing) sees the previous version or the new one,
never a part. The files are not replaced together: after a kill between two of them, some are new and some old.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import joblib
import pandas as pd

from regress.model_format import load, migrate
from regress.predictor import ExpressionPredictor
from slidedata.errors import DataError
from slidedata.publish import publishing, publishing_folder

PREDICTOR = "predictor.joblib"
SUMMARY = "predictor.json"
SCORES = "scores.csv"
GENE_PEARSON = "gene_pearson.csv"
PLOT = "scores.png"
MAPS = "maps.png"
ENCODER = "encoder"


class ModelDir:
    """A model directory at `path` (created on the first write)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r})"

    def reports(self) -> list[str]:
        """The names of the files that report on the fit (scores, per-gene Pearson, plots) present here."""
        return [name for name in (SCORES, GENE_PEARSON, PLOT, MAPS) if (self.path / name).is_file()]

    # -- the model ------------------------------------------------------------------------------------------------
    def save_predictor(self, predictor: ExpressionPredictor) -> Path:
        """The predictor, then its summary (which is only for people: nothing loads it)."""
        with publishing(self.path / PREDICTOR) as tmp:
            joblib.dump(predictor, tmp)
        with publishing(self.path / SUMMARY) as tmp, open(tmp, "w") as handle:
            json.dump(predictor.summary(), handle, indent=2, default=str)
        return self.path / PREDICTOR

    def replaced_model(self, data: str | Path, genes: list[str]) -> str | None:
        """Where this directory holds a model fitted on other data than `data` (or on other genes), a line saying
        what a new fit would replace; None where it holds none or one of the same data. The summary says what the
        model was fitted on; models saved before it recorded that are read for their genes."""
        if not (self.path / PREDICTOR).exists():
            return None
        try:
            summary = json.loads((self.path / SUMMARY).read_text())
        except (OSError, ValueError):
            summary = {}
        recorded_data, recorded_genes = summary.get("data") or "", summary.get("genes")
        if recorded_genes is None:
            try:
                old = self.load_predictor()
            except Exception:  # unreadable: nothing to compare, and the fit replaces it anyway
                return f"{self.path} holds a model that cannot be read; this fit replaces it"
            recorded_data, recorded_genes = old.data or recorded_data, list(old.genes)
        new_data = str(Path(data).resolve())
        if (recorded_data and recorded_data != new_data) or list(recorded_genes) != list(genes):
            what = f"{recorded_data or 'other data'} ({len(recorded_genes)} genes)"
            return (f"{self.path} holds a model fitted on {what}; this fit on {new_data} ({len(genes)} genes) "
                    "replaces it (give another model folder to keep both)")
        return None

    def load_predictor(self) -> ExpressionPredictor:
        path = self.path / PREDICTOR
        if not path.exists():
            raise DataError(path, "-", "no fitted model here; run the fit stage (make fit) first")
        if not path.is_file():
            raise DataError(path, "-", "is not a file; run the fit stage (make fit) again")
        try:
            predictor = load(path)
        except Exception as exc:  # a damaged pickle fails anywhere in the unpickler (EOFError, KeyError: 25, ...)
            line = (str(exc).strip().splitlines() or [""])[0][:160]
            reason = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
            raise DataError(path, "-", f"cannot be read ({reason}): an empty or damaged file, or one of another "
                                       "version; run the fit stage (make fit) again to write it anew") from exc
        if not isinstance(predictor, ExpressionPredictor):
            raise DataError(path, "-", f"holds a {type(predictor).__name__}, not an ExpressionPredictor")
        try:
            return migrate(predictor)
        except ValueError as exc:
            raise DataError(path, "-", str(exc)) from None

    # -- the evaluation -------------------------------------------------------------------------------------------
    def save_scores(self, scores: pd.DataFrame, gene_pearson: pd.DataFrame) -> None:
        """`scores`: one row per model; `gene_pearson`: one row per gene (index named 'gene'), a column per model."""
        with publishing(self.path / SCORES) as tmp:
            scores.to_csv(tmp, index=False)
        with publishing(self.path / GENE_PEARSON) as tmp:
            gene_pearson.to_csv(tmp)

    def save_plot(self, figure) -> Path:
        """The scores drawn. `figure`: a matplotlib Figure, or a function that draws into the (PNG) path it is
        given."""
        return self._save_figure(PLOT, figure)

    def save_maps(self, figure) -> Path:
        """Maps of expression on held-out tissue, as `save_plot` takes them."""
        return self._save_figure(MAPS, figure)

    def discard_maps(self) -> None:
        """Remove maps of an earlier fit (this one drew none), so that the folder never shows another model's."""
        (self.path / MAPS).unlink(missing_ok=True)

    def discard_figures(self) -> None:
        """Remove both figures of an earlier fit (this one drew none)."""
        (self.path / PLOT).unlink(missing_ok=True)
        self.discard_maps()

    def _save_figure(self, name: str, figure) -> Path:
        with publishing(self.path / name) as tmp:
            if hasattr(figure, "savefig"):
                figure.savefig(tmp, dpi=110)
            else:
                figure(tmp)
        return self.path / name

    # -- the encoder's weights ------------------------------------------------------------------------------------
    def copy_encoder_weights(self, file: str | Path) -> Path:
        """Copy a weights file into `encoder/` under the name the loaders look for; replaces the whole folder, so
        no weights of an earlier encoder stay beside it."""
        file = Path(file)
        canonical = "model.safetensors" if file.suffix == ".safetensors" else "pytorch_model.bin"
        with publishing_folder(self.path / ENCODER) as tmp:
            tmp.mkdir()
            shutil.copy2(file, tmp / canonical)
        return self.path / ENCODER / canonical

    def encoder_weights(self) -> Path | None:
        """The folder of the copied encoder weights, None if there is none."""
        folder = self.path / ENCODER
        return folder if folder.is_dir() else None


__all__ = ["ModelDir", "ENCODER", "GENE_PEARSON", "PLOT", "PREDICTOR", "SCORES", "SUMMARY"]
