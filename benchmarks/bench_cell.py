"""Real single cells: leave-one-crop-out on the four Xenium pancreas crops, every family between floor and ceiling.

    python benchmarks/bench_cell.py [--data DIR] [--out outputs/bench-cell] [--feature-sets ...] [--models ...]

The crops (../shared/data/xenium-pancreas, already in the challenge's format: 377 genes, one cell per nucleus) are
embedded (resumable), and every (features, model) pair is trained on three crops and scored on the fourth, as
`make bench-real` does for her2st (same machinery, same table). Each held-out crop is also scored for
* the floor: the mean profile of the training crops (a strong one on this metric), and
* the ceiling: the expression-state oracle (`regress.metrics.expression_state_oracle`: each held-out cell gets the
  mean measured expression of its 30 nearest training cells in the principal-component space of the measured
  expression; it knows the answer, so no image model can be expected to pass it),
and every model gets the share of that headroom it captures (`headroom_share`: 0 at the floor, 1 at the ceiling).
The row `state oracle` (`regress.states.state_oracle`) is a perfect classifier into the state-space family's own
states (k-means of the training crops' expression): it shows how much of the headroom lies within the states, where
no choice of state reaches.
The row `selected` is what `make fit` would save: chosen by leave-one-crop-out among the training crops alone,
refitted on them, then scored on the held-out crop. Writes `results.csv`, `scores.png` and `maps-cell.png` under
--out. Exits 0 with a message when the data folder is absent.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared leave-one-out machinery of bench_real

from bench_real import (CNN, HANDCRAFTED, Encoders, FeatureSet, ModeConfig, ModeData,  # noqa: E402
                        add_choice_arguments, plot_scores, run_mode, summary)
from embed.pipeline import embed_dataset  # noqa: E402
from regress.metrics import cellwise_spearman, expression_state_oracle, headroom_share  # noqa: E402
from regress.plots import informative_genes, plot_maps  # noqa: E402
from regress.states import ExpressionStates, state_oracle  # noqa: E402
from slidedata.sample import open_samples  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "xenium-pancreas"
MODELS = ("mean-profile", "ridge", "ridge+context", "lightgbm+context", "states+context", "mlp-ensemble",
          "neighbour-set")
# neighbour-set is compared, not a candidate: it lost to mlp-ensemble on every crop (docs/fit.md)
SELECTION_MODELS = ("mean-profile", "ridge", "ridge+context", "states+context", "mlp-ensemble")
# A cell, its neighbours, its niche; neighbours pooled by mean and max within 15 and 30 um (DeepSets).
CELL = ModeConfig(patch_sizes={HANDCRAFTED: ("12um", "24um", "48um"), CNN: ("48um",)},
                  input_size={HANDCRAFTED: None, CNN: 64}, models=MODELS,
                  context_radius_um=(15.0, 30.0), context_pool=("mean", "max"))
FEATURE_SETS = (FeatureSet("handcrafted", (HANDCRAFTED,)), FeatureSet("efficientnet", (CNN,)),
                FeatureSet("both", (HANDCRAFTED, CNN)))
ORACLE_K, ORACLE_COMPONENTS = 30, 50
STATES = max(ExpressionStates().n_states)  # the finest states the state-space family tries


def prepare(data: Path, out: Path, roles: set[str], encoders: Encoders = Encoders()) -> ModeData:
    """Embed (resumable: a re-run reads the cache) every crop with the encoder of every role the feature sets need."""
    cache = out / f"features{encoders.cache_suffix}.zarr"
    for role in sorted(roles):
        start = time.perf_counter()
        settings = encoders.settings(role, CELL.patch_sizes[role], CELL.input_size[role])
        embed_dataset(data, cache, encoders.name(role), settings=settings, device="cpu", progress=False)
        print(f"[cell] {encoders.name(role)} embedded in {time.perf_counter() - start:.0f} s", flush=True)
    return ModeData("cell", data, cache, open_samples(data), encoders)


# Two ceilings, each built from the other crops' measured expression: the expression-state oracle (the headroom's
# top) and the state oracle (a perfect classifier into the state-space family's own states: what choosing the right
# state, and nothing finer, can reach).
ORACLES = {
    "oracle": lambda train, held: expression_state_oracle(train, held, k=ORACLE_K, n_components=ORACLE_COMPONENTS),
    "state oracle": lambda train, held: state_oracle(train, held, n_states=STATES),
}
_SCORES: dict[tuple[str, str], float] = {}  # (oracle, crop) -> its score: the same truth whatever the features


def oracle_rows(features: str, truth: dict[str, np.ndarray]) -> list[dict]:
    """Every oracle on each held-out crop (computed once per crop, whatever the feature set)."""
    rows = []
    for section, held in truth.items():
        if any((name, section) not in _SCORES for name in ORACLES):
            train = np.concatenate([t for other, t in truth.items() if other != section])
            for name, oracle in ORACLES.items():
                _SCORES[name, section] = float(cellwise_spearman(held, oracle(train, held)).mean())
        rows += [{"model": name, "section": section, "spearman": _SCORES[name, section]} for name in ORACLES]
    return rows


def with_headroom(results: pd.DataFrame) -> pd.DataFrame:
    """Each row's share of the headroom from its crop's mean profile to its crop's oracle."""
    keys = ["mode", "features", "section"]
    floor = results[results["model"] == "mean-profile"].set_index(keys)["spearman"]
    ceiling = results[results["model"] == "oracle"].set_index(keys)["spearman"]
    index = pd.MultiIndex.from_frame(results[keys])
    shares = [headroom_share(s, f, c) for s, f, c in zip(results["spearman"], floor.reindex(index),
                                                           ceiling.reindex(index))]
    return results.assign(headroom=shares)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("XENIUM_PANCREAS_DIR", DEFAULT_DATA)))
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-cell"))
    parser.add_argument("--feature-sets", nargs="+", default=[f.name for f in FEATURE_SETS],
                        choices=[f.name for f in FEATURE_SETS])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="models compared on every feature set")
    parser.add_argument("--selection-models", nargs="+", default=list(SELECTION_MODELS),
                        help="the candidates of the nested selection ('selected'), as `make fit` would try them")
    parser.add_argument("--map-section", default="XP1", help="held-out crop drawn in maps-cell.png")
    add_choice_arguments(parser, FEATURE_SETS, tta_cache="features-tta.zarr")
    args = parser.parse_args(argv)

    if not args.data.is_dir():
        print(f"bench-cell: no Xenium crops at {args.data} (set XENIUM_PANCREAS_DIR or --data); nothing to benchmark")
        return 0
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    feature_sets = tuple(f for f in FEATURE_SETS if f.name in args.feature_sets)
    args.out.mkdir(parents=True, exist_ok=True)
    data = prepare(args.data, args.out, {e for f in feature_sets for e in f.encoders}, Encoders(args.cnn, args.tta))
    results, maps = run_mode(data, feature_sets, tuple(args.models), args.selection_set, config=CELL,
                             selection_models=tuple(args.selection_models), each=oracle_rows,
                             ridge_criterion=args.ridge_criterion)
    results = with_headroom(results)
    results.to_csv(args.out / "results.csv", index=False)
    plot_scores(results[~results["model"].isin(list(ORACLES))], args.out / "scores.png", "Xenium pancreas")
    if args.map_section in maps:
        coords, truth, predictions, genes = maps[args.map_section]
        plot_maps(coords, predictions, genes, informative_genes(truth, predictions), args.out / "maps-cell.png",
                  f"held-out crop {args.map_section}: best and worst predicted genes (selected model)", truth=truth)
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 200, "display.max_rows", 500):
        print("\nper held-out crop (cell-wise Spearman; the crop is one region):")
        print(results.pivot_table(index=["features", "model"], columns="section", values="spearman",
                                  sort=False).to_string())
        print("\nshare of the headroom from the mean profile (0) to the expression-state oracle (1):")
        print(results.pivot_table(index=["features", "model"], columns="section", values="headroom",
                                  sort=False).to_string())
        shares = results.groupby(["features", "model"], sort=False)["headroom"].agg(headroom_mean="mean",
                                                                                  headroom_min="min")
        table = summary(results.drop(columns="headroom")).merge(shares.reset_index(), on=["features", "model"])
        print("\nmean over held-out crops:")
        print(table.drop(columns="mode").to_string(index=False))
        if "chosen" in results:  # absent with --selection-set none
            print("\nmodel chosen by the nested selection:")
            print(results[results["model"] == "selected"][["section", "chosen"]].to_string(index=False))
    print(f"\nbench-cell: {time.perf_counter() - start:.0f} s; results.csv, scores.png, maps-cell.png in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
