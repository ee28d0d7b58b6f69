"""The real-tissue benchmark's own logic: it must say so and succeed where the data is absent, and aggregate right."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_real  # noqa: E402


def test_bench_real_without_data_says_so_and_exits_0(tmp_path, capsys):
    assert bench_real.main(["--her2st", str(tmp_path / "absent"), "--out", str(tmp_path / "out")]) == 0
    assert "no her2st data" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_summary_gain_is_per_section_against_the_mean_profile():
    results = pd.DataFrame({
        "mode": "spot", "features": "f", "section": ["A", "B"] * 2,
        "model": ["mean-profile", "mean-profile", "ridge", "ridge"], "spearman": [0.5, 0.2, 0.6, 0.15],
        "mse": 0.0, "gene_pearson": 0.0, "gene_pearson_top50": 0.0,
    })
    row = bench_real.summary(results).set_index("model").loc["ridge"]
    assert np.isclose(row["gain_vs_mean"], (0.1 - 0.05) / 2) and row["folds_won"] == 1
