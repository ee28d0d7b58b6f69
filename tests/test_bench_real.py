"""The benchmarks' own logic (bench-real, bench-cell): they say so and succeed where the data is absent, and they
aggregate right."""

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


def test_the_network_role_is_filled_by_the_chosen_network_and_only_it_gets_tta():
    from types import SimpleNamespace

    chosen = bench_real.Encoders("efficientnet-lite1", tta=True)
    both = next(f for f in bench_real.FEATURE_SETS if f.name == "both")
    settings = bench_real.fit_settings(bench_real.MODES["nuclei"], both, [SimpleNamespace(microns_per_pixel=0.5)],
                                       ("ridge",), morphology=True, encoders=chosen)
    assert [(e, s.key) for e, s in settings.features.keys] == [
        ("handcrafted", "12um"), ("handcrafted", "24um"), ("handcrafted", "48um"), ("efficientnet-lite1", "48um")]
    assert settings.features.context_radius == (100.0,)  # 50 um at 0.5 um/px
    assert chosen.settings(bench_real.CNN, ("48um",), 64).tta
    assert not chosen.settings(bench_real.HANDCRAFTED, ("12um",), None).tta
    assert both.label(chosen) == "both [efficientnet-lite1 + TTA]" and both.label(bench_real.Encoders()) == "both"
    assert chosen.cache_suffix == "-tta" and bench_real.Encoders("efficientnet-lite2").cache_suffix == ""


def test_bench_cell_without_data_says_so_and_exits_0(tmp_path, capsys):
    import bench_cell

    assert bench_cell.main(["--data", str(tmp_path / "absent"), "--out", str(tmp_path / "out"), "--cnn",
                            "efficientnet-lite2", "--tta", "--ridge-criterion", "spearman"]) == 0
    assert "no Xenium crops" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
