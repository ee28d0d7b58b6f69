"""What a cache entry's identity covers, prediction's check of the settings, and processes sharing one cache."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from embed import handcrafted
from embed.encoders import load_encoder
from embed.pipeline import EmbedSettings, embed_sample, entry_attrs, patch_plans
from regress.features import FeatureSpec
from regress.predictor import ExpressionPredictor
from slidedata import locks, open_sample, open_samples
from slidedata.feature_store import (
    IDENTITY_KEYS, SAMPLE_KEYS, CacheMismatchError, FeatureStore, identity_attrs, settings_of,
)
from submission.validate import validate_submission
from submission.writer import InvalidSubmission, write_submission
from tests.conftest import FIXTURE_PATCH_SIZES, ForkedCommand

ONE_SIZE = dict(patch_sizes=(24,), chunk_nuclei=128)


def _new_entry(demo_dir, tmp_path):
    """A store holding one empty handcrafted entry of demo1 at 24 px, and the attributes it was created with."""
    sample, encoder = open_sample(demo_dir / "demo1.zarr"), load_encoder("handcrafted")
    store, settings = FeatureStore(tmp_path / "features.zarr"), EmbedSettings(**ONE_SIZE)
    nuclei = store.nuclei(sample)
    attrs = entry_attrs(encoder, patch_plans(sample, encoder, settings)["24"], sample, len(nuclei), settings,
                        sample.input_digest())
    return store, store.create_entry("demo1", attrs), attrs


def _another(value):
    """A different value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, list):
        return value + [0.5]
    return "other" if value is None else f"{value}-other"


def test_another_value_of_any_recorded_identity_key_is_another_entry(demo_dir, tmp_path):
    store, entry, attrs = _new_entry(demo_dir, tmp_path)
    recorded = entry.attrs[IDENTITY_KEYS]
    assert {"weights_sha256", "encoder_code_version", "pad_mode", "n_nuclei", "input_digest"} <= set(recorded)
    for key in recorded:
        if key == "patch_size":  # encoder and patch size name the entry's folder: another value is another entry
            assert store.create_entry("demo1", {**attrs, key: "25"}).path != entry.path
            continue
        if key == "encoder":
            assert store.create_entry("demo1", {**attrs, key: "other"}).path != entry.path
            continue
        with pytest.raises(CacheMismatchError, match=f"cached with {key}="):
            store.create_entry("demo1", {**attrs, key: _another(attrs[key])})
    assert store.create_entry("demo1", attrs).path == entry.path  # the same identity reuses it


def test_an_entry_that_records_no_or_other_identity_keys_is_refused_as_another_version(demo_dir, tmp_path):
    store, entry, attrs = _new_entry(demo_dir, tmp_path)
    trained_on = store.settings("demo1", [("handcrafted", 24)])
    del entry.group.attrs[IDENTITY_KEYS]  # as an older version wrote it
    older = "older version that did not record its identity keys.*embed again"
    with pytest.raises(CacheMismatchError, match=older):  # embed
        store.create_entry("demo1", attrs)
    with pytest.raises(CacheMismatchError, match=older):  # fit
        store.settings("demo1", [("handcrafted", 24)])
    with pytest.raises(CacheMismatchError, match=older):  # predict
        store.check_settings("demo1", trained_on)
    # A version that records one more key, even one whose value would read as None here, made another entry.
    entry.group.attrs[IDENTITY_KEYS] = attrs[IDENTITY_KEYS] + ["tissue_mask"]
    with pytest.raises(CacheMismatchError, match=r"identity_keys.*only cached: \['tissue_mask="):
        store.create_entry("demo1", attrs)


@pytest.mark.parametrize("change", ["pad_mode", "code_version"])
def test_changed_settings_or_encoder_code_never_reuse_an_entry(demo_dir, tmp_path, monkeypatch, change):
    sample = open_sample(demo_dir / "demo1.zarr")
    store, encoder = FeatureStore(tmp_path / "features.zarr"), load_encoder("handcrafted")
    embed_sample(sample, store, encoder, EmbedSettings(**ONE_SIZE, max_units=1), progress=False)
    settings = EmbedSettings(**ONE_SIZE)
    if change == "pad_mode":
        settings.pad_mode = "reflect"
    else:  # an edit of embed/handcrafted.py
        monkeypatch.setattr(handcrafted, "CODE_VERSION", "handcrafted-edited")
    with pytest.raises(CacheMismatchError, match="pad_mode" if change == "pad_mode" else "encoder_code_version"):
        embed_sample(sample, store, encoder, settings, progress=False)


def test_prediction_refuses_features_made_with_other_settings(demo_dir, embedded_cache):
    store = FeatureStore(embedded_cache)
    spec = FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES)
    trained_on = store.settings("demo1", spec.keys)
    assert trained_on == store.settings("demo2", spec.keys)  # per-sample keys (n_nuclei, digest) are left out
    store.check_settings("demo2", trained_on)

    other = {key: {**value, "stain_normalization": "macenko"} for key, value in trained_on.items()}
    predictor = ExpressionPredictor("ridge", spec, estimator=None, genes=[], feature_settings=other)
    with pytest.raises(CacheMismatchError, match="other settings than the model was trained on.*stain_normalization"):
        predictor.predict_sample(store, "demo2")


def test_settings_are_the_recorded_identity_without_the_recorded_per_sample_keys():
    attrs = {**identity_attrs({"pad_mode": "symmetric", "dim": 27}, {"n_nuclei": 500, "input_digest": "abc"}),
             "note": "not part of the identity"}
    assert attrs[SAMPLE_KEYS] == ["input_digest", "n_nuclei"]
    assert settings_of(attrs) == {"pad_mode": "symmetric", "dim": 27}


def test_stale_locks_of_dead_processes_are_reclaimed(tmp_path):
    lock = tmp_path / "unit-0.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f"{dead.pid} {__import__('socket').gethostname()} 0\n")
    assert locks.try_lock(lock)  # the dead owner's lock is taken over
    assert not locks.try_lock(lock)  # ours is live: a second claim fails
    locks.release(lock)
    assert not lock.exists()


def test_a_lock_left_by_an_earlier_process_with_our_pid_is_reclaimed(tmp_path):
    """A restarted container reuses pid and host: the killed run's lock names a live pid that is not its owner."""
    lock = tmp_path / "unit-0.lock"
    host = __import__("socket").gethostname()
    lock.write_text(f"{os.getpid()} {host} 0 1\n")  # started at tick 1: another process than this one
    assert not locks.is_held(lock) and not lock.exists()
    assert locks.try_lock(lock) and locks.is_held(lock)  # our own lock is live
    locks.release(lock)


@pytest.mark.slow
def test_two_embeds_without_shards_share_the_units(demo_dir, embedded_cache, tmp_path):
    from embed.__main__ import main as embed_main

    cache = tmp_path / "features.zarr"
    argv = ["--data", str(demo_dir / "demo2.zarr"), "--cache", str(cache), "--patch-sizes",
            *map(str, FIXTURE_PATCH_SIZES), "--chunk-nuclei", "128", "--device", "cpu"]
    runs = [ForkedCommand(embed_main, argv, tmp_path / f"run{i}.log") for i in range(2)]
    codes, outputs = zip(*(run.wait() for run in runs))
    assert codes == (0, 0), outputs
    computed = [int(o.split("computed ")[1].split(" of")[0]) for o in outputs]
    total = FeatureStore(cache).open_entry("demo2", "handcrafted", 24).n_units
    assert sum(computed) == total  # no unit computed twice, none left out
    for size in FIXTURE_PATCH_SIZES:
        np.testing.assert_array_equal(FeatureStore(cache).read_features("demo2", "handcrafted", size),
                                      FeatureStore(embedded_cache).read_features("demo2", "handcrafted", size))
    assert not list(FeatureStore(cache).locks.rglob("unit-*.lock"))  # every lock released


# -- submission files --------------------------------------------------------------------------------------------

def test_an_invalid_submission_never_reaches_the_final_path(tmp_path):
    from submission.predict import SamplePredictions

    path = tmp_path / "submission.csv"
    path.write_text("previous\n")
    predictions = [SamplePredictions("A", np.array([1, 2]), ["g1", "g2"], np.ones((2, 2)))]
    with pytest.raises(InvalidSubmission, match="missing rows"):
        write_submission(predictions, path, check=lambda written: ["missing rows: 3"])
    assert path.read_text() == "previous\n" and list(tmp_path.iterdir()) == [path]


def test_parquet_with_text_predictions_is_invalid(demo_dir, tmp_path):
    samples = open_samples(demo_dir)
    genes = samples[1].genes
    held = samples[1].groups.index[samples[1].groups != "train"].to_numpy()
    frame = pd.DataFrame({"cell_id": np.repeat(held, len(genes)), "gene": np.tile(genes, len(held)),
                          "prediction": "0.5", "sample": "demo1"})
    frame.to_parquet(tmp_path / "s.parquet")
    kinds = {p.kind for p in validate_submission(tmp_path / "s.parquet", samples[1:2])}
    assert "prediction column is not float" in kinds
    frame.assign(prediction=0.5).to_parquet(tmp_path / "ok.parquet")
    assert validate_submission(tmp_path / "ok.parquet", samples[1:2]) == []


def test_samples_embedded_with_other_settings_are_not_mixed_in_one_fit(demo_dir, tmp_path):
    from regress.source import CacheSource

    store = FeatureStore(tmp_path / "features.zarr")
    encoder = load_encoder("handcrafted")
    demo1, demo2 = (open_sample(demo_dir / f"{name}.zarr") for name in ("demo1", "demo2"))
    embed_sample(demo1, store, encoder, EmbedSettings(patch_sizes=(24,), chunk_nuclei=128), progress=False)
    embed_sample(demo2, store, encoder, EmbedSettings(patch_sizes=(24,), chunk_nuclei=128, pad_mode="constant"),
                 progress=False)
    with pytest.raises(CacheMismatchError, match="those of demo1.*pad_mode.*embed all samples alike"):
        CacheSource.open(demo_dir, store.root, FeatureSpec(patch_sizes=(24,)), progress=False)
