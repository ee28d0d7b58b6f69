"""The default features (slidedata.recipe): the recipe measured on real H&E nuclei where every sample's pixel size is
known, the handcrafted features at pixel sizes where it is not; `python -m embed` and `python -m regress` without
feature options agree on them; named features win. Expected keys are written out here, not read from the recipe."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from embed.__main__ import main as embed_main
from regress.__main__ import main as fit_main
from regress.features import FeatureSpec
from regress.model_dir import ModelDir
from regress.settings import default_features
from slidedata.feature_store import FeatureStore
from slidedata.recipe import DEFAULT_FEATURES, MICRON_RECIPE
from slidedata.sample import open_sample

ROOT = Path(__file__).resolve().parents[1]
# The her2st nuclei recipe (docs/fit.md): handcrafted at 12, 24, 48 um, EfficientNet-Lite0 at 48 um, 50 um radius.
MICRON_KEYS = [("handcrafted", "12um"), ("handcrafted", "24um"), ("handcrafted", "48um"),
               ("efficientnet-lite0", "48um")]
PIXEL_KEYS = [("handcrafted", "32"), ("handcrafted", "64"), ("handcrafted", "128"), ("handcrafted", "224")]
DEMO_MICRONS_PER_PIXEL = 0.2125  # what the demo samples store


def keys(spec: FeatureSpec) -> list[tuple[str, str]]:
    return [(encoder, size.key) for encoder, size in spec.keys]


def cached_keys(cache: Path) -> set[tuple[str, str]]:
    """The complete entries of the cache."""
    entries = FeatureStore(cache, create=False).entries()
    return {(e, s) for e, s, done, units in entries[["encoder", "patch_size", "units_done", "units"]].itertuples(
        index=False) if done == units}


def saved_features(model: Path) -> FeatureSpec:
    return ModelDir(model).load_predictor().feature_spec


# -------------------------------------------------------------------------------------------- the choice, in memory

def test_the_recipe_is_the_micron_one_only_where_every_pixel_size_is_known():
    recipe, microns = DEFAULT_FEATURES.choose([0.5, 0.25, 0.3])
    assert [(e, s.key) for e, s in recipe.keys] == MICRON_KEYS
    assert microns == pytest.approx(0.3)  # the median converts the radius
    assert recipe.blocks[1].input_size == 64
    for sizes in ([0.5, None], [None], []):
        recipe, microns = DEFAULT_FEATURES.choose(sizes)
        assert [(e, s.key) for e, s in recipe.keys] == PIXEL_KEYS and microns is None


def test_the_fit_reads_the_recipes_blocks_and_neighbourhood():
    spec = default_features(MICRON_RECIPE, 0.5)
    assert keys(spec) == MICRON_KEYS
    assert (spec.encoder, [s.key for s in spec.patch_sizes]) == ("handcrafted", ["12um", "24um", "48um"])
    assert spec.context_radius == (100.0,)  # 50 um at 0.5 um/px
    pixel = default_features()  # the pixel recipe: what FitSettings() reads, as before
    assert keys(pixel) == PIXEL_KEYS and pixel.context_k == 15 and pixel.context_radius is None
    assert pixel == FeatureSpec(patch_sizes=(32, 64, 128, 224), context_k=15)
    with pytest.raises(ValueError, match="pixel size"):
        MICRON_RECIPE.context_radius_px(None)


# ---------------------------------------------------------------------------------- the stages, without flags

def without_pixel_size(src: Path, dst: Path) -> Path:
    """The sample `src` written again without its pixel size."""
    import spatialdata as sd

    from slidedata.writer import write_sample

    sample, tables = open_sample(src), sd.read_zarr(src).tables
    groups = tables["cell_id-group"].obs[["cell_id", "group"]].reset_index(drop=True)
    return write_sample(dst, np.asarray(sample.image), np.asarray(sample.mask), groups, tables["anucleus"],
                        chunk_size=256)


@pytest.mark.slow  # both stages, EfficientNet-Lite0 included
def test_a_sample_with_a_pixel_size_gets_the_recipe_and_the_fit_reads_it(small_demo_dir, tmp_path):
    data = small_demo_dir / "demo1.zarr"
    assert open_sample(data).microns_per_pixel == pytest.approx(DEMO_MICRONS_PER_PIXEL)
    cache = tmp_path / "features.zarr"
    assert embed_main(["--data", str(data), "--cache", str(cache), "--device", "cpu"]) == 0
    assert cached_keys(cache) == set(MICRON_KEYS)
    assert FeatureStore(cache, create=False).open_entry("demo1", "efficientnet-lite0", "48um").attrs[
        "input_size"] == 64
    assert fit_main(["--data", str(data), "--cache", str(cache), "--model-dir", str(tmp_path / "model"), "--models",
                     "ridge+context", "--quiet", "--no-figures"]) == 0
    spec = saved_features(tmp_path / "model")
    assert keys(spec) == MICRON_KEYS
    assert spec.context_radius == pytest.approx((50 / DEMO_MICRONS_PER_PIXEL,))  # 235.3 px


@pytest.mark.slow  # both stages
def test_a_sample_without_a_pixel_size_keeps_the_pixel_sizes_and_a_given_one_reaches_the_fit(small_demo_dir,
                                                                                             tmp_path):
    data = without_pixel_size(small_demo_dir / "demo1.zarr", tmp_path / "data" / "demo1.zarr")
    assert open_sample(data).microns_per_pixel is None
    cache = tmp_path / "pixels.zarr"
    assert embed_main(["--data", str(data), "--cache", str(cache), "--device", "cpu"]) == 0
    assert cached_keys(cache) == set(PIXEL_KEYS)
    assert fit_main(["--data", str(data), "--cache", str(cache), "--model-dir", str(tmp_path / "m1"), "--models",
                     "ridge+context", "--quiet", "--no-figures"]) == 0
    spec = saved_features(tmp_path / "m1")
    assert keys(spec) == PIXEL_KEYS and spec.context_k == 15 and spec.context_radius is None

    # Given to the embed stage only: the fit, which has no pixel-size option, finds it where the cache recorded it.
    cache = tmp_path / "microns.zarr"
    assert embed_main(["--data", str(data), "--cache", str(cache), "--device", "cpu", "--microns-per-pixel",
                       "0.25"]) == 0
    assert cached_keys(cache) == set(MICRON_KEYS)
    assert fit_main(["--data", str(data), "--cache", str(cache), "--model-dir", str(tmp_path / "m2"), "--models",
                     "ridge+context", "--quiet", "--no-figures"]) == 0
    spec = saved_features(tmp_path / "m2")
    assert keys(spec) == MICRON_KEYS and spec.context_radius == pytest.approx((200.0,))  # 50 um at 0.25 um/px


def test_named_features_win_over_the_recipe(small_demo_dir, tmp_path, capsys):
    data = small_demo_dir / "demo1.zarr"  # stores a pixel size: the defaults would be the micron recipe
    cache = tmp_path / "features.zarr"
    assert embed_main(["--data", str(data), "--cache", str(cache), "--device", "cpu", "--patch-sizes", "24"]) == 0
    assert cached_keys(cache) == {("handcrafted", "24")}
    assert fit_main(["--data", str(data), "--cache", str(cache), "--model-dir", str(tmp_path / "model"),
                     "--patch-sizes", "24", "--models", "ridge+context", "--quiet", "--no-figures"]) == 0
    spec = saved_features(tmp_path / "model")
    assert keys(spec) == [("handcrafted", "24")] and spec.context_k == 15 and spec.context_radius is None
    # An encoder named alone: that encoder only (no EfficientNet block), at the sizes FitSettings() reads.
    cache = tmp_path / "named-encoder.zarr"
    assert embed_main(["--data", str(data), "--cache", str(cache), "--device", "cpu", "--encoder",
                       "handcrafted"]) == 0
    assert cached_keys(cache) == set(PIXEL_KEYS)
    capsys.readouterr()
    with pytest.raises(SystemExit) as usage:  # a usage error: the default features' encoders bring their weights
        embed_main(["--data", str(data), "--cache", str(cache), "--weights", "w.pt"])
    assert usage.value.code == 2 and "--weights needs --encoder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- the Makefile

@pytest.mark.slow  # another process (make -n: prints the commands, runs none)
def test_the_makefile_names_no_features_unless_asked_and_the_demo_names_its_own():
    def commands(*targets: str, **variables: str) -> str:
        args = ["make", "-n", "-C", str(ROOT), *targets, "PY=python", "STAMP=", "DATA=somewhere",
                *(f"{k}={v}" for k, v in variables.items())]
        return subprocess.run(args, capture_output=True, text=True, check=True).stdout

    default = commands("embed", "fit")
    assert "--patch-sizes" not in default and "--encoder" not in default
    named = commands("embed", "fit", PATCH_SIZES="12um 24um", ENCODER="uni")
    assert named.count("--patch-sizes 12um 24um") == 2 and named.count("--encoder uni") == 2
    demo = commands("demo", DEMO_DATA="somewhere")
    assert demo.count("--patch-sizes 32 64 128 224") == 2
