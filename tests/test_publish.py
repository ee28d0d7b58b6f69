"""Every output is put in place whole (`slidedata.publish`): a writer killed mid-write (SIGTERM or SIGKILL) leaves the
previous output byte-identical, or none if there was none; what a SIGKILL leaves behind, the next publish sweeps.

Each writer runs in a forked child (the modules are imported already: no interpreter start per case) that stalls
mid-write, tells the test so through a file, and is killed there.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from slidedata import publish
from slidedata.publish import ASIDE_MARK, PARTIAL_MARK, NotPublished, publishing, publishing_folder, sweep
from tests.conftest import FORK

GENES = ["g1", "g2", "g3"]


# -- stalling a writer mid-write ----------------------------------------------------------------------------------

def _stall(ready: Path, seconds: float = 60.0) -> None:
    ready.touch()
    time.sleep(seconds)


class StallsWhenPickled:
    """An estimator whose pickling stalls (a predictor being dumped)."""

    def __init__(self, ready: Path):
        self.ready = ready

    def __reduce__(self):
        _stall(self.ready)
        return (StallsWhenPickled, (self.ready,))


class StallsWhenPrinted:
    """A value whose text stalls (a CSV or JSON being written); pickles like any object."""

    def __init__(self, ready: Path):
        self.ready = ready

    def __str__(self) -> str:
        _stall(self.ready)
        return "x"


def _stall_on(owner, method: str, ready: Path, after_calls: int = 2) -> None:
    """Patch `owner.method` (in the child only) to stall once it has been called `after_calls` times."""
    original, calls = getattr(owner, method), [0]

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == after_calls:
            _stall(ready)
        return result

    setattr(owner, method, wrapper)


# -- the outputs: where, a previous version, a new version (stalling or not), how to read it back -----------------

def _predictions(sample: str, ids, value: float):
    from submission.predict import SamplePredictions

    ids = np.asarray(ids, dtype=np.int64)
    return SamplePredictions(sample, ids, GENES, np.full((len(ids), len(GENES)), value))


def _predictor(estimator="old", embed_settings=None):
    from regress.features import FeatureSpec
    from regress.predictor import ExpressionPredictor

    return ExpressionPredictor("ridge", FeatureSpec(), estimator, GENES, embed_settings=embed_settings or {})


def _tiny_image():
    image = np.full((3, 32, 32), 200, dtype=np.uint8)
    mask = np.zeros((32, 32), dtype=np.int32)
    for cell, (y, x) in enumerate([(4, 4), (4, 20), (20, 12)], start=1):
        mask[y: y + 6, x: x + 6] = cell
    return image, mask


def _groups(group: str) -> pd.DataFrame:
    return pd.DataFrame({"cell_id": [1, 2, 3], "group": ["train", group, "test"]})


class Output:
    """One kind of output. `write(tmp_path, version, ready)`: version 'old' or 'new'; with `ready`, stall mid-write."""

    previous = True

    def target(self, tmp_path: Path) -> Path:
        raise NotImplementedError

    def write(self, tmp_path: Path, version: str, ready: Path | None) -> None:
        raise NotImplementedError

    def read(self, tmp_path: Path):
        raise NotImplementedError


class Submission(Output):
    def __init__(self, suffix: str, previous: bool):
        self.suffix, self.previous = suffix, previous

    def target(self, tmp_path):
        return tmp_path / f"submission{self.suffix}"

    def write(self, tmp_path, version, ready):
        from submission.writer import write_submission

        value = 0.25 if version == "old" else 0.75

        def blocks():
            yield _predictions("A", range(10), value)
            if ready:
                _stall(ready)  # rows of sample A are in the partial file by now
            yield _predictions("B", range(10), value)

        write_submission(blocks(), self.target(tmp_path), nuclei_per_block=4)

    def read(self, tmp_path):
        path = self.target(tmp_path)
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        assert len(frame) == 20 * len(GENES)
        return float(frame["prediction"].iloc[0])


class Predictor(Output):
    """`stall_in`: 'joblib' (while pickling the model) or 'json' (the model written, while writing its summary)."""

    def __init__(self, stall_in: str):
        self.stall_in = stall_in

    def target(self, tmp_path):
        return tmp_path / "model" / ("predictor.joblib" if self.stall_in == "joblib" else "predictor.json")

    def write(self, tmp_path, version, ready):
        from regress.model_dir import ModelDir

        estimator, settings = version, {"version": version}
        if ready and self.stall_in == "joblib":
            estimator = StallsWhenPickled(ready)
        elif ready:
            settings["stalls"] = StallsWhenPrinted(ready)
        ModelDir(tmp_path / "model").save_predictor(_predictor(estimator, settings))

    def read(self, tmp_path):
        import json

        from regress.model_dir import ModelDir

        summary = json.loads((tmp_path / "model" / "predictor.json").read_text())["embed_settings"]["version"]
        if self.stall_in == "json":
            return summary  # the model itself is new by then
        return ModelDir(tmp_path / "model").load_predictor().estimator, summary


class Scores(Output):
    def target(self, tmp_path):
        return tmp_path / "model" / "gene_pearson.csv"  # the second file: the first, scores.csv, is new by then

    def write(self, tmp_path, version, ready):
        from regress.model_dir import ModelDir

        scores = pd.DataFrame({"model": ["ridge"], "spearman_official": [0.1 if version == "old" else 0.2]})
        column = [StallsWhenPrinted(ready) if ready else version] + [version] * 2
        gene_pearson = pd.DataFrame({"ridge": column}, index=pd.Index(GENES, name="gene"))
        ModelDir(tmp_path / "model").save_scores(scores, gene_pearson)

    def read(self, tmp_path):
        return pd.read_csv(self.target(tmp_path), index_col="gene")["ridge"].tolist()


class H5ad(Output):
    def target(self, tmp_path):
        return tmp_path / "h5ad" / "A.h5ad"

    def write(self, tmp_path, version, ready):
        from submission.anndata_io import write_anndata

        if ready:
            import h5py

            _stall_on(h5py.Group, "create_dataset", ready)
        write_anndata([_predictions("A", range(5), 0.25 if version == "old" else 0.75)], tmp_path / "h5ad")

    def read(self, tmp_path):
        import anndata as ad

        return float(ad.read_h5ad(self.target(tmp_path)).X[0, 0])


class SampleZarr(Output):
    def target(self, tmp_path):
        return tmp_path / "data" / "s.zarr"

    def write(self, tmp_path, version, ready):
        from slidedata.writer import write_sample_tables_after

        image, mask = _tiny_image()

        def tables():
            if ready:
                _stall(ready)  # the images are written by now
            return _groups("validation" if version == "old" else "train"), None

        write_sample_tables_after(self.target(tmp_path), image, mask, tables, chunk_size=16)

    def read(self, tmp_path):
        from slidedata.sample import open_sample

        return open_sample(self.target(tmp_path), n_genes=None).groups.loc[2]


class FeatureGroup(Output):
    """A nuclei table of the feature store: published once (a second worker keeps the first one's)."""

    previous = False

    def target(self, tmp_path):
        return tmp_path / "features.zarr" / "s" / "nuclei"

    def write(self, tmp_path, version, ready):
        import zarr

        from slidedata.feature_store import FeatureStore
        from slidedata.sample import open_sample

        sample = open_sample(tmp_path / "s.zarr", n_genes=None)
        table = sample.nuclei()
        if ready:
            _stall_on(zarr.Group, "create_array", ready)
        FeatureStore(tmp_path / "features.zarr").write_nuclei(sample, table)

    def read(self, tmp_path):
        from slidedata.feature_store import FeatureStore

        return FeatureStore(tmp_path / "features.zarr").read_nuclei("s")["cell_id"].tolist()


class SpatialDataTable(Output):
    def target(self, tmp_path):
        return tmp_path / "s.zarr"  # the whole sample: nothing else in it may change either

    def write(self, tmp_path, version, ready):
        import zarr

        from submission.anndata_io import add_to_spatialdata

        if ready:
            _stall_on(zarr.Group, "create_array", ready)
        add_to_spatialdata(self.target(tmp_path), _predictions("s", [1, 2, 3], 0.25 if version == "old" else 0.75))

    def read(self, tmp_path):
        import spatialdata as sd

        return float(sd.read_zarr(self.target(tmp_path)).tables["predicted_expression"].X[0, 0])


OUTPUTS = {
    "csv": Submission(".csv", previous=False), "parquet": Submission(".parquet", previous=True),
    "predictor": Predictor("joblib"), "predictor-json": Predictor("json"), "scores": Scores(), "h5ad": H5ad(),
    "sample-zarr": SampleZarr(), "feature-group": FeatureGroup(), "spatialdata-table": SpatialDataTable(),
}


@pytest.fixture(scope="module")
def tiny_sample(tmp_path_factory) -> Path:
    """A 32 x 32 px sample zarr with three nuclei: the slow thing to build, built once."""
    from slidedata.writer import write_sample

    image, mask = _tiny_image()
    return write_sample(tmp_path_factory.mktemp("tiny") / "s.zarr", image, mask, _groups("validation"),
                        chunk_size=16)


def _snapshot(path: Path) -> dict[str, bytes] | None:
    """Every byte of a file or a folder (by relative path, a killed writer's leftovers inside it aside); None if
    absent."""
    if path.is_file():
        return {"": path.read_bytes()}
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
                if p.is_file() and PARTIAL_MARK not in str(p.relative_to(path))}
    return None


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if PARTIAL_MARK in p.name or ASIDE_MARK in p.name or p.name.endswith(".tmp")]


def _run_killed(output: Output, tmp_path: Path, sig: int) -> int:
    """Run the new version's writer in a forked child, kill it once it stalls mid-write; its exit code."""
    ready = tmp_path / "ready"

    def child():
        import dask

        dask.config.set(scheduler="synchronous")  # the parent's thread pool does not survive the fork
        output.write(tmp_path / "work", "new", ready)

    process = FORK.Process(target=child)
    process.start()
    deadline = time.monotonic() + 30
    while not ready.exists() and process.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ready.exists(), f"the writer never stalled (exit code {process.exitcode})"
    os.kill(process.pid, sig)
    process.join(30)
    return process.exitcode


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
@pytest.mark.parametrize("kind", list(OUTPUTS))
def test_a_writer_killed_mid_write_leaves_the_previous_output_whole(kind, sig, tiny_sample, tmp_path):
    output, work = OUTPUTS[kind], tmp_path / "work"
    work.mkdir()
    if kind in ("feature-group", "spatialdata-table"):
        shutil.copytree(tiny_sample, work / "s.zarr")
    if output.previous:
        output.write(work, "old", None)
    before, readback = _snapshot(output.target(work)), output.read(work) if output.previous else None

    exitcode = _run_killed(output, tmp_path, sig)

    assert _snapshot(output.target(work)) == before  # byte for byte, or still absent
    if output.previous:
        assert output.read(work) == readback
    if sig == signal.SIGTERM:
        assert exitcode == 128 + signal.SIGTERM  # SystemExit raised in the writer: its cleanup ran
        assert _leftovers(work) == []
        return
    assert exitcode == -signal.SIGKILL and _leftovers(work)  # nothing ran: the partial output is still there...
    output.write(work, "new", None)
    assert _leftovers(work) == []  # ...until the next publish of the same path sweeps it
    assert output.read(work) != readback


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_folder_swap_without_exchange_killed_between_its_renames(sig, tmp_path, monkeypatch):
    """Where the system cannot exchange two folders in one step: SIGTERM waits until both renames are done (the
    new folder is in place); after SIGKILL between them, the next publish puts the old folder back first."""
    target, ready = tmp_path / "out", tmp_path / "ready"
    _write_folder(target, "old")
    monkeypatch.setattr(publish, "_exchange", lambda a, b: False)

    def child():
        rename = os.rename

        def stalling_rename(src, dst):
            rename(src, dst)
            if ASIDE_MARK in Path(dst).name:
                _stall(ready, seconds=1.0)

        publish.os.rename = stalling_rename
        with publishing_folder(target) as tmp:
            _write_folder(tmp, "new")

    process = FORK.Process(target=child)
    process.start()
    while not ready.exists() and process.is_alive():
        time.sleep(0.01)
    os.kill(process.pid, sig)
    process.join(30)
    if sig == signal.SIGTERM:
        assert process.exitcode == 128 + signal.SIGTERM and (target / "f").read_text() == "new"
        assert _leftovers(tmp_path) == []
        return
    assert not target.exists() and _leftovers(tmp_path)  # killed between the renames: the old one is aside
    with pytest.raises(RuntimeError):
        with publishing_folder(target):
            raise RuntimeError("a publish that fails still sweeps first")
    assert (target / "f").read_text() == "old" and _leftovers(tmp_path) == []


# -- the helper's other promises ----------------------------------------------------------------------------------

def _write_folder(path: Path, text: str) -> None:
    path.mkdir()
    (path / "f").write_text(text)


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_an_output_with_problems_is_deleted_and_the_target_left_alone(tmp_path, folder):
    target = tmp_path / "out"
    write, publisher = (_write_folder, publishing_folder) if folder else (Path.write_text, publishing)
    write(target, "old")
    with pytest.raises(NotPublished, match="2 problem.*bad rows"):
        with publisher(target, validate=lambda tmp: ["bad rows", "more"]) as tmp:
            write(tmp, "new")
    assert ((target / "f") if folder else target).read_text() == "old" and sorted(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_folder_is_replaced_whole(tmp_path, monkeypatch, exchange):
    target = tmp_path / "out"
    _write_folder(target, "old")
    (target / "only-in-old").write_text("x")
    if not exchange:
        monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
    with publishing_folder(target) as tmp:
        _write_folder(tmp, "new")
    assert sorted(p.name for p in target.iterdir()) == ["f"] and (target / "f").read_text() == "new"
    assert sorted(tmp_path.iterdir()) == [target]


def test_keep_existing_keeps_the_folder_published_first(tmp_path):
    target = tmp_path / "group"
    with publishing_folder(target, keep_existing=True) as tmp:
        _write_folder(tmp, "ours")
        _write_folder(target, "theirs")  # another worker got there first
    assert (target / "f").read_text() == "theirs" and sorted(tmp_path.iterdir()) == [target]


def test_sweep_leaves_live_writers_alone_and_restores_a_folder_set_aside(tmp_path):
    target, dead, live = tmp_path / "out", _dead_pid(), os.getppid()
    aside = publish.aside_path(target, pid=dead)
    _write_folder(aside, "old")  # a writer killed between the two renames of the fallback swap...
    _write_folder(publish.partial_path(target, folder=True, pid=dead), "new")
    _write_folder(publish.partial_path(target, folder=True, pid=live), "being written")
    (tmp_path / ".out.tmp").write_text("an older version's temporary name")
    sweep(target)
    assert (target / "f").read_text() == "old"  # ...gets its old folder back
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", f".out{PARTIAL_MARK}{publish.writer_tag(live)}"])
    elsewhere = tmp_path / f".out{PARTIAL_MARK}another-host-{dead}"  # a dead pid here says nothing of that host
    _write_folder(elsewhere, "another machine's work in progress")
    sweep(target)
    assert elsewhere.exists()

    _write_folder(aside, "older")  # with the target in place, a folder set aside is only deleted
    sweep(target)
    assert (target / "f").read_text() == "old" and not aside.exists()


def test_the_model_directory_writes_each_of_its_files_whole(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from regress.model_dir import ModelDir

    model = ModelDir(tmp_path / "model")
    figure = plt.figure()
    model.save_plot(figure)  # a figure (its temporary name ends in .png too: matplotlib goes by it)...
    plt.close(figure)
    assert (model.path / "scores.png").read_bytes()[:4] == b"\x89PNG"
    model.save_plot(lambda path: Path(path).write_bytes(b"\x89PNG drawn"))  # ...or whatever draws into a path
    assert (model.path / "scores.png").read_bytes() == b"\x89PNG drawn"
    for name in ("w.bin", "w.safetensors"):
        (tmp_path / name).write_bytes(name.encode())
        model.copy_encoder_weights(tmp_path / name)
    assert [p.name for p in model.encoder_weights().iterdir()] == ["model.safetensors"]  # no stale .bin beside it
    assert sorted(p.name for p in model.path.iterdir()) == ["encoder", "scores.png"]
